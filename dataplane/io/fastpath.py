"""Fast paths: move many packets per system call, and let the kernel cut and checksum.

weft's plain engine (runner.Engine) does one read, one send per packet;
profiling showed ~9 µs of system calls per packet against ~0.15 µs of Python,
so speed comes from moving more bytes per call. Kernel features do it, each
probed at start-up and used only when the kernel accepts it:

**Send: TSO in, UDP-tunnel GSO out.** The pod-side device is opened with
IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6): the kernel hands weft whole
TCP super-packets (up to 64 KB) with a virtio_net_hdr saying how to cut them.
weft writes the outer Ethernet / IPv4 / UDP headers (and VXLAN, inner Ethernet
through the backend's encap, as for any packet) in front *once*, and writes
the frame to an egress TAP opened with the 24-byte tunnel vnet header and
TUN_F_UDP_TUNNEL_GSO(_CSUM) (Linux 6.17+). The kernel takes it as if it came
in from a NIC, routes it to the peer's public IP (ip_forward, accept_local,
rp_filter 0 on the TAP; this needs net.ipv4.conf.all.rp_filter=0 too, and
weft adds an iptables FORWARD ACCEPT rule for the TAP) and, on the way out,
segments it into MTU-sized standard VXLAN datagrams with every inner and
outer checksum filled in — the same datagrams a kernel VXLAN device sends.
Packets that are not GSO (ACKs, pings, small writes) still go through the UDP
socket; both sends run the kernel's transmit path synchronously inside the
system call, in order, so a flow is not reordered between them.

**Send fallback: TSO in, segments cut in userspace, UDP_SEGMENT out.** Without
the egress TAP (Linux < 6.17, rp_filter, or switched off) weft still reads
super-packets, cuts them itself into the segments the kernel's TCP GSO would
make (dataplane/io/segment.py, numpy over all segments at once), each with
the backend's headers in front, back to back in one buffer, and sends that
with one sendmsg carrying a UDP_SEGMENT cmsg (Linux 4.18+): the kernel cuts
the buffer into standard datagrams and fills in the outer UDP checksums. When
the kernel refuses that send (before Linux 6.11 it does when the underlay
device has no checksum offload: EIO) weft turns UDP_SEGMENT and TSO off and
sends one datagram per call (cutting in userspace without UDP_SEGMENT cost as
much as not asking for TSO at all).

**Send: small datagrams batched (tx_batch).** Within one drain of the device,
consecutive packets to one peer whose datagrams have the same size (a 64-byte
UDP flood, a run of pure ACKs) are read back to back into one buffer and sent
with one UDP_SEGMENT sendmsg; the run is flushed when the size or peer changes,
before any other send, and at the end of the drain, and the first packet of a
drain is sent at once, so nothing waits for a later packet.

**Send: UDP super-packets (uso_read).** A pod's small datagrams cost a read
each — unless something merged them on the way: with GRO forwarding on the
pod's veth (`ethtool -K <veth> gro on rx-udp-gro-forwarding on` and a
gro_flush_timeout, see control.lab.topology.Lab.udp_gro_forwarding) the kernel
glues up to 64 same-size datagrams of one flow into one UDP GSO packet, and the
pod device, with TUN_F_USO4|TUN_F_USO6 set, hands it to weft whole. It leaves
like a TCP super-packet: outer headers once, then the egress TAP with an inner
GSO type of UDP_L4, and the kernel cuts one standard datagram per pod datagram
(inner UDP checksums filled in); without the TAP weft cuts it itself, as a TCP
one (segment.py), for one UDP_SEGMENT send. A kernel whose TAP refuses it
switches it off.

**Send: one outer source port per flow (vxlan).** Each inner flow's datagrams
leave from one of `--source-ports` sockets (dataplane/io/sockets.SourcePorts),
picked by a hash of the flow (dataplane/flows.py), as the kernel's VXLAN picks
a port; the egress TAP path writes the same port into the headers it builds. A
tx_batch run whose datagrams have several ports (the ACKs of several flows) goes
as one UDP_SEGMENT send per port, each gathering its datagrams.

**Receive: UDP GRO + recvmmsg in, GSO out.** The UDP socket has UDP_GRO on:
one message can hold many same-size datagrams of one flow (the segment size
comes in a cmsg), and recvmmsg (ctypes, dataplane/io/batch.py) takes up to
128 messages per call. The consecutive TCP segments of one inner flow in GRO
messages are validated and coalesced (dataplane/io/gro.py, numpy over whole
messages) and written to the device as one super-packet with a GSO vnet
header; the kernel delivers it to the pod as its own GRO would have. Single
datagrams (no GRO upstream: e.g. a sender's outer UDP checksum 0) that carry
one TCP flow's consecutive segments in consecutive recvmmsg slots are coalesced
the same way, planned for the whole batch at once (gro.DatagramPlanner, numpy
over strided views of the slots; coalescing them in the interpreter cost more
than the writes it saved); other single datagrams go to the device one by one.
Same-size datagrams of one inner *UDP* flow go to the device as one UDP GSO
(USO) write (dataplane/io/uso.py): the kernel cuts it back into the same
datagrams at the pod's socket.

Datagrams still pass the forwarder (VXLAN header, VNI, VtepMAC, source
check); for a coalesced run the first segment decides for all, because the
rest carry the same bytes in every field the forwarder reads. ICMP errors
(no route, frag-needed for PMTU) are the forwarder's as before: a GSO packet
is judged by its first segment, whose size is what the wire would carry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dataplane.backends.base import DropReason
from dataplane.forwarder import Forwarder, Verdict
from dataplane.io import batch, netlink
from dataplane.io import uso as uso_mod
from dataplane.io.gro import Batch, Coalescer, DatagramPlanner, split_messages
from dataplane.io.idle import IdleGaps
from dataplane.io.runner import BATCH, BUFFER_SIZE, Engine
from dataplane.io.segment import (
    MAX_SEGMENTS,
    MAX_SEND_BYTES,
    Segmenter,
    complete_checksums,
    probe_udp_segment,
    segment_cmsg,
)
from dataplane.io.sockets import SourcePorts
from dataplane.io.tun import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
    TunDevice,
    TunError,
    get_sndbuf,
    open_tun,
    set_offload,
    set_sndbuf,
    set_vnet_hdr_size,
)
from dataplane.io.uso import UdpCoalescer, merged_header
from dataplane.packet.checksum import ones_complement_sum
from dataplane.packet.vnet import (
    GSO_UDP_TUNNEL_IPV4,
    VNET_HDR_LEN,
    VNET_HDR_TUNNEL_LEN,
    VNET_STRUCT,
    VNET_TUNNEL_STRUCT,
    ZERO_VNET,
    GsoType,
    VnetFlag,
    complete_checksum,
)
from dataplane.peers import Peer
from dataplane.trace import Tracer

log = logging.getLogger("weft.fastpath")

# Linux ≥ 6.17 (include/uapi/linux/if_tun.h); Debian 12's headers predate them.
TUN_F_UDP_TUNNEL_GSO = 0x080
TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100
TUNSETVNETLE = 0x400454DC

POD_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
EGRESS_OFFLOADS = POD_OFFLOADS | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM
#: The pod device's largest GSO packet: with the 50 bytes of outer headers in
#: front, the outer IPv4 total length must stay ≤ 65535.
POD_GSO_MAX_SIZE = 65400

OUTER_HLEN = 14 + 20 + 8  # Ethernet, IPv4, UDP written by weft in front of the backend's headers
RX_SLOTS = 128
#: A receive slot: the longest GRO message, and room after it to pad its last segment
#: to a jumbo frame's segment size (gro.Coalescer.plan_batch pads in place).
RX_SLOT_SIZE = batch.SLOT_SIZE + 9216
#: Batches of at least this many GRO messages are planned for all messages at once
#: (gro.Coalescer.plan_batch; measured in the lab, from two messages on it costs
#: less than plan_whole, message by message — docs/decisions.md, section 24).
BATCH_PLAN_MIN = 2
#: A batch of single datagrams is planned for coalescing (gro.DatagramPlanner, some
#: 60–120 µs of numpy) only when it has at least this many datagrams longer than
#: DATAGRAM_MIN_PAYLOAD + all headers whose length equals the one before: a stream's
#: full-size segments. Request/response traffic (a datagram or two per batch) and
#: batches of pure ACKs (a weft sender's receive side) pay a few numpy calls at most.
DATAGRAM_RUN_MIN = 4
DATAGRAM_MIN_PAYLOAD = 64
#: Work per readiness callback, so that one direction does not keep the other
#: waiting: TCP's ACKs travel the other way, and a sender whose ACKs wait for
#: a long batch stalls. recvmmsg calls per callback, and device bytes read.
RX_ROUNDS = 4
#: Segment shapes (size, header length) whose payload views _deliver_chain keeps.
MAX_PAYLOAD_VIEW_SHAPES = 4
#: --egress-thread: a TAP write returns before the kernel thread has sent the frame,
#: while a datagram sent on a socket leaves inside the call. So a flow's packets that
#: follow one of its super-packets within this long go through the TAP as well, behind
#: it, instead of overtaking it (a reordered TCP segment costs the receiver its
#: out-of-order queue and the sender duplicate ACKs, fast retransmits). 5 ms is
#: ~20 super-packets of 64 KB at 2 Gbit/s: far more than the thread's queue holds
#: while it keeps up (decisions §20).
EGRESS_ORDER_NS = 5_000_000
#: --egress-thread auto: after the thread is switched on or off, every flow's packets
#: go through the TAP for this long (FastEngine.egress_thread_switched).
EGRESS_SWITCH_NS = 20_000_000
#: --egress-thread: the TAP queue in front of the kernel thread holds two 64 KB
#: super-packets (TUNSETSNDBUF; a TAP has no bound of its own). The thread takes
#: up to 64 packets a poll and passes them all on before the CPU's backlog runs:
#: with 4 MiB queued, one poll put ~60 super-packets, 2,600 frames once cut, into
#: the next hop, and on the lab's veth underlay (a 1,000-packet backlog a CPU)
#: thousands a second were dropped there (decisions §20).
EGRESS_QUEUE_BYTES = 128 << 10
#: --egress-thread: how long a write waits for room in a full TAP queue before the
#: packet is dropped (send_failed).
EGRESS_WAIT_MS = 20
TX_BUDGET = 512 << 10

_OUTER = struct.Struct("!6s6sHBBHHHBBH4s4sHHHH")
# Plain ints for the hot loop: `int & IntFlag` goes through enum.Flag.__rand__,
# which showed up at 3–7 % of the send loop's profile.
_NEEDS_CSUM = int(VnetFlag.NEEDS_CSUM)
#: The egress TAP's header flags, as a plain int: `Flag | Flag` goes through
#: enum.Flag.__or__ (~1 µs, per super-packet sent).
_TUNNEL_CSUM_FLAGS = int(VnetFlag.NEEDS_CSUM | VnetFlag.UDP_TUNNEL_CSUM)
_GSO_NONE = int(GsoType.NONE)
_GSO_UDP_L4 = int(GsoType.UDP_L4)
_SEND = int(Verdict.SEND)
_REPLY = int(Verdict.REPLY)
#: sendmsg errors that say the buffer was full (drop, try the next), not that the
#: kernel refuses UDP_SEGMENT sends.
_TRANSIENT = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM})
_U16 = struct.Struct("!H")

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


def _errtext(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{name}: {exc.strerror or exc}"


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
                raise TunError(exc.errno, f"TUNSETVNETLE: {_errtext(exc)}") from None
            # Kernels without TUN_VNET_LE_CROSS speak native order: little-endian here.
        if paths.wanted("tso_read"):
            try:
                set_offload(dev, POD_OFFLOADS)
                paths.enable("tso_read")
            except TunError as exc:
                paths.refuse("tso_read", f"TUNSETOFFLOAD(CSUM|TSO4|TSO6) refused: {_errtext(exc)}")
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
    current = POD_OFFLOADS if paths.on["tso_read"] else 0
    try:
        set_offload(dev, current | TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6)
    except TunError as exc:
        paths.refuse("uso_write", f"TUN without USO (Linux 6.2+): {_errtext(exc)}")
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
        set_offload(dev, POD_OFFLOADS | TUN_F_USO4 | TUN_F_USO6)
    except TunError as exc:
        paths.refuse("uso_read", f"TUN without USO (Linux 6.2+): {_errtext(exc)}")
        return
    paths.enable("uso_read")


def stop_uso_read(dev: int, paths: FastPaths, reason: str) -> None:
    """The sender refused a UDP super-packet: the device hands out no more of them
    (those already queued are dropped by the caller, counted; said once)."""
    if not paths.on["uso_read"]:
        return
    try:
        set_offload(dev, POD_OFFLOADS)
    except TunError as exc:
        log.warning("could not switch USO off on the device: %s", exc)
    paths.turn_off("uso_read", reason)


def gso_l4(buf: bytearray | memoryview, l4: int, gso_type: int) -> tuple[int, int]:
    """(header length, checksum field offset) of a super-packet's transport header
    at buf[l4:]: UDP's for a UDP super-packet (USO), else TCP's."""
    if gso_type == _GSO_UDP_L4:
        return 8, 6
    return (buf[l4 + 12] >> 4) << 2, 16


def limit_gso_size(name: str, size: int = POD_GSO_MAX_SIZE) -> None:
    """Cap the device's GSO packets so that outer headers still fit 64 KiB."""
    from pyroute2 import IPRoute

    def fn(ipr: IPRoute) -> None:
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, gso_max_size=size)

    netlink._call(f"gso_max_size {name}", fn)


