"""RFC 1071 Internet checksum, pseudo-header sums and RFC 1624 incremental update.

The sums use one big-integer trick instead of a Python loop over 16-bit
words: 2**16 == 1 (mod 0xFFFF), so the one's complement sum of the words of
`data` is congruent to int.from_bytes(data) modulo 0xFFFF. CPython reduces a
big integer by a one-digit modulus in a single C loop, so a 1500-byte packet
costs a few microseconds.
"""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview


def ones_complement_sum(data: Buffer, initial: int = 0) -> int:
    """Folded 16-bit one's complement sum of `data` (big-endian words) plus `initial`.

    Not complemented. An odd trailing byte is padded with a zero byte, as RFC
    1071 says. `initial` may be any non-negative int (e.g. an unfolded partial
    sum); the result is in 0..0xFFFF and is 0 only if every word and `initial`
    are zero (end-around carry never produces "negative zero" from a non-zero sum).
    """
    total = int.from_bytes(data, "big")
    if len(data) & 1:
        total <<= 8
    return _fold(total + initial)


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """The value to store in a checksum field: ~ones_complement_sum (16 bits)."""
    return ~ones_complement_sum(data, initial) & 0xFFFF


def pseudo_header_sum_v4(src: Buffer, dst: Buffer, proto: int, length: int) -> int:
    """Folded sum of the RFC 768 / RFC 793 IPv4 pseudo-header (4-byte addresses)."""
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 pseudo-header needs 4-byte addresses")
    # Each address is two words; the zero byte and proto form one word.
    return _fold(int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length)


def pseudo_header_sum_v6(src: Buffer, dst: Buffer, next_header: int, length: int) -> int:
    """Folded sum of the RFC 8200 section 8.1 pseudo-header (16-byte addresses).

    `length` is the 32-bit upper-layer packet length; the 24 zero bits and
    next_header form the last word.
    """
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 pseudo-header needs 16-byte addresses")
    return _fold(int.from_bytes(src, "big") + int.from_bytes(dst, "big") + next_header + length)


def _fold(total: int) -> int:
    """Fold a non-negative big-endian word sum (any width) to 16 bits, end-around carry."""
    if total == 0:
        return 0
    return total % 0xFFFF or 0xFFFF


def checksum_update16(old_checksum: int, old_word: int, new_word: int) -> int:
    """New checksum after one 16-bit word of the summed data changes (RFC 1624 eqn 3).

    HC' = ~(~HC + ~m + m'). Eqn 3 rather than eqn 2 because it never turns a
    valid checksum into the 0x0000/0xFFFF ambiguity eqn 2 can produce.
    """
    total = (~old_checksum & 0xFFFF) + (~old_word & 0xFFFF) + (new_word & 0xFFFF)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
