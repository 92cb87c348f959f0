"""Internet checksum helpers against a slow word-by-word reference."""

from __future__ import annotations

import random
import struct

from hypothesis import given
from hypothesis import strategies as st

from dataplane.packet.checksum import (
    checksum_update16,
    internet_checksum,
    ones_complement_sum,
    pseudo_header_sum_v4,
    pseudo_header_sum_v6,
)
from dataplane.packet.ipv4 import build_ipv4


def reference_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 the slow way: add 16-bit words, fold carries back in."""
    if len(data) % 2:
        data += b"\x00"
    total = initial
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_complement_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D


def test_ipv4_header_vector() -> None:
    # The header whose checksum field is b861 (the classic worked example).
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(header) == 0xB861


def test_edge_values() -> None:
    assert ones_complement_sum(b"") == 0
    assert ones_complement_sum(b"\x00" * 10) == 0
    assert ones_complement_sum(b"\xff\xff") == 0xFFFF
    assert ones_complement_sum(b"\xff\xff\xff\xff") == 0xFFFF
    assert ones_complement_sum(b"\x01") == 0x0100  # odd byte padded on the right
    assert ones_complement_sum(b"\x12\x34\x56") == 0x1234 + 0x5600
    assert ones_complement_sum(b"", 0x1FFFE) == 0xFFFF
    assert internet_checksum(b"\x00\x00") == 0xFFFF


def test_accepts_every_buffer_type() -> None:
    data = bytes(range(255))
    expected = reference_sum(data)
    assert ones_complement_sum(data) == expected
    assert ones_complement_sum(bytearray(data)) == expected
    assert ones_complement_sum(memoryview(data)) == expected
    assert ones_complement_sum(memoryview(data)[3:200]) == reference_sum(data[3:200])


@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=0xFFFFFF))
def test_sum_matches_reference(data: bytes, initial: int) -> None:
    assert ones_complement_sum(data, initial) == reference_sum(data, initial)


@given(st.binary(min_size=2, max_size=200).filter(lambda b: len(b) % 2 == 0))
def test_checksum_makes_data_sum_to_ffff(data: bytes) -> None:
    # Put the checksum in the first word: the receiver's sum is then 0xFFFF.
    zeroed = b"\x00\x00" + data[2:]
    filled = struct.pack("!H", internet_checksum(zeroed)) + data[2:]
    if any(zeroed):
        assert ones_complement_sum(filled) == 0xFFFF


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
def test_pseudo_header_v4(src: bytes, dst: bytes) -> None:
    pseudo = src + dst + bytes([0, 17]) + struct.pack("!H", 1234)
    assert pseudo_header_sum_v4(src, dst, 17, 1234) == reference_sum(pseudo)
    assert pseudo_header_sum_v4(memoryview(src), bytearray(dst), 17, 1234) == reference_sum(pseudo)


@given(
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
)
def test_pseudo_header_v6(src: bytes, dst: bytes, length: int) -> None:
    pseudo = src + dst + struct.pack("!I", length) + bytes([0, 0, 0, 58])
    assert pseudo_header_sum_v6(src, dst, 58, length) == reference_sum(pseudo)


def test_incremental_update_matches_recompute_for_ttl_decrements() -> None:
    rng = random.Random(1624)
    for _ in range(2000):
        ttl = rng.randint(1, 255)
        header = bytearray(
            build_ipv4(
                rng.randbytes(4),
                rng.randbytes(4),
                rng.randint(0, 255),
                b"",
                ttl=ttl,
                identification=rng.randint(0, 0xFFFF),
                tos=rng.randint(0, 255),
            )
        )
        new_ttl = ttl - rng.randint(1, ttl)
        proto = header[9]
        old_checksum = header[10] << 8 | header[11]
        patched = checksum_update16(old_checksum, ttl << 8 | proto, new_ttl << 8 | proto)
        header[8] = new_ttl
        header[10:12] = b"\x00\x00"
        assert patched == internet_checksum(header)


@given(
    st.binary(min_size=2, max_size=64).filter(lambda b: len(b) % 2 == 0),
    st.data(),
)
def test_incremental_update_any_word(body: bytes, data: st.DataObject) -> None:
    # A fixed non-zero word (like an IPv4 version/IHL byte) keeps the data
    # from ever summing to zero, where +0 and -0 would legitimately differ.
    packet = bytearray(b"\x45\x00\x00\x00" + body)
    checksum = internet_checksum(packet)
    index = data.draw(st.integers(min_value=2, max_value=len(packet) // 2 - 1)) * 2
    new_word = data.draw(st.integers(min_value=0, max_value=0xFFFF))
    old_word = packet[index] << 8 | packet[index + 1]
    packet[index : index + 2] = struct.pack("!H", new_word)
    assert checksum_update16(checksum, old_word, new_word) == internet_checksum(packet)
