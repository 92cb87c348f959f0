"""Which fast paths this kernel grants: probed at start-up, kept in FastPaths.

Each fast path (see dataplane/io/fastpath.py for what they do) is asked of the
kernel when a device or socket is opened — an offload flag, a socket option, a
header size — and switched on only when the kernel accepts it. `FastPaths`
records which are on, why the others are off (`weft status` shows both) and the
counters of what went through them; `--offload on` turns any refusal into an
error at start-up, `WEFT_OFFLOAD_DISABLE` leaves paths off to measure each one's
gain. The egress TAP, the send path's own device, is set up in egress_tap.py.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

from dataplane.io import batch, netlink
from dataplane.io.egress_tap import remove_forwarding
from dataplane.io.segment import probe_udp_segment
from dataplane.io.tun import (
    TSO_OFFLOADS,
    TUN_F_CSUM,
    TUN_F_USO4,
    TUN_F_USO6,
    TunDevice,
    TunError,
    errno_text,
    open_tun,
    set_offload,
)

log = logging.getLogger("weft.fastpath")

TUNSETVNETLE = 0x400454DC

#: The pod device's largest GSO packet: with the 50 bytes of outer headers in
#: front, the outer IPv4 total length must stay ≤ 65535.
POD_GSO_MAX_SIZE = 65400

#: The fast paths, as `weft status` names them:
#: tso_read    TCP super-packets read from the pod device (IFF_VNET_HDR + TSO)
#: tunnel_gso  … sent through a TAP with UDP-tunnel GSO (the kernel segments, checksums)
#: uso_read    UDP super-packets read from the pod device too (TUN_F_USO4|6: the node's
#:             GRO forwarding merges a pod's small datagrams), sent on as TCP's are
#: udp_segment many datagrams to one peer in one sendmsg (UDP_SEGMENT): without
#:             tunnel_gso, the segments weft cuts from a super-packet
#: tx_batch    consecutive same-size datagrams to one peer read in one drain of the
#:             device: one UDP_SEGMENT sendmsg
#: udp_gro     UDP_GRO on the socket (many datagrams of one flow per message)
#: recvmmsg    up to 128 messages per system call (ctypes)
#: gso_write   a GRO message's TCP segments written to the device as one GSO packet
#: gso_datagrams  … and consecutive single datagrams of one TCP flow (no GRO upstream)
#: uso_write   consecutive datagrams of one inner UDP flow written as one UDP GSO packet
#: packet_gso  host-gw: super-packets (and checksums) handed whole to the AF_PACKET
#:             socket with a vnet header (dataplane/io/packet_gso.py)
PATHS = (
    "tso_read", "tunnel_gso", "uso_read", "udp_segment", "tx_batch", "udp_gro", "recvmmsg",
    "gso_write", "gso_datagrams", "uso_write", "packet_gso",
)  # fmt: skip


class FastCounters:
    """How much went through each fast path (counted per batch or per write, not per packet)."""

    __slots__ = (
        "answers_first",
        "batch_plan_declines",
        "batch_plans",
        "batched_datagrams",
        "egress_thread_switches",
        "egress_waits",
        "gro_cuts",
        "gso_datagram_writes",
        "gso_segments",
        "gso_sends",
        "gso_writes",
        "gso_written_segments",
        "mixed_runs",
        "ordered_sends",
        "rx_calls",
        "rx_messages",
        "rx_segments",
        "singles_ahead",
        "split_packets",
        "split_segments",
        "udp_segment_sends",
        "uso_sends",
        "uso_writes",
        "uso_written_segments",
    )  # fmt: skip

    def __init__(self) -> None:
        self.gso_sends = 0  # super-packets written to the egress TAP
        self.gso_segments = 0  # … and the datagrams the kernel cut them into
        self.uso_sends = 0  # UDP super-packets sent (uso_read), whole or split
        self.rx_calls = 0  # recvmmsg calls that returned messages
        self.rx_messages = 0  # messages they returned (a GRO message holds many datagrams)
        self.rx_segments = 0  # datagrams in those messages
        self.gso_writes = 0  # coalesced packets written to the device
        self.gso_written_segments = 0  # … and the segments they carried
        self.gso_datagram_writes = 0  # … of them made of single datagrams (gso_datagrams)
        self.batch_plans = 0  # recvmmsg batches of GRO messages planned at once
        self.batch_plan_declines = 0  # … and batches it left to message-by-message planning
        self.gro_cuts = 0  # coalesced writes that began or ended inside a GRO message
        self.singles_ahead = 0  # single datagrams delivered ahead of the coalesced writes
        # received before them (of other flows: gro.lone_first)
        self.answers_first = 0  # … after which the device was read before those writes
        self.split_packets = 0  # super-packets cut in userspace (no tunnel_gso)
        self.split_segments = 0  # … and the segments they made
        self.udp_segment_sends = 0  # sendmsg calls with UDP_SEGMENT (many datagrams each)
        self.batched_datagrams = 0  # tx_batch: small datagrams sent in those calls
        self.mixed_runs = 0  # tx_batch runs of several source ports: a send per port
        self.ordered_sends = 0  # --egress-thread: datagrams sent through the TAP behind
        # their flow's super-packets (EGRESS_ORDER_NS)
        self.egress_waits = 0  # --egress-thread: writes that waited for room in its queue
        self.egress_thread_switches = 0  # --egress-thread auto: the thread on or off
        self.uso_writes = 0  # UDP GSO packets written to the device
        self.uso_written_segments = 0  # … and the datagrams they carried

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


#: Comma-separated fast paths to leave off (for measuring each one's gain), e.g.
#: WEFT_OFFLOAD_DISABLE=gso_write,udp_gro.
DISABLE_ENV = "WEFT_OFFLOAD_DISABLE"


def _disabled() -> set[str]:
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


class OffloadRefused(OSError):
    """`--offload on` and the kernel refused one of the fast paths."""

    def __str__(self) -> str:  # the reason alone: "[Errno 95]" would say nothing more
        return str(self.strerror)


@dataclass
class FastPaths:
    """Which fast paths are on, and why the others are off."""

    mode: str  # auto | on
    on: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(PATHS, False))
    why_off: dict[str, str] = field(default_factory=dict)
    egress: TunDevice | None = None
    egress_mac: bytes = b""
    #: --egress-thread: the egress TAP's NAPI runs in a kernel thread (napi/gso-…)
    #: now, and what may wait for it on this queue (TUNGETSNDBUF; 0: no thread, no
    #: limit). egress_thread_mode: "on", "auto" (the thread comes and goes:
    #: dataplane/egress_thread.py) or "off".
    egress_thread: bool = False
    egress_thread_mode: str = "off"
    egress_queue_bytes: int = 0
    forward_rule: str = ""  # the TAP whose FORWARD ACCEPT rule weft added
    counters: FastCounters = field(default_factory=FastCounters)

    def refuse(self, path: str, reason: str) -> None:
        self.on[path] = False
        self.why_off[path] = reason
        if self.mode == "on":
            raise OffloadRefused(errno.EOPNOTSUPP, f"--offload on: {path}: {reason}")

    def wanted(self, path: str) -> bool:
        """False (and the reason recorded) when the path is switched off by DISABLE_ENV."""
        if path in _disabled():
            self.on[path] = False
            self.why_off[path] = f"disabled by {DISABLE_ENV}"
            return False
        return True

    def turn_off(self, path: str, reason: str) -> None:
        """A path the kernel refused while running (not at the probe): off from now on."""
        self.on[path] = False
        self.why_off[path] = reason
        log.warning("fast path %s off: %s", path, reason)

    def enable(self, path: str) -> None:
        self.on[path] = True
        self.why_off.pop(path, None)

    def status(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "on": [p for p in PATHS if self.on[p]],
            "off": dict(self.why_off),
            "egress_thread": self.egress_thread,
            "egress_thread_mode": self.egress_thread_mode,
            "egress_queue_bytes": self.egress_queue_bytes,
            "counters": self.counters.as_dict(),
        }

    def log_summary(self) -> None:
        on = [p for p in PATHS if self.on[p]]
        if on:
            log.info("fast paths on: %s", ", ".join(on))
        for path, why in self.why_off.items():
            log.info("fast path %s off: %s", path, why)
        if not on:
            log.info("fast paths: none; the plain engine (one packet per system call) runs")

    def close(self) -> None:
        if self.egress is not None:
            self.egress.close()
            self.egress = None
        if self.forward_rule:
            remove_forwarding(self.forward_rule)
            self.forward_rule = ""


def open_pod_device(
    name: str, *, tap: bool, mode: str, paths: FastPaths | None = None, multi_queue: bool = False
) -> tuple[TunDevice, FastPaths]:
    """The pod-side TUN/TAP with IFF_VNET_HDR and TSO when the kernel allows it.

    Every read and write on the returned device carries a 10-byte vnet header
    (little-endian) — whatever the probe found, since the header was asked for
    at creation. When the offloads are refused, reads are never GSO, and
    writes may still be (GSO writes need only IFF_VNET_HDR). Given `paths` (host-gw's:
    the kernel delivers what peers send), only the read side is probed, into them."""
    receives = paths is None
    if paths is None:
        paths = FastPaths(mode)
    dev = open_tun(name, tap=tap, vnet_hdr=True, multi_queue=multi_queue)
    try:
        try:
            fcntl.ioctl(dev.fileno(), TUNSETVNETLE, struct.pack("i", 1))
        except OSError as exc:
            if exc.errno != errno.EINVAL or struct.pack("=H", 1) != b"\x01\x00":
                raise TunError(exc.errno, f"TUNSETVNETLE: {errno_text(exc)}") from None
            # Kernels without TUN_VNET_LE_CROSS speak native order: little-endian here.
        if paths.wanted("tso_read"):
            try:
                set_offload(dev, TSO_OFFLOADS)
                paths.enable("tso_read")
            except TunError as exc:
                why = f"TUNSETOFFLOAD(CSUM|TSO4|TSO6) refused: {errno_text(exc)}"
                paths.refuse("tso_read", why)
        if not receives:
            return dev, paths
        paths.why_off["packet_gso"] = "host-gw only"
        if paths.wanted("gso_write"):
            paths.enable("gso_write")
        if paths.wanted("gso_datagrams"):
            if paths.on["gso_write"]:
                paths.enable("gso_datagrams")
            else:
                paths.why_off["gso_datagrams"] = "needs gso_write"
        if paths.wanted("uso_write"):
            _probe_uso(dev, paths)
    except BaseException:
        dev.close()
        raise
    return dev, paths


def _probe_uso(dev: TunDevice, paths: FastPaths) -> None:
    """UDP GSO writes (VIRTIO_NET_HDR_GSO_UDP_L4) need a kernel whose TUN knows USO
    (Linux 6.2+, which also brought TUN_F_USO4/6). Writes need no offload flag — the
    flags say what the kernel may hand to reads — so the probe only asks whether
    TUN_F_USO4|TUN_F_USO6 are known (the kernel takes them only together), and puts
    the flags back (USO reads are not handled)."""
    current = TSO_OFFLOADS if paths.on["tso_read"] else 0
    try:
        set_offload(dev, current | TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6)
    except TunError as exc:
        paths.refuse("uso_write", f"TUN without USO (Linux 6.2+): {errno_text(exc)}")
        return
    set_offload(dev, current)
    paths.enable("uso_write")


def probe_uso_read(dev: TunDevice | int, paths: FastPaths) -> None:
    """Let the pod device hand out UDP super-packets (TUN_F_USO4|TUN_F_USO6, Linux
    6.2+) wherever TCP's go: whole through the egress TAP (tunnel_gso) or host-gw's
    AF_PACKET socket (packet_gso), the kernel cutting them; else cut here
    (segment.Segmenter) and sent with UDP_SEGMENT. The kernel builds them
    only where something merged a pod's datagrams: GRO forwarding on the pod's
    veth (`ethtool -K veth gro on rx-udp-gro-forwarding on`, and a
    gro_flush_timeout: a veth's NAPI otherwise polls one packet at a time), or a
    pod sending with UDP_SEGMENT. Without them the device advertises no USO and
    the kernel cuts such packets before they reach weft."""
    if not paths.wanted("uso_read"):
        return
    if not paths.on["tso_read"]:
        paths.why_off["uso_read"] = "needs tso_read"
        return
    try:
        set_offload(dev, TSO_OFFLOADS | TUN_F_USO4 | TUN_F_USO6)
    except TunError as exc:
        paths.refuse("uso_read", f"TUN without USO (Linux 6.2+): {errno_text(exc)}")
        return
    paths.enable("uso_read")


def stop_uso_read(dev: int, paths: FastPaths, reason: str) -> None:
    """The sender refused a UDP super-packet: the device hands out no more of them
    (those already queued are dropped by the caller, counted; said once)."""
    if not paths.on["uso_read"]:
        return
    try:
        set_offload(dev, TSO_OFFLOADS)
    except TunError as exc:
        log.warning("could not switch USO off on the device: %s", exc)
    paths.turn_off("uso_read", reason)


def limit_gso_size(name: str, size: int = POD_GSO_MAX_SIZE) -> None:
    """Cap the device's GSO packets so that outer headers still fit 64 KiB."""
    from pyroute2 import IPRoute

    def fn(ipr: IPRoute) -> None:
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, gso_max_size=size)

    netlink._call(f"gso_max_size {name}", fn)


