"""Receive coalescing (dataplane/io/gro.py) on segments built with scapy.

Every run the coalescer plans must be something the kernel's TCP GRO would
merge, and every segment in a run must have valid IP and TCP checksums; the
rest stays single (the kernel validates those when they are written).
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from dataplane.io import gro
from dataplane.io.gro import MAX_SEGMENTS, Coalescer, DatagramPlanner, split_messages
from dataplane.packet.checksum import internet_checksum

MAC = "02:77:00:00:00:01"
SLOT = 65600
TS = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]


def segment(
    seq: int,
    payload: bytes,
    flags: str = "A",
    *,
    sport: int = 5201,
    ack: int = 1,
    window: int = 500,
    options: list | None = None,
    src: str = "10.244.2.2",
    tos: int = 0,
    vxlan: bool = True,
) -> bytes:
    inner = IP(src=src, dst="10.244.1.2", flags="DF", id=seq & 0xFFFF, tos=tos) / TCP(
        sport=sport, dport=40000, seq=seq, ack=ack, flags=flags, window=window,
        options=TS if options is None else options,
    ) / payload  # fmt: skip
    if not vxlan:
        return bytes(inner)
    return bytes(VXLAN(vni=1, flags=0x08) / Ether(dst=MAC, src="02:00:00:00:00:09") / inner)


class Rx:
    """A receive buffer with messages placed as recvmmsg would place them."""

    def __init__(self, ip_off: int = 22, slots: int = 8, slot: int = SLOT, shift: int = 0) -> None:
        self.slot = slot
        self.shift = shift  # where in its slot a message lands (MmsgReceiver's shift)
        self.buf = bytearray(slots * slot + 256)
        self.messages: list[tuple[int, int, int, int]] = []
        # Across single datagrams too (the engine leaves that off), so that the
        # interpreter's segment-by-segment rules are tested as well.
        self.coalescer = Coalescer(self.buf, ip_off, datagrams=True)

    def datagram(self, data: bytes, peer: int = 0) -> None:
        off = len(self.messages) * self.slot + self.shift
        self.buf[off : off + len(data)] = data
        self.messages.append((off, len(data), 0, peer))

    def gro(self, datagrams: list[bytes], peer: int = 0) -> None:
        """A UDP GRO message: same-size datagrams glued, the last may be shorter."""
        size = len(datagrams[0])
        assert all(len(d) == size for d in datagrams[:-1]) and len(datagrams[-1]) <= size
        off = len(self.messages) * self.slot + self.shift
        data = b"".join(datagrams)
        self.buf[off : off + len(data)] = data
        self.messages.append((off, len(data), size, peer))

    def runs(self) -> list[tuple[int, int]]:
        return self.coalescer.plan(self.messages).runs


def stream(count: int, size: int = 1398, start: int = 1000, last: int | None = None, **kw):
    out = []
    seq = start
    for i in range(count):
        n = size if i < count - 1 or last is None else last
        out.append(segment(seq, bytes([i & 0xFF]) * n, **kw))
        seq += n
    return out


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("gro", [False, True])
@pytest.mark.parametrize("last", [1398, 100, 101])
def test_a_contiguous_stream_is_one_run(gro: bool, last: int, shift: int) -> None:
    rx = Rx(shift=shift)
    segs = stream(8, last=last)
    if gro:
        rx.gro(segs)
        # The vectorised path (whole message at once) took it, not the fallback.
        assert rx.coalescer._whole_message(*rx.messages[0][:3]) is not None
    else:
        for s in segs:
            rx.datagram(s)
    plan = rx.coalescer.plan(rx.messages)
    assert plan.runs == [(0, 8)]
    assert plan.hlens == [22 + 20 + 32] * 8
    assert plan.lengths[-1] == len(segs[-1])


@pytest.mark.parametrize("gro", [False, True])
def test_psh_ends_a_run_and_only_the_last_may_carry_it(gro: bool) -> None:
    rx = Rx()
    psh = segment(1000 + 3 * 1398, b"x" * 1398, "PA")
    segs = [*stream(3), psh, *stream(2, start=1000 + 4 * 1398)]
    if gro:
        rx.gro(segs)
    else:
        for s in segs:
            rx.datagram(s)
    assert rx.runs() == [(0, 4), (4, 2)]


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("gro", [False, True])
@pytest.mark.parametrize("where", [0, 3, 7])
def test_a_corrupt_segment_is_never_merged(gro: bool, where: int, shift: int) -> None:
    rx = Rx(shift=shift)
    segs = [bytearray(s) for s in stream(8)]
    segs[where][200] ^= 0x40  # payload bit flip: only the TCP checksum notices
    if where == 7:
        segs[where][-1] ^= 0x01  # and the last byte of the last segment
    if gro:
        rx.gro([bytes(s) for s in segs])
    else:
        for s in segs:
            rx.datagram(bytes(s))
    for first, count in rx.runs():
        assert count == 1 or not first <= where < first + count


def test_a_corrupt_ip_header_is_never_merged() -> None:
    rx = Rx()
    segs = [bytearray(s) for s in stream(4)]
    segs[1][22 + 8] -= 1  # TTL changed, IP checksum not: the next row differs anyway
    segs[2][22 + 4] ^= 1  # IP ID changed (allowed to differ), IP checksum now wrong
    rx.gro([bytes(s) for s in segs])
    for first, count in rx.runs():
        assert count == 1 or not first <= 2 < first + count


@pytest.mark.parametrize(
    "change",
    [
        {"sport": 5202},
        {"ack": 2},
        {"window": 501},
        {"src": "10.244.2.3"},
        {"tos": 4},
        {"options": [("NOP", None), ("NOP", None), ("Timestamp", (1, 3))]},
    ],
)
def test_a_different_flow_or_header_breaks_the_run(change: dict) -> None:
    rx = Rx()
    segs = stream(3)
    segs.append(segment(1000 + 3 * 1398, b"y" * 1398, **change))
    for s in segs:
        rx.datagram(s)
    assert rx.runs() == [(0, 3), (3, 1)]


def test_a_gap_in_sequence_numbers_breaks_the_run() -> None:
    rx = Rx()
    segs = stream(3) + stream(2, start=1000 + 4 * 1398)
    rx.gro(segs)
    assert rx.runs() == [(0, 3), (3, 2)]


def test_a_short_segment_ends_the_run() -> None:
    rx = Rx()
    short = segment(1000 + 2 * 1398, b"s" * 500)
    segs = [*stream(2), short, *stream(2, start=1000 + 2 * 1398 + 500)]
    for s in segs:
        rx.datagram(s)
    assert rx.runs() == [(0, 3), (3, 2)]


def test_different_peers_never_share_a_run() -> None:
    rx = Rx()
    segs = stream(4)
    rx.datagram(segs[0], peer=0)
    rx.datagram(segs[1], peer=0)
    rx.datagram(segs[2], peer=1)
    rx.datagram(segs[3], peer=1)
    assert rx.runs() == [(0, 2), (2, 2)]


def test_non_tcp_syn_fin_and_empty_segments_stay_single() -> None:
    rx = Rx()
    rx.datagram(segment(1000, b"x" * 100, "S"))
    rx.datagram(segment(1100, b"x" * 100, "FA"))
    rx.datagram(segment(1200, b"", "A"))  # a pure ACK: nothing to merge
    rx.datagram(b"")
    rx.datagram(b"\x08\x00\x00\x00\x00\x00\x01\x00" + bytes(20))
    assert rx.runs() == [(i, 1) for i in range(5)]


def test_runs_are_capped_in_count_and_size() -> None:
    rx = Rx(slots=MAX_SEGMENTS + 6, slot=2048)
    for s in stream(MAX_SEGMENTS + 6, size=200):
        rx.datagram(s)
    assert rx.runs() == [(0, MAX_SEGMENTS), (MAX_SEGMENTS, 6)]
    rx = Rx(slots=60, slot=2048)
    for s in stream(60, size=1398):
        rx.datagram(s)
    runs = rx.runs()
    assert [c for _, c in runs] == [46, 14]  # 46 × 1398 ≤ 64 KiB of payload, 47 × not


def test_udp_backend_offsets() -> None:
    rx = Rx(ip_off=0)
    segs = stream(5, vxlan=False)
    rx.gro(segs)
    plan = rx.coalescer.plan(rx.messages)
    assert plan.runs == [(0, 5)] and plan.hlens == [52] * 5


def test_split_messages_cuts_without_merging() -> None:
    plan = split_messages([(0, 3000, 1000, 0), (65600, 0, 0, 0), (131200, 10, 0, 1)])
    assert plan.starts == [0, 1000, 2000, 65600, 131200]
    assert plan.lengths == [1000, 1000, 1000, 0, 10]
    assert plan.messages == [0, 0, 0, 1, 2]
    assert plan.runs == [(i, 1) for i in range(5)]


def test_scapy_segments_have_valid_checksums() -> None:
    # The premise of the tests above: scapy fills in checksums.
    inner = segment(5, b"abc", vxlan=False)
    assert internet_checksum(inner[:20]) == 0


def test_consecutive_gro_messages_of_one_flow_make_one_run() -> None:
    rx = Rx()
    segs = stream(30)
    rx.gro(segs[:10])
    rx.gro(segs[10:25])
    rx.gro(segs[25:])
    assert rx.runs() == [(0, 30)]


def first_gro_message(rx: Rx, second: str) -> int:
    """A GRO message of 10 segments, shaped for what `second` tests (its last
    segment with PSH, or short), then a sequence gap or a single datagram when
    `second` asks; returns the sequence number the next message should start at."""
    first = stream(10)
    nxt = 1000 + 10 * 1398
    if second == "psh":
        first[-1] = segment(1000 + 9 * 1398, bytes([9]) * 1398, "PA")
    if second == "short":
        first[-1] = segment(1000 + 9 * 1398, b"s" * 700)
        nxt = 1000 + 9 * 1398 + 700
    rx.gro(first)
    if second == "gap":
        nxt += 1398
    if second == "single":
        rx.datagram(segment(nxt, b"x" * 1398))
        nxt += 1398
    return nxt


@pytest.mark.parametrize(
    "second",
    [
        "gap",
        "psh",
        "short",
        "peer",
        "flow",
    ],
)
def test_gro_messages_that_cannot_continue_a_run(second: str) -> None:
    rx = Rx()
    nxt = first_gro_message(rx, second)
    rest = stream(5, start=nxt, sport=5202 if second == "flow" else 5201)
    rx.gro(rest, peer=1 if second == "peer" else 0)
    assert rx.runs() == [(0, 10), (10, 5)]


@pytest.mark.parametrize("gro", [False, True])
def test_sequence_numbers_that_wrap_inside_a_run(gro: bool) -> None:
    rx = Rx(shift=2)
    segs = [segment(((1 << 32) - 3 * 1398 - 5 + i * 1398) % (1 << 32), bytes([i]) * 1398)
            for i in range(6)]  # fmt: skip
    if gro:
        rx.gro(segs)
    else:
        for s in segs:
            rx.datagram(s)
    assert rx.runs() == [(0, 6)]


def test_single_datagrams_stay_single_unless_asked() -> None:
    rx = Rx()
    rx.coalescer = Coalescer(rx.buf, 22)  # the engine's setting
    for s in stream(4):
        rx.datagram(s)
    rx.gro(stream(3, start=1000 + 4 * 1398))
    plan = rx.coalescer.plan(rx.messages)
    assert plan.runs == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 3)]
    assert plan.lengths[:4] == [len(s) for s in stream(4)]


def peer_address(peer: int) -> tuple[str, int]:
    """The (address, port) a test's peer number stands for: bit 0 the port, the
    other bits the address (peers 1 and 2 differ from 0 in one of them each)."""
    return f"10.0.0.{1 + (peer >> 1)}", 8472 + (peer & 1)


def whole_runs(rx: Rx) -> list[tuple[int, int]] | None:
    """Coalescer.plan_whole over rx's messages, its runs converted to plan's segment
    runs (first segment, count); None when plan_whole declines the batch."""
    msgs = rx.messages
    sizes = [size or n for _, n, size, _ in msgs]  # the receiver's: a datagram's own length
    runs = rx.coalescer.plan_whole(
        [off for off, *_ in msgs],
        [n for _, n, _, _ in msgs],
        sizes,
        [peer_address(peer)[0] for *_, peer in msgs],
        [peer_address(peer)[1] for *_, peer in msgs],
        len(msgs),
    )
    if runs is None:
        return None
    segments = [-(-n // s) if s < n else 1 for (_, n, _, _), s in zip(msgs, sizes, strict=True)]
    return segment_runs(msgs, segments, runs)


def segment_runs(
    msgs: list[tuple[int, int, int, int]], segments: list[int], runs: list[tuple[int, ...]]
) -> list[tuple[int, int]]:
    """gro.Run tuples as plan's (first segment, count), each run's payload checked
    against the segments it takes."""
    out = []
    for first, count, hl, payload, skip, upto in runs:
        last = first + count - 1
        taken = sum(segments[first : first + count]) - skip
        if upto:
            taken -= segments[last] - upto
        if hl:
            # The run's payload: its segments' bytes less their headers.
            pay = 0
            for k in range(first, last + 1):
                n, size = msgs[k][1], msgs[k][2]
                lens = [size] * (segments[k] - 1) + [n - (segments[k] - 1) * size]
                pay += sum(lens[skip if k == first else 0 : upto if k == last and upto else None])
            assert payload == pay - taken * hl
        else:
            assert payload == msgs[first][1]
        out.append((sum(segments[:first]) + skip, taken))
    return out


@pytest.mark.parametrize("second", ["same", "gap", "psh", "short", "peer", "flow", "single"])
def test_whole_message_batches_plan_as_plan_does(second: str) -> None:
    rx = Rx(shift=2)
    rx.coalescer = Coalescer(rx.buf, 22)  # the engine's setting
    nxt = first_gro_message(rx, second)
    rest = stream(5, start=nxt, sport=5202 if second == "flow" else 5201)
    rx.gro(rest, peer=1 if second == "peer" else 0)
    rx.gro(stream(4, start=nxt + 5 * 1398, sport=5202 if second == "flow" else 5201))
    expected = rx.coalescer.plan(rx.messages).runs
    assert whole_runs(rx) == expected
    if second == "same":
        assert expected == [(0, 19)]


def test_whole_message_batches_respect_the_segment_cap() -> None:
    rx = Rx(shift=2)
    rx.coalescer = Coalescer(rx.buf, 22)
    seq = 1000
    for _ in range(3):
        rx.gro(stream(40, start=seq))
        seq += 40 * 1398
    # plan cuts between messages only; plan_whole gives a run what fits of the next
    # message (46 segments of 1,398 bytes: 64 KiB) and starts the next run with the rest.
    assert rx.coalescer.plan(rx.messages).runs == [(0, 40), (40, 40), (80, 40)]
    assert whole_runs(rx) == [(0, 46), (46, 46), (92, 28)]


def test_a_batch_with_a_corrupt_segment_is_left_to_plan() -> None:
    rx = Rx(shift=2)
    rx.coalescer = Coalescer(rx.buf, 22)
    rx.gro(stream(10))
    rx.gro(stream(10, start=1000 + 10 * 1398))
    off = rx.messages[1][0] + 3 * 1472 + 200
    rx.buf[off] ^= 0x40
    assert whole_runs(rx) is None
    assert rx.coalescer.plan(rx.messages).runs == [(0, 10), *((k, 1) for k in range(10, 20))]


# gro.DatagramPlanner: the same rules over single datagrams in fixed-stride slots,
# vectorised. Every case is checked against the interpreter's plan (Coalescer with
# datagrams=True), which the tests above pin down.


def planner_runs(rx: Rx) -> list[tuple[int, int]]:
    """DatagramPlanner's runs over rx's single datagrams, with the datagrams between
    them as runs of one (plan's form)."""
    msgs = rx.messages
    assert all(size == 0 for _, _, size, _ in msgs)
    planner = DatagramPlanner(rx.buf, rx.coalescer.ip_off)
    lengths = np.array([n for _, n, _, _ in msgs], dtype=np.int64)
    peers = np.array([peer for *_, peer in msgs], dtype=np.int64)
    hl, runs = planner.plan(msgs[0][0], rx.slot, lengths, peers)
    out: list[tuple[int, int]] = []
    done = 0
    for first, count in runs:
        assert count > 1 and first >= done
        out += [(k, 1) for k in range(done, first)]
        out.append((first, count))
        done = first + count
        # The header length the engine cuts the payloads at: every segment's.
        assert all(hl == 22 * (rx.coalescer.ip_off == 22) + 20 + 32 for _ in range(count))
    return out + [(k, 1) for k in range(done, len(msgs))]


def datagrams(segs: list[bytes], *, shift: int = 2, peers: list[int] | None = None,
              ip_off: int = 22) -> Rx:  # fmt: skip
    rx = Rx(ip_off=ip_off, slots=len(segs) + 1, shift=shift)
    for i, s in enumerate(segs):
        rx.datagram(s, peer=0 if peers is None else peers[i])
    return rx


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("last", [1398, 100, 101, 1])
def test_datagram_planner_merges_a_stream(shift: int, last: int) -> None:
    rx = datagrams(stream(8, last=last), shift=shift)
    assert planner_runs(rx) == rx.runs() == [(0, 8)]


def test_datagram_planner_udp_backend() -> None:
    rx = datagrams(stream(5, vxlan=False), ip_off=0, shift=0)
    assert planner_runs(rx) == rx.runs() == [(0, 5)]


@pytest.mark.parametrize(
    "case",
    ["psh", "short", "gap", "peer", "sport", "ack", "window", "src", "tos", "ttl", "options",
     "syn", "fin", "pure_ack", "udp", "fragment", "ip_options", "padding", "wrap", "empty"],
)  # fmt: skip
def test_datagram_planner_follows_the_merge_rules(case: str) -> None:
    """A stream of 4 + 1 changed + 4: where the interpreter's plan cuts, so does the
    planner (and both merge what the kernel's GRO would)."""
    size = 1398
    start = ((1 << 32) - 5 * size) if case == "wrap" else 1000
    segs = [segment((start + i * size) % (1 << 32), bytes([i]) * size) for i in range(9)]
    peers = [0] * 9
    seq4 = (start + 4 * size) % (1 << 32)
    odd: dict[str, bytes] = {
        "psh": segment(seq4, b"p" * size, "PA"),
        "short": segment(seq4, b"s" * 500),
        "gap": segment(seq4 + 1, b"g" * size),
        "sport": segment(seq4, b"x" * size, sport=5202),
        "ack": segment(seq4, b"x" * size, ack=2),
        "window": segment(seq4, b"x" * size, window=501),
        "src": segment(seq4, b"x" * size, src="10.244.2.3"),
        "tos": segment(seq4, b"x" * size, tos=4),
        "options": segment(seq4, b"x" * size, options=[("NOP", None), ("NOP", None),
                                                         ("Timestamp", (1, 3))]),
        "syn": segment(seq4, b"x" * size, "S"),
        "fin": segment(seq4, b"x" * size, "FA"),
        "pure_ack": segment(seq4, b""),
    }  # fmt: skip
    if case in odd:
        segs[4] = odd[case]
    elif case == "peer":
        peers[4:] = [1] * 5
    elif case == "ttl":
        seg = bytearray(segs[4])
        seg[22 + 8] -= 1
        seg[22 + 10 : 22 + 12] = b"\0\0"
        seg[22 + 10 : 22 + 12] = (~internet_checksum(bytes(seg[22:42])) & 0xFFFF).to_bytes(2)
        segs[4] = bytes(seg)
    elif case in ("udp", "fragment", "ip_options", "padding", "empty"):
        inner = bytearray(segs[4][22:])
        if case == "udp":
            inner[9] = 17
        elif case == "fragment":
            inner[6] |= 0x20  # MF
        elif case == "ip_options":
            inner[0] = 0x46
        elif case == "padding":
            inner += b"\0\0"  # the IP total length no longer matches the datagram
        else:
            inner = bytearray()
        if case != "padding" and inner:
            inner[10:12] = b"\0\0"
            inner[10:12] = (~internet_checksum(bytes(inner[:20])) & 0xFFFF).to_bytes(2)
        segs[4] = segs[4][:22] + bytes(inner)
    rx = datagrams(segs, peers=peers)
    expected = rx.runs()
    assert planner_runs(rx) == expected
    if case in ("psh", "short"):
        assert expected == [(0, 5), (5, 4)]
    elif case == "wrap":
        assert expected == [(0, 9)]
    elif case == "peer":
        assert expected == [(0, 4), (4, 5)]
    else:
        assert expected == [(0, 4), (4, 1), (5, 4)]


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("where", [0, 3, 7])
@pytest.mark.parametrize("last", [1398, 101])
def test_datagram_planner_never_merges_a_corrupt_segment(shift: int, where: int, last: int) -> None:
    segs = [bytearray(s) for s in stream(8, last=last)]
    if where == 7:
        segs[where][-1] ^= 0x01  # the last byte: the masked tail word must catch it
    else:
        segs[where][200] ^= 0x40  # a payload bit: only the TCP checksum notices
    rx = datagrams([bytes(s) for s in segs], shift=shift)
    runs = planner_runs(rx)
    # (The interpreter's plan splits a whole run with a bad segment into single
    # ones; the planner cuts out only the bad one.)
    assert runs == [r for r in [(0, where), (where, 1), (where + 1, 7 - where)] if r[1]]


def test_datagram_planner_never_merges_a_corrupt_ip_header() -> None:
    segs = [bytearray(s) for s in stream(6)]
    segs[2][22 + 4] ^= 1  # IP ID (allowed to differ), IP checksum now wrong
    rx = datagrams([bytes(s) for s in segs])
    assert planner_runs(rx) == [(0, 2), (2, 1), (3, 3)]


def test_datagram_planner_ignores_stale_bytes_after_a_datagram() -> None:
    """The bytes after a datagram in its slot (from an earlier, longer one) are not
    summed: a checksum that is only right with them must still be found wrong."""
    segs = stream(4, last=101)
    rx = datagrams(segs)
    off = rx.messages[3][0] + len(segs[3])
    rx.buf[off : off + 4] = b"\xff\xee\xdd\xcc"
    assert planner_runs(rx) == [(0, 4)]


def test_datagram_planner_caps_runs_in_count_and_size() -> None:
    rx = Rx(slots=MAX_SEGMENTS + 7, slot=2048, shift=2)
    for s in stream(MAX_SEGMENTS + 6, size=200):
        rx.datagram(s)
    assert planner_runs(rx) == rx.runs() == [(0, MAX_SEGMENTS), (MAX_SEGMENTS, 6)]
    rx = datagrams(stream(60))
    assert planner_runs(rx) == rx.runs() == [(0, 46), (46, 14)]


def test_datagram_planner_interleaved_flows_and_acks() -> None:
    """Two streams interleaved datagram by datagram do not merge (runs need
    neighbours); a stream with the other direction's pure ACKs between merges in
    the stretches between them."""
    a, b = stream(6), stream(6, sport=5202)
    rx = datagrams([x for pair in zip(a, b, strict=True) for x in pair])
    assert planner_runs(rx) == rx.runs() == [(k, 1) for k in range(12)]
    ack = segment(77, b"", sport=40000)
    segs = [*a[:3], ack, *a[3:]]
    rx = datagrams(segs)
    assert planner_runs(rx) == rx.runs() == [(0, 3), (3, 1), (4, 3)]


@pytest.mark.parametrize("corrupt", [None, 7])
def test_datagram_planner_streams_of_two_sizes(corrupt: int | None) -> None:
    """Rows of the longest length are summed as one matrix, a few others one by one,
    many others as a matrix per length: here 6 of 500 payload bytes after 4 of 1398."""
    segs = [bytearray(s) for s in [*stream(4), *stream(6, size=500, sport=5202)]]
    if corrupt is not None:
        segs[corrupt][150] ^= 0x01
    rx = datagrams([bytes(s) for s in segs])
    runs = planner_runs(rx)
    if corrupt is None:
        assert runs == rx.runs() == [(0, 4), (4, 6)]
    else:
        assert runs == [(0, 4), (4, 3), (7, 1), (8, 2)]


# gro.Coalescer.plan_batch: plan_whole's decisions for a whole recvmmsg batch of GRO
# messages at once. Checked against plan_whole (and so against plan) on the same
# buffers, including every way a message can fail to be one run.


def batch_runs(rx: Rx) -> list[tuple[int, int]] | None:
    """plan_batch over rx's messages, converted like whole_runs; None when it declines."""
    msgs = rx.messages
    runs = rx.coalescer.plan_batch(
        msgs[0][0],
        rx.slot,
        [n for _, n, _, _ in msgs],
        [size or n for _, n, size, _ in msgs],
        [peer_address(peer)[0] for *_, peer in msgs],
        [peer_address(peer)[1] for *_, peer in msgs],
    )
    if runs is None:
        return None
    segments = [-(-n // s) for _, n, s, _ in msgs]
    for _, _, hl, *_ in runs:
        assert hl == rx.coalescer.ip_off + 20 + 32
    return segment_runs(msgs, segments, runs)


def gro_batch(messages: list[list[bytes]], *, shift: int = 2, ip_off: int = 22,
              peers: list[int] | None = None) -> Rx:  # fmt: skip
    rx = Rx(ip_off=ip_off, shift=shift)
    rx.coalescer = Coalescer(rx.buf, ip_off)  # the engine's setting
    for i, segs in enumerate(messages):
        rx.gro(segs, peer=0 if peers is None else peers[i])
    return rx


@pytest.mark.parametrize("shift", [0, 2])  # 16-bit and 32-bit checksum words
@pytest.mark.parametrize("second", ["same", "gap", "psh", "short", "peer", "peer_address", "flow"])
def test_batch_plans_as_plan_whole_does(second: str, shift: int) -> None:
    rx = Rx(shift=shift)
    rx.coalescer = Coalescer(rx.buf, 22)
    nxt = first_gro_message(rx, second)
    rest = stream(5, start=nxt, sport=5202 if second == "flow" else 5201)
    rx.gro(rest, peer={"peer": 1, "peer_address": 2}.get(second, 0))
    rx.gro(stream(4, start=nxt + 5 * 1398, sport=5202 if second == "flow" else 5201))
    expected = whole_runs(rx)
    assert expected == rx.coalescer.plan(rx.messages).runs
    assert batch_runs(rx) == expected


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("last", [1398, 100, 101, 1])
def test_batch_short_last_segments_of_any_length(last: int, shift: int) -> None:
    """The last segment is padded to the segment size for the sums: odd and even
    lengths, and padding that must not change what the next message holds."""
    msgs = [stream(6, start=1000 + k * 6 * 1398) for k in range(3)]
    msgs.append(stream(5, start=1000 + 18 * 1398, last=last))
    rx = gro_batch(msgs, shift=shift)
    held = bytes(rx.buf)
    assert batch_runs(rx) == whole_runs(rx) == [(0, 23)]
    for off, n, _, _ in rx.messages:
        assert rx.buf[off : off + n] == held[off : off + n]


def test_batch_udp_backend() -> None:
    segs = stream(12, vxlan=False)
    rx = gro_batch([segs[:5], segs[5:9], segs[9:]], ip_off=0, shift=0)
    assert batch_runs(rx) == whole_runs(rx) == [(0, 12)]


@pytest.mark.parametrize(
    ("size", "count", "expected"),
    [(500, 30, [(0, 64), (64, 26)]),  # 64 segments at most
     (1398, 15, [(0, 46), (46, 44)])],  # 64 KiB at most
)  # fmt: skip
def test_batch_respects_the_caps(size: int, count: int, expected: list) -> None:
    """A message that only partly fits the run before it: plan_whole and plan_batch
    cut it there."""
    seq, msgs = 1000, []
    for _ in range(6 if size == 1398 else 3):
        msgs.append(stream(count, size=size, start=seq))
        seq += count * size
    rx = gro_batch(msgs)
    assert batch_runs(rx) == whole_runs(rx) == expected


def test_batch_of_super_packets_that_fill_their_runs() -> None:
    """[44, 2] per super-packet of 46 segments (64 KiB), the common batch: every run
    is full where the next message begins."""
    msgs, seq = [], 1000
    for _ in range(3):
        msgs += [stream(44, start=seq), stream(2, start=seq + 44 * 1398)]
        seq += 46 * 1398
    rx = gro_batch(msgs)
    assert batch_runs(rx) == whole_runs(rx) == [(0, 46), (46, 46), (92, 46)]
    # Two of them back to back, cut [44, 20, 28] by the node's GRO, nothing to cut at
    # inside (one timestamp, no push): two runs of 46, not three writes.
    segs = stream(92)
    rx = gro_batch([segs[:44], segs[44:64], segs[64:]])
    assert batch_runs(rx) == whole_runs(rx) == [(0, 46), (46, 46)]


def test_batch_sequence_numbers_that_wrap() -> None:
    start = (1 << 32) - 7 * 1398 - 5
    segs = [segment((start + i * 1398) % (1 << 32), bytes([i]) * 1398) for i in range(12)]
    rx = gro_batch([segs[:6], segs[6:]])
    assert batch_runs(rx) == whole_runs(rx) == [(0, 12)]


def with_lead(seg: bytes, lead: bytes, hide: int = 0) -> bytes:
    """seg with its first two bytes (VXLAN flags and reserved) set to `lead`, and,
    with `hide`, its payload changed by that much in its one's complement sum (a
    little-endian 16-bit word at an even offset from the inner addresses)."""
    out = bytearray(seg)
    out[:2] = lead
    if hide:
        word = (int.from_bytes(out[300:302], "little") + hide) % 0xFFFF
        out[300:302] = word.to_bytes(2, "little")
    return bytes(out)


def test_batch_rows_that_run_on_into_other_leading_bytes() -> None:
    """Rows of 32-bit words run on into the next segment's first two bytes (VXLAN
    flags and a reserved byte: 1472-byte segments): plan_batch takes them out as one
    constant, so the batch's messages must all begin alike, or it declines. The
    second message begins 08 01 and each of its segments but the last has a payload
    that differs by exactly what the first message's constant would hide: plan_whole
    sees each message with its own bytes and declines; so must plan_batch."""
    segs = stream(12)
    rx = gro_batch([segs[:5], segs[5:]])
    assert batch_runs(rx) == whole_runs(rx) == [(0, 12)]
    assert rx.coalescer._shapes[next(iter(rx.coalescer._shapes))].run_on
    hide = (0x0008 - 0x0108) % 0xFFFF
    odd = [with_lead(s, b"\x08\x01", hide if i < 6 else 0) for i, s in enumerate(segs[5:])]
    rx = gro_batch([segs[:5], odd])
    assert whole_runs(rx) is None
    assert batch_runs(rx) is None
    # Leading bytes alike but not VXLAN's usual (one segment hidden as above is caught).
    lead = [with_lead(s, b"\x08\x01") for s in segs]
    rx = gro_batch([lead[:5], lead[5:]])
    assert batch_runs(rx) == whole_runs(rx) == [(0, 12)]
    lead[7] = with_lead(segs[7], b"\x08\x01", (0x0108 - 0x0008) % 0xFFFF)
    rx = gro_batch([lead[:5], lead[5:]])
    assert batch_runs(rx) is None and whole_runs(rx) is None
    # Through one Coalescer, in the same slots: the kept shape follows the change
    # of leading bytes both ways.
    rx = gro_batch([segs[:5], segs[5:]])
    other = gro_batch([(s := [with_lead(x, b"\x08\x01") for x in segs])[:5], s[5:]])
    clean = bytes(rx.buf)
    for buf in (other.buf, clean, other.buf):
        rx.buf[:] = buf
        assert batch_runs(rx) == [(0, 12)]
    assert len(rx.coalescer._shapes) == 1


DECLINE_CASES = [
    "psh", "gap", "sport", "ack", "window", "src", "tos", "ttl", "options", "syn", "fin",
    "udp", "fragment", "ip_options", "first_ip_sum", "tot", "payload", "last_payload",
    "last_odd_payload", "last_fin", "first_psh",
]  # fmt: skip


def declining_segments(case: str, *, odd_one: bool = True) -> list[bytes]:
    """15 segments for two GRO messages (5 + 10) of which one is not what a run needs
    (`case`); with odd_one=False the same stream as it should be (same lengths)."""
    size = 1398
    n_last = 101 if case == "last_odd_payload" else size
    segs = stream(15, last=n_last)
    # Segment 13 begins the last message when the 15 come as 2 + 11 + 2.
    where = {"first_ip_sum": 5, "first_psh": 13}.get(case, 14 if case.startswith("last") else 8)
    seq = 1000 + where * size
    odd: dict[str, bytes] = {
        "psh": segment(seq, bytes([where]) * size, "PA"),
        "gap": segment(seq + 1, bytes([where]) * size),
        "sport": segment(seq, bytes([where]) * size, sport=5202),
        "ack": segment(seq, bytes([where]) * size, ack=2),
        "window": segment(seq, bytes([where]) * size, window=501),
        "src": segment(seq, bytes([where]) * size, src="10.244.2.3"),
        "tos": segment(seq, bytes([where]) * size, tos=4),
        "options": segment(seq, bytes([where]) * size,
                           options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 3))]),
        "syn": segment(seq, bytes([where]) * size, "S"),
        "fin": segment(seq, bytes([where]) * size, "FA"),
        "last_fin": segment(seq, bytes([where]) * size, "FA"),
        "first_psh": segment(seq, bytes([where]) * size, "PA"),
    }  # fmt: skip
    if not odd_one:
        return segs
    if case in odd:
        segs[where] = odd[case]
    else:
        seg = bytearray(segs[where])
        ip = 22
        if case == "ttl":
            seg[ip + 8] -= 1
        elif case == "udp":
            seg[ip + 9] = 17
        elif case == "fragment":
            seg[ip + 6] |= 0x20
        elif case == "ip_options":
            seg[ip] = 0x46
        elif case == "tot":
            seg[ip + 3] -= 2  # says 2 bytes fewer than the datagram holds
        elif case == "first_ip_sum":
            seg[ip + 10] ^= 0x01  # the IP header checksum of a message's first segment
        else:
            seg[-1 if case == "last_odd_payload" else 300] ^= 0x20
        if case in ("ttl", "udp", "fragment", "ip_options", "tot"):
            seg[ip + 10 : ip + 12] = b"\0\0"
            csum = ~internet_checksum(bytes(seg[ip : ip + 20])) & 0xFFFF
            seg[ip + 10 : ip + 12] = csum.to_bytes(2)
        segs[where] = bytes(seg)
    return segs


