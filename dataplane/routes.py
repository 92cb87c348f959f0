"""Longest-prefix match for IPv4 and IPv6, keyed by integers.

One dict per prefix length present, {network address as int: value}, and a
list of (mask, dict) pairs longest prefix first. A lookup is at most one
AND and one dict probe per distinct prefix length in use; an overlay has a
handful (the peers' subnets, maybe a default route), so that is a few probes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Generic, TypeVar

V = TypeVar("V")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PrefixLike = str | ipaddress.IPv4Network | ipaddress.IPv6Network
AddressLike = str | ipaddress.IPv4Address | ipaddress.IPv6Address | bytes | bytearray


def parse_prefix(prefix: PrefixLike) -> Network:
    """A network from a prefix; strict, so "10.0.0.1/24" is an error, not 10.0.0.0/24."""
    if isinstance(prefix, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return prefix
    try:
        return ipaddress.ip_network(prefix, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            raise ValueError(f"invalid route prefix {prefix!r}: {exc}") from None
        raise ValueError(
            f"invalid route prefix {prefix!r}: host bits set (did you mean {loose}?)"
        ) from None


class _Family(Generic[V]):
    """The per-length dicts of one address family."""

    __slots__ = ("all_ones", "by_length", "fast", "levels", "network_class")

    def __init__(self, width: int, network_class: type[Network]) -> None:
        self.all_ones = (1 << width) - 1
        self.network_class = network_class
        self.by_length: dict[int, dict[int, V]] = {}
        # Longest first. Rebuilt in place when a prefix length appears or
        # disappears (rare next to lookups), so RouteTable can hold `fast`.
        self.levels: list[tuple[int, int, dict[int, V]]] = []  # (length, mask, dict)
        self.fast: list[tuple[int, dict[int, V]]] = []  # (mask, dict)

    def rebuild(self) -> None:
        self.levels[:] = [
            (length, self.all_ones ^ (self.all_ones >> length), self.by_length[length])
            for length in sorted(self.by_length, reverse=True)
        ]
        self.fast[:] = [(mask, table) for _, mask, table in self.levels]


class RouteTable(Generic[V]):
    """Prefix → value, with longest-prefix-match lookups. Values must not be None."""

    __slots__ = ("_v4", "_v4_levels", "_v6", "_v6_levels")

    def __init__(self) -> None:
        self._v4: _Family[V] = _Family(32, ipaddress.IPv4Network)
        self._v6: _Family[V] = _Family(128, ipaddress.IPv6Network)
        # The hot path iterates these lists directly (one attribute load less).
        self._v4_levels = self._v4.fast
        self._v6_levels = self._v6.fast

    def _family(self, network: Network) -> _Family[V]:
        return self._v4 if network.version == 4 else self._v6

    def insert(self, prefix: PrefixLike, value: V) -> None:
        """Add a route, replacing any value the same prefix had."""
        if value is None:
            raise ValueError("RouteTable values must not be None (None means no route)")
        network = parse_prefix(prefix)
        family = self._family(network)
        table = family.by_length.get(network.prefixlen)
        if table is None:
            family.by_length[network.prefixlen] = {int(network.network_address): value}
            family.rebuild()
        else:
            table[int(network.network_address)] = value

    def remove(self, prefix: PrefixLike) -> V | None:
        """Delete a route; return its value, or None if there was no such prefix."""
        network = parse_prefix(prefix)
        family = self._family(network)
        table = family.by_length.get(network.prefixlen)
        if table is None:
            return None
        value = table.pop(int(network.network_address), None)
        if not table:
            del family.by_length[network.prefixlen]
            family.rebuild()
        return value

    def get(self, prefix: PrefixLike) -> V | None:
        """The value of exactly this prefix (no longest-prefix match)."""
        network = parse_prefix(prefix)
        table = self._family(network).by_length.get(network.prefixlen)
        return None if table is None else table.get(int(network.network_address))

    def lookup_v4(self, addr: int) -> V | None:
        """Longest match for an IPv4 address given as a 32-bit int."""
        for mask, table in self._v4_levels:
            value = table.get(addr & mask)
            if value is not None:
                return value
        return None

    def lookup_v6(self, addr: int) -> V | None:
        """Longest match for an IPv6 address given as a 128-bit int."""
        for mask, table in self._v6_levels:
            value = table.get(addr & mask)
            if value is not None:
                return value
        return None

    def lookup(self, addr: AddressLike) -> V | None:
        """Longest match for an address as text, an ipaddress object or packed bytes."""
        version, value = _address_int(addr)
        return self.lookup_v4(value) if version == 4 else self.lookup_v6(value)

    def match(self, addr: AddressLike) -> tuple[Network, V] | None:
        """The matching prefix and its value (for explaining a routing decision)."""
        version, value = _address_int(addr)
        family = self._v4 if version == 4 else self._v6
        for length, mask, table in family.levels:
            key = value & mask
            found = table.get(key)
            if found is not None:
                return family.network_class((key, length)), found
        return None

    def items(self) -> Iterator[tuple[Network, V]]:
        """Every route: IPv4 then IPv6, each longest prefix first (a snapshot)."""
        snapshot = [
            (family.network_class((key, length)), value)
            for family in (self._v4, self._v6)
            for length, _, table in family.levels
            for key, value in table.items()
        ]
        return iter(snapshot)

    def clear(self) -> None:
        for family in (self._v4, self._v6):
            family.by_length.clear()
            family.rebuild()

    def __len__(self) -> int:
        return sum(len(t) for f in (self._v4, self._v6) for t in f.by_length.values())

    def __contains__(self, prefix: object) -> bool:
        if not isinstance(prefix, str | ipaddress.IPv4Network | ipaddress.IPv6Network):
            return False
        return self.get(prefix) is not None

    def __repr__(self) -> str:
        return f"RouteTable({len(self)} routes)"


def _address_int(addr: AddressLike) -> tuple[int, int]:
    """(IP version, address as int)."""
    if isinstance(addr, bytes | bytearray):
        if len(addr) == 4:
            return 4, int.from_bytes(addr, "big")
        if len(addr) == 16:
            return 6, int.from_bytes(addr, "big")
        raise ValueError(f"a packed address is 4 or 16 bytes, got {len(addr)}")
    if isinstance(addr, str):
        addr = ipaddress.ip_address(addr)
    return addr.version, int(addr)
