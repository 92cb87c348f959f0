"""gro.lone_first: a batch's single datagrams ahead of its bulk runs, every flow's order kept."""

from __future__ import annotations

import random

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from test_fastpath_gro import MAC, Rx, peer_address, segment, stream

from dataplane.io.gro import Coalescer, Run, lone_first

IP_OFF = 22


def vxlan(inner: IP) -> bytes:
    return bytes(VXLAN(vni=1, flags=0x08) / Ether(dst=MAC, src="02:00:00:00:00:09") / inner)


def ping(src: str = "10.244.2.3", seq: int = 1) -> bytes:
    return vxlan(IP(src=src, dst="10.244.1.2") / ICMP(id=7, seq=seq) / (b"p" * 56))


def plan(rx: Rx, lone_behind: bool | None = None) -> tuple[list[Run], list[int]]:
    """plan_whole's runs over rx's messages (as the engine calls it), and their
    offsets; with `lone_behind`, what plan_whole must say of a single behind a run."""
    msgs = rx.messages
    offsets = [off for off, *_ in msgs]
    coalescer = Coalescer(rx.buf, IP_OFF)
    coalescer.lone_behind = lone_behind is False  # (the opposite: plan_whole must set it)
    runs = coalescer.plan_whole(
        offsets,
        [n for _, n, _, _ in msgs],
        [size or n for _, n, size, _ in msgs],
        [peer_address(p)[0] for *_, p in msgs],
        [peer_address(p)[1] for *_, p in msgs],
        len(msgs),
    )
    assert runs is not None
    if lone_behind is not None:
        assert coalescer.lone_behind is lone_behind
    return runs, offsets


def order(runs: list[Run]) -> list[tuple[int, int]]:
    """(first message, header length or 0) of each run, in order."""
    return [(r[0], r[2]) for r in runs]


def test_a_ping_behind_a_stream_goes_first() -> None:
    rx = Rx()
    rx.gro(stream(10))  # message 0: a stream's GRO message (flow A)
    rx.datagram(ping())  # message 1: a ping of another pod
    rx.gro(stream(10, start=1000 + 10 * 1398, sport=5202))  # message 2: flow B
    runs, offsets = plan(rx, lone_behind=True)
    assert [r[0] for r in runs] == [0, 1, 2] and runs[1][2] == 0
    moved, ahead = lone_first(runs, rx.buf, offsets, IP_OFF)
    assert [r[0] for r in moved] == [1, 0, 2] and ahead == 1
    assert sorted(moved) == sorted(runs)  # every run, each once, unchanged


def test_a_single_of_a_flow_with_a_run_before_it_stays_behind_it() -> None:
    rx = Rx()
    rx.gro(stream(10))  # flow A, segments 0..9
    gap = 1000 + 11 * 1398
    rx.datagram(segment(gap, b"x" * 1398))  # flow A after a gap: a single, behind its run
    rx.datagram(ping())
    runs, offsets = plan(rx)
    assert order(runs) == [(0, runs[0][2]), (1, 0), (2, 0)]
    assert order(lone_first(runs, rx.buf, offsets, IP_OFF)[0]) == [(2, 0), (0, runs[0][2]), (1, 0)]


def test_singles_of_one_flow_move_together_in_their_order() -> None:
    rx = Rx()
    rx.gro(stream(10))
    rx.datagram(ping(seq=1))
    rx.gro(stream(10, start=1000 + 10 * 1398))
    rx.datagram(ping(seq=2))
    runs, offsets = plan(rx)
    moved, ahead = lone_first(runs, rx.buf, offsets, IP_OFF)
    firsts = [r[0] for r in moved]
    assert firsts[:2] == [1, 3] and sorted(firsts[2:]) == firsts[2:] and ahead == 2


def test_a_udp_datagram_of_another_pair_moves_a_tcp_one_of_the_streams_pair_does_not() -> None:
    """The flow is told by addresses and protocol: a single of the stream's pair and
    protocol (another port: another flow, still) keeps its place; UDP between the
    same pods is another protocol and moves."""
    rx = Rx()
    rx.gro(stream(10))
    rx.datagram(segment(1, b"y" * 100, "PA", sport=6000))  # same pair, TCP, another port
    rx.datagram(vxlan(IP(src="10.244.2.2", dst="10.244.1.2") / UDP(sport=53, dport=53) / b"q"))
    runs, offsets = plan(rx)
    assert lone_first(runs, rx.buf, offsets, IP_OFF) == ([runs[2], runs[0], runs[1]], 1)


def test_batches_with_nothing_to_move_come_back_as_they_are() -> None:
    rx = Rx()
    for s in stream(3):
        rx.datagram(s)  # singles only (a kernel node's ACKs, say)
    runs, offsets = plan(rx, lone_behind=False)
    assert lone_first(runs, rx.buf, offsets, IP_OFF) == (runs, 0)
    assert lone_first(runs, rx.buf, offsets, IP_OFF)[0] is runs
    rx = Rx()
    rx.datagram(ping())
    rx.gro(stream(10))
    rx.gro(stream(10, start=1000 + 10 * 1398))
    runs, offsets = plan(rx, lone_behind=False)
    assert lone_first(runs, rx.buf, offsets, IP_OFF)[0] is runs  # singles already first


def test_random_batches_keep_every_flows_order() -> None:
    """Over random batches of runs and singles of a few flows (addresses and protocol
    written where the inner IPv4 header has them): every run comes out once, each
    flow's runs in their order, and every single whose flow had no run before it
    ahead of all runs of segments."""
    rng = random.Random(6)
    slot = 64
    for _ in range(500):
        n = rng.randint(1, 12)
        buf = bytearray(n * slot)
        offsets = [i * slot for i in range(n)]
        flows = [rng.randrange(3) for _ in range(n)]
        for i, flow in enumerate(flows):
            at = offsets[i] + IP_OFF
            buf[at + 9] = (6, 6, 1)[flow]
            buf[at + 12 : at + 20] = bytes([10, 244, 2, 2 + (flow == 1), 10, 244, 1, 2])
            buf[at + 10 : at + 12] = rng.randbytes(2)  # the IP checksum: not the flow
        runs: list[Run] = [(i, 1, rng.choice((0, 52)), 0, 0, 0) for i in range(n)]
        out, ahead = lone_first(runs, buf, offsets, IP_OFF)
        assert sorted(out) == runs
        for flow in range(3):
            mine = [r for r in runs if flows[r[0]] == flow]
            assert [r for r in out if flows[r[0]] == flow] == mine
        first_bulk = next((i for i, r in enumerate(out) if r[2]), len(out))
        for r in runs:
            earlier = [q for q in runs[: r[0]] if q[2] and flows[q[0]] == flows[r[0]]]
            if not r[2] and not earlier:
                assert out.index(r) < first_bulk, (runs, flows, out)
        behind = sum(1 for i, r in enumerate(out) if not r[2] and out.index(r) < first_bulk
                     and any(q[2] for q in runs[: r[0]]))  # fmt: skip
        assert ahead == behind
