"""host-gw's fast path: super-packets from the pod device, handed whole to AF_PACKET.

host-gw sends the inner packet unchanged, in an Ethernet frame to the peer's MAC
(dataplane/backends/hostgw.py), through an AF_PACKET socket on the underlay. With
PACKET_VNET_HDR on that socket, every frame written carries the same 10-byte
virtio_net_hdr that the pod device (IFF_VNET_HDR + TSO, see fastpath.py) puts in
front of what it reads. So a 64 KB TCP super-packet (or a UDP one: uso_read, see
offloads.probe_uso_read) goes out with one write, and
the kernel cuts it into MTU-sized segments on the underlay device (software GSO
when the NIC has no TSO); a packet whose checksum the pod left to offload
(NEEDS_CSUM) goes out the same way, and the kernel completes the checksum. The
header passes through with its offsets moved by the 14 bytes of Ethernet header
weft puts in front.

Peers' packets reach the pods through the kernel's routing, not through weft
(host-gw has no decapsulation), so the receive-side paths do not apply.
"""

from __future__ import annotations

import errno
import logging
import os
import socket

from dataplane.backends.base import DropReason
from dataplane.forwarder import Forwarder, Verdict
from dataplane.io.offloads import PATHS, FastPaths, open_pod_device, probe_uso_read, stop_uso_read
from dataplane.io.runner import BATCH, TX_BUDGET, Engine
from dataplane.io.tun import TunDevice, errno_text, open_tun
from dataplane.packet.vnet import VNET_HDR_LEN, VNET_STRUCT, ZERO_VNET, GsoType, gso_l4

log = logging.getLogger("weft.fastpath")

SOL_PACKET = 263
PACKET_VNET_HDR = 15  # linux/if_packet.h
ETH_HLEN = 14
_GSO_NONE = int(GsoType.NONE)
_GSO_UDP_L4 = int(GsoType.UDP_L4)
_SEND = int(Verdict.SEND)
_REPLY = int(Verdict.REPLY)
#: The fast paths that host-gw uses; the others move datagrams, which host-gw has not.
HOSTGW_PATHS = ("tso_read", "uso_read", "packet_gso")


def open_hostgw_device(name: str, sock: socket.socket, *, mode: str) -> tuple[TunDevice, FastPaths]:
    """The pod-side TUN for host-gw: with IFF_VNET_HDR and TSO when the AF_PACKET
    socket `sock` takes vnet headers (PACKET_VNET_HDR: packet_gso on), else a plain
    TUN (packet_gso off: the plain engine runs). `mode` on: a refusal is an error
    (OffloadRefused)."""
    paths = FastPaths(mode)
    for path in PATHS:
        if path not in HOSTGW_PATHS:
            paths.why_off[path] = "vxlan and udp only (host-gw moves no datagrams)"
    if paths.wanted("packet_gso"):
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            paths.enable("packet_gso")
        except OSError as exc:
            paths.refuse("packet_gso", f"PACKET_VNET_HDR refused: {errno_text(exc)}")
    if not paths.on["packet_gso"]:
        paths.why_off.setdefault("tso_read", "needs packet_gso")
        return open_tun(name), paths
    dev, _ = open_pod_device(name, tap=False, mode=mode, paths=paths)
    try:
        probe_uso_read(dev, paths)
    except BaseException:
        dev.close()
        raise
    return dev, paths


class PacketGsoEngine(Engine):
    """The device → underlay loop of host-gw with vnet headers on both ends: one read
    and one write per super-packet (see the module's notes). No network side."""

    def __init__(
        self,
        forwarder: Forwarder,
        device_fd: int,
        packet_sock: socket.socket,
        paths: FastPaths,
    ) -> None:
        super().__init__(forwarder, device_fd, None, send_socket=packet_sock)
        self.paths = paths
        self._fc = paths.counters
        # The device's vnet header lands at the start of the buffer, the packet
        # `headroom` (14) bytes after it, where the Ethernet header goes: vnet
        # header and frame are then one contiguous buffer for the socket.
        buf = memoryview(self._dev_buf)
        self._at = VNET_HDR_LEN + forwarder.headroom
        self._iov = [buf[:VNET_HDR_LEN], buf[self._at :]]
        self._failed_once = False

    def _on_device(self) -> None:
        fwd = self.forwarder
        buf = self._dev_buf
        out = self._dev_out
        head = self._at
        fd = self.device_fd
        readv = os.readv
        writev = os.writev
        send = self.send_socket.send  # type: ignore[union-attr]
        iov = self._iov
        unpack = VNET_STRUCT.unpack_from
        pack_into = VNET_STRUCT.pack_into
        drops = fwd.counters.drops
        fc = self._fc
        tracer = self.tracer if self.tracer is not None and self.tracer.active else None
        if tracer is not None:
            tracer.start_batch()
        got = 0
        budget = TX_BUDGET
        for _ in range(BATCH):
            if budget <= 0:
                break
            try:
                n = readv(fd, iov) - VNET_HDR_LEN
            except BlockingIOError:
                break
            except OSError:
                break  # device went away; the agent notices and stops
            got += 1
            if n <= 0:
                continue
            budget -= n
            end = head + n
            check_end = end
            offloaded = buf[0] or buf[1]  # vnet flags or GSO type: header to adjust
            if offloaded:
                flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = unpack(buf)
                if gso_type != _GSO_NONE:
                    # The forwarder judges the first segment (route, size against MTU).
                    l4 = head + csum_start
                    check_end = min(end, l4 + gso_l4(buf, l4, gso_type)[0] + gso_size)
            verdict = fwd.from_device(buf, head, check_end)
            if tracer is not None:
                tracer.from_device(buf, head, check_end, verdict, fwd)
            if verdict == _SEND:
                # The Ethernet header went in front of the packet, right after the
                # vnet header, whose offsets now count it too.
                if offloaded:
                    pack_into(
                        buf, 0, flags, gso_type, hdr_len + ETH_HLEN, gso_size,
                        csum_start + ETH_HLEN, csum_offset,
                    )  # fmt: skip
                try:
                    send(out[fwd.out_start - VNET_HDR_LEN : end])
                except OSError as exc:
                    drops[DropReason.SEND_FAILED] += 1
                    if gso_type == _GSO_UDP_L4 and exc.errno == errno.EINVAL:
                        # UDP GSO refused: the kernel cuts UDP before weft again.
                        stop_uso_read(fd, self.paths, f"UDP GSO send refused: {errno_text(exc)}")
                        continue
                    self._send_failed(exc)
                    continue
                if offloaded and gso_type != _GSO_NONE:
                    fc.gso_sends += 1
                    fc.gso_segments += -(-(end - check_end) // gso_size) + 1
                    if gso_type == _GSO_UDP_L4:
                        fc.uso_sends += 1
            elif verdict == _REPLY:
                try:
                    writev(fd, [ZERO_VNET, fwd.reply])
                except OSError:
                    drops[DropReason.WRITE_FAILED] += 1
        self.count_batch(0, got)
        if self.after_batch is not None:
            self.after_batch()

    def _send_failed(self, exc: OSError) -> None:
        """Say once why the kernel refused a frame (a full queue is not worth it)."""
        if self._failed_once or exc.errno in (errno.EAGAIN, errno.ENOBUFS):
            return
        self._failed_once = True
        log.warning("host-gw send refused: %s", errno_text(exc))
