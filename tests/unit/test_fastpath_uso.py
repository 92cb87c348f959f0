"""Receive-side UDP coalescing (dataplane/io/uso.py) on datagrams built with scapy.

Every run of two or more must be datagrams of one inner UDP flow and one size,
each with valid IP and UDP checksums (or a zero UDP checksum); the merged header
must be what the kernel cuts back into the original datagrams.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from dataplane.io.uso import MAX_SEGMENTS, UdpCoalescer, merged_header
from dataplane.packet.checksum import internet_checksum, ones_complement_sum
from dataplane.packet.vnet import VNET_STRUCT, GsoType, VnetFlag

MAC = "02:77:00:00:00:01"
SLOT = 16384


def datagram(
    payload: bytes,
    *,
    sport: int = 5201,
    dport: int = 40000,
    src: str = "10.244.2.2",
    ident: int = 1,
    tos: int = 0,
    ttl: int = 64,
    flags: str = "DF",
    frag: int = 0,
    options: list | None = None,
    vxlan: bool = True,
) -> bytes:
    ip = IP(src=src, dst="10.244.1.2", id=ident, tos=tos, ttl=ttl, flags=flags, frag=frag)
    if options is not None:
        ip.options = options
    inner = ip / UDP(sport=sport, dport=dport) / payload
    if not vxlan:
        return bytes(inner)
    return bytes(VXLAN(vni=1, flags=0x08) / Ether(dst=MAC, src="02:00:00:00:00:09") / inner)


def flow(count: int, size: int = 64, **kw) -> list[bytes]:
    return [datagram(bytes([i & 0xFF]) * size, ident=i, **kw) for i in range(count)]


class Rx:
    """A receive buffer with datagrams placed as recvmmsg places them: one per slot,
    or many in one UDP GRO message."""

    def __init__(self, ip_off: int = 22, slots: int = 16, shift: int = 2) -> None:
        self.buf = bytearray(slots * SLOT + 256)
        self.shift = shift
        self.slots = 0
        self.starts: list[int] = []
        self.lengths: list[int] = []
        self.peers: list[int] = []
        self.coalescer = UdpCoalescer(self.buf, ip_off)

    def single(self, data: bytes, peer: int = 0) -> None:
        off = self.slots * SLOT + self.shift
        self.slots += 1
        self.buf[off : off + len(data)] = data
        self.starts.append(off)
        self.lengths.append(len(data))
        self.peers.append(peer)

    def gro(self, datagrams: list[bytes], peer: int = 0) -> None:
        off = self.slots * SLOT + self.shift
        self.slots += 1
        for d in datagrams:
            self.buf[off : off + len(d)] = d
            self.starts.append(off)
            self.lengths.append(len(d))
            self.peers.append(peer)
            off += len(d)

    def runs(self) -> list[tuple[int, int]]:
        return self.coalescer.runs(
            np.array(self.starts, dtype=np.int64),
            np.array(self.lengths, dtype=np.int64),
            np.array(self.peers, dtype=np.int64),
        )


def test_one_flow_in_slots_is_one_run() -> None:
    rx = Rx()
    for d in flow(10):
        rx.single(d)
    assert rx.runs() == [(0, 10)]


def test_one_flow_in_gro_messages_is_one_run_across_messages() -> None:
    rx = Rx()
    dgrams = flow(12)
    rx.gro(dgrams[:5])
    rx.gro(dgrams[5:])
    assert rx.runs() == [(0, 12)]


@pytest.mark.parametrize("shift", [0, 1, 2, 3])
@pytest.mark.parametrize("size", [1, 63, 64, 65, 66, 1000, 1422])
def test_any_size_and_alignment(size: int, shift: int) -> None:
    rx = Rx(shift=shift)
    for d in flow(3, size):
        rx.single(d)
    assert rx.runs() == [(0, 3)]


def test_udp_backend_offsets() -> None:
    rx = Rx(ip_off=0)
    for d in flow(4, vxlan=False):
        rx.single(d)
    assert rx.runs() == [(0, 4)]


def test_runs_are_cut_at_the_segment_cap() -> None:
    rx = Rx(slots=4)
    dgrams = flow(MAX_SEGMENTS + 5)
    rx.gro(dgrams[:40])
    rx.gro(dgrams[40:])
    assert rx.runs() == [(0, MAX_SEGMENTS), (MAX_SEGMENTS, 5)]


def test_runs_are_cut_at_64_kib() -> None:
    rx = Rx(slots=50)
    rx.coalescer.max_segments = 1000
    for d in flow(50, 1400):
        rx.single(d)
    most = (65535 - 28) // 1400  # 46 payloads of 1400 fit one IP packet
    assert rx.runs() == [(0, most), (most, 50 - most)]


@pytest.mark.parametrize(
    "odd",
    [
        {"sport": 5202},
        {"dport": 40001},
        {"src": "10.244.2.3"},
        {"tos": 4},
        {"ttl": 63},
        {"flags": 0},
        {"size": 65},
        {"peer": 1},
    ],
)
def test_a_different_datagram_breaks_the_run(odd: dict) -> None:
    rx = Rx()
    peer = odd.pop("peer", 0)
    size = odd.pop("size", 64)
    for d in flow(3):
        rx.single(d)
    rx.single(datagram(b"x" * size, **odd), peer=peer)
    for d in flow(2):
        rx.single(d)
    assert rx.runs() == [(0, 3), (3, 1), (4, 2)]


def test_fragments_options_and_tcp_are_never_merged() -> None:
    rx = Rx()
    for _ in range(2):
        rx.single(datagram(b"f" * 64, flags="MF"))
    for _ in range(2):
        rx.single(datagram(b"f" * 64, flags=0, frag=100))
    for _ in range(2):
        rx.single(datagram(b"o" * 64, options=[b"\x01\x01\x01\x00"]))
    assert rx.runs() == [(k, 1) for k in range(6)]


def test_a_bad_udp_checksum_stays_single() -> None:
    rx = Rx()
    dgrams = [bytearray(d) for d in flow(5)]
    dgrams[2][-1] ^= 0x01  # payload corrupted after the checksum was computed
    for d in dgrams:
        rx.single(bytes(d))
    assert rx.runs() == [(0, 2), (2, 1), (3, 2)]


def test_a_bad_ip_checksum_stays_single() -> None:
    rx = Rx()
    dgrams = [bytearray(d) for d in flow(4)]
    dgrams[3][22 + 4] ^= 0x10  # the IP ID: may differ, but the checksum no longer holds
    for d in dgrams:
        rx.single(bytes(d))
    assert rx.runs() == [(0, 3), (3, 1)]


def test_a_zero_udp_checksum_is_merged_but_its_ip_header_still_checked() -> None:
    rx = Rx()
    dgrams = [bytearray(d) for d in flow(4)]
    for d in dgrams:
        d[22 + 26 : 22 + 28] = b"\0\0"  # "no checksum"
    dgrams[3][22 + 5] ^= 0x01
    for d in dgrams:
        rx.single(bytes(d))
    assert rx.runs() == [(0, 3), (3, 1)]


def test_an_empty_payload_is_not_merged() -> None:
    rx = Rx()
    for _ in range(3):
        rx.single(datagram(b""))
    assert rx.runs() == [(0, 1), (1, 1), (2, 1)]


def test_length_fields_must_match_the_datagram() -> None:
    rx = Rx()
    # A datagram with trailing bytes past the IP total length (padding) stays single.
    rx.single(flow(1)[0] + b"\0\0")
    rx.single(flow(1)[0] + b"\0\0")
    assert rx.runs() == [(0, 1), (1, 1)]


def _segment(vnet: bytes, header: bytes, payloads: list[bytes], ip: int) -> list[bytes]:
    """What the kernel makes of a USO packet (__udp_gso_segment): per payload, the
    headers with this datagram's lengths and checksums filled in."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_STRUCT.unpack(vnet)
    assert flags == VnetFlag.NEEDS_CSUM and gso_type == GsoType.UDP_L4
    assert hdr_len == len(header) and csum_start == ip + 20 and csum_offset == 6
    out = []
    for p in payloads:
        assert len(p) == gso_size
        h = bytearray(header)
        h[ip + 2 : ip + 4] = (28 + len(p)).to_bytes(2, "big")
        h[ip + 10 : ip + 12] = b"\0\0"
        h[ip + 10 : ip + 12] = internet_checksum(h[ip : ip + 20]).to_bytes(2, "big")
        h[ip + 24 : ip + 26] = (8 + len(p)).to_bytes(2, "big")
        h[ip + 26 : ip + 28] = b"\0\0"
        pseudo = ones_complement_sum(h[ip + 12 : ip + 20], 17 + 8 + len(p))
        h[ip + 26 : ip + 28] = internet_checksum(bytes(h[ip + 20 :]) + p, pseudo).to_bytes(2, "big")
        out.append(bytes(h) + p)
    return out


