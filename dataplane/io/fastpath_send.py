"""The send path (device → network): FastEngine's half that reads the pod device.

A drain of the device reads packets, each behind room for headers: a super-packet
(TSO, or a UDP one: uso_read) gets its outer headers once and goes whole to the
egress TAP (_send_gso), or is cut here for one UDP_SEGMENT send (_send_split);
consecutive same-size datagrams to one peer leave as one UDP_SEGMENT send
(tx_batch, _send_run); the first packet of a drain leaves at once, alone.
The engine's state is set up in fastpath.FastEngine.__init__.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time

from dataplane.backends.base import DropReason
from dataplane.forwarder import Forwarder, Verdict
from dataplane.io.offloads import stop_uso_read
from dataplane.io.runner import BATCH, BUFFER_SIZE, TX_BUDGET, Engine
from dataplane.io.segment import MAX_SEGMENTS, MAX_SEND_BYTES, complete_checksums, segment_cmsg
from dataplane.io.tun import TunError, errno_text, set_offload
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
    gso_l4,
)
from dataplane.peers import Peer

log = logging.getLogger("weft.fastpath")

OUTER_HLEN = 14 + 20 + 8  # Ethernet, IPv4, UDP written by weft in front of the backend's headers
#: --egress-thread: a TAP write returns before the kernel thread has sent the frame,
#: while a datagram sent on a socket leaves inside the call. So a flow's packets that
#: follow its last write to the TAP (a super-packet, or one of these) within this long
#: after that write returned go through the TAP as well, behind it, instead of
#: overtaking it (a reordered TCP segment costs the receiver its
#: out-of-order queue and the sender duplicate ACKs, fast retransmits). The queue
#: holds two super-packets, but the thread must first get a CPU: on a loaded
#: machine (CI's two test processes) it waited more than the first 5 ms here, and
#: more than EGRESS_WAIT_MS beside a CPU hog (decisions §27). A bulk flow writes to
#: the TAP every few milliseconds anyway; the window only decides for flows that
#: paused.
EGRESS_ORDER_NS = 50_000_000
#: --egress-thread: how long a write waits for room in a full TAP queue before the
#: packet is dropped (send_failed).
EGRESS_WAIT_MS = 20

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


class SendPath(Engine):
    """Device → network, for FastEngine (whose __init__ sets up the state used here)."""

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
                                # When the write ended, not when the drain began:
                                # a drain that waited for room in a full queue
                                # (the thread behind) took longer than the window.
                                tap_at[idx] = time.monotonic_ns()
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
            self._first_error(f"egress TAP write failed: {errno_text(exc)}")
            return
        self._fc.ordered_sends += 1
        self._tap_at[idx] = time.monotonic_ns()  # what follows it waits behind it too

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
                    self.device_fd, self.paths, f"egress TAP refused UDP GSO: {errno_text(exc)}"
                )
                return
            self._first_error(f"egress TAP write failed: {errno_text(exc)}")
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
        why = f"sendmsg with UDP_SEGMENT failed: {errno_text(exc)}"
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