def egress_name(device_name: str) -> str:
    """The egress TAP's name: gso-weft.1 beside weft.1 (IFNAMSIZ allows 15 bytes)."""
    return f"gso-{device_name}"[:15]


def open_egress_tap(
    paths: FastPaths,
    device_name: str,
    *,
    multi_queue: bool = False,
    attach: bool = False,
    thread: str = "off",
) -> None:
    """The TAP weft writes tunnel-GSO frames into; on success paths.egress is set.

    With `attach` (a queue worker, dataplane/io/queues.py) the TAP exists already,
    made and configured by queue 0: this opens one more of its queues and leaves
    its sysctls, link state and FORWARD rule to their owner.

    With `thread` "on" (--egress-thread) the TAP is opened with IFF_NAPI and made
    `threaded`: a write only queues the frame, and a kernel thread segments and
    forwards it while weft reads on (decisions §20); paths.egress_thread says
    whether that took. With "auto" (one queue only) it is opened with IFF_NAPI and
    left unthreaded, for the owner to switch (switch_egress_thread, §23); until
    then the kernel's NAPI poll runs inside each write, as without IFF_NAPI."""
    if thread == "auto" and (multi_queue or attach):
        thread = "off"  # one switch for the whole device: not decided per queue
    name = egress_name(device_name)
    if not paths.wanted("tunnel_gso"):
        return
    if attach and not os.path.exists(f"/sys/class/net/{name}"):
        paths.refuse("tunnel_gso", f"queue 0 has no egress TAP {name}")
        return
    rp_filter = _sysctl_int("net/ipv4/conf/all/rp_filter")
    if rp_filter and not attach:
        # A device's effective rp_filter is max(all, device), and in either mode the
        # kernel drops frames from our own address coming in on a TAP that has no
        # IPv4 address (fib_validate_source: no_addr → last_resort → e_rpf).
        paths.refuse(
            "tunnel_gso",
            f"net.ipv4.conf.all.rp_filter={rp_filter} would drop the TAP's frames "
            "(the send fast path needs 0)",
        )
        return
    tap = _open_egress_queue(paths, name, multi_queue or attach, napi=thread != "off")
    if tap is None:
        return
    try:
        if not attach:
            _configure_egress_tap(name)
        paths.egress_mac = netlink.link_mac(name)
        if thread == "on":
            paths.egress_thread = _napi_threaded(name) if attach else _thread_napi(name)
            paths.egress_thread_mode = "on" if paths.egress_thread else "off"
        elif thread == "auto":
            paths.egress_thread_mode = "auto"
    except OSError as exc:
        tap.close()
        paths.refuse("tunnel_gso", f"cannot configure TAP {name}: {_errtext(exc)}")
        return
    paths.egress = tap
    paths.enable("tunnel_gso")
    if attach:
        return
    err = allow_forwarding(name)
    if err is None:
        paths.forward_rule = name
    elif err:
        log.warning(
            "could not add `iptables -I FORWARD -i %s -j ACCEPT` (%s): a FORWARD policy of "
            "DROP would drop the fast path's datagrams",
            name,
            err,
        )


def _configure_egress_tap(name: str) -> None:
    for key, value in (("disable_ipv6", 1),):
        with contextlib.suppress(OSError):  # IPv6 may be off altogether
            netlink.sysctl_set(f"net/ipv6/conf/{name}/{key}", value)
    for key, value in (("accept_local", 1), ("rp_filter", 0), ("forwarding", 1)):
        netlink.sysctl_set(f"net/ipv4/conf/{name}/{key}", value)
    netlink.set_link(name, up=True)


def _write_threaded(name: str, on: bool) -> None:
    """The TAP's NAPI polled by a kernel thread (`napi/<name>-N`; on) or inside
    weft's writes: sysfs `threaded`, Linux 5.12+. OSError when refused."""
    with open(f"/sys/class/net/{name}/threaded", "w") as f:
        f.write("1" if on else "0")


def _thread_napi(name: str) -> bool:
    """Have a kernel thread poll the TAP's NAPI, not weft's writes. False, said once,
    when the kernel refuses."""
    try:
        _write_threaded(name, True)
    except OSError as exc:
        log.warning(
            "--egress-thread: cannot write 1 to /sys/class/net/%s/threaded (%s): the "
            "kernel's work behind egress writes stays inside them",
            name,
            _errtext(exc),
        )
        return False
    return True