@pytest.mark.parametrize("l2", [False, True])
def test_merged_header_cuts_back_into_the_original_datagrams(l2: bool) -> None:
    dgrams = [datagram(bytes([i]) * 100, ident=7) for i in range(5)]
    out = 8 if l2 else 22  # what the device gets: inner Ethernet on a TAP, else inner IP
    ip = 22 - out
    rx = Rx()
    for d in dgrams:
        rx.single(d)
    starts = np.array(rx.starts, dtype=np.int64)
    vnet, header = merged_header(dgrams[0][out:50], ip, 5, 100)
    whole = bytes(header) + bytes(rx.coalescer.payloads(starts, 100))
    assert int.from_bytes(header[ip + 2 : ip + 4], "big") == len(whole) - ip
    assert ones_complement_sum(header[ip : ip + 20]) == 0xFFFF
    payloads = [whole[len(header) + 100 * k : len(header) + 100 * (k + 1)] for k in range(5)]
    # Same ID in every datagram here, so the kernel's segments are byte for byte the originals.
    assert _segment(vnet, header, payloads, ip) == [d[out:] for d in dgrams]


@pytest.mark.parametrize(
    "kind",
    ["more-fragments", "fragment-offset", "options", "tcp", "padding", "empty", "udp-length"],
)
def test_a_batch_of_one_kind_that_may_not_merge_stays_single(kind: str) -> None:
    """Every datagram alike (one flow, one size): the first one's headers decide for
    the whole batch, so each rule must still hold there."""
    rx = Rx()
    for i in range(6):
        if kind == "more-fragments":
            d = datagram(b"f" * 64, ident=i, flags="MF")
        elif kind == "fragment-offset":
            d = datagram(b"f" * 64, ident=i, flags=0, frag=100)
        elif kind == "options":
            d = datagram(b"o" * 64, ident=i, options=[b"\x01\x01\x01\x00"])
        elif kind == "tcp":
            d = bytearray(datagram(b"t" * 64, ident=i))
            d[22 + 9] = 6  # the IP checksum no longer holds either: both rules apply
            d = bytes(d)
        elif kind == "padding":
            d = datagram(b"p" * 64, ident=i) + b"\0\0"
        elif kind == "empty":
            d = datagram(b"", ident=i)
        else:
            d = bytearray(datagram(b"u" * 64, ident=i))
            d[22 + 24 : 22 + 26] = (8 + 63).to_bytes(2, "big")  # UDP length short of the IP's
            d = bytes(d)
        rx.single(d)
    assert rx.runs() == [(k, 1) for k in range(6)]


