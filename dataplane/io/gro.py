"""Receive-side coalescing: which received TCP segments can go to the device as one
GSO super-packet.

A batch is a list of received messages (offset, length, segment size, peer)
in one buffer: the datagrams of a recvmmsg call, a UDP GRO message holding
many datagrams of one size. Each datagram is an encapsulated packet whose
inner IPv4 header sits `ip_off` bytes in (vxlan 22: VXLAN 8 + inner
Ethernet 14; udp backend 0).

`Coalescer.plan` cuts the messages into segments and groups them into runs
`(first, count)`, in order. A run of two or more is a set of consecutive
segments that the Linux kernel's own TCP GRO would have merged
(tcp_gro_receive's rules, a little stricter):

- every segment is IPv4 without options, TCP, not a fragment, its IP total
  length matches the datagram, and its IP header checksum and TCP checksum
  are valid — checked here for every segment of a run, because the merged
  packet goes to the device as CHECKSUM_PARTIAL, which the receiving stack
  does not verify again;
- same peer (outer address and port), same bytes before the inner IP header
  (VXLAN header, inner Ethernet), same IP addresses, TOS, TTL, DF; same
  ports, ACK number, header length, window, urgent pointer and TCP options;
- flags ACK only, except the last segment, which may add PSH;
- sequence numbers contiguous; payloads of equal size except the last,
  which may be smaller; at most `max_segments` and 64 KiB in all.

Everything else is a run of one, delivered as it came: the kernel checks
its checksums, so a corrupt segment is dropped there and counted in the
pod's TCP statistics, as it would be without weft.

Cost: one `struct.unpack_from` per segment for the header fields (the
interpreter decides the runs in one pass), and numpy for the checksums of
the whole batch at once — the messages copied into one compact array and
one `add.reduceat` over its big-endian 16-bit words. Summing 1.4 KB with
`int.from_bytes(...) % 0xFFFF` costs ~6 µs a segment; the batch sum costs
well under 1 µs a segment.

`Coalescer.plan_whole` decides batches of GRO messages with numpy views over each
message, cutting a message where a run must end inside it (a PSH; another ACK
number, window or timestamp: the next super-packet of the flow, which the node's GRO
put in the same message); `Coalescer.plan_batch` the same for all messages of a
batch at once when no message needs a cut at a PSH or a header change (a fixed
number of numpy calls, fewer than plan_whole's from two messages on);
`DatagramPlanner` applies the same rules
to single datagrams (no GRO upstream) in consecutive recvmmsg slots, with numpy
views over the slots.
"""

from __future__ import annotations

import itertools
import struct

import numpy as np

from dataplane.packet.checksum import ones_complement_sum

TCP_ACK = 0x10
TCP_PSH = 0x08
#: A run of plan_whole or plan_batch: (first message, messages, header length,
#: payload bytes, segments skipped at the start of the first message, segments taken
#: from the last message — 0: all of them). Header length 0: one single datagram.
Run = tuple[int, int, int, int, int, int]
MAX_SEGMENTS = 64
#: Largest payload of one coalesced packet: IP total length ≤ 65535 with a 20-byte IP
#: header and at most 60 bytes of TCP header.
MAX_PAYLOAD = 65535 - 20 - 60