def switch_egress_thread(paths: FastPaths, name: str, on: bool) -> bool:
    """--egress-thread auto: the TAP's NAPI into its kernel thread (on) or back into
    weft's writes. False, said once and auto given up, when the kernel refuses."""
    try:
        _write_threaded(name, on)
    except OSError as exc:
        log.warning(
            "--egress-thread auto: cannot write %d to /sys/class/net/%s/threaded (%s): "
            "the thread stays %s",
            on,
            name,
            _errtext(exc),
            "on" if paths.egress_thread else "off",
        )
        paths.egress_thread_mode = "on" if paths.egress_thread else "off"
        return False
    paths.egress_thread = on
    paths.counters.egress_thread_switches += 1
    return True


def _napi_threaded(name: str) -> bool:
    """Queue 0 made the TAP's NAPI threaded (a worker attaching to its queue)?"""
    try:
        with open(f"/sys/class/net/{name}/threaded") as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


def _open_egress_queue(
    paths: FastPaths, name: str, multi_queue: bool, *, napi: bool = False
) -> TunDevice | None:
    try:
        tap = open_tun(name, tap=True, vnet_hdr=True, multi_queue=multi_queue, napi=napi)
    except TunError as exc:
        paths.refuse("tunnel_gso", f"cannot open TAP {name}: {_errtext(exc)}")
        return None
    try:
        set_vnet_hdr_size(tap, VNET_HDR_TUNNEL_LEN)
        set_offload(tap, EGRESS_OFFLOADS)
        if napi:
            # What weft writes now waits in a queue for the kernel thread, and a TAP
            # queue has no limit of its own: bound it (EGRESS_QUEUE_BYTES; a full
            # queue refuses the write, EAGAIN, and weft waits for room).
            set_sndbuf(tap, EGRESS_QUEUE_BYTES)
            paths.egress_queue_bytes = get_sndbuf(tap)
    except TunError as exc:
        tap.close()
        paths.refuse(
            "tunnel_gso",
            f"TAP refused TUN_F_UDP_TUNNEL_GSO (Linux 6.17+): {_errtext(exc)}",
        )
        return None
    return tap


def _iptables(*args: str) -> subprocess.CompletedProcess[str] | None:
    binary = shutil.which("iptables")
    if binary is None:
        return None
    return subprocess.run([binary, "-w", "5", *args], capture_output=True, text=True, timeout=30)


def allow_forwarding(tap: str) -> str | None:
    """Accept what the egress TAP forwards, ahead of the FORWARD chain's rules.

    The kernel *forwards* the GSO frames (they come in on the TAP), so a FORWARD
    policy of DROP — Docker sets one — would drop them, as it would drop pod
    traffic if flanneld did not add its own ACCEPT rules. Only weft writes to the
    TAP. Returns None when the rule is in place, "" when there is no iptables,
    else the error."""
    rule = ("FORWARD", "-i", tap, "-j", "ACCEPT")
    check = _iptables("-C", *rule)
    if check is None:
        return ""
    if check.returncode == 0:
        return None
    insert = _iptables("-I", *rule)
    if insert is not None and insert.returncode == 0:
        return None
    return (insert.stderr if insert is not None else "").strip() or "iptables failed"


def remove_forwarding(tap: str) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        _iptables("-D", "FORWARD", "-i", tap, "-j", "ACCEPT")


def _sysctl_int(path: str) -> int | None:
    try:
        return int(netlink.sysctl_get(path))
    except (OSError, ValueError):
        return None


def setup_socket(paths: FastPaths, sock: socket.socket) -> None:
    if paths.wanted("udp_segment"):
        try:
            probe_udp_segment(sock)
            paths.enable("udp_segment")
        except OSError as exc:
            paths.refuse("udp_segment", f"setsockopt UDP_SEGMENT refused: {_errtext(exc)}")
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
            paths.refuse("udp_gro", f"setsockopt UDP_GRO refused: {_errtext(exc)}")
    elif not paths.on["recvmmsg"]:
        paths.refuse("udp_gro", "needs recvmmsg (the segment size comes in a cmsg)")
    if paths.on["uso_write"] and not paths.on["recvmmsg"]:
        # Not a refusal (--offload on still starts): the datagrams to merge come
        # from recvmmsg batches, and recvmmsg is off by choice or by libc.
        paths.on["uso_write"] = False
        paths.why_off["uso_write"] = "needs recvmmsg (it merges the datagrams of a batch)"


# -- the engine ---------------------------------------------------------------------