@pytest.mark.parametrize("case", DECLINE_CASES)
@pytest.mark.parametrize("shift", [0, 2])
def test_batch_declines_what_plan_whole_declines(case: str, shift: int) -> None:
    """One segment of the second message is not what the run needs: plan_batch
    declines the batch as plan_whole does (plan then cuts it segment by segment) —
    but for a PSH inside a message, or a segment whose ACK number, window or TCP
    options differ, where plan_whole cuts the message there (CUTS)."""
    segs = declining_segments(case)
    rx = gro_batch([segs[:5], segs[5:]], shift=shift)
    assert whole_runs(rx) == CUTS.get(case)
    assert batch_runs(rx) is None


#: declining_segments' cases that plan_whole cuts rather than declines, and its runs:
#: a PSH inside the second message (at segment 8 or 13 of 15) ends a run there; a
#: segment with another ACK number, window or timestamp (segment 8) is a run of its
#: own, the segments after it another.
CUTS = {
    "psh": [(0, 9), (9, 6)],
    "first_psh": [(0, 14), (14, 1)],
    **{case: [(0, 8), (8, 1), (9, 6)] for case in ("ack", "window", "options")},
}


@pytest.mark.parametrize("shift", [0, 2])
def test_a_psh_inside_a_gro_message_cuts_it(shift: int) -> None:
    """A node's GRO cuts at its poll's packet quota, not at the sender's pushes, so
    one GRO message can hold the end of one super-packet (PSH) and the start of the
    next: [44, 20, 28] for two super-packets of 46 back to back. plan_whole cuts the
    message after the PSH and joins each piece to its neighbour; plan_batch leaves
    such batches to it; plan, segment by segment, makes four runs of them."""
    segs = stream(92)
    segs[45] = segment(1000 + 45 * 1398, bytes([45]) * 1398, "PA")
    rx = gro_batch([segs[:44], segs[44:64], segs[64:]], shift=shift)
    assert whole_runs(rx) == [(0, 46), (46, 46)]
    assert batch_runs(rx) is None
    assert rx.coalescer.plan(rx.messages).runs == [(0, 44), (44, 2), (46, 18), (64, 28)]
    # The piece after the push keeps its first segment's IP header: checked as a
    # message's first is, a bad one declines the batch.
    bad = bytearray(segs[46])
    bad[22 + 10] ^= 0x01
    rx = gro_batch([segs[:44], [*segs[44:46], bytes(bad), *segs[47:64]], segs[64:]], shift=shift)
    assert whole_runs(rx) is None
    # Without the push, but the second super-packet with its own timestamp, as a
    # sender's TCP gives each: cut where it changes.
    ts2 = [("NOP", None), ("NOP", None), ("Timestamp", (2, 1))]
    later = [segment(1000 + i * 1398, bytes([i]) * 1398, options=ts2) for i in range(46, 92)]
    rx = gro_batch([segs[:44], [*stream(46)[44:], *later[:18]], later[18:]], shift=shift)
    assert whole_runs(rx) == [(0, 46), (46, 46)]
    # Two pushes in one message, and a one-segment piece between them.
    segs[50] = segment(1000 + 50 * 1398, bytes([50]) * 1398, "PA")
    segs[51] = segment(1000 + 51 * 1398, bytes([51]) * 1398, "PA")
    rx = gro_batch([segs[:44], segs[44:64], segs[64:]], shift=shift)
    assert whole_runs(rx) == [(0, 46), (46, 5), (51, 1), (52, 40)]


