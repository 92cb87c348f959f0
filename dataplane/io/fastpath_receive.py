"""The receive path (network → device): FastEngine's half that reads the UDP socket.

recvmmsg takes up to 128 messages a call (a GRO message holds many datagrams of
one flow); the TCP segments of one inner flow are checked and coalesced for the
whole batch at once (gro.py, numpy) and written to the device as one GSO packet;
a lone datagram after a gap is taken and delivered alone (idle.IdleGaps); runs
of one inner UDP flow go as one USO write (uso.py); the rest one by one.
The engine's state is set up in fastpath.FastEngine.__init__.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time

import numpy as np

from dataplane.backends.base import DropReason
from dataplane.forwarder import Verdict
from dataplane.io import batch
from dataplane.io import uso as uso_mod
from dataplane.io.gro import Batch, Coalescer, DatagramPlanner, Run, lone_first, split_messages
from dataplane.io.runner import Engine
from dataplane.io.tun import errno_text
from dataplane.io.uso import UdpCoalescer, merged_header
from dataplane.packet.checksum import ones_complement_sum
from dataplane.packet.vnet import VNET_STRUCT, ZERO_VNET, GsoType, VnetFlag
from dataplane.trace import Tracer

log = logging.getLogger("weft.fastpath")

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
#: a long batch stalls. recvmmsg calls per callback (runner.TX_BUDGET is the
#: bound the other way).
RX_ROUNDS = 4
#: Segment shapes (size, header length) whose payload views _deliver_chain keeps.
MAX_PAYLOAD_VIEW_SHAPES = 4
_U16 = struct.Struct("!H")


class ReceivePath(Engine):
    """Network → device, for FastEngine (whose __init__ sets up the state used here)."""

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
        ahead = 0
        if runs is None:
            runs = coalescer.plan_whole(offsets, lengths, sizes, rx.sources, rx.ports, m)
            if runs is None:
                return False
            if coalescer.lone_behind:
                # A lone datagram of another flow does not wait for the bulk writes
                # before it, nor does the answer to it (_answer_first).
                runs, ahead = lone_first(runs, rx.buf, offsets, self._ip_off)
                self._fc.singles_ahead += ahead
        fc = self._fc
        for first, count, hl, payload, skip, upto in runs:
            if hl:
                if ahead:
                    ahead = 0
                    self._answer_first()
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
        hl, planned = planner.plan(offsets[0], rx.slot_size, lens, peers)
        self._fc.rx_segments += m
        # Singles behind the first run: m less what the runs from it on cover.
        behind = m - planned[0][0] if planned else 0
        for _, count in planned:
            behind -= count
        if behind:
            self._deliver_lone_first(planned, hl, m)
            return True
        done = 0
        for first, count in planned:
            for k in range(done, first):
                self._deliver_one(offsets[k], lengths[k], k, None)
            self._deliver_datagram_run(first, count, hl)
            done = first + count
        for k in range(done, m):
            self._deliver_one(offsets[k], lengths[k], k, None)
        return True

    def _deliver_lone_first(self, planned: list[tuple[int, int]], hl: int, m: int) -> None:
        """_deliver_datagrams' batch with singles behind a planned run: as gro.Run
        tuples (the datagrams between the runs are singles, header length 0), the
        singles of flows with no run before them first (gro.lone_first)."""
        rx = self._rx
        assert rx is not None
        offsets, lengths = rx.offsets, rx.lengths
        runs: list[Run] = []
        done = 0
        for first, count in planned:
            runs += [(k, 1, 0, 0, 0, 0) for k in range(done, first)]
            runs.append((first, count, hl, 0, 0, 0))
            done = first + count
        runs += [(k, 1, 0, 0, 0, 0) for k in range(done, m)]
        runs, ahead = lone_first(runs, rx.buf, offsets, self._ip_off)
        self._fc.singles_ahead += ahead
        for first, count, run_hl, _, _, _ in runs:
            if run_hl:
                if ahead:
                    ahead = 0
                    self._answer_first()
                self._deliver_datagram_run(first, count, run_hl)
            else:
                self._deliver_one(offsets[first], lengths[first], first, None)

    def _answer_first(self) -> None:
        """Singles went to the device ahead of a batch's bulk writes (gro.lone_first):
        read the device once now, so that what their pods answered at once (the echo
        reply of a ping: the pod's stack answers inside the write) leaves before those
        writes too, not after the rest of this callback. (What else the device holds
        goes with it: the next thing the loop would have done anyway.)"""
        self._fc.answers_first += 1
        self._on_device()

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
                self._first_error(f"UDP GSO write to the device refused: {errno_text(exc)}")
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
                self._first_error(f"GSO write to the device refused: {errno_text(exc)}")
            return
        counters.rx_packets += count - 1
        counters.rx_bytes += tot_len + (14 if self._l2 else 0) - (len0 - out)
        fc = self._fc
        fc.gso_writes += 1
        fc.gso_written_segments += count
