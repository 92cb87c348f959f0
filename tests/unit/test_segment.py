"""Userspace TCP segmentation (dataplane/io/segment.py) against segments scapy builds
the way Linux's tcp_gso_segment cuts a super-packet: the same bytes, checksums valid,
sequence numbers, IP IDs and flags (CWR on the first, FIN/PSH on the last); and UDP
super-packets (uso_read) cut as __udp_gso_segment cuts them."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from dataplane.io.segment import (
    MAX_SEGMENTS,
    MAX_SEND_BYTES,
    Segmenter,
    complete_checksums,
    segment_cmsg,
)
from dataplane.packet.checksum import internet_checksum, ones_complement_sum, pseudo_header_sum_v4
from dataplane.packet.vnet import complete_checksum

PREFIX = bytes.fromhex("08000000 00000100") + bytes.fromhex("0a0b0c0d0e0f 020304050607 0800")
OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (12345, 678))]


def payload(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


def super_v4(data: bytes, flags: str, ip_id: int = 0xFFF0, seq: int = 0xFFFFF000) -> IP:
    return IP(src="10.244.1.2", dst="10.244.2.3", id=ip_id, flags="DF", ttl=64) / TCP(
        sport=40000, dport=5201, seq=seq, ack=99, flags=flags, window=500, options=OPTS
    ) / Raw(data)  # fmt: skip


def super_v6(data: bytes, flags: str, seq: int = 1000) -> IPv6:
    return IPv6(src="fd00::1", dst="fd00::2", hlim=64) / TCP(
        sport=40000, dport=5201, seq=seq, ack=99, flags=flags, window=500, options=OPTS
    ) / Raw(data)  # fmt: skip


def expected(pkt: IP | IPv6, mss: int) -> list[bytes]:
    """What tcp_gso_segment makes of pkt: scapy fills lengths and checksums."""
    data = bytes(pkt[Raw].load)
    tcp = pkt[TCP]
    flags = int(tcp.flags)
    chunks = [data[i : i + mss] for i in range(0, len(data), mss)]
    out = []
    for i, chunk in enumerate(chunks):
        f = flags
        if i > 0:
            f &= ~0x80
        if i < len(chunks) - 1:
            f &= ~0x09
        seg_tcp = tcp.copy()
        seg_tcp.remove_payload()
        seg_tcp.seq = (tcp.seq + i * mss) & 0xFFFFFFFF
        seg_tcp.flags = f
        del seg_tcp.chksum
        if isinstance(pkt, IP):
            ip = pkt.copy()
            ip.remove_payload()
            ip.id = (pkt.id + i) & 0xFFFF
            del ip.len, ip.chksum
        else:
            ip = pkt.copy()
            ip.remove_payload()
            del ip.plen
        out.append(bytes(ip / seg_tcp / Raw(chunk)))
    return out


def cut(
    raw: bytes,
    prefix: bytes,
    mss: int,
    *,
    lead: int = 7,
    udp: bool = False,
    seg: Segmenter | None = None,
    **kw: int,
) -> list[bytes]:
    """raw (an IP super-packet) `lead` bytes into a buffer after `prefix`; all batches
    (by a new Segmenter, or `seg`)."""
    buf = bytearray(lead) + bytearray(prefix) + bytearray(raw) + bytearray(5)
    start = lead
    ip = start + len(prefix)
    ihl = 40 if raw[0] >> 4 == 6 else (raw[0] & 15) * 4
    if seg is None:
        seg = Segmenter(**{k: v for k, v in kw.items() if k == "capacity"})
    n = seg.start(
        buf, start, ip, ip + ihl, ip + len(raw), mss, max_segments=kw.get("max", 64), udp=udp
    )
    rows: list[bytes] = []
    first = 0
    while first < n:
        count = min(seg.per_batch, n - first)
        nbytes = seg.fill(first, count)
        out = bytes(seg.out[:nbytes])
        rows += [out[i : i + seg.row] for i in range(0, nbytes, seg.row)]
        first += count
    assert len(rows) == n
    for r in rows:
        assert r[: len(prefix)] == prefix
    return [r[len(prefix) :] for r in rows]


@pytest.mark.parametrize(
    ("flags", "size", "mss"),
    [
        ("PA", 64000, 1398),  # a full super-packet, short last segment
        ("FPA", 4 * 1398, 1398),  # exact multiple, FIN on the last only
        ("CEA", 3000, 1398),  # CWR on the first only, ECE on all
        ("A", 3001, 1001),  # odd MSS: rows of odd length
        ("PA", 1398 + 1, 1398),  # one byte in the last segment
    ],
)
def test_ipv4_segments_are_what_linux_makes(flags: str, size: int, mss: int) -> None:
    pkt = super_v4(payload(size), flags)
    got = cut(bytes(pkt), PREFIX, mss)
    want = expected(pkt, mss)
    assert len(got) == len(want) == -(-size // mss)
    for g, w in zip(got, want, strict=True):
        assert g == w
        # Valid checksums, re-checked independently of scapy.
        assert internet_checksum(g[:20]) == 0
        pseudo = pseudo_header_sum_v4(g[12:16], g[16:20], 6, len(g) - 20)
        assert internet_checksum(g[20:], pseudo) == 0
    seqs = [IP(g)[TCP].seq for g in got]
    assert seqs[1] == (0xFFFFF000 + mss) & 0xFFFFFFFF  # wraps around 2**32
    assert [IP(g).id for g in got] == [(0xFFF0 + i) & 0xFFFF for i in range(len(got))]


def test_ipv4_sequence_and_id_wrap() -> None:
    pkt = super_v4(payload(30 * 1000), "PA", ip_id=0xFFFE, seq=0xFFFFFFFF - 2500)
    got = cut(bytes(pkt), b"", 1000)
    assert got == expected(pkt, 1000)
    assert [IP(g).id for g in got][:4] == [0xFFFE, 0xFFFF, 0, 1]


def test_ipv6_segments_are_what_linux_makes() -> None:
    pkt = super_v6(payload(10_000), "PA")
    got = cut(bytes(pkt), PREFIX[:8] + PREFIX[8:20] + b"\x86\xdd", 1428)
    assert got == expected(pkt, 1428)
    assert IPv6(got[-1]).plen == 32 + 10_000 - 7 * 1428


def udp_super(data: bytes, mss: int, *, v6: bool = False, ip_id: int = 0xFFFE) -> IP | IPv6:
    """A UDP GSO packet as GRO forwarding hands it to the TUN: the lengths of the
    whole (the checksum field does not matter: it is recomputed per datagram)."""
    ip = (
        IPv6(src="fd00::1", dst="fd00::2")
        if v6
        else IP(src="10.244.1.2", dst="10.244.2.3", id=ip_id, flags="DF", ttl=64)
    )
    return ip / UDP(sport=40000, dport=5201, chksum=0x1234) / Raw(data)


def udp_expected(pkt: IP | IPv6, mss: int) -> list[bytes]:
    """What __udp_gso_segment makes of pkt: one datagram per mss bytes, IDs counting
    up from the first, lengths and checksums of each (scapy fills them in)."""
    data = bytes(pkt[Raw].load)
    out = []
    for i in range(0, len(data), mss):
        udp = UDP(sport=40000, dport=5201)
        if isinstance(pkt, IP):
            ip = IP(src=pkt.src, dst=pkt.dst, id=(pkt.id + i // mss) & 0xFFFF, flags="DF", ttl=64)
        else:
            ip = IPv6(src=pkt.src, dst=pkt.dst)
        out.append(bytes(ip / udp / Raw(data[i : i + mss])))
    return out


@pytest.mark.parametrize(("size", "mss"), [(64 * 36, 36), (50 * 64 + 10, 64), (3001, 1000)])
@pytest.mark.parametrize("v6", [False, True])
def test_udp_super_packets_are_cut_into_the_pods_datagrams(size: int, mss: int, v6: bool) -> None:
    pkt = udp_super(payload(size), mss, v6=v6)
    prefix = PREFIX[:20] + (b"\x86\xdd" if v6 else b"\x08\x00")
    got = cut(bytes(pkt), prefix, mss, udp=True)
    assert got == udp_expected(pkt, mss)
    if not v6:
        assert [IP(g).id for g in got][:3] == [0xFFFE, 0xFFFF, 0]
        for g in got:
            pseudo = pseudo_header_sum_v4(g[12:16], g[16:20], 17, len(g) - 20)
            assert internet_checksum(g[20:], pseudo) == 0


def test_a_udp_checksum_that_computes_to_zero_is_sent_as_all_ones() -> None:
    """RFC 768: a computed 0 goes out as 0xFFFF (0 means "no checksum")."""
    mss = 100
    first = bytearray(payload(mss))
    first[-2:] = b"\0\0"
    probe = IP(bytes(IP(src="10.244.1.2", dst="10.244.2.3") / UDP(sport=40000, dport=5201)
                     / Raw(bytes(first))))  # fmt: skip
    first[-2:] = probe[UDP].chksum.to_bytes(2, "big")  # the sum becomes 0xFFFF
    pkt = udp_super(bytes(first) + payload(mss), mss)
    got = cut(bytes(pkt), b"", mss, udp=True)
    assert got[0][26:28] == b"\xff\xff"
    assert got == udp_expected(pkt, mss)


def test_batches_stay_within_the_kernels_limits() -> None:
    """At most MAX_SEGMENTS datagrams and 64 KiB per sendmsg: a super-packet of
    small segments is cut in several batches, which together are the same."""
    pkt = super_v4(payload(20_000), "PA")
    seg = Segmenter()
    raw = bytearray(PREFIX + bytes(pkt))
    assert seg.start(raw, 0, len(PREFIX), len(PREFIX) + 20, len(raw), 200) == 100
    assert seg.per_batch == MAX_SEGMENTS
    assert cut(bytes(pkt), PREFIX, 200) == expected(pkt, 200)
    big = Segmenter()
    assert big.start(raw, 0, len(PREFIX), len(PREFIX) + 20, len(raw), 9000) == 3
    assert big.per_batch == 65507 // (22 + 52 + 9000)
    assert cut(bytes(pkt), PREFIX, 1398, capacity=5000) == expected(pkt, 1398)


@pytest.mark.parametrize(
    ("size", "mss"), [(64000, 1398), (20_000, 200), (65000, 8950), (3000, 1398)]
)
def test_one_fill_sent_in_slices_is_what_linux_makes(size: int, mss: int) -> None:
    """What the send path does: a whole super-packet in one fill, then `sends` slices
    within the kernel's limits (datagrams a sendmsg, bytes a datagram) that cut at
    row boundaries and together hold every segment."""
    pkt = super_v4(payload(size), "PA")
    raw = bytearray(PREFIX + bytes(pkt))
    seg = Segmenter()
    n = seg.start(raw, 0, len(PREFIX), len(PREFIX) + 20, len(raw), mss)
    assert seg.per_fill >= n  # one fill
    nbytes = seg.fill(0, n)
    rows: list[bytes] = []
    for piece, count in seg.sends(nbytes):
        assert count <= min(seg.per_batch, MAX_SEGMENTS)
        assert len(piece) <= MAX_SEND_BYTES
        assert -(-len(piece) // seg.row) == count
        data = bytes(piece)
        rows += [data[i : i + seg.row] for i in range(0, len(data), seg.row)]
    assert [r[len(PREFIX) :] for r in rows] == expected(pkt, mss)


def test_one_segmenter_cuts_packets_of_every_shape_in_turn() -> None:
    """What one engine's Segmenter meets: views made for one shape of fill (kept for
    the next packet of that shape) never serve another — TCP then UDP of one row
    size, IPv4 then IPv6, short then full, and the first shape again."""
    seg = Segmenter()
    v6_prefix = PREFIX[:20] + b"\x86\xdd"
    for _ in range(2):
        for raw, prefix, mss, udp, want in (
            (tcp := super_v4(payload(64000), "PA"), PREFIX, 1398, False, expected(tcp, 1398)),
            # the same rows as the TCP one: 46 of 22 + 20 + 8 + 1422 bytes
            (u := udp_super(payload(64000), 1422), PREFIX, 1422, True, udp_expected(u, 1422)),
            (t6 := super_v6(payload(9000), "A"), v6_prefix, 1378, False, expected(t6, 1378)),
            # the same rows as the IPv6 one: 7 of 22 + 20 + 32 + 1398 bytes
            (t7 := super_v4(payload(9000), "PA"), PREFIX, 1398, False, expected(t7, 1398)),
            (t3 := super_v4(payload(3000), "FPA"), PREFIX, 1398, False, expected(t3, 1398)),
            (t4 := super_v4(payload(3001), "A"), PREFIX, 1001, False, expected(t4, 1001)),
        ):
            assert cut(bytes(raw), prefix, mss, udp=udp, seg=seg) == want


def test_udp_backend_has_no_prefix() -> None:
    pkt = super_v4(payload(5000), "PA")
    assert cut(bytes(pkt), b"", 1420, lead=0) == expected(pkt, 1420)


def test_not_cut() -> None:
    seg = Segmenter()
    raw = bytearray(bytes(super_v4(b"", "A")))
    assert seg.start(raw, 0, 0, 20, len(raw), 1398) == 0  # no payload
    raw = bytearray(bytes(super_v4(payload(100), "A")))
    assert seg.start(raw, 0, 0, 20, len(raw), 0) == 0


def test_cmsg() -> None:
    assert segment_cmsg(1472) == [(17, 103, (1472).to_bytes(2, "little"))]


# complete_checksums: NEEDS_CSUM for a run of datagrams at once (tx_batch), against
# vnet.complete_checksum datagram by datagram.


@pytest.mark.parametrize(
    ("size", "last", "csum_start", "csum_offset"),
    [
        (106, 106, 56, 6),  # 64-byte UDP in VXLAN: every row full
        (106, 91, 56, 6),  # a shorter last, odd span
        (107, 100, 56, 6),  # odd rows
        (107, 107, 57, 6),  # odd start
        (88, 88, 42, 16),  # TCP ACKs (udp backend: no prefix)
        (1400, 71, 56, 6),
    ],
)
@pytest.mark.parametrize("count", [1, 2, 17, 64])
def test_complete_checksums_as_one_by_one(
    size: int, last: int, csum_start: int, csum_offset: int, count: int
) -> None:
    base = 10
    rows = [bytearray(payload(size)[i:] + payload(size)[:i]) for i in range(count)]
    rows[-1] = rows[-1][:last]
    buf = bytearray(base) + b"".join(rows) + bytes.fromhex("ee") * (size + 8)
    stop = base + (count - 1) * size + last
    expected = bytearray(buf)
    for i in range(count):
        at = base + i * size
        complete_checksum(memoryview(expected)[at : min(at + size, stop)], csum_start, csum_offset)
    complete_checksums(buf, base, size, count, stop, csum_start, csum_offset)
    assert buf == expected  # and nothing after the run was touched (the next packet)


def test_complete_checksums_stores_a_zero_result_as_ffff() -> None:
    size, start, off = 60, 20, 6
    row = bytearray(payload(size))
    row[start + off : start + off + 2] = b"\0\0"
    # The field value that makes the whole range sum to 0xFFFF: the checksum is 0.
    rest = ones_complement_sum(row[start:])
    row[start + off : start + off + 2] = (0xFFFF - rest).to_bytes(2, "big")
    assert ones_complement_sum(row[start:]) == 0xFFFF
    buf = row * 3
    complete_checksums(buf, 0, size, 3, 3 * size, start, off)
    for i in range(3):
        assert buf[i * size + start + off : i * size + start + off + 2] == b"\xff\xff"