@pytest.mark.parametrize("case", DECLINE_CASES)
def test_batch_of_a_known_shape_is_checked_again(case: str) -> None:
    """plan_batch keeps what follows from a batch's shape (message lengths, segment
    size, header length) and reuses it for the next batch of that shape: the next
    batch's bytes are all checked again. A good batch, then the odd one in the same
    slots (same lengths), then the good one again, through one Coalescer."""
    good = gro_batch([(s := declining_segments(case, odd_one=False))[:5], s[5:]])
    odd = gro_batch([(s := declining_segments(case))[:5], s[5:]])
    clean = bytes(good.buf)
    expected = batch_runs(good)
    assert expected == [(0, 15)]
    assert len(good.coalescer._shapes) == 1
    good.buf[:] = odd.buf  # same length: the buffer is written over, not replaced
    assert batch_runs(good) is None
    assert len(good.coalescer._shapes) == 1  # the kept shape served
    good.buf[:] = clean
    assert batch_runs(good) == expected
    assert len(good.coalescer._shapes) == 1


def fill_stale(rx: Rx, seed: int) -> None:
    """Random bytes in every slot past its message: what earlier batches left there."""
    rng = random.Random(seed)
    for off, n, _, _ in rx.messages:
        end = off - rx.shift + rx.slot
        rx.buf[off + n : end] = rng.randbytes(end - off - n)