def setup_socket(paths: FastPaths, sock: socket.socket) -> None:
    if paths.wanted("udp_segment"):
        try:
            probe_udp_segment(sock)
            paths.enable("udp_segment")
        except OSError as exc:
            paths.refuse("udp_segment", f"setsockopt UDP_SEGMENT refused: {errno_text(exc)}")
    if paths.wanted("tx_batch"):
        if paths.on["udp_segment"]:
            paths.enable("tx_batch")
        else:
            paths.refuse("tx_batch", "needs udp_segment")
    if paths.wanted("recvmmsg"):
        if batch.available():
            paths.enable("recvmmsg")
        else:
            paths.refuse("recvmmsg", "libc has no recvmmsg")
    if paths.wanted("udp_gro") and paths.on["recvmmsg"]:
        try:
            batch.enable_udp_gro(sock)
            paths.enable("udp_gro")
        except OSError as exc:
            paths.refuse("udp_gro", f"setsockopt UDP_GRO refused: {errno_text(exc)}")
    elif not paths.on["recvmmsg"]:
        paths.refuse("udp_gro", "needs recvmmsg (the segment size comes in a cmsg)")
    if paths.on["uso_write"] and not paths.on["recvmmsg"]:
        # Not a refusal (--offload on still starts): the datagrams to merge come
        # from recvmmsg batches, and recvmmsg is off by choice or by libc.
        paths.on["uso_write"] = False
        paths.why_off["uso_write"] = "needs recvmmsg (it merges the datagrams of a batch)"
