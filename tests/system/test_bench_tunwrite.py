"""`python -m bench.tunwrite`: a super-packet into a TUN whole (one GSO write) or a
segment a write (IFF_NAPI, the kernel's GRO merges them). No assertion on speed:
that every segment went through, and that GRO did merge (the tool's premise)."""

from __future__ import annotations

from bench import tunwrite
from control.lab.netns import list_netns
from control.lab.topology import Lab
from dataplane.packet.checksum import internet_checksum, pseudo_header_sum_v4
from dataplane.packet.ipv4 import ipv4_header_checksum_ok


def test_segments_carry_good_checksums_and_the_merged_packet_a_gso_header() -> None:
    seg = tunwrite.tcp_segment(1000, 7, bytes(range(200)))
    assert ipv4_header_checksum_ok(seg)
    src, dst = seg[12:16], seg[16:20]
    assert internet_checksum(seg[20:], pseudo_header_sum_v4(src, dst, 6, len(seg) - 20)) == 0
    vnet, packet = tunwrite.merged_packet(3, bytes(1440))
    assert len(vnet) == tunwrite.VNET_LEN and vnet[:2] == b"\x01\x01"  # NEEDS_CSUM, TCPV4
    assert len(packet) == 20 + 20 + 3 * 1440 and ipv4_header_checksum_ok(packet)


def test_both_ways_deliver_and_the_segments_are_merged() -> None:
    with Lab() as lab:
        merged = tunwrite.run_one(lab, "merged", 8, 20, 20)
        segments = tunwrite.run_one(lab, "segments", 8, 20, 20)
        made = set(lab.namespaces)
    assert len(made) == 2 and not made & set(list_netns())  # (other tests' labs may run)
    assert merged.written == segments.written == 160
    assert merged.packets_out == 20  # one GSO packet a batch
    # GRO merged: fewer packets left than segments went in, and at least one a batch.
    assert 20 <= segments.packets_out < segments.written / 2, segments