@pytest.mark.parametrize("split", [(5, 10), (2, 11, 2)])  # grid summed whole, or gathered
@pytest.mark.parametrize("case", [None, *DECLINE_CASES])
def test_batch_rows_past_a_message_count_for_nothing(case: str | None, split: tuple) -> None:
    """The grid of (message, segment) rows runs past a shorter message's last segment
    into stale bytes: whatever they hold, plan_batch decides as plan_whole does."""
    segs = declining_segments(case or "psh", odd_one=case is not None)
    cuts = list(itertools.accumulate(split, initial=0))
    msgs = [segs[a:b] for a, b in itertools.pairwise(cuts)]
    clean = gro_batch(msgs)
    expected = whole_runs(clean)
    cut = case in CUTS and expected is not None  # plan_whole's alone
    assert batch_runs(clean) == (None if cut else expected)
    if case is None:
        assert expected == [(0, 15)]
    for seed in range(3):
        rx = gro_batch(msgs)
        fill_stale(rx, seed)
        assert whole_runs(rx) == expected
        assert batch_runs(rx) == (None if cut else expected)


def test_batch_shapes_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes are kept for so many rows of segments in all, then dropped."""
    monkeypatch.setattr(gro, "MAX_SHAPE_ROWS", 40)
    rx = gro_batch([stream(5), stream(5, start=1000 + 5 * 1398)])
    co = rx.coalescer
    seq = 1000
    for count in range(2, 12):  # same slots, ten lengths, one Coalescer
        msgs = [stream(count, start=seq), stream(count, start=seq + count * 1398)]
        for i, segs in enumerate(msgs):
            data = b"".join(segs)
            off = i * rx.slot + rx.shift
            rx.buf[off : off + len(data)] = data
        rx.messages = [(i * rx.slot + rx.shift, count * len(msgs[0][0]), len(msgs[0][0]), 0)
                       for i in range(2)]  # fmt: skip
        assert batch_runs(rx) == [(0, 2 * count)]
        assert co._shape_rows <= 40
    assert len(co._shapes) < 10


def test_batch_leaves_other_shapes_to_plan_whole() -> None:
    segs = stream(12)
    rx = gro_batch([segs[:5], segs[5:10]])
    rx.datagram(segs[10])  # a single datagram in the batch
    assert batch_runs(rx) is None and whole_runs(rx) is not None
    rx = gro_batch([stream(5), stream(5, size=1000, start=1000 + 5 * 1398)])  # two sizes
    assert batch_runs(rx) is None and whole_runs(rx) is not None
