"""Ethernet II header codec and MAC address helpers."""

from __future__ import annotations

import random

import pytest
from scapy.layers.l2 import Ether

from dataplane.packet.errors import DecodeError
from dataplane.packet.ethernet import (
    BROADCAST_MAC,
    ETH_HLEN,
    EthernetHeader,
    EtherType,
    build_ethernet,
    mac_from_str,
    mac_to_str,
    parse_ethernet,
    random_vtep_mac,
)

# Broadcast ARP frame header from 52:54:00:12:34:01, followed by 4 payload bytes.
FRAME = bytes.fromhex("ffffffffffff 525400123401 0806 deadbeef")


def test_parse_vector() -> None:
    header, payload = parse_ethernet(FRAME)
    assert header == EthernetHeader(BROADCAST_MAC, bytes.fromhex("525400123401"), EtherType.ARP)
    assert isinstance(payload, memoryview)
    assert bytes(payload) == bytes.fromhex("deadbeef")


def test_build_vector_and_round_trip() -> None:
    built = build_ethernet(
        BROADCAST_MAC, mac_from_str("52:54:00:12:34:01"), EtherType.ARP, bytes.fromhex("deadbeef")
    )
    assert built == FRAME
    header, payload = parse_ethernet(built)
    assert build_ethernet(header.dst, header.src, header.ethertype, payload) == FRAME
    assert header.pack() == FRAME[:ETH_HLEN]


def test_accepts_buffer_types() -> None:
    header, payload = parse_ethernet(memoryview(bytearray(FRAME)))
    assert header.ethertype == EtherType.ARP
    assert bytes(payload) == FRAME[ETH_HLEN:]
    assert build_ethernet(bytearray(6), memoryview(bytes(6)), 0x0800, bytearray(b"x"))[-1:] == b"x"


def test_builder_matches_scapy() -> None:
    dst, src = "a2:3e:11:7f:00:02", "6e:8c:4a:0d:91:01"
    expected = bytes(Ether(dst=dst, src=src, type=0x86DD) / b"payload")
    assert build_ethernet(mac_from_str(dst), mac_from_str(src), EtherType.IPV6, b"payload") == (
        expected
    )


def test_empty_payload_and_short_frame() -> None:
    _, payload = parse_ethernet(FRAME[:ETH_HLEN])
    assert len(payload) == 0
    with pytest.raises(DecodeError):
        parse_ethernet(FRAME[: ETH_HLEN - 1])


def test_build_rejects_bad_mac_length() -> None:
    with pytest.raises(ValueError):
        build_ethernet(b"\x00" * 5, b"\x00" * 6, EtherType.IPV4)


def test_mac_strings() -> None:
    mac = bytes.fromhex("aabbccddeeff")
    assert mac_to_str(mac) == "aa:bb:cc:dd:ee:ff"
    assert mac_from_str("aa:bb:cc:dd:ee:ff") == mac
    assert mac_from_str("AA-BB-CC-DD-EE-FF") == mac
    assert mac_from_str(mac_to_str(BROADCAST_MAC)) == BROADCAST_MAC
    with pytest.raises(ValueError):
        mac_to_str(b"\x00" * 5)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "aa:bb:cc:dd:ee",
        "aa:bb:cc:dd:ee:ff:00",
        "aa:bb:cc:dd:ee:gg",
        "a:bb:cc:dd:ee:ff0",
        "aabbccddeeff",
        "aa:bb:cc:dd:ee:+f",
        "aa:bb:cc:dd:ee:٠٠",
    ],
)
def test_mac_from_str_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid MAC address"):
        mac_from_str(text)


def test_random_vtep_mac_is_local_unicast_and_seeded() -> None:
    rng = random.Random(7)
    macs = [random_vtep_mac(rng) for _ in range(500)]
    for mac in macs:
        assert len(mac) == 6
        assert mac[0] & 0x01 == 0  # unicast
        assert mac[0] & 0x02 == 0x02  # locally administered
    assert len(set(macs)) == len(macs)
    assert random_vtep_mac(random.Random(7)) == macs[0]


def test_ethertype_values() -> None:
    assert (EtherType.IPV4, EtherType.ARP, EtherType.IPV6) == (0x0800, 0x0806, 0x86DD)
