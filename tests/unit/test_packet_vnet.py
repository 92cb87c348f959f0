"""virtio_net_hdr codec, with byte vectors laid out as include/uapi/linux/virtio_net.h says."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP

from dataplane.packet.checksum import internet_checksum, pseudo_header_sum_v4
from dataplane.packet.errors import DecodeError
from dataplane.packet.vnet import (
    GSO_ECN,
    GSO_UDP_TUNNEL_IPV4,
    GSO_UDP_TUNNEL_IPV6,
    TCP_CSUM_OFFSET,
    UDP_CSUM_OFFSET,
    VNET_HDR_LEN,
    VNET_HDR_TUNNEL_LEN,
    ZERO_VNET,
    GsoType,
    VnetFlag,
    VnetHeader,
    build_vnet,
    complete_checksum,
    gso_l4,
    pack_vnet_into,
    parse_vnet,
)

# What the kernel put in front of a 64 KB TSO super-packet read from a TUN here:
# NEEDS_CSUM, TCPV4, hdr_len 52 (IP 20 + TCP 32), gso_size 1398, csum 20 + 16.
TSO_READ = bytes.fromhex("01 01 3400 7605 1400 1000")
# A frame weft writes to the egress TAP: outer Ethernet/IPv4/UDP (UDP at 34), VXLAN,
# inner Ethernet, inner IPv4 at 64, TCP at 84: NEEDS_CSUM|UDP_TUNNEL_CSUM, TCPV4 |
# UDP_TUNNEL_IPV4, hdr_len 116, gso_size 1398, csum 84 + 16; offsets at bytes 20, 22.
TUNNEL_WRITE = bytes.fromhex("09 21 7400 7605 5400 1000 0000 00000000 0000 0000 2200 4000")


def test_lengths() -> None:
    assert VNET_HDR_LEN == 10 and VNET_HDR_TUNNEL_LEN == 24
    assert bytes(10) == ZERO_VNET
    assert len(TSO_READ) == 10 and len(TUNNEL_WRITE) == 24


def test_parse_a_tso_read() -> None:
    header, rest = parse_vnet(TSO_READ + b"\x45")
    assert header == VnetHeader(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 52, 1398, 20, 16)
    assert header.is_gso and header.needs_csum and not header.tunnel and not header.ecn
    assert header.base_gso_type == GsoType.TCPV4
    assert bytes(rest) == b"\x45"


def test_build_the_tunnel_write() -> None:
    header = VnetHeader(
        VnetFlag.NEEDS_CSUM | VnetFlag.UDP_TUNNEL_CSUM,
        GsoType.TCPV4 | GSO_UDP_TUNNEL_IPV4,
        116,
        1398,
        84,
        TCP_CSUM_OFFSET,
        outer_th_offset=34,
        inner_nh_offset=64,
    )
    assert build_vnet(header, size=24) == TUNNEL_WRITE
    parsed, rest = parse_vnet(TUNNEL_WRITE, size=24)
    assert parsed == header and not rest
    assert parsed.tunnel == GSO_UDP_TUNNEL_IPV4 and parsed.base_gso_type == GsoType.TCPV4


def test_pack_into_a_buffer_at_an_offset() -> None:
    buf = bytearray(b"\xff" * 40)
    pack_vnet_into(buf, 4, 1, 1, 52, 1398, 20, 16)
    assert bytes(buf[4:14]) == TSO_READ and buf[3] == buf[14] == 0xFF
    pack_vnet_into(buf, 10, 9, 0x21, 116, 1398, 84, 16, 34, 64)
    assert bytes(buf[10:34]) == TUNNEL_WRITE  # num_buffers and hash fields zeroed


def test_ecn_and_ipv6_bits_are_separate_from_the_base_type() -> None:
    header, _ = parse_vnet(bytes([1, GsoType.TCPV6 | GSO_ECN | GSO_UDP_TUNNEL_IPV6]) + bytes(8))
    assert header.base_gso_type == GsoType.TCPV6 and header.ecn
    assert header.tunnel == GSO_UDP_TUNNEL_IPV6


def test_other_sizes_pad_and_skip() -> None:
    header = VnetHeader(0, GsoType.NONE)
    assert build_vnet(header, size=12) == bytes(12)  # mrg_rxbuf: num_buffers zero
    parsed, rest = parse_vnet(bytes(12) + b"x", size=12)
    assert parsed == header and bytes(rest) == b"x"


def test_truncated_and_bad_size() -> None:
    with pytest.raises(DecodeError):
        parse_vnet(bytes(9))
    with pytest.raises(DecodeError):
        parse_vnet(bytes(23), size=24)
    with pytest.raises(ValueError):
        parse_vnet(bytes(10), size=8)


def _partial(packet: bytes, l4: int, proto: int) -> bytearray:
    """The packet as a NEEDS_CSUM read gives it: the field holds the pseudo-header sum."""
    buf = bytearray(packet)
    field = l4 + (TCP_CSUM_OFFSET if proto == 6 else UDP_CSUM_OFFSET)
    pseudo = pseudo_header_sum_v4(packet[12:16], packet[16:20], proto, len(packet) - l4)
    buf[field : field + 2] = pseudo.to_bytes(2, "big")
    return buf


@pytest.mark.parametrize("payload", [b"", b"a", b"hello world", bytes(range(256)) * 5])
def test_complete_checksum_matches_a_full_tcp_checksum(payload: bytes) -> None:
    packet = bytes(IP(src="10.244.1.2", dst="10.244.2.2") / TCP(flags="PA", seq=7) / payload)
    buf = _partial(packet, 20, 6)
    complete_checksum(buf, 20, TCP_CSUM_OFFSET)
    assert bytes(buf) == packet  # scapy computed the same checksum
    assert (
        internet_checksum(buf[20:], pseudo_header_sum_v4(buf[12:16], buf[16:20], 6, len(buf) - 20))
        == 0
    )


def test_complete_checksum_udp_never_writes_zero() -> None:
    # Choose two payload bytes so that everything sums to 0xFFFF: the checksum then
    # computes to 0, which for UDP means "none", so 0xFFFF must be stored instead.
    packet = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / bytes(2)))
    packet[26:28] = bytes(2)
    pseudo = pseudo_header_sum_v4(packet[12:16], packet[16:20], 17, len(packet) - 20)
    packet[28:30] = internet_checksum(packet[20:], pseudo).to_bytes(2, "big")
    assert internet_checksum(packet[20:], pseudo) == 0
    buf = _partial(bytes(packet), 20, 17)
    complete_checksum(buf, 20, UDP_CSUM_OFFSET)
    assert buf[26:28] == b"\xff\xff"


def test_complete_checksum_refuses_a_field_outside_the_packet() -> None:
    with pytest.raises(DecodeError):
        complete_checksum(bytearray(30), 20, 16)


@pytest.mark.parametrize("options", [0, 12, 40])
def test_gso_l4_reads_the_tcp_data_offset_and_not_for_udp(options: int) -> None:
    at = 7  # the transport header at an odd offset in a buffer, as after a vnet header
    tcp = bytes(TCP(dport=80, options=[("NOP", None)] * options))
    buf = bytearray(at) + tcp + b"payload"
    assert gso_l4(buf, at, int(GsoType.TCPV4)) == (20 + options, TCP_CSUM_OFFSET)
    assert gso_l4(buf, at, int(GsoType.TCPV6)) == (20 + options, TCP_CSUM_OFFSET)
    assert gso_l4(buf, at, int(GsoType.UDP_L4)) == (8, UDP_CSUM_OFFSET)
