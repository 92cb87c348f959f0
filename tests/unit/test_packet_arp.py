"""ARP (Ethernet/IPv4) codec."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.l2 import ARP

from dataplane.packet.arp import ARP_LEN, ArpOp, ArpPacket, build_arp, parse_arp
from dataplane.packet.errors import DecodeError

SENDER_MAC = bytes.fromhex("525400123401")
# Who has 10.244.1.0? Tell 10.244.0.0 — as a kernel sends it, target MAC zero.
#          htype ptype hlen plen op   sender MAC   sender IP target MAC   target IP
REQUEST = bytes.fromhex("0001 0800 06 04 0001 525400123401 0af40000 000000000000 0af40100")
REPLY = bytes.fromhex("0001 0800 06 04 0002 a23e117f0002 0af40100 525400123401 0af40000")


def test_parse_request() -> None:
    packet = parse_arp(REQUEST)
    assert packet == ArpPacket(
        ArpOp.REQUEST, SENDER_MAC, bytes([10, 244, 0, 0]), bytes(6), bytes([10, 244, 1, 0])
    )
    assert packet.op is ArpOp.REQUEST
    assert packet.sender_address == ipaddress.IPv4Address("10.244.0.0")
    assert packet.target_address == ipaddress.IPv4Address("10.244.1.0")


def test_build_vectors() -> None:
    assert build_arp(ArpOp.REQUEST, SENDER_MAC, "10.244.0.0", bytes(6), "10.244.1.0") == REQUEST
    reply = build_arp(
        ArpOp.REPLY,
        bytes.fromhex("a23e117f0002"),
        ipaddress.IPv4Address("10.244.1.0"),
        SENDER_MAC,
        bytes([10, 244, 0, 0]),
    )
    assert reply == REPLY
    assert len(reply) == ARP_LEN


def test_round_trip() -> None:
    packet = parse_arp(REPLY)
    rebuilt = build_arp(
        packet.op, packet.sender_mac, packet.sender_ip, packet.target_mac, packet.target_ip
    )
    assert rebuilt == REPLY


def test_matches_scapy() -> None:
    expected = bytes(
        ARP(
            op=2,
            hwsrc="a2:3e:11:7f:00:02",
            psrc="10.244.1.0",
            hwdst="52:54:00:12:34:01",
            pdst="10.244.0.0",
        )
    )
    assert expected == REPLY


def test_trailing_padding_ignored() -> None:
    assert parse_arp(REQUEST + bytes(18)) == parse_arp(REQUEST)


def test_unknown_op_kept_as_int() -> None:
    packet = parse_arp(REQUEST[:6] + b"\x00\x08" + REQUEST[8:])  # InARP request
    assert packet.op == 8
    assert not isinstance(packet.op, ArpOp)


@pytest.mark.parametrize(
    ("offset", "value"),
    [(0, b"\x00\x06"), (2, b"\x86\xdd"), (4, b"\x08"), (5, b"\x10")],
    ids=["htype", "ptype", "hlen", "plen"],
)
def test_rejects_other_hardware_or_protocol(offset: int, value: bytes) -> None:
    bad = REQUEST[:offset] + value + REQUEST[offset + len(value) :]
    with pytest.raises(DecodeError):
        parse_arp(bad)


def test_rejects_truncated() -> None:
    with pytest.raises(DecodeError):
        parse_arp(REQUEST[:-1])


def test_build_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError):
        build_arp(ArpOp.REQUEST, SENDER_MAC[:5], "10.0.0.1", bytes(6), "10.0.0.2")
    with pytest.raises(ValueError):
        build_arp(ArpOp.REQUEST, SENDER_MAC, b"\x0a\x00\x00", bytes(6), "10.0.0.2")