class FastEngine(Engine):
    """Engine whose device has a vnet header; uses whichever fast paths are on."""

    def __init__(
        self,
        forwarder: Forwarder,
        device_fd: int,
        sock: socket.socket,
        paths: FastPaths,
        *,
        public_ip: str,
        underlay_mac: bytes,
        port: int,
    ) -> None:
        super().__init__(forwarder, device_fd, sock)
        self.paths = paths
        # A run of datagrams (tx_batch) starts at _base; every packet is read
        # `headroom` bytes after where the previous datagram ended, with room in
        # front of the first for the egress TAP's headers, and room for a whole
        # super-packet after the longest run.
        self._base = VNET_HDR_TUNNEL_LEN + OUTER_HLEN
        head = self._base + forwarder.headroom
        self._tx_buf = bytearray(head + MAX_SEND_BYTES + BUFFER_SIZE)
        self._tx_view = memoryview(self._tx_buf)
        self._tx_vnet = bytearray(VNET_HDR_LEN)
        self._tx_iov = [self._tx_vnet, self._tx_view[head : head + BUFFER_SIZE]]
        self._iov_at = head
        self._egress_fd = paths.egress.fileno() if paths.egress is not None else -1
        # While the kernel thread sends, writes wait in the TAP's queue for it: a
        # flow's lone packets follow its super-packets through the TAP
        # (EGRESS_ORDER_NS), and a full queue is waited on. (--egress-thread auto
        # switches it: egress_thread_switched; meanwhile the TAP's NAPI runs inside
        # each write, nothing waits, and nothing can be overtaken.)
        self._egress_thread = paths.egress_thread and self._egress_fd >= 0
        self._ordered_until = 0  # … and for a while after a switch, whatever it was
        self._egress_poll = select.poll()
        if self._egress_fd >= 0 and paths.egress_thread_mode != "off":
            self._egress_poll.register(self._egress_fd, select.POLLOUT)
        # --egress-thread: per source port (a hash of the inner flow), when that port's
        # last super-packet went to the TAP (EGRESS_ORDER_NS)
        self._tap_at = [0]
        self._egress_mac = paths.egress_mac
        self._underlay_mac = underlay_mac
        self._src = socket.inet_aton(public_ip)
        self._port = port
        self._source_port_numbers = [port]
        self._run_ports = [0] * (MAX_SEGMENTS + 1)  # each datagram's port, in a tx_batch run
        self._ip_id = 0
        self._outer: dict[tuple[str, int], tuple[int, int, bytes]] = {}
        # Without the egress TAP, super-packets are cut here (dataplane/io/segment.py).
        self._segmenter = Segmenter() if paths.on["tso_read"] and self._egress_fd < 0 else None
        l2 = forwarder.l2
        # Where the inner IP header sits in a received datagram (vxlan: after the
        # VXLAN header and inner Ethernet; udp: at once) and in what weft writes.
        backend = forwarder.backend
        self._ip_off = 22 if backend.name == "vxlan" else 0
        self._l2 = l2
        # receive
        self._rx: batch.MmsgReceiver | None = None
        self._coalescer: Coalescer | None = None
        self._planner: DatagramPlanner | None = None
        if paths.on["recvmmsg"]:
            # Datagrams land so that the inner TCP checksum range (from the inner IP
            # addresses on) is 4-byte aligned: see gro.Coalescer._tcp_sums_ok.
            shift = -(self._ip_off + 12) % 4
            self._rx = batch.MmsgReceiver(RX_SLOTS, RX_SLOT_SIZE, shift=shift)
            if paths.on["gso_write"]:
                self._coalescer = Coalescer(self._rx.buf, self._ip_off)
                if paths.on["gso_datagrams"]:
                    self._planner = DatagramPlanner(self._rx.buf, self._ip_off)
        self._uso: UdpCoalescer | None = None
        if self._rx is not None and paths.on["uso_write"]:
            # Runs of up to 128 datagrams (UDP_MAX_SEGMENTS on Linux 6.x); the first
            # EINVAL for a longer run than older kernels take brings it down to 64.
            self._uso = UdpCoalescer(
                self._rx.buf, self._ip_off, max_segments=uso_mod.MAX_SEGMENTS_6X
            )
        self._rx_view = memoryview(self._rx.buf) if self._rx is not None else None
        self._rx_u8 = np.frombuffer(self._rx.buf, np.uint8) if self._rx is not None else None
        # (segment size, header length) → per receive slot, views of the payloads
        # of the first segments of a GRO message there, as many as one has needed
        # (_deliver_chain).
        self._payload_views: dict[tuple[int, int], list[list[memoryview]]] = {}
        self._gso_write_failed = False
        self._uso_write_failed = False
        # When each side's last callback ended, and whether it took a lone packet.
        self._gaps = IdleGaps()
        self._fc = paths.counters
        self.on_first_error: Callable[[str], None] | None = None

    def use_source_ports(self, ports: SourcePorts | None) -> None:
        super().use_source_ports(ports)
        # The egress TAP path writes the outer UDP header itself: the same port.
        self._source_port_numbers = list(ports.ports) if ports is not None else [self._port]
        self._tap_at = [0] * len(self._source_port_numbers)

    def egress_thread_switched(self, on: bool) -> None:
        """The TAP's NAPI just moved into (`on`) or out of its kernel thread
        (--egress-thread auto): for EGRESS_SWITCH_NS every flow's packets go through
        the TAP, behind whatever the switch left queued (a thread just started may be
        slow to run, and one stopping hands its last packets back)."""
        now = time.monotonic_ns()
        self._egress_thread = on and self._egress_fd >= 0
        self._ordered_until = now + EGRESS_SWITCH_NS
        self._tap_at = [now + EGRESS_SWITCH_NS - EGRESS_ORDER_NS] * len(self._tap_at)

    def _tap_queues(self, now: int) -> bool:
        """May what weft writes to the TAP wait in its queue (a thread sends it), so
        that a flow's packets must follow their super-packets there?"""
        return self._egress_thread or now < self._ordered_until

    def start(self, loop) -> None:  # type: ignore[no-untyped-def]
        super().start(loop)
        if self._egress_fd >= 0:
            loop.add_reader(self._egress_fd, self._drain_egress)

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._egress_fd >= 0:
            loop.remove_reader(self._egress_fd)
        super().stop()

    def _drain_egress(self) -> None:
        # The kernel may queue frames to the TAP (it is an interface like any
        # other); nothing should go there, and nothing read there matters.
        for _ in range(BATCH):
            try:
                os.read(self._egress_fd, 65536)
            except OSError:
                return

    # -- device → network ----------------------------------------------------------

    def _outer_for(self, peer_ip: str, peer_port: int) -> tuple[int, int, bytes]:
        """(IPv4 header word sum without length and ID, UDP pseudo-header sum without
        length, dst address) for a peer; cached."""
        key = (peer_ip, peer_port)
        got = self._outer.get(key)
        if got is None:
            dst = socket.inet_aton(peer_ip)
            words = (
                0x4500 + 0x4000 + (65 << 8 | 17)
                + int.from_bytes(self._src[:2], "big") + int.from_bytes(self._src[2:], "big")
                + int.from_bytes(dst[:2], "big") + int.from_bytes(dst[2:], "big")
            )  # fmt: skip
            pseudo = words - 0x4500 - 0x4000 - (65 << 8)  # addresses + protocol 17
            got = self._outer[key] = (words, pseudo, dst)
            if len(self._outer) > 4096:
                self._outer.clear()
                self._outer[key] = got
        return got

    def _on_device(self) -> None:
        fwd = self.forwarder
        buf = self._tx_buf
        view = self._tx_view
        headroom = fwd.headroom
        fd = self.device_fd
        readv = os.readv
        writev = os.writev
        iov = self._tx_iov
        vnet = self._tx_vnet
        unpack_vnet = VNET_STRUCT.unpack_from
        egress = self._egress_fd
        # Super-packets leave through the TAP (the kernel cuts them) or are cut here.
        gso_out = egress >= 0 or self._segmenter is not None
        # One outer source port per inner flow (vxlan: sockets.SourcePorts), or all
        # from the listening socket (udp, or --source-ports 0).
        ports = self.source_ports
        sendtos = self._sendtos
        ip_at = 14 if self._l2 else 0  # the inner IP header, from `head`
        idx = 0
        drops = fwd.counters.drops
        l2 = self._l2
        tracer = self.tracer if self.tracer is not None and self.tracer.active else None
        if tracer is not None:
            tracer.start_batch()
        # tx_batch: each packet is read right behind the previous datagram (its
        # backend headers land where that one ended), so a run of same-size
        # datagrams to one peer is one buffer for one UDP_SEGMENT sendmsg.
        # `base` is where the run starts, `pos` where it ends (the next datagram
        # starts); a run is sent when the size or peer changes, before any other
        # send, and at the end of the drain, so no packet waits for a later one
        # (but the last of a run waits for the next read: hence the first packet
        # of a drain is sent at once, see below).
        batching = self.paths.on["tx_batch"]
        now = time.monotonic_ns()
        idle = self._gaps.device_idle(now)
        lone = False
        ordered = self._tap_queues(now)  # EGRESS_ORDER_NS
        tap_at = self._tap_at
        # Checksums the pod left to offload (NEEDS_CSUM) are completed for a whole
        # run at once when it is sent (segment.complete_checksums): `run_csum` is
        # the run's (start, offset), -1 when its datagrams need none. Not while
        # tracing, which shows packets as they leave.
        defer = batching and tracer is None
        base = pos = self._base
        run_peer: Peer | None = None
        run_size = run_count = 0
        run_csum = -1
        # A run's datagrams may belong to flows with different source ports (the
        # ACKs of several flows, say): each one's port is noted here, and _send_run
        # sends the run as one UDP_SEGMENT send per port, not cut at every change.
        run_ports = self._run_ports
        budget = TX_BUDGET
        got = 0
        for _ in range(BATCH):
            if budget <= 0:
                break
            head = pos + headroom
            if head != self._iov_at:
                iov[1] = view[head : head + BUFFER_SIZE]
                self._iov_at = head
            try:
                n = readv(fd, iov) - VNET_HDR_LEN
            except BlockingIOError:
                break
            except OSError:
                break
            got += 1
            if n <= 0:
                continue
            budget -= n
            end = head + n
            flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = unpack_vnet(vnet)
            if gso_type != _GSO_NONE and gso_out:
                # A TCP (or UDP: uso_read) super-packet: the forwarder judges its first
                # segment (route, size against the path MTU, encapsulation in front).
                l4 = head + csum_start
                seg_end = l4 + gso_l4(buf, l4, gso_type)[0] + gso_size
                if seg_end < end:
                    if run_count:
                        self._send_run(base, pos, run_size, run_count, run_peer, run_csum)
                        run_count = 0
                        pos = base  # (the packet stays where it is: headers go in front)
                    verdict = fwd.from_device(buf, head, seg_end)
                    if tracer is not None:
                        tracer.from_device(buf, head, seg_end, verdict, fwd)
                    if verdict == _SEND:
                        if ports is not None:
                            idx = ports.index(buf, head + ip_at, seg_end)
                        if egress >= 0:
                            self._send_gso(
                                fwd, head, end, seg_end, gso_type, gso_size, csum_start, idx
                            )
                            if ordered:
                                tap_at[idx] = now
                        else:
                            self._send_split(
                                fwd, head, end, seg_end, gso_type, gso_size, csum_start, idx
                            )
                    elif verdict == _REPLY:
                        try:
                            writev(fd, [ZERO_VNET, fwd.reply])
                        except OSError:
                            drops[DropReason.WRITE_FAILED] += 1
                    continue
            csum = -1
            if flags & _NEEDS_CSUM:
                if defer and got > 1 and gso_type == _GSO_NONE:
                    if csum_start + csum_offset + 2 > n:
                        drops[DropReason.TRUNCATED] += 1
                        continue
                    csum = csum_start << 16 | csum_offset  # completed with its run
                else:
                    try:
                        complete_checksum(view[head:end], csum_start, csum_offset)
                    except ValueError:
                        drops[DropReason.TRUNCATED] += 1
                        continue
            if gso_type != _GSO_NONE and end > head + (fwd.max_inner + (14 if l2 else 0)):
                # A GSO packet and no way to send it segmented: never happens,
                # since TSO is only asked for when super-packets can be sent.
                drops[DropReason.TOO_BIG] += 1
                continue
            verdict = fwd.from_device(buf, head, end)
            if tracer is not None:
                tracer.from_device(buf, head, end, verdict, fwd)
            if verdict == _SEND:
                peer = fwd.out_peer
                if ports is not None:
                    idx = ports.index(buf, head + ip_at, end)
                if ordered and now - tap_at[idx] < EGRESS_ORDER_NS:
                    # Behind its flow's super-packets, which the kernel thread may
                    # not have sent yet.
                    if run_count:
                        self._send_run(base, pos, run_size, run_count, run_peer, run_csum)
                        run_count = 0
                        pos = base  # (the packet stays where it is: headers go in front)
                    if csum >= 0:
                        complete_checksum(view[head:end], csum >> 16, csum & 0xFFFF)
                    self._send_tap_one(fwd, end, idx)
                    continue
                if not batching or got == 1:
                    # The first packet of a drain goes out at once: a lone packet
                    # (ping, a request) must not wait for the read that finds the
                    # device empty. Runs start with the second.
                    try:
                        sendtos[idx](view[fwd.out_start : end], peer.sockaddr)  # type: ignore[union-attr]
                    except OSError:
                        drops[DropReason.SEND_FAILED] += 1
                    if idle:
                        lone = True
                        break  # a lone packet after a gap (idle.IdleGaps)
                    continue
                # The datagram is buf[pos:end]: encap wrote `headroom` bytes in front.
                size = end - pos
                if run_count:
                    if peer is run_peer and size <= run_size and csum == run_csum:
                        run_ports[run_count] = idx
                        run_count += 1
                        pos = end
                        if (
                            size < run_size  # a shorter one ends a run
                            or run_count == MAX_SEGMENTS
                            or pos - base + run_size > MAX_SEND_BYTES
                        ):
                            self._send_run(base, pos, run_size, run_count, run_peer, run_csum)
                            run_count = 0
                            pos = base
                        continue
                    # Another peer, a bigger datagram or other checksum offsets: send
                    # the run, move this one to the front of the buffer and start the
                    # next run with it.
                    self._send_run(base, pos, run_size, run_count, run_peer, run_csum)
                    view[base : base + size] = view[pos:end]  # memmove: may overlap
                    pos, end = base, base + size
                run_peer, run_size, run_count, run_csum = peer, size, 1, csum
                run_ports[0] = idx
                pos = end
            elif verdict == _REPLY:
                if run_count:
                    self._send_run(base, pos, run_size, run_count, run_peer, run_csum)
                    run_count = 0
                    pos = base
                try:
                    writev(fd, [ZERO_VNET, fwd.reply])
                except OSError:
                    drops[DropReason.WRITE_FAILED] += 1
        if run_count:
            self._send_run(base, pos, run_size, run_count, run_peer, run_csum)
        self.count_batch(0, got)
        if self.after_batch is not None:
            self.after_batch()
        self._gaps.device_done(time.monotonic_ns(), lone)

    def _send_run(
        self, base: int, pos: int, size: int, count: int, peer: Peer | None, csum: int
    ) -> None:
        """buf[base:pos]: `count` datagrams of `size` bytes (the last may be shorter) to
        peer, each from the source socket _run_ports gives it; `csum` ≥ 0: their inner
        checksums are still to complete, from csum >> 16 bytes into the inner packet,
        the field csum & 0xFFFF bytes after that."""
        assert peer is not None
        if csum >= 0:
            at = self.forwarder.headroom  # the inner packet, in each datagram
            complete_checksums(
                self._tx_buf, base, size, count, pos, at + (csum >> 16), csum & 0xFFFF
            )
        view, addr = self._tx_view, peer.sockaddr
        # (tx_batch may go off in the middle of a drain)
        ports = self._run_ports
        first = ports[0]
        if ports[:count].count(first) == count:  # one port: the common case
            sent = self._send_datagrams([view[base:pos]], size, count, addr, "tx_batch", first)
        else:
            # One send per port, each gathering its datagrams (a flow keeps its order;
            # flows on different ports may leave in another order than they came).
            groups: dict[int, list[memoryview]] = {}
            for i in range(count):
                off = base + i * size
                groups.setdefault(ports[i], []).append(view[off : min(off + size, pos)])
            sent = 0
            self._fc.mixed_runs += 1
            for port, pieces in groups.items():
                sent += self._send_datagrams(pieces, size, len(pieces), addr, "tx_batch", port)
        self._fc.batched_datagrams += sent

    def _send_datagrams(
        self,
        iov: list[memoryview],
        size: int,
        count: int,
        addr: tuple[str, int],
        path: str,
        idx: int,
    ) -> int:
        """The buffers in `iov`, back to back: `count` datagrams of `size` bytes (the
        last may be shorter) to addr from source socket `idx`, with one UDP_SEGMENT
        sendmsg while `path` is on, else one sendto each. Returns how many went out in
        that one sendmsg (0: none did)."""
        sock = self._send_socks[idx]
        drops = self.forwarder.counters.drops
        if count > 1 and self.paths.on[path]:
            try:
                sock.sendmsg(iov, segment_cmsg(size), 0, addr)
                self._fc.udp_segment_sends += 1
                return count
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    drops[DropReason.SEND_FAILED] += count
                    return 0
                if exc.errno != errno.EMSGSIZE:
                    self._udp_segment_refused(exc)
                # EMSGSIZE: the route's MTU is below the segments; sendto
                # fragments them as the kernel's VXLAN device would.
        for piece in iov:
            for off in range(0, len(piece), size):
                try:
                    sock.sendto(piece[off : off + size], addr)
                except OSError:
                    drops[DropReason.SEND_FAILED] += 1
        return 0

    def _put_outer(self, fwd: Forwarder, end: int, idx: int, datagrams: int) -> int:
        """Outer Ethernet, IPv4 and UDP headers in front of buf[out_start:end] for the
        egress TAP, the UDP checksum field holding the pseudo-header sum (the kernel
        completes it); `datagrams` IP IDs are used. Returns where the frame starts, -1
        (counted) when it is too long for one IP packet."""
        out_start = fwd.out_start
        peer = fwd.out_peer
        assert peer is not None
        frame = out_start - OUTER_HLEN
        ip_len = end - frame - 14
        if ip_len > 0xFFFF:
            fwd.counters.drops[DropReason.TOO_BIG] += 1
            return -1
        words, pseudo, dst = self._outer_for(*peer.sockaddr)
        ip_id = self._ip_id
        csum = words + ip_len + ip_id
        csum = (csum & 0xFFFF) + (csum >> 16)
        csum = (csum & 0xFFFF) + (csum >> 16)
        udp_len = ip_len - 20
        ucsum = pseudo + udp_len
        ucsum = (ucsum & 0xFFFF) + (ucsum >> 16)
        ucsum = (ucsum & 0xFFFF) + (ucsum >> 16)
        _OUTER.pack_into(
            self._tx_buf, frame,
            self._egress_mac, self._underlay_mac, 0x0800,
            0x45, 0, ip_len, ip_id, 0x4000, 65, 17, ~csum & 0xFFFF, self._src, dst,
            self._source_port_numbers[idx], peer.sockaddr[1], udp_len, ucsum,
        )  # fmt: skip
        self._ip_id = (ip_id + datagrams) & 0xFFFF
        return frame

    def _write_egress(self, frame: memoryview) -> None:
        """One frame to the egress TAP. With --egress-thread a full queue (EAGAIN:
        the kernel thread is behind) is waited on, up to EGRESS_WAIT_MS, then the
        write is tried once more: the wait holds weft's reads of the pod device
        back, so the pods' TCP sees a slower path instead of a lost super-packet."""
        try:
            os.write(self._egress_fd, frame)
        except BlockingIOError:
            # (without the thread the TAP's queue empties inside each write, but the
            # last of the thread's may still be there right after a switch)
            queued = self._tap_queues(time.monotonic_ns())
            if not queued or not self._egress_poll.poll(EGRESS_WAIT_MS):
                raise
            self._fc.egress_waits += 1
            os.write(self._egress_fd, frame)

    def _send_tap_one(self, fwd: Forwarder, end: int, idx: int) -> None:
        """One datagram through the egress TAP (--egress-thread: EGRESS_ORDER_NS), its
        inner checksums complete, the outer UDP checksum left to the kernel."""
        frame = self._put_outer(fwd, end, idx, 1)
        if frame < 0:
            return
        VNET_TUNNEL_STRUCT.pack_into(
            self._tx_buf, frame - VNET_HDR_TUNNEL_LEN,
            _NEEDS_CSUM, _GSO_NONE, 0, 0, 14 + 20, 6, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        try:
            self._write_egress(self._tx_view[frame - VNET_HDR_TUNNEL_LEN : end])
        except BlockingIOError:  # --egress-thread: its queue stayed full
            fwd.counters.drops[DropReason.SEND_FAILED] += 1
            return
        except OSError as exc:
            fwd.counters.drops[DropReason.SEND_FAILED] += 1
            self._first_error(f"egress TAP write failed: {_errtext(exc)}")
            return
        self._fc.ordered_sends += 1

    def _send_gso(
        self,
        fwd: Forwarder,
        head: int,
        end: int,
        seg_end: int,
        gso_type: int,
        gso_size: int,
        csum_start: int,
        idx: int,
    ) -> None:
        """Outer headers and the tunnel vnet header in front of buf[out_start:end]; one
        write. The outer source port is that of source socket `idx`, so that a flow's
        super-packets and its single datagrams leave from one port."""
        buf = self._tx_buf
        l4 = head + csum_start
        thl, check_at = gso_l4(buf, l4, gso_type)
        hdrs = l4 - head + thl  # inner headers per segment
        nsegs = -(-(end - head - hdrs) // gso_size)
        frame = self._put_outer(fwd, end, idx, nsegs)
        if frame < 0:
            return
        # Offsets in the frame: the inner packet's csum_start counted from `head`.
        cs = csum_start + (head - frame)
        VNET_TUNNEL_STRUCT.pack_into(
            buf, frame - VNET_HDR_TUNNEL_LEN,
            _TUNNEL_CSUM_FLAGS, gso_type | GSO_UDP_TUNNEL_IPV4,
            cs + thl, gso_size, cs, check_at, 0, 0, 0, 0, 14 + 20, OUTER_HLEN + self._ip_off,
        )  # fmt: skip
        try:
            self._write_egress(self._tx_view[frame - VNET_HDR_TUNNEL_LEN : end])
        except BlockingIOError:  # --egress-thread: its queue stayed full
            fwd.counters.drops[DropReason.SEND_FAILED] += 1
            return
        except OSError as exc:
            fwd.counters.drops[DropReason.SEND_FAILED] += 1
            if gso_type == _GSO_UDP_L4 and exc.errno == errno.EINVAL:
                # A kernel whose tunnel GSO takes TCP only: UDP is cut before weft again.
                stop_uso_read(
                    self.device_fd, self.paths, f"egress TAP refused UDP GSO: {_errtext(exc)}"
                )
                return
            self._first_error(f"egress TAP write failed: {_errtext(exc)}")
            return
        counters = fwd.counters
        counters.tx_packets += nsegs - 1
        counters.tx_bytes += (end - seg_end) + (nsegs - 1) * hdrs
        fc = self._fc
        fc.gso_sends += 1
        fc.gso_segments += nsegs
        if gso_type == _GSO_UDP_L4:
            fc.uso_sends += 1

    def _send_split(
        self,
        fwd: Forwarder,
        head: int,
        end: int,
        seg_end: int,
        gso_type: int,
        gso_size: int,
        csum_start: int,
        idx: int,
    ) -> None:
        """Cut buf[out_start:end] (backend headers, then the TCP or UDP super-packet)
        into datagrams in userspace; send each batch with one UDP_SEGMENT sendmsg from
        source socket `idx`."""
        seg = self._segmenter
        assert seg is not None
        peer = fwd.out_peer
        assert peer is not None
        l4 = head + csum_start
        nsegs = seg.start(
            self._tx_buf, fwd.out_start, head + (14 if self._l2 else 0), l4, end, gso_size,
            udp=gso_type == _GSO_UDP_L4,
        )  # fmt: skip
        counters = fwd.counters
        if nsegs == 0:
            counters.drops[DropReason.TRUNCATED] += 1
            return
        addr = peer.sockaddr
        row = seg.row
        fc = self._fc
        first = 0
        while first < nsegs:
            count = min(seg.per_fill, nsegs - first)
            nbytes = seg.fill(first, count)
            first += count
            for piece, n in seg.sends(nbytes):
                self._send_datagrams([piece], row, n, addr, "udp_segment", idx)
        # As _send_gso: the forwarder counted the first segment.
        hdrs = row - gso_size - (head - fwd.out_start)  # inner headers per segment
        counters.tx_packets += nsegs - 1
        counters.tx_bytes += (end - seg_end) + (nsegs - 1) * hdrs
        fc.split_packets += 1
        fc.split_segments += nsegs
        if gso_type == _GSO_UDP_L4:
            fc.uso_sends += 1

    def _udp_segment_refused(self, exc: OSError) -> None:
        """The kernel refused a UDP_SEGMENT send (EIO: the underlay device has no
        checksum offload, before Linux 6.11; EINVAL): udp_segment and tx_batch off.
        Without the egress TAP, cutting super-packets and sending the segments one
        by one costs more than reading them one by one, so stop asking the device
        for super-packets too (those already queued are still cut)."""
        why = f"sendmsg with UDP_SEGMENT failed: {_errtext(exc)}"
        paths = self.paths
        for path in ("udp_segment", "tx_batch"):
            if paths.on[path]:
                paths.turn_off(path, why)
        if self._egress_fd < 0 and paths.on["tso_read"]:
            try:
                set_offload(self.device_fd, 0)
                paths.turn_off("tso_read", f"no tunnel_gso, and {why}")
                if paths.on["uso_read"]:
                    paths.turn_off("uso_read", f"no tunnel_gso, and {why}")
            except TunError as err:
                log.warning("could not switch TSO off on the device: %s", err)

    def _first_error(self, what: str) -> None:
        if self.on_first_error is not None:
            self.on_first_error(what)
            self.on_first_error = None

    # -- network → device ----------------------------------------------------------

    def _on_network(self) -> None:
        rx = self._rx
        if rx is None:
            Engine._on_network(self)
            return
        fwd = self.forwarder
        drops = fwd.counters.drops
        sockfd = self.sock.fileno()  # type: ignore[union-attr]
        tracer = self.tracer if self.tracer is not None and self.tracer.active else None
        if tracer is not None:
            tracer.start_batch()
        coalescer = self._coalescer if tracer is None and not self._gso_write_failed else None
        uso = self._uso if tracer is None and not self._uso_write_failed else None
        fc = self._fc
        before = fc.rx_segments
        gaps = self._gaps
        idle = gaps.network_idle(time.monotonic_ns())
        lone = False
        try:
            lone = self._receive_batches(rx, sockfd, drops, coalescer, uso, tracer, idle)
        finally:
            self.count_batch(1, fc.rx_segments - before)
            gaps.network_done(time.monotonic_ns(), lone)

    def _receive_batches(
        self,
        rx: batch.MmsgReceiver,
        sockfd: int,
        drops: list[int],
        coalescer: Coalescer | None,
        uso: UdpCoalescer | None,
        tracer: Tracer | None,
        idle: bool = False,
    ) -> bool:
        """recvmmsg rounds until the socket is empty (RX_ROUNDS at most); True when
        the first was a lone datagram after a gap, taken alone (idle.IdleGaps)."""
        fc = self._fc
        buf = rx.buf
        u8 = self._rx_u8
        proto_at = self._ip_off + 9  # the inner IP protocol, from a datagram's start
        first = idle and self._gaps.network_lone
        for _ in range(RX_ROUNDS):
            try:
                if first:
                    first = False
                    m = rx.receive_one(self.sock)  # type: ignore[arg-type]
                else:
                    m = rx.receive(sockfd)
            except OSError:
                # ICMP errors queued on the socket (port unreachable from a peer).
                continue
            if m == 0:
                break
            fc.rx_calls += 1
            fc.rx_messages += m
            if m == 1 and rx.segment_sizes[0] >= rx.lengths[0] and not rx.truncated[0]:
                # One datagram (nothing queued behind it): no batch to plan.
                fc.rx_segments += 1
                self._deliver_one(rx.offsets[0], rx.lengths[0], 0, tracer)
                if idle:
                    return True  # a lone datagram after a gap (idle.IdleGaps)
                continue
            if uso is not None and rx.np_lengths is not None and not rx.any_truncated:
                offs = rx.np_offsets[:m]
                if (u8[offs + proto_at] == 17).all():
                    # A batch of UDP only (small-datagram traffic): straight from the
                    # receiver's arrays, no per-message Python.
                    sizes = rx.np_sizes
                    lens = rx.np_lengths
                    assert sizes is not None and rx.np_peers is not None
                    self._deliver_udp(
                        uso, offs, lens, np.where(sizes < lens, sizes, 0), rx.np_peers, None
                    )
                    continue
            if (
                coalescer is not None
                and self._planner is not None
                and rx.np_lengths is not None
                and self._deliver_datagrams(rx, m, self._planner, uso)
            ):
                continue
            if coalescer is not None and self._deliver_whole(rx, m, coalescer, uso):
                continue
            # (offset, length, GRO segment size or 0, peer number) per message, and
            # the receiver's index of each (truncated ones are left out).
            messages: list[tuple[int, int, int, int]] = []
            index: list[int] = []
            peers: dict[tuple[str, int], int] = {}
            offsets, sizes, lengths = rx.offsets, rx.segment_sizes, rx.lengths
            truncated, sources, ports = rx.truncated, rx.sources, rx.ports
            for i in range(m):
                if truncated[i]:
                    drops[DropReason.OVERSIZED] += 1
                    continue
                peer = peers.setdefault((sources[i], ports[i]), len(peers))
                n = lengths[i]
                messages.append((offsets[i], n, sizes[i] if sizes[i] < n else 0, peer))
                index.append(i)
            if uso is not None and messages:
                udp = [buf[off + proto_at] == 17 for off, _, _, _ in messages]
                if all(udp):
                    self._deliver_udp_messages(uso, messages, index)
                    continue
                if any(udp):
                    # Mixed: each stretch of messages goes its own way, in order.
                    self._deliver_mixed(uso, coalescer, messages, index, udp, tracer)
                    continue
            self._deliver_messages(coalescer, messages, index, tracer)
        return False

    def _deliver_whole(
        self,
        rx: batch.MmsgReceiver,
        m: int,
        coalescer: Coalescer,
        uso: UdpCoalescer | None,
    ) -> bool:
        """The common TCP batch: every message a single datagram or a GRO message that
        is one valid run (gro.Coalescer.plan_batch, plan_whole), nothing truncated, no UDP
        when USO may take it. Delivers it and returns True; False: not such a batch,
        nothing done. Straight from the receiver's lists: no per-message tuples, no
        per-segment lists."""
        offsets, lengths, sizes = rx.offsets, rx.lengths, rx.segment_sizes
        if rx.np_lengths is not None:
            if rx.any_truncated:
                return False
            if uso is not None:
                assert self._rx_u8 is not None
                if (self._rx_u8[rx.np_offsets[:m] + (self._ip_off + 9)] == 17).any():
                    return False
        else:
            if True in rx.truncated:
                return False
            if uso is not None:
                buf = rx.buf
                proto_at = self._ip_off + 9
                for i in range(m):
                    if buf[offsets[i] + proto_at] == 17:
                        return False
        runs = None
        if m >= BATCH_PLAN_MIN and sizes[0] < lengths[0]:
            # (A batch that begins with a single datagram — a TCP sender's ACKs from
            # a kernel node — is never plan_batch's: it takes GRO messages only.)
            runs = coalescer.plan_batch(
                offsets[0], rx.slot_size, lengths, sizes, rx.sources, rx.ports
            )
            if runs is not None:
                self._fc.batch_plans += 1
            else:
                self._fc.batch_plan_declines += 1
        if runs is None:
            runs = coalescer.plan_whole(offsets, lengths, sizes, rx.sources, rx.ports, m)
        if runs is None:
            return False
        fc = self._fc
        for first, count, hl, payload, skip, upto in runs:
            if hl:
                self._deliver_chain(first, count, hl, payload, skip, upto)
            else:
                fc.rx_segments += 1
                self._deliver_one(offsets[first], lengths[first], first, None)
        return True

    def _deliver_datagrams(
        self, rx: batch.MmsgReceiver, m: int, planner: DatagramPlanner, uso: UdpCoalescer | None
    ) -> bool:
        """A batch of single datagrams (no UDP GRO upstream: e.g. a kernel VXLAN
        sender, whose outer UDP checksum 0 keeps the node's GRO from merging) that
        looks like a TCP stream: the runs gro.DatagramPlanner finds go to the device
        as one GSO write each, the rest one by one, in order. Returns False (nothing
        done) for other batches: GRO messages, truncated or UDP datagrams (when USO
        may take them), or fewer than DATAGRAM_RUN_MIN full-size-looking datagrams."""
        lens, sizes, peers = rx.np_lengths, rx.np_sizes, rx.np_peers
        assert lens is not None and sizes is not None and peers is not None
        if rx.any_truncated:
            return False
        # Inner IP + TCP headers with options are at most 80 bytes.
        longer = self._ip_off + 80 + DATAGRAM_MIN_PAYLOAD
        if np.count_nonzero((lens[1:] == lens[:-1]) & (lens[1:] > longer)) < DATAGRAM_RUN_MIN:
            return False
        if (sizes < lens).any():
            return False  # GRO messages: _deliver_whole's
        if uso is not None:
            assert self._rx_u8 is not None
            if (self._rx_u8[rx.np_offsets[:m] + (self._ip_off + 9)] == 17).any():
                return False
        offsets, lengths = rx.offsets, rx.lengths
        hl, runs = planner.plan(offsets[0], rx.slot_size, lens, peers)
        self._fc.rx_segments += m
        done = 0
        for first, count in runs:
            for k in range(done, first):
                self._deliver_one(offsets[k], lengths[k], k, None)
            self._deliver_datagram_run(first, count, hl)
            done = first + count
        for k in range(done, m):
            self._deliver_one(offsets[k], lengths[k], k, None)
        return True

    def _deliver_datagram_run(self, first: int, count: int, hl: int) -> None:
        """Receiver messages first..first+count-1, single datagrams that make one run
        (gro.DatagramPlanner), as one GSO write."""
        rx = self._rx
        rxv = self._rx_view
        assert rx is not None and rxv is not None
        offsets, lengths = rx.offsets, rx.lengths
        s0, len0 = offsets[first], lengths[first]
        fwd = self.forwarder
        verdict = fwd.from_network(rxv[s0 : s0 + len0], len0, rx.sources[first])  # type: ignore[arg-type]
        if verdict != Verdict.DELIVER:
            fwd.counters.drops[fwd.drop_reason] += count - 1
            return
        # The payloads of all but the last (one size: the run's rules) are rows of a
        # strided view over the slots, copied out in one numpy call: measured 3.5 µs
        # for 46 segments against 8.6 µs for an iovec per segment (build + writev).
        last = offsets[first + count - 1]
        len_last = lengths[first + count - 1]
        rows = np.ndarray((count - 1, len0 - hl), np.uint8, rx.buf, s0 + hl, (rx.slot_size, 1))
        iov: list[bytes | bytearray | memoryview] = [
            b"", b"", memoryview(np.ascontiguousarray(rows)), rxv[last + hl : last + len_last]
        ]  # fmt: skip
        payload = (count - 1) * (len0 - hl) + len_last - hl
        self._fc.gso_datagram_writes += 1
        self._write_gso(iov, s0, len0, hl, last, payload, count)

    def _deliver_chain(
        self, first: int, count: int, hl: int, payload: int, skip: int = 0, upto: int = 0
    ) -> None:
        """Receiver messages first..first+count-1, GRO messages of one segment size that
        make one run (gro.Coalescer.plan_whole or plan_batch, a `gro.Run`: from segment
        `skip` of the first message to segment `upto` of the last, 0: its end), as one
        GSO write: the payload of every segment, cut from the messages every `size`
        bytes. A run of one segment is written as it is."""
        rx = self._rx
        rxv = self._rx_view
        assert rx is not None and rxv is not None
        offsets, lengths = rx.offsets, rx.lengths
        size = rx.segment_sizes[first]
        s0 = offsets[first] + skip * size
        end_k = first + count - 1
        if count == 1 and (upto or (lengths[first] - 1) // size + 1) - skip == 1:
            self._fc.rx_segments += 1
            self._deliver_one(s0, min(size, offsets[first] + lengths[first] - s0), first, None)
            return
        verdict = self.forwarder.from_network(rxv[s0 : s0 + size], size, rx.sources[first])  # type: ignore[arg-type]
        segments = 0
        iov: list[bytes | bytearray | memoryview] = [b"", b""]
        last = s0
        # An iovec entry per segment, straight from the receive buffer: measured
        # against copying each message's payload rows out with numpy first, it
        # is as fast at MTU 1500 and faster for jumbo segments (seven per message).
        # The views are made as a slot first needs them and kept for the next
        # message of that segment size there (44 slices: 6.5 µs; taking them
        # from the list: 0.2 µs).
        views = self._payload_views.get((size, hl))
        if views is None:
            if len(self._payload_views) >= MAX_PAYLOAD_VIEW_SHAPES:
                self._payload_views.clear()
            views = self._payload_views[(size, hl)] = [[] for _ in offsets]
        for k in range(first, first + count):
            o = offsets[k]
            full = (lengths[k] - 1) // size  # segments before the last
            a = skip if k == first else 0
            b = upto if k == end_k and upto else full + 1  # segments a..b-1 of this one
            if verdict == Verdict.DELIVER:
                row = views[k]
                if len(row) < full:
                    pay = size - hl
                    at = o + hl + len(row) * size
                    row += [rxv[p : p + pay] for p in range(at, o + full * size, size)]
            if b <= full:  # (a cut inside the message: its segments are full-size)
                last = o + (b - 1) * size
                segments += b - a
                if verdict == Verdict.DELIVER:
                    iov += row[a:b]
            else:
                last = o + full * size
                segments += full + 1 - a
                if verdict == Verdict.DELIVER:
                    iov += row[a:full]
                    iov.append(rxv[last + hl : o + lengths[k]])
        self._fc.rx_segments += segments
        if skip or upto:
            self._fc.gro_cuts += 1
        if verdict != Verdict.DELIVER:
            self.forwarder.counters.drops[self.forwarder.drop_reason] += segments - 1
            return
        self._write_gso(iov, s0, size, hl, last, payload, segments)

    def _deliver_mixed(
        self,
        uso: UdpCoalescer,
        coalescer: Coalescer | None,
        messages: list[tuple[int, int, int, int]],
        index: list[int],
        udp: list[bool],
        tracer: Tracer | None,
    ) -> None:
        lo = 0
        for hi in range(1, len(messages) + 1):
            if hi == len(messages) or udp[hi] != udp[lo]:
                if udp[lo]:
                    self._deliver_udp_messages(uso, messages[lo:hi], index[lo:hi])
                else:
                    self._deliver_messages(coalescer, messages[lo:hi], index[lo:hi], tracer)
                lo = hi

    def _deliver_messages(
        self,
        coalescer: Coalescer | None,
        messages: list[tuple[int, int, int, int]],
        index: list[int],
        tracer: Tracer | None,
    ) -> None:
        """Messages of TCP (or anything but UDP): GRO messages coalesced, the rest one by one."""
        fc = self._fc
        if not any(message[2] for message in messages):
            # Single datagrams only (no UDP GRO upstream): delivered one by one.
            # Coalescing them in the interpreter cost more than it saved.
            fc.rx_segments += len(messages)
            for (off, n, _, _), i in zip(messages, index, strict=True):
                self._deliver_one(off, n, i, tracer)
            return
        plan = coalescer.plan(messages) if coalescer is not None else split_messages(messages)
        fc.rx_segments += len(plan.starts)
        for first, count in plan.runs:
            source = index[plan.messages[first]]
            if count == 1:
                self._deliver_one(plan.starts[first], plan.lengths[first], source, tracer)
            else:
                self._deliver_run(plan, first, count, source)

    def _deliver_udp_messages(
        self, uso: UdpCoalescer, messages: list[tuple[int, int, int, int]], index: list[int]
    ) -> None:
        table = np.array(messages, dtype=np.int64)
        self._deliver_udp(uso, table[:, 0], table[:, 1], table[:, 2], table[:, 3], index)

    def _deliver_udp(
        self,
        uso: UdpCoalescer,
        offs: np.ndarray,
        lens: np.ndarray,
        sizes: np.ndarray,
        peers: np.ndarray,
        index: list[int] | None,
    ) -> None:
        """Messages whose (first) datagram is UDP inside: runs of one flow as USO writes.
        Per message: offset, length, GRO segment size (0: one datagram), peer key;
        `index` maps a message to the receiver's (None: the same).

        The datagrams' offsets come from the messages in a few numpy calls: each
        message holds ceil(length / step) datagrams, one every `step` bytes."""
        m = len(offs)
        owner_l: list[int] | None = None  # the message of each datagram (None: the same)
        if not sizes.any():
            total, starts, lengths = m, offs, lens  # one datagram per message
        else:
            step = np.where(sizes > 0, sizes, np.maximum(lens, 1))
            counts = np.maximum(-(-lens // step), 1)  # an empty datagram is still delivered
            total = int(counts.sum())
            owner = np.repeat(np.arange(m), counts)
            nth = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            starts = offs[owner] + nth * step[owner]
            lengths = np.minimum(step[owner], (offs + lens)[owner] - starts)
            peers = peers[owner]
            owner_l = owner.tolist()
        self._fc.rx_segments += total
        runs = uso.runs(starts, lengths, peers)
        starts_l, lengths_l = starts.tolist(), lengths.tolist()
        for first, count in runs:
            message = first if owner_l is None else owner_l[first]
            source = message if index is None else index[message]
            if count == 1:
                self._deliver_one(starts_l[first], lengths_l[first], source, None)
            else:
                self._deliver_uso(uso, starts[first : first + count], lengths_l[first], source)

    def _deliver_uso(self, uso: UdpCoalescer, starts: np.ndarray, length: int, source: int) -> None:
        """Same-size datagrams of one UDP flow (see uso.UdpCoalescer) as one USO write:
        the first datagram's headers with the lengths of the whole, the UDP checksum
        field holding the pseudo-header sum (NEEDS_CSUM), then every payload."""
        fwd = self.forwarder
        rx = self._rx
        assert rx is not None and self._rx_view is not None
        count = len(starts)
        s0 = int(starts[0])
        view0 = self._rx_view[s0 : s0 + length]
        verdict = fwd.from_network(view0, length, rx.sources[source])  # type: ignore[arg-type]
        counters = fwd.counters
        if verdict != Verdict.DELIVER:
            counters.drops[fwd.drop_reason] += count - 1
            return
        out = fwd.out_start
        hl = uso.hlen
        pay = length - hl
        vnet, header = merged_header(view0[out:hl], self._ip_off - out, count, pay)
        try:
            os.writev(self.device_fd, [vnet, header, uso.payloads(starts, pay)])
        except OSError as exc:
            # Undo the first datagram's count; deliver them one by one instead.
            counters.rx_packets -= 1
            counters.rx_bytes -= length - out
            legacy = uso_mod.MAX_SEGMENTS
            if exc.errno == errno.EINVAL and count > legacy and uso.max_segments > legacy:
                # An older kernel (UDP_MAX_SEGMENTS 64): shorter runs from now on.
                uso.max_segments = legacy
                log.info("UDP GSO writes of %d datagrams refused: at most %d from now on",
                         count, legacy)  # fmt: skip
                for at in range(0, count, legacy):
                    if count - at > 1:
                        self._deliver_uso(uso, starts[at : at + legacy], length, source)
                    else:
                        self._deliver_one(int(starts[at]), length, source, None)
                return
            if exc.errno == errno.EINVAL:
                # The device refused the USO header: one by one from now on.
                self._uso_write_failed = True
                self._first_error(f"UDP GSO write to the device refused: {_errtext(exc)}")
            for start in starts.tolist():
                self._deliver_one(start, length, source, None)
            return
        counters.rx_packets += count - 1
        counters.rx_bytes += (count - 1) * (length - out)
        fc = self._fc
        fc.uso_writes += 1
        fc.uso_written_segments += count

    @staticmethod
    def write_device(fd: int, packet: memoryview) -> int:
        """The plain engine's receive loop (used when recvmmsg is off) writes through
        this: the device expects a vnet header in front of every packet."""
        return os.writev(fd, [ZERO_VNET, packet])

    def _deliver_one(self, start: int, length: int, source: int, tracer: Tracer | None) -> None:
        fwd = self.forwarder
        rx = self._rx
        assert rx is not None and self._rx_view is not None
        view = self._rx_view[start : start + length]
        verdict = fwd.from_network(view, length, rx.sources[source])  # type: ignore[arg-type]
        if tracer is not None:
            tracer.from_network(
                view,  # type: ignore[arg-type]
                length,
                (rx.sources[source], rx.ports[source]),
                verdict,
                fwd,
            )
        if verdict == Verdict.DELIVER:
            try:
                os.writev(self.device_fd, [ZERO_VNET, view[fwd.out_start : fwd.out_end]])
            except OSError:
                fwd.counters.drops[DropReason.WRITE_FAILED] += 1

    def _deliver_run(self, plan: Batch, first: int, count: int, source: int) -> None:
        """Segments first..first+count-1 (see gro.Coalescer) as one GSO write."""
        fwd = self.forwarder
        rx = self._rx
        assert rx is not None and self._rx_view is not None
        rxv = self._rx_view
        starts, lengths, hlens = plan.starts, plan.lengths, plan.hlens
        s0, len0, hl0 = starts[first], lengths[first], hlens[first]
        verdict = fwd.from_network(rxv[s0 : s0 + len0], len0, rx.sources[source])  # type: ignore[arg-type]
        if verdict != Verdict.DELIVER:
            fwd.counters.drops[fwd.drop_reason] += count - 1
            return
        stop = first + count
        iov: list[bytes | bytearray | memoryview] = [b"", b""]
        iov += [
            rxv[s + h : s + n]
            for s, h, n in zip(
                starts[first:stop], hlens[first:stop], lengths[first:stop], strict=True
            )
        ]
        payload = sum(lengths[first:stop]) - sum(hlens[first:stop])
        self._write_gso(iov, s0, len0, hl0, starts[stop - 1], payload, count)

    def _write_gso(
        self,
        iov: list[bytes | bytearray | memoryview],
        s0: int,
        len0: int,
        hl0: int,
        last: int,
        payload: int,
        count: int,
    ) -> None:
        """Write `count` segments as one GSO packet: iov[2:] holds their payloads; the
        first segment (at s0, len0 bytes, headers hl0) has passed the forwarder, whose
        decap offset is used; `last` is where the last segment starts (for its PSH)."""
        fwd = self.forwarder
        rxv = self._rx_view
        assert rxv is not None
        counters = fwd.counters
        out = fwd.out_start
        ip = self._ip_off
        # The merged header: the first segment's (after decap), with the total
        # length, PSH from the last segment, and the TCP checksum field holding
        # the pseudo-header sum (NEEDS_CSUM; every segment's checksum was checked).
        header = bytearray(rxv[s0 + out : s0 + hl0])
        iov[1] = header
        ipo = ip - out  # inner IP header within `header`
        tcp = ipo + 20
        thl = hl0 - ip - 20
        tot_len = 20 + thl + payload
        header[tcp + 13] |= rxv[last + ip + 33] & 0x08  # PSH
        _U16.pack_into(header, ipo + 2, tot_len)
        header[ipo + 10] = header[ipo + 11] = 0
        _U16.pack_into(header, ipo + 10, ~ones_complement_sum(header[ipo:tcp]) & 0xFFFF)
        pseudo = ones_complement_sum(header[ipo + 12 : ipo + 20], 6 + thl + payload)
        _U16.pack_into(header, tcp + 16, pseudo)
        iov[0] = VNET_STRUCT.pack(
            VnetFlag.NEEDS_CSUM, GsoType.TCPV4, tcp + thl, len0 - hl0, tcp, 16
        )
        try:
            os.writev(self.device_fd, iov)
        except OSError as exc:
            counters.drops[DropReason.WRITE_FAILED] += count
            counters.rx_packets -= 1
            counters.rx_bytes -= len0 - out
            if exc.errno == errno.EINVAL:
                # The device refused the GSO header: deliver one by one from now on.
                self._gso_write_failed = True
                self._first_error(f"GSO write to the device refused: {_errtext(exc)}")
            return
        counters.rx_packets += count - 1
        counters.rx_bytes += tot_len + (14 if self._l2 else 0) - (len0 - out)
        fc = self._fc
        fc.gso_writes += 1
        fc.gso_written_segments += count