def _room(segments: int, run_segments: int, run_payload: int, seg_pay: int, cap: int) -> int:
    """How many of the next `segments` (full-size, `seg_pay` bytes of payload each,
    the last of them left out: it may be short) a run of `run_segments` and
    `run_payload` bytes can still take within `cap` segments and MAX_PAYLOAD: where
    plan_whole and plan_batch cut a message that does not fit whole."""
    return min(segments - 1, cap - run_segments, (MAX_PAYLOAD - run_payload) // seg_pay)


_ONES = np.uint64(0xFFFF)
_ACKS = bytes((TCP_ACK,)) * MAX_SEGMENTS


_MASKS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def lone_first(
    runs: list[Run], buf: bytearray, offsets: list[int], ip_off: int
) -> tuple[list[Run], int]:
    """The runs of one batch, single datagrams first where that keeps every flow's order;
    and how many singles that moved ahead of a run of segments.

    A lone datagram (a ping, a request, a DNS query) that came in behind a bulk
    flow's GRO messages would wait for their GSO writes (each one the receiving pod's
    whole receive of 64 KB) before it reaches its pod. Moved ahead of them, it waits
    for none: a single datagram (header length 0) goes first unless a run that stays
    in place before it carries its flow, told by the inner addresses and protocol
    (coarser than a flow: two flows of one pair and protocol keep their order too).
    The singles keep their order among themselves and so do the runs, so no flow's
    packets change order. `runs` as Coalescer.plan_whole gives them; returned as it
    is (the same list) when no single follows a run of segments."""
    # (plain loops: a generator expression costs more than the whole check here)
    k = 0
    for run in runs:
        if run[2]:
            break
        k += 1
    for run in runs[k + 1 :]:
        if not run[2]:
            break
    else:
        return runs, 0  # singles only, or none behind a run
    moved = runs[:k]
    stays: list[Run] = []
    bulk: set[tuple[int, bytes]] = set()
    for run in runs[k:]:
        at = offsets[run[0]] + ip_off
        flow = (buf[at + 9], bytes(buf[at + 12 : at + 20]))
        if run[2] or flow in bulk:
            bulk.add(flow)
            stays.append(run)
        else:
            moved.append(run)
    return moved + stays, len(moved) - k


def header_masks(ip: int, hl: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For headers of hl bytes with the inner IP header at `ip`, read as little-endian
    64-bit words (the last one running on into the payload): the bits that must be
    equal between the segments of a run (all but IP total length, ID and checksum;
    TCP sequence number, flags — checked on their own — and checksum), and a mask
    and value every candidate matches (IPv4 without options, not a fragment, TCP,
    this data offset, flags ACK with or without PSH)."""
    masks = _MASKS.get((ip, hl))
    if masks is None:
        size = -(-hl // 8) * 8
        keep = np.zeros(size, dtype=np.uint8)
        keep[:hl] = 0xFF
        keep[[ip + 2, ip + 3, ip + 4, ip + 5, ip + 10, ip + 11]] = 0
        keep[[ip + 24, ip + 25, ip + 26, ip + 27, ip + 33, ip + 36, ip + 37]] = 0
        mask = np.zeros(size, dtype=np.uint8)
        value = np.zeros(size, dtype=np.uint8)
        for at, bits, want in (
            (ip, 0xFF, 0x45),
            (ip + 6, 0x3F, 0),  # MF and the fragment offset
            (ip + 7, 0xFF, 0),
            (ip + 9, 0xFF, 6),
            (ip + 32, 0xF0, (hl - ip - 20) << 2),
            (ip + 33, 0xFF & ~TCP_PSH, TCP_ACK),
        ):
            mask[at], value[at] = bits, want
        masks = _MASKS[(ip, hl)] = (keep.view("<u8"), mask.view("<u8"), value.view("<u8"))
    return masks


_ZEROS = bytes(65536)
#: Rows the tiled masks cover: every segment of a full recvmmsg batch (plan_batch).
MAX_ROWS = 128 * MAX_SEGMENTS
_TILED: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _tiled_masks(ip: int, hl: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """header_masks repeated for MAX_ROWS rows, flat: numpy then runs the comparisons
    over compact same-shape arrays (3–5× faster than broadcasting a 12-word row)."""
    tiled = _TILED.get((ip, hl))
    if tiled is None:
        tiled = _TILED[(ip, hl)] = tuple(np.tile(a, MAX_ROWS) for a in header_masks(ip, hl))  # type: ignore[assignment]
    return tiled  # type: ignore[return-value]


class Batch:
    """The segments of one batch and the runs over them (see Coalescer.plan)."""

    __slots__ = ("hlens", "lengths", "messages", "runs", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []  # offset of each segment in the buffer
        self.lengths: list[int] = []
        self.messages: list[int] = []  # index of the message each came in
        self.hlens: list[int] = []  # ip_off + IP + TCP header length; 0: not a candidate
        self.runs: list[tuple[int, int]] = []  # (first segment, count), in order


def split_messages(messages: list[tuple[int, int, int, int]]) -> Batch:
    """The segments of the messages, each a run of one (no coalescing)."""
    out = Batch()
    for mi, (off, n, size, _peer) in enumerate(messages):
        step = size or n
        for p in range(off, off + n, step) if step else (off,):
            out.runs.append((len(out.starts), 1))
            out.starts.append(p)
            out.lengths.append(min(step, off + n - p))
            out.messages.append(mi)
    return out


#: plan_batch keeps what it works out from a batch's shape for up to this many rows
#: of segments in all (~210 bytes a row: the header masks and index arrays; about
#: 7 MB at most), then starts again.
MAX_SHAPE_ROWS = 1 << 15


class _BatchShape:
    """What Coalescer.plan_batch needs that follows from a batch's shape alone: the
    message lengths and GRO segment sizes, where the messages sit, the header
    length. Which rows of the (message, segment) grid are segments, each segment's
    message and place in it, the header bits each must have (the fixed ones, its IP
    total length, no PSH but on a message's last), the sequence number step from
    its message's first, the pseudo-header part of its TCP sum, where each
    message's padding goes. Worked out once per shape: a bulk flow's batches
    repeat a few shapes (a sender's 46-segment TSO packets arrive as GRO messages
    of 44 and 2 segments, batch after batch)."""

    __slots__ = (
        "check_mask", "check_value", "dense", "firsts", "full_before", "heads", "ii", "jj",
        "keep", "keep_row", "lead", "lead_fixed", "n", "not_last", "pads", "pay_list",
        "pseudo", "psh_at", "rows", "run_on", "seg_list", "seq_steps", "size", "sum_fix",
        "unit", "w", "width",
    )  # fmt: skip

    @staticmethod
    def of(
        co: Coalescer,
        base: int,
        stride: int,
        hl: int,
        message_lengths: list[int],
        segment_sizes: list[int],
    ) -> _BatchShape | object:
        """The shape, or _DECLINE when no batch of this shape is planned at once."""
        m = len(message_lengths)
        ip = co.ip_off
        size = segment_sizes[0]
        lengths = np.array(message_lengths, dtype=np.int64)
        sizes = np.array(segment_sizes, dtype=np.int64)
        if size & 1 or size < co.min_len:
            return _DECLINE
        segs = -(-lengths // size)
        full = segs - 1  # full-size segments before each message's last
        if not ((sizes == size).all() and full.min() > 0):
            return _DECLINE  # single datagrams, or two segment sizes: plan_whole's
        rows = int(segs.max())
        if rows > co.max_segments or rows * size + 2 + base % stride > stride:
            return _DECLINE  # no room to pad the last segments
        if m * rows > MAX_ROWS:
            return _DECLINE  # more than the tiled masks and the sum grid cover
        last = lengths - full * size
        if hl < ip + 40 or size <= hl or int(last.min()) <= hl:
            return _DECLINE
        sh = _BatchShape()
        sh.rows, sh.size = rows, size
        starts = base + np.arange(m) * stride
        sh.pads = list(zip((starts + lengths).tolist(), (size + 2 - last).tolist(), strict=True))
        # The segments: (message, row) of each, in order.
        col = np.arange(rows)
        ii, jj = np.nonzero(col < segs[:, None])
        n = sh.n = len(ii)
        sh.dense = n * 4 >= m * rows * 3  # sum the whole grid: at most a quarter wasted
        is_last = jj == full[ii]
        sh.ii, sh.jj = ii, jj
        keep, mask, value = _tiled_masks(ip, hl)
        w = sh.w = len(keep) // MAX_ROWS
        sh.keep = keep[: n * w].reshape(n, w)
        sh.keep_row = keep[:w]
        # The bits every segment must have: header_masks' fixed ones, and per row its
        # IP total length and, but on a message's last segment, no PSH.
        check_mask = mask[: n * w].reshape(n, w).copy()
        check_value = value[: n * w].reshape(n, w).copy()
        mask_bytes = check_mask.view(np.uint8)
        value_bytes = check_value.view(np.uint8)
        tot = np.where(is_last, last[ii] - ip, size - ip)
        mask_bytes[:, ip + 2 : ip + 4] = 0xFF
        value_bytes[:, ip + 2] = tot >> 8
        value_bytes[:, ip + 3] = tot & 0xFF
        mask_bytes[~is_last, ip + 33] = 0xFF
        heads = sh.heads = np.cumsum(segs) - segs  # each message's first segment, gathered
        sh.firsts = np.repeat(heads, segs)  # … for every segment
        sh.seq_steps = (jj * (size - hl)).astype(np.uint32)
        start = ip + 12
        sh.unit = 4 if (base + start) & 3 == 0 and size & 3 == 0 else 2
        sh.width = -(-(size - start) // sh.unit)
        tcp_len = np.where(is_last, last[ii], size) - (ip + 20)
        sh.pseudo = sh.sum_fix = ((tcp_len + 6) << 8).astype(np.uint64)
        # A row of 32-bit words that runs on into the next row's first two bytes (see
        # plan_batch): those bytes must then be the same in every segment.
        sh.run_on = sh.unit * sh.width > size - start
        sh.lead_fixed = (int(mask[0]) & 0xFFFF, int(value[0]) & 0xFFFF)
        if sh.run_on:
            mask_bytes[:, 0:2] = 0xFF
        sh.check_mask, sh.check_value = check_mask, check_value
        sh.not_last = (~is_last).astype(np.uint64)
        sh.lead = -1 if sh.run_on else 0
        pays = lengths - segs * hl
        sh.seg_list, sh.pay_list = segs.tolist(), pays.tolist()
        sh.full_before = (last == size).tolist()
        sh.psh_at = (starts + full * size + ip + 33).tolist()
        return sh

    def take_lead(self, lead: int) -> bool:
        """Set the header values and TCP sum constants for a batch whose segments
        begin with the 16-bit word `lead` (little-endian; run_on shapes only), in
        place when it changes (a VXLAN header's flags are the same in every packet;
        the UDP backend's are the inner IP version and TOS). False when `lead`
        contradicts the fixed bits."""
        if lead != self.lead:
            fixed, want = self.lead_fixed
            if lead & fixed != want:
                return False
            value = self.check_value
            value[:, 0] = (value[:, 0] & ~np.uint64(0xFFFF)) | np.uint64(lead)
            self.sum_fix = self.pseudo + np.uint64(0xFFFF - lead) * self.not_last
            self.lead = lead
        return True


#: _BatchShape.of: batches of this shape are left to plan_whole.
_DECLINE = object()


class Coalescer:
    """Plans GSO runs over messages received into `buf` (never resized while in use)."""

    def __init__(
        self,
        buf: bytearray,
        ip_off: int,
        *,
        max_segments: int = MAX_SEGMENTS,
        datagrams: bool = False,
    ) -> None:
        self.buf = buf
        #: Also coalesce across single-datagram messages (recvmmsg without UDP GRO),
        #: one segment at a time in the interpreter. Off in the engine: measured, it
        #: cost more than the writes it saved (docs/decisions.md, section 7).
        self.datagrams = datagrams
        self.u8 = np.frombuffer(buf, dtype=np.uint8)
        self.ip_off = ip_off
        self.max_segments = max_segments
        ip = ip_off
        # From the start of a segment: the bytes before the inner IP header and the
        # IP version/TOS; total length; flags+fragment; TTL; protocol; addresses and
        # ports; sequence; ACK; data offset; TCP flags; window; urgent pointer.
        self._hdr = struct.Struct(f"!{ip + 2}sH2xHBB2x12sI4sBB2s2x2s")
        self.min_len = ip + 40
        self._pad = np.zeros(256, dtype=np.uint8)
        self._sum_grid = np.empty(MAX_ROWS, dtype=np.uint64)  # plan_batch's TCP sums
        self._shapes: dict[tuple[int, int, int, tuple[int, ...], tuple[int, ...]], object] = {}
        self._shape_rows = 0  # rows of segments the kept shapes cover
        # Header bytes that may differ between the segments of a run: IP total length,
        # ID and checksum; TCP sequence number, flags (checked on their own), checksum.
        may_differ = np.zeros(ip + 80, dtype=bool)
        may_differ[[ip + 2, ip + 3, ip + 4, ip + 5, ip + 10, ip + 11]] = True
        may_differ[[ip + 24, ip + 25, ip + 26, ip + 27, ip + 33, ip + 36, ip + 37]] = True
        self._may_differ = may_differ
        self._keep: dict[int, np.ndarray] = {}  # header length -> columns that must be equal
        #: Whether plan_whole's last runs have a single datagram behind a run of
        #: segments (what lone_first may move; plan_batch's runs never have one).
        self.lone_behind = False

    def plan(self, messages: list[tuple[int, int, int, int]]) -> Batch:
        """Segments and runs for messages (offset, length, segment size, peer number).

        A segment size of 0 means the message is one datagram."""
        out = Batch()
        starts, lengths, msgs, hlens, runs = (
            out.starts, out.lengths, out.messages, out.hlens, out.runs,
        )  # fmt: skip
        buf = self.buf
        ip = self.ip_off
        unpack = self._hdr.unpack_from
        min_len = self.min_len
        cap = self.max_segments
        # The open run: its first index, count, key, next sequence number, segment size.
        first = count = payload = 0
        key: tuple[object, ...] | None = None
        next_seq = mss = 0
        unchecked: list[int] = []  # indexes in `runs` of runs whose checksums are unchecked
        # A run made of whole GRO messages that the next one may extend: (its index in
        # runs, peer, segment size, header length, next sequence number, payload so
        # far, offset of its first segment).
        chain: tuple[int, int, int, int, int, int, int] | None = None
        for mi, (off, n, size, peer) in enumerate(messages):
            whole = self._whole_message(off, n, size) if size else None
            if whole is not None:
                # A UDP GRO message that is one run from end to end (the common case).
                if key is not None:
                    if count > 1:
                        unchecked.append(len(runs))
                    runs.append((first, count))
                    key = None
                hl, segments, last, _ = whole
                seq0 = int.from_bytes(buf[off + ip + 24 : off + ip + 28], "big")
                pay = n - segments * hl
                if (
                    chain is not None
                    and chain[0] == len(runs) - 1  # the last run is the chained one
                    and chain[1:4] == (peer, size, hl)
                    and chain[4] == seq0
                    and runs[-1][1] + segments <= cap
                    and chain[5] + pay <= MAX_PAYLOAD
                    and self._same_flow(chain[6], off, hl)
                ):
                    # The same flow went on in the next GRO message: one write for both.
                    runs[-1] = (runs[-1][0], runs[-1][1] + segments)
                    pay += chain[5]
                else:
                    runs.append((len(starts), segments))
                    chain = (len(runs) - 1, peer, size, hl, 0, 0, off)
                last_at = off + n - last
                if last == size and not buf[last_at + ip + 33] & TCP_PSH:
                    # Full-size last segment without PSH: the next message may continue it.
                    chain = (*chain[:4], (seq0 + n - segments * hl) & 0xFFFFFFFF, pay, chain[6])
                else:
                    chain = None
                starts.extend(range(off, off + n, size))
                lengths.extend([size] * (segments - 1))
                lengths.append(last)
                msgs.extend([mi] * segments)
                hlens.extend([hl] * segments)
                continue
            stop = off + n
            step = size or n
            if not step or not (size or self.datagrams):
                # One datagram, delivered as it is (or an empty one, which the
                # forwarder counts as truncated).
                if key is not None:
                    if count > 1:
                        unchecked.append(len(runs))
                    runs.append((first, count))
                    key = None
                runs.append((len(starts), 1))
                starts.append(off)
                lengths.append(n)
                msgs.append(mi)
                hlens.append(0)
                continue
            for p in range(off, stop, step):
                length = min(step, stop - p)
                index = len(starts)
                starts.append(p)
                lengths.append(length)
                msgs.append(mi)
                hl = 0
                if length >= min_len and buf[p + ip] == 0x45 and buf[p + ip + 9] == 6:
                    pre, tot, frag, ttl, _proto, addrs, seq, ack, doff, flags, win, urg = unpack(
                        buf, p
                    )
                    thl = (doff >> 4) << 2
                    if (
                        tot == length - ip
                        and not frag & 0x3FFF
                        and thl >= 20
                        and flags & ~TCP_PSH == TCP_ACK
                        and length > ip + 20 + thl
                    ):
                        hl = ip + 20 + thl
                hlens.append(hl)
                if not hl:
                    if key is not None:
                        if count > 1:
                            unchecked.append(len(runs))
                        runs.append((first, count))
                        key = None
                    runs.append((index, 1))
                    continue
                pay = length - hl
                opts = bytes(buf[p + ip + 40 : p + hl]) if hl > ip + 40 else b""
                this = (peer, pre, frag, ttl, addrs, ack, doff, win, urg, opts)
                if (
                    key is not None
                    and this == key
                    and seq == next_seq
                    and pay <= mss
                    and count < cap
                    and payload + pay <= MAX_PAYLOAD
                ):
                    count += 1
                    payload += pay
                else:
                    if key is not None:
                        if count > 1:
                            unchecked.append(len(runs))
                        runs.append((first, count))
                    first, count, payload, key, mss = index, 1, pay, this, pay
                next_seq = (seq + pay) & 0xFFFFFFFF
                if flags & TCP_PSH or pay < mss:
                    # Only the last segment of a run may be short or carry PSH.
                    if count > 1:
                        unchecked.append(len(runs))
                    runs.append((first, count))
                    key = None
        if key is not None:
            if count > 1:
                unchecked.append(len(runs))
            runs.append((first, count))
        if unchecked:
            self._check_runs(messages, out, unchecked)
        return out

    def plan_whole(
        self,
        offsets: list[int],
        lengths: list[int],
        sizes: list[int],
        sources: list[str],
        ports: list[int],
        m: int,
    ) -> list[Run] | None:
        """The common case without per-segment bookkeeping. Over the first `m`
        messages of a recvmmsg batch (offset, length, segment size — the length for a
        single datagram — and peer address and port of each): runs (see `Run`), when
        every message is either one datagram (header length 0: delivered as it is) or
        a UDP GRO message of valid segments (see _whole_message); None as soon as one
        is neither — then `plan` decides segment by segment.

        A GRO message is cut after each inner segment with PSH and where the headers
        change (the node's GRO cuts at its poll's packet quota, not where the sender's
        super-packets end, so one message may hold the end of one and the start of
        the next, with another timestamp). A run joins consecutive pieces of one flow
        as `plan` does: same peer, segment size and headers, contiguous sequence
        numbers, the earlier piece's last segment full-size without PSH, within
        `max_segments` and MAX_PAYLOAD; a piece that does not fit whole gives the run
        what fits and starts the next with the rest (so that writes carry 64 KiB
        where the node's GRO cut elsewhere; `plan_batch` does the same, `plan` cuts
        only between messages)."""
        runs: list[Run] = []
        buf = self.buf
        seq_at = self.ip_off + 24
        psh_at = self.ip_off + 33
        cap = self.max_segments
        # The open run that the next message may extend: its index in runs, its
        # segment count so far, next sequence number (open_run -1: none may extend it).
        open_run = -1
        segs = next_seq = 0
        self.lone_behind = False
        for i in range(m):
            off, n, size = offsets[i], lengths[i], sizes[i]
            if size >= n:
                runs.append((i, 1, 0, n, 0, 0))  # one datagram
                open_run = -1
                if segs:  # (a run of segments before it: see lone_behind)
                    self.lone_behind = True
                continue
            whole = self._whole_message(off, n, size, pushes_ok=True)
            if whole is None:
                return None
            hl, segments, last, pushes = whole
            seg_pay = size - hl
            seq0 = int.from_bytes(buf[off + seq_at : off + seq_at + 4], "big")
            begin = 0
            for end in (*(p + 1 for p in pushes), segments) if pushes else (segments,):
                # The piece: segments begin..end-1 of this message.
                count = end - begin
                pay = count * seg_pay if end < segments else n - segments * hl - begin * seg_pay
                upto = end if end < segments else 0
                if open_run >= 0 and begin == 0:
                    r_first, r_count, r_hl, r_pay, r_skip, _ = runs[open_run]
                    if (
                        r_hl == hl
                        and sizes[r_first] == size
                        and ports[r_first] == ports[i]
                        and sources[r_first] == sources[i]
                        and next_seq == seq0
                        and self._same_flow(offsets[r_first] + r_skip * size, off, hl)
                    ):
                        if segs + count <= cap and r_pay + pay <= MAX_PAYLOAD:
                            runs[open_run] = (r_first, r_count + 1, hl, r_pay + pay, r_skip, upto)
                            segs += count
                        else:
                            # Full: the run takes what fits of this piece (full-size
                            # segments), the rest starts the next run.
                            take = _room(count, segs, r_pay, seg_pay, cap)
                            if take > 0:
                                runs[open_run] = (r_first, r_count + 1, hl, r_pay + take * seg_pay,
                                                  r_skip, take)  # fmt: skip
                                begin, count, pay = take, count - take, pay - take * seg_pay
                            open_run = -1
                    else:
                        open_run = -1
                else:
                    open_run = -1
                if open_run < 0:
                    open_run = len(runs)
                    runs.append((i, 1, hl, pay, begin, upto))
                    segs = count
                if end < segments or last != size or buf[off + n - last + psh_at] & TCP_PSH:
                    open_run = -1  # ends with PSH, or short: the next piece starts anew
                else:
                    next_seq = (seq0 + segments * seg_pay) & 0xFFFFFFFF
                begin = end
        return runs

    def plan_batch(
        self,
        base: int,
        stride: int,
        lengths: list[int],
        sizes: list[int],
        sources: list[str],
        ports: list[int],
    ) -> list[Run] | None:
        """plan_whole for the common batch, decided for all its messages at once: m =
        len(lengths) UDP GRO messages of one segment size, message i at base + i *
        stride (the receiver's slots), `sizes` their GRO segment sizes, `sources`
        and `ports` their peers' addresses and ports. The same runs as plan_whole;
        None when plan_whole would decline, or when the batch is not of that shape
        (then plan_whole decides).

        Segment j of message i is row (i, j) of strided numpy views over the slots
        (strides: stride, segment size). The rows that hold a segment are gathered
        into compact arrays (header words, sequence numbers) and checked with a
        fixed number of numpy calls, whatever the batch holds, against a dozen per
        message in plan_whole. Each message's last segment is padded with zeros to
        the segment size first (a one's complement sum does not change), so every
        row sums alike: the slot must have room for that (stride ≥ the longest
        message + the segment size), which the engine's receiver gives for segments
        up to a jumbo frame's. What follows from the message lengths alone (which
        rows are segments, what each one's IP length and TCP length must be) is
        worked out once per batch shape (_BatchShape): a bulk flow's batches come
        in a few shapes, over and over."""
        m = len(lengths)
        if m < 2 or base & 1 or stride & 1:
            return None
        buf = self.buf
        ip = self.ip_off
        hl = ip + 20 + ((buf[base + ip + 32] >> 4) << 2)
        key = (base, stride, hl, tuple(lengths), tuple(sizes))
        shape = self._shapes.get(key)
        if shape is None:
            shape = _BatchShape.of(self, base, stride, hl, lengths, sizes)
            rows = shape.n if isinstance(shape, _BatchShape) else 1
            if self._shape_rows + rows > MAX_SHAPE_ROWS:
                self._shapes.clear()
                self._shape_rows = 0
            self._shapes[key] = shape
            self._shape_rows += rows
        if shape is _DECLINE:
            return None
        assert isinstance(shape, _BatchShape)
        rows, size, w = shape.rows, shape.size, shape.w
        ii, jj = shape.ii, shape.jj
        if shape.run_on and not shape.take_lead(buf[base] | buf[base + 1] << 8):
            return None
        # Pad every message's last segment to the segment size, and 2 bytes more
        # (see the TCP checksums below).
        for end, pad in shape.pads:
            buf[end : end + pad] = _ZEROS[:pad]
        # Header words: the bits the shape fixes (the protocol, IP total length, PSH
        # only on a message's last segment…), and every segment equal to its
        # message's first where a run must be. One count for both.
        words = np.ndarray((m, rows, w), "<u8", buf, base, (stride, size, 8))[ii, jj]
        bad = (words & shape.check_mask) ^ shape.check_value
        bad |= (words ^ words[shape.firsts]) & shape.keep
        if np.count_nonzero(bad):
            return None
        # Sequence numbers contiguous within each message (uint32: they may wrap),
        # read from the gathered header words.
        seq = np.ndarray((len(ii),), ">u4", words, ip + 24, (w * 8,)).astype(np.uint32)
        if np.count_nonzero((seq - seq[shape.firsts]) != shape.seq_steps):
            return None
        # The first IP header of each message (the one a merged packet keeps; the
        # others' fields were compared with it).
        ip_hdr = np.ndarray((m, 10), "<u2", buf, base + ip, (stride, 2))
        if np.count_nonzero(np.add.reduce(ip_hdr, axis=1, dtype=np.uint64) % _ONES):
            return None
        # TCP checksums: little-endian 32-bit words (16-bit when the rows are not
        # 4-byte aligned) from the inner addresses (the pseudo-header's) to the
        # padded end; protocol and TCP length added × 256 (see _tcp_sums_ok). A row
        # of 32-bit words may run on into the next row's first two bytes (run_on):
        # its message's, the same in every segment (the header check saw to it),
        # taken out again with the constants, unless the row is a message's last
        # (then the padding's zeros). When most rows of the grid are segments,
        # summed in place over every row (rows past a message's last hold stale
        # bytes within its slot, and are not picked): gathering the segments' rows
        # first copies the batch once more. Else (GRO messages of 44 and 2
        # segments, say) gathered, then summed.
        unit, width = shape.unit, shape.width
        tcp = np.ndarray((m, rows, width), f"<u{unit}", buf, base + ip + 12, (stride, size, unit))
        if shape.dense:
            grid = self._sum_grid[: m * rows].reshape(m, rows)
            np.add.reduce(tcp, axis=2, dtype=np.uint64, out=grid)
            sums = grid[ii, jj]
        else:
            sums = np.add.reduce(tcp[ii, jj], axis=1, dtype=np.uint64)
        sums += shape.sum_fix
        if np.count_nonzero(sums % _ONES):
            return None
        # Which message continues the one before it: same peer and flow, contiguous
        # sequence numbers, the earlier one's last segment full-size without PSH.
        # Asked in the loop below, over a handful of values per message.
        heads = shape.heads
        flow = (words[heads] & shape.keep_row).tolist()
        seq_first = seq[heads].tolist()
        full_before, psh_at = shape.full_before, shape.psh_at
        runs: list[Run] = []
        cap = self.max_segments
        seg_list, pay_list = shape.seg_list, shape.pay_list
        # The open run: first message, messages, segments, payload, segments of its
        # first message left to the run before (a message cut as plan_whole cuts it).
        first, count, segments, payload, skip = 0, 1, seg_list[0], pay_list[0], 0
        seg_pay = size - hl
        for i in range(1, m):
            s, p = seg_list[i], pay_list[i]
            if (
                full_before[i - 1]
                and sources[i] == sources[i - 1]
                and ports[i] == ports[i - 1]
                and seq_first[i] == (seq_first[i - 1] + pay_list[i - 1]) & 0xFFFFFFFF
                and not buf[psh_at[i - 1]] & TCP_PSH
                and flow[i] == flow[i - 1]
            ):
                if segments + s <= cap and payload + p <= MAX_PAYLOAD:
                    count += 1
                    segments += s
                    payload += p
                    continue
                take = _room(s, segments, payload, seg_pay, cap)
                if take > 0:
                    runs.append((first, count + 1, hl, payload + take * seg_pay, skip, take))
                    first, count, segments, payload, skip = i, 1, s - take, p - take * seg_pay, take
                    continue
            runs.append((first, count, hl, payload, skip, 0))
            first, count, segments, payload, skip = i, 1, s, p, 0
        runs.append((first, count, hl, payload, skip, 0))
        return runs

    def _whole_message(
        self, off: int, n: int, size: int, pushes_ok: bool = False
    ) -> tuple[int, int, int, tuple[int, ...]] | None:
        """(header length, segments, last segment's length, cuts) when the GRO message
        at buf[off:off+n], cut every `size` bytes, is one valid run — or with
        `pushes_ok`, valid runs one after another (contiguous sequence numbers, one
        TCP header length), each ending at a segment with PSH or where the next has
        other headers: `cuts` are the segments that end one (the last aside); else
        None.

        Per-segment fields are read for all segments at once: byte slices with a
        step of `size` (flags, total length) and numpy views with a row stride of
        `size` (headers, sequence numbers, checksummed words) — no copies, and a
        fixed dozen of numpy calls whatever the number of segments."""
        segments = -(-n // size)
        last = n - (segments - 1) * size
        if segments < 2 or segments > self.max_segments or off & 1 or size & 1:
            return None
        buf = self.buf
        ip = self.ip_off
        if size < self.min_len or buf[off + ip] != 0x45 or buf[off + ip + 9] != 6:
            return None
        hl = ip + 20 + ((buf[off + ip + 32] >> 4) << 2)
        if (
            hl < ip + 40
            or last <= hl
            or size <= hl
            or buf[off + ip + 6] & 0x3F
            or buf[off + ip + 7]
        ):
            return None
        stop = off + n
        full = segments - 1
        # Flags: ACK on all, PSH allowed on the last (with pushes_ok, on any).
        flags = buf[off + ip + 33 : stop : size]
        if flags[-1] & ~TCP_PSH != TCP_ACK:
            return None
        pushes: tuple[int, ...] = ()
        if flags[:-1] != _ACKS[:full]:
            if not pushes_ok:
                return None
            pushes = tuple(i for i in range(full) if flags[i] != TCP_ACK)
            if any(flags[i] != TCP_ACK | TCP_PSH for i in pushes):
                return None
        # IP total lengths: the datagram's, less what comes before the IP header.
        tot = size - ip
        if (
            buf[off + ip + 2 : stop - last : size] != bytes((tot >> 8,)) * full
            or buf[off + ip + 3 : stop - last : size] != bytes((tot & 0xFF,)) * full
            or (buf[stop - last + ip + 2] << 8 | buf[stop - last + ip + 3]) != last - ip
        ):
            return None
        # The first IP header is the one the merged packet keeps (with a new total
        # length and checksum): its checksum must be right. The others' fields are
        # all compared with it below (ID and checksum aside, which are not kept).
        if ones_complement_sum(buf[off + ip : off + ip + 20]) != 0xFFFF:
            return None
        # The header bytes that must be equal, taken from every segment into one
        # compact block (one numpy call), compared as bytes with the first's repeated.
        keep = self._keep.get(hl)
        if keep is None:
            keep = self._keep[hl] = np.flatnonzero(~self._may_differ[:hl])
        fixed = np.ndarray((segments, hl), np.uint8, buf, off, (size, 1)).take(keep, axis=1)
        if fixed.tobytes() != fixed[0].tobytes() * segments:
            if not pushes_ok:
                return None
            # Pieces with TCP headers of their own (another super-packet of the flow:
            # another timestamp, ACK number or window), cut where they change.
            if buf[off + ip + 32 : stop : size] != bytes((buf[off + ip + 32],)) * segments:
                return None  # another TCP header length
            differ = fixed[1:] != fixed[:-1]
            if differ[:, keep < ip + 28].any():
                return None  # not only the ACK number, window or options: decline
            changes = np.flatnonzero(differ.any(axis=1)).tolist()
            pushes = tuple(sorted({*pushes, *changes}))
        # Each piece's first IP header is the one its write keeps (its ID with it): it
        # is checked as the message's first is.
        for i in pushes:
            at = off + (i + 1) * size + ip
            if ones_complement_sum(buf[at : at + 20]) != 0xFFFF:
                return None
        seq = np.ndarray((segments,), ">u4", buf, off + ip + 24, (size,)).tolist()
        pay = size - hl
        if seq[0] + full * pay < 1 << 32:
            if seq != list(range(seq[0], seq[0] + segments * pay, pay)):
                return None
        elif any((b - a) & 0xFFFFFFFF != pay for a, b in itertools.pairwise(seq)):
            return None  # (the sequence numbers wrap inside this message)
        if not self._tcp_sums_ok(off, n, size, full, last):
            return None
        return hl, segments, last, pushes

    def _same_flow(self, a: int, b: int, hl: int) -> bool:
        """Do the segments at buf[a:] and buf[b:] (headers of length hl) belong in one
        run: equal in every header byte except IP length, ID and checksum, sequence
        number, TCP flags and checksum (the caller checks those)?"""
        buf = self.buf
        ip = self.ip_off
        for lo, hi in ((0, ip + 2), (ip + 6, ip + 10), (ip + 12, ip + 24), (ip + 28, ip + 33),
                       (ip + 34, ip + 36), (ip + 38, hl)):  # fmt: skip
            if buf[a + lo : a + hi] != buf[b + lo : b + hi]:
                return False
        return True

    def _tcp_sums_ok(self, off: int, n: int, size: int, full: int, last: int) -> bool:
        """Every TCP checksum of a GRO message valid?

        One's complement sums care neither about byte order nor word size: the
        sum of the little-endian 32-bit words of a range, mod 0xFFFF, is its
        big-endian 16-bit sum times 256 (mod 0xFFFF), and a valid checksum makes
        both 0. So the full-size segments are summed as they lie in memory, a
        matrix of uint32 words in one numpy call (16-bit words take twice as long).
        Each row runs from the inner IP addresses (the pseudo-header's) to the
        segment's end; the receiver places datagrams so that the start is 4-byte
        aligned, and when the row length is not a multiple of 4, it runs on into
        the first two bytes of the next segment — the VXLAN flags, equal in every
        segment of the run (the header check saw to it) — which are taken out
        again with the pseudo-header's protocol and length, all one constant. The
        last segment is summed on its own."""
        buf = self.buf
        start = self.ip_off + 12
        fix = (6 + size - start - 8) * 256  # protocol and TCP length (× 256: see above)
        if (off + start) & 3 == 0 and size & 1 == 0:
            extra = -(size - start) % 4
            if extra:
                fix += 0xFFFF - (buf[off] | buf[off + 1] << 8)
            width = (size - start + extra) >> 2
            words = np.ndarray((full, width), "<u4", buf, off + start, (size, 4))
        else:
            words = np.ndarray((full, (size - start) >> 1), "<u2", buf, off + start, (size, 2))
        sums = np.add.reduce(words, axis=1, dtype=np.uint64) + np.uint64(fix)
        if np.count_nonzero(sums % _ONES):
            return False
        at = off + full * size + start
        tail_words = np.ndarray(((last - start) >> 1,), "<u2", buf, at)
        tail = int(np.add.reduce(tail_words, dtype=np.uint64))
        if (last - start) & 1:
            tail += buf[off + n - 1]  # the odd byte is the high half of a big-endian word
        return (tail + (6 + last - start - 8) * 256) % 0xFFFF == 0

    def _check_runs(
        self, messages: list[tuple[int, int, int, int]], out: Batch, unchecked: list[int]
    ) -> None:
        """Split every run (of those at `unchecked` in out.runs) that holds a segment
        with a bad IP or TCP checksum into runs of one.

        The messages those runs came from are copied one after the other into a
        compact array (each rounded up to an even length, so that the gaps between
        receive slots are not summed); one add.reduceat sums every segment."""
        ip = self.ip_off
        runs = out.runs
        segs = [k for r in unchecked for k in range(runs[r][0], runs[r][0] + runs[r][1])]
        msgs = out.messages
        wanted = sorted({msgs[k] for k in segs})
        u8 = self.u8
        shift: dict[int, int] = {}
        base = 0
        parts = []
        for m in wanted:
            off, n = messages[m][0], messages[m][1]
            parts.append(u8[off : off + n + (n & 1)])
            shift[m] = base - off
            base += n + (n & 1)
        compact = np.concatenate([*parts, self._pad])
        u16 = compact.view(">u2")  # every part and the pad have an even length
        s = np.fromiter((out.starts[k] + shift[msgs[k]] for k in segs), np.int64, len(segs))
        length = np.fromiter((out.lengths[k] for k in segs), np.int64, len(segs))
        # Word ranges per segment: [ip, ip+12) [ip+12, ip+20) [ip+20, end) and the
        # gap to the next (ignored); see _whole_message.
        bounds = np.empty((len(segs), 4), dtype=np.int64)
        bounds[:, 0] = (s + ip) >> 1
        bounds[:, 1] = bounds[:, 0] + 6
        bounds[:, 2] = bounds[:, 0] + 10
        bounds[:, 3] = (s + length) >> 1
        sums = np.add.reduceat(u16, bounds.ravel(), dtype=np.uint64).reshape(-1, 4)
        ip_ok = (sums[:, 0] + sums[:, 1]) % _ONES == 0
        tcp_len = length - ip - 20
        tcp = sums[:, 1] + sums[:, 2] + (6 + tcp_len).astype(np.uint64)
        odd = (tcp_len & 1).astype(bool)
        if odd.any():
            tail = compact[np.where(odd, s + length - 1, 0)].astype(np.uint64) << np.uint64(8)
            tcp += np.where(odd, tail, np.uint64(0))
        valid = dict(zip(segs, (ip_ok & (tcp % _ONES == 0) & ((s & 1) == 0)).tolist(), strict=True))
        bad = {
            r
            for r in unchecked
            if not all(valid[k] for k in range(runs[r][0], runs[r][0] + runs[r][1]))
        }
        if not bad:
            return
        fixed: list[tuple[int, int]] = []
        for r, (first, count) in enumerate(runs):
            if r in bad:
                fixed.extend((k, 1) for k in range(first, first + count))
            else:
                fixed.append((first, count))
        out.runs = fixed


class DatagramPlanner:
    """Runs over single datagrams in fixed-stride slots (recvmmsg without UDP GRO
    upstream: a kernel VXLAN sender's outer UDP checksum 0 keeps the receiving
    node's GRO from merging), decided for the whole batch at once with numpy.

    The batch's datagrams are the rows of strided views over the receive buffer
    (row k at base + k * stride): each header field of every datagram is one view,
    without copies. A datagram joins the one before it by Coalescer's rules (see the
    module's notes); the IP and TCP checksums of every row are summed as matrices,
    one per datagram length among the rows that join (a run has one length but
    for its last). Some thirty numpy calls per batch whatever its size (numpy costs
    1–7 µs a call here), so the engine tries it only on batches that look like a
    stream (see fastpath_receive.ReceivePath._deliver_datagrams)."""

    def __init__(self, buf: bytearray, ip_off: int, *, max_segments: int = MAX_SEGMENTS) -> None:
        self.buf = buf
        self.ip_off = ip_off
        self.max_segments = max_segments

    def _tcp_sums_ok(self, base: int, stride: int, m: int, length: int) -> np.ndarray:
        """Per row: would a datagram of `length` bytes there have a valid TCP checksum?
        From the inner addresses (the pseudo-header's) to the end as little-endian
        32-bit words (16-bit when the rows are not 4-byte aligned), the bytes after
        the end masked off the last word; protocol and TCP length added (× 256: see
        Coalescer._tcp_sums_ok)."""
        ip = self.ip_off
        start = base + ip + 12
        unit = 4 if start & 3 == 0 else 2
        dtype = "<u4" if unit == 4 else "<u2"
        whole, rest = divmod(length - ip - 12, unit)
        rows = np.ndarray((m, whole), dtype, self.buf, start, (stride, unit))
        sums = np.add.reduce(rows, axis=1, dtype=np.uint64)
        if rest:
            tail = np.ndarray((m,), dtype, self.buf, start + whole * unit, (stride,))
            sums += tail & ((1 << 8 * rest) - 1)
        return (sums + np.uint64((6 + length - ip - 20) * 256)) % _ONES == 0

    def plan(
        self, base: int, stride: int, lengths: np.ndarray, peers: np.ndarray
    ) -> tuple[int, list[tuple[int, int]]]:
        """(header length, runs (first, count) of two or more datagrams, in order) over
        the m = len(lengths) datagrams at base + k * stride (k < m); `peers` any integer
        per datagram that differs between peers. The datagrams between the runs go as
        they came. The receive buffer must have room after every datagram for the
        header words (8 bytes) and the checksum sums (4), read, not written."""
        m = len(lengths)
        buf = self.buf
        ip = self.ip_off
        if m < 2 or base & 1 or stride & 3:
            return 0, []
        # The header length of a run: that of the longest datagram (a data segment;
        # rows with another TCP header length are not candidates).
        longest = int(lengths.argmax())
        at = base + longest * stride
        hl = ip + 20 + ((buf[at + ip + 32] >> 4) << 2)
        if hl < ip + 40 or int(lengths[longest]) <= hl:
            return 0, []
        keep, mask, value = header_masks(ip, hl)
        words = np.ndarray((m, len(keep)), "<u8", buf, base, (stride, 8))
        tot = np.ndarray((m,), ">u2", buf, base + ip + 2, (stride,))
        flags = np.ndarray((m,), np.uint8, buf, base + ip + 33, (stride,))
        seq = np.ndarray((m,), ">u4", buf, base + ip + 24, (stride,)).astype(np.int64)
        pay = lengths - hl
        candidate = ((words & mask) == value).all(axis=1) & (tot == lengths - ip) & (pay > 0)
        joins = np.zeros(m, dtype=bool)
        joins[1:] = (
            candidate[1:]
            & candidate[:-1]
            & ~((words[1:] ^ words[:-1]) & keep).any(axis=1)
            & (peers[1:] == peers[:-1])
            & ((seq[:-1] + pay[:-1]) & 0xFFFFFFFF == seq[1:])
            & (pay[1:] <= pay[:-1])
            & (flags[:-1] == TCP_ACK)  # PSH only on the last of a run
        )
        # A shorter segment is the last of its run.
        joins[2:] &= ~(joins[1:-1] & (pay[1:-1] < pay[:-2]))
        involved = joins.copy()
        involved[:-1] |= joins[1:]
        if not involved.any():
            return hl, []
        # Checksums, of every row (fewer numpy calls than picking the rows first).
        # IP headers: little-endian 16-bit words (a valid header sums to 0 mod 0xFFFF
        # in either byte order).
        ip_hdr = np.ndarray((m, 10), "<u2", buf, base + ip, (stride, 2))
        ip_sums = np.add.reduce(ip_hdr, axis=1, dtype=np.uint64)
        good = ip_sums % _ONES == 0
        # The longest datagrams' length (a run's full-size segments) as a matrix; the
        # few rows of other lengths (a run's short last segment) one by one in the
        # interpreter (~2 µs each against ~14 µs for another matrix), unless many.
        full = int(lengths[longest])
        tcp_ok = self._tcp_sums_ok(base, stride, m, full)
        others = np.flatnonzero(involved & (lengths != full))
        if len(others) > 4:
            for length in set(lengths[others].tolist()):
                tcp_ok |= (lengths == length) & self._tcp_sums_ok(base, stride, m, length)
        elif len(others):
            start = ip + 12
            for k in others.tolist():
                at = base + k * stride
                length = int(lengths[k])
                pseudo = 6 + length - ip - 20  # protocol and TCP length
                tcp_ok[k] = ones_complement_sum(buf[at + start : at + length], pseudo) == 0xFFFF
        good &= tcp_ok
        joins[1:] &= good[1:] & good[:-1]
        # Runs of two or more, cut at the caps.
        firsts = np.flatnonzero(~joins).tolist()
        firsts.append(m)
        runs: list[tuple[int, int]] = []
        cap = self.max_segments
        pays: list[int] | None = None
        for k in range(len(firsts) - 1):
            first = firsts[k]
            count = firsts[k + 1] - first
            if count < 2:
                continue
            if pays is None:
                pays = pay.tolist()
            most = min(cap, MAX_PAYLOAD // pays[first])
            while count > 1:
                take = min(count, most)
                runs.append((first, take))
                first += take
                count -= take
        return hl, runs