def _reference_ok(d: bytes, ip: int) -> bool:
    """One datagram's own rules (module docstring), byte by byte."""
    inner = len(d) - ip
    return (
        d[ip] == 0x45
        and d[ip + 9] == 17
        and int.from_bytes(d[ip + 6 : ip + 8], "big") & 0x3FFF == 0
        and int.from_bytes(d[ip + 2 : ip + 4], "big") == inner
        and int.from_bytes(d[ip + 24 : ip + 26], "big") == inner - 20
        and len(d) > ip + 28
        and ones_complement_sum(d[ip : ip + 20]) == 0xFFFF
        and (
            d[ip + 26 : ip + 28] == b"\0\0"
            or ones_complement_sum(d[ip + 12 : ip + 20] + d[ip + 20 :], 17 + inner - 20) == 0xFFFF
        )
    )


def _reference_runs(dgrams: list[bytes], peers: list[int], ip: int) -> list[tuple[int, int]]:
    """The runs the rules give, datagram by datagram in Python (no segment cap hit)."""
    differ = {ip + 4, ip + 5, ip + 10, ip + 11, ip + 26, ip + 27}
    hl = ip + 28
    runs: list[tuple[int, int]] = []
    for k, d in enumerate(dgrams):
        prev = dgrams[k - 1] if k else b""
        joins = (
            k > 0
            and _reference_ok(d, ip)
            and _reference_ok(prev, ip)
            and len(d) == len(prev)
            and peers[k] == peers[k - 1]
            and all(d[i] == prev[i] for i in range(hl) if i not in differ)
        )
        if joins:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    return runs


@pytest.mark.parametrize("seed", range(40))
def test_runs_match_the_rules_datagram_by_datagram(seed: int) -> None:
    """Random batches, mostly one flow and one size with now and then an odd datagram
    (a bad checksum, another port, size, peer, a zero checksum): the planner's runs
    are those of the rules applied to each datagram in Python."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 60))
    size = int(rng.choice([1, 64, 65, 333]))
    odd_rate = float(rng.choice([0.0, 0.02, 0.2]))
    zero_csum = bool(rng.integers(2))
    dgrams: list[bytes] = []
    peers: list[int] = []
    for i in range(count):
        d = bytearray(datagram(bytes([i & 0xFF]) * size, ident=int(rng.integers(65536))))
        peer = 0
        if zero_csum:
            d[22 + 26 : 22 + 28] = b"\0\0"
        if rng.random() < odd_rate:
            what = int(rng.integers(6))
            if what == 0:
                d[-1] ^= 0x40  # payload after the checksum
            elif what == 1:
                d[22 + 4] ^= 0x01  # IP ID without fixing the IP checksum
            elif what == 2:
                d = bytearray(datagram(b"s" * size, sport=5202, ident=i))
            elif what == 3:
                d = bytearray(datagram(b"s" * (size + 1), ident=i))
            elif what == 4:
                peer = 1
            else:
                d[22 + 26 : 22 + 28] = b"\0\0"
        dgrams.append(bytes(d))
        peers.append(peer)
    rx = Rx(slots=64)
    if rng.integers(2) and len({len(d) for d in dgrams}) == 1:
        # As UDP GRO hands them over: a few messages of consecutive datagrams.
        cut = sorted({0, count, *rng.integers(1, count, 3).tolist()})
        for a, b in itertools.pairwise(cut):
            rx.gro(dgrams[a:b])
            rx.peers[-(b - a) :] = peers[a:b]  # a peer per datagram, odd ones too
    else:
        for d, p in zip(dgrams, peers, strict=True):
            rx.single(d, peer=p)
    assert rx.runs() == _reference_runs(dgrams, peers, 22)
