"""RouteTable longest-prefix match against a linear-scan reference."""

from __future__ import annotations

import ipaddress
import random

import pytest

from dataplane.routes import RouteTable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ReferenceTable:
    """The obvious implementation: scan every network, keep the longest that contains.

    The networks are taken apart into (version, address, netmask, length)
    ints once per change, so a scan over a thousand routes stays quick.
    """

    def __init__(self) -> None:
        self.routes: dict[Network, int] = {}
        self._rows: list[tuple[int, int, int, int, Network]] | None = None

    def set(self, network: Network, value: int) -> None:
        self.routes[network] = value
        self._rows = None

    def pop(self, network: Network) -> int:
        self._rows = None
        return self.routes.pop(network)

    def lookup(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int | None:
        if self._rows is None:
            self._rows = [
                (n.version, int(n.network_address), int(n.netmask), n.prefixlen, n)
                for n in self.routes
            ]
        version, as_int = addr.version, int(addr)
        best: Network | None = None
        for row_version, network_int, mask, length, network in self._rows:
            if (
                row_version == version
                and as_int & mask == network_int
                and (best is None or length > best.prefixlen)
            ):
                best = network
        return None if best is None else self.routes[best]


def _address(bits: int, value: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if bits == 32 else ipaddress.IPv6Address(value)


def _random_prefixes(rng: random.Random, bits: int, count: int) -> list[Network]:
    """Prefixes that nest and overlap: random lengths carved out of a few bases (no /0)."""
    bases = [rng.getrandbits(bits) for _ in range(8)]
    prefixes = []
    for _ in range(count):
        length = rng.choice([bits, *range(bits // 4, bits + 1)])
        addr = rng.choice(bases) ^ (rng.getrandbits(bits) >> rng.randint(length // 2, bits))
        mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
        cls = ipaddress.IPv4Network if bits == 32 else ipaddress.IPv6Network
        prefixes.append(cls((addr & mask, length)))
    return prefixes


def _random_addresses(
    rng: random.Random, prefixes: list[Network], bits: int, count: int
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses inside random prefixes (most of them) and anywhere at all."""
    addrs = []
    for _ in range(count):
        if rng.random() < 0.8:
            net = rng.choice(prefixes)
            offset = rng.getrandbits(bits - net.prefixlen) if net.prefixlen < bits else 0
            addrs.append(_address(bits, int(net.network_address) + offset))
        else:
            addrs.append(_address(bits, rng.getrandbits(bits)))
    return addrs


@pytest.mark.parametrize(("bits", "seed"), [(32, 1), (128, 2)])
def test_against_reference(bits: int, seed: int) -> None:
    rng = random.Random(seed)
    table: RouteTable[int] = RouteTable()
    reference = ReferenceTable()
    prefixes = _random_prefixes(rng, bits, 2000)
    for i, prefix in enumerate(prefixes):
        table.insert(prefix if i % 2 else str(prefix), i)  # later duplicates replace
        reference.set(prefix, i)
    assert len(table) == len(reference.routes)

    def check(count: int) -> None:
        for addr in _random_addresses(rng, prefixes, bits, count):
            expected = reference.lookup(addr)
            as_int = int(addr)
            fast = table.lookup_v4(as_int) if bits == 32 else table.lookup_v6(as_int)
            assert fast == expected, addr
            assert table.lookup(addr) == expected
            assert table.lookup(str(addr)) == expected
            assert table.lookup(addr.packed) == expected
            match = table.match(addr)
            if expected is None:
                assert match is None
            else:
                assert match is not None
                network, value = match
                assert value == expected and addr in network
                assert reference.routes[network] == expected

    check(1000)  # no default route yet: some lookups miss
    # Remove a third of the routes (a second remove finds nothing), replace some
    # values, add a default route.
    for prefix in rng.sample(sorted(reference.routes, key=str), len(reference.routes) // 3):
        assert table.remove(prefix) == reference.pop(prefix)
        assert table.remove(prefix) is None
        assert prefix not in table
    for prefix in rng.sample(sorted(reference.routes, key=str), 50):
        table.insert(prefix, -reference.routes[prefix])
        reference.set(prefix, -reference.routes[prefix])
    default = ipaddress.ip_network("0.0.0.0/0" if bits == 32 else "::/0")
    table.insert(default, 10**6)
    reference.set(default, 10**6)
    assert len(table) == len(reference.routes)
    assert dict(table.items()) == reference.routes
    check(1000)  # every lookup hits something now


def test_families_are_separate() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert("0.0.0.0/0", "v4 default")
    assert table.lookup("fd00::1") is None
    assert table.lookup_v6(1) is None
    table.insert("::/0", "v6 default")
    assert table.lookup("fd00::1") == "v6 default"
    assert table.lookup("10.0.0.1") == "v4 default"
    # The same integer means different things in each family.
    table.insert("0.0.0.1/32", "v4 host")
    assert table.lookup_v4(1) == "v4 host"
    assert table.lookup_v6(1) == "v6 default"


def test_default_and_host_routes() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert("0.0.0.0/0", "default")
    table.insert("10.244.0.0/16", "cluster")
    table.insert("10.244.3.0/24", "node3")
    table.insert("10.244.3.7/32", "pod")
    table.insert("::/0", "default6")
    table.insert("fd00::/48", "cluster6")
    table.insert("fd00::7/128", "pod6")
    assert table.lookup("10.244.3.7") == "pod"
    assert table.lookup("10.244.3.8") == "node3"
    assert table.lookup("10.244.4.1") == "cluster"
    assert table.lookup("8.8.8.8") == "default"
    assert table.lookup("255.255.255.255") == "default"
    assert table.lookup("fd00::7") == "pod6"
    assert table.lookup("fd00::8") == "cluster6"
    assert table.lookup("2001:db8::1") == "default6"
    assert table.match("10.244.3.8") == (ipaddress.IPv4Network("10.244.3.0/24"), "node3")
    assert table.match("2001:db8::1") == (ipaddress.IPv6Network("::/0"), "default6")
    assert table.remove("0.0.0.0/0") == "default"
    assert table.lookup("8.8.8.8") is None
    assert table.match("8.8.8.8") is None


def test_insert_replaces_and_remove_returns() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert("10.244.1.0/24", "old")
    table.insert(ipaddress.IPv4Network("10.244.1.0/24"), "new")
    assert len(table) == 1
    assert table.lookup("10.244.1.9") == "new"
    assert table.get("10.244.1.0/24") == "new"
    assert table.get("10.244.0.0/16") is None
    assert "10.244.1.0/24" in table
    assert ipaddress.IPv4Network("10.244.1.0/24") in table
    assert "10.244.0.0/16" not in table
    assert 42 not in table
    assert table.remove("10.244.1.0/24") == "new"
    assert table.remove("10.244.1.0/24") is None
    assert table.remove("fd00::/64") is None
    assert len(table) == 0
    assert table.lookup("10.244.1.9") is None


def test_items_and_clear() -> None:
    table: RouteTable[int] = RouteTable()
    table.insert("fd00::/64", 3)
    table.insert("10.0.0.0/8", 1)
    table.insert("10.1.0.0/16", 2)
    assert list(table.items()) == [
        (ipaddress.IPv4Network("10.1.0.0/16"), 2),
        (ipaddress.IPv4Network("10.0.0.0/8"), 1),
        (ipaddress.IPv6Network("fd00::/64"), 3),
    ]
    # items() is a snapshot, so removing while iterating is safe.
    for network, _ in table.items():
        table.remove(network)
    assert len(table) == 0
    table.insert("10.0.0.0/8", 1)
    table.insert("fd00::/64", 3)
    table.clear()
    assert len(table) == 0
    assert table.lookup("10.1.2.3") is None and table.lookup("fd00::1") is None
    assert repr(table) == "RouteTable(0 routes)"


@pytest.mark.parametrize("prefix", ["10.0.0.1/24", "10.244.1.1/16", "fd00::1/64"])
def test_host_bits_set_is_an_error(prefix: str) -> None:
    table: RouteTable[int] = RouteTable()
    with pytest.raises(ValueError, match="host bits set"):
        table.insert(prefix, 1)
    with pytest.raises(ValueError, match="host bits set"):
        table.remove(prefix)


@pytest.mark.parametrize("prefix", ["10.0.0.0/33", "banana", "10.0.0/8", "fd00::/129"])
def test_invalid_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid route prefix"):
        RouteTable[int]().insert(prefix, 1)


def test_bare_address_is_a_host_route() -> None:
    table: RouteTable[int] = RouteTable()
    table.insert("10.0.0.1", 1)
    assert table.match("10.0.0.1") == (ipaddress.IPv4Network("10.0.0.1/32"), 1)
    assert table.lookup("10.0.0.2") is None


def test_rejects_none_value_and_bad_addresses() -> None:
    table: RouteTable[object] = RouteTable()
    with pytest.raises(ValueError):
        table.insert("10.0.0.0/8", None)
    with pytest.raises(ValueError):
        table.lookup(b"\x0a\x00\x00")
    with pytest.raises(ValueError):
        table.lookup("not an address")
