"""control/config.py: flannel net-conf parsing, defaults, validation, MTU."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from control.config import (
    BackendConfig,
    ConfigError,
    NetworkConfig,
    mtu_for,
    parse_network_config,
)


def cfg(**top: object) -> NetworkConfig:
    return parse_network_config(json.dumps(top))


# ---------------------------------------------------------------- defaults (facts §1.1)


def test_default_16_network() -> None:
    c = parse_network_config(b'{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    assert c.network == IPv4Network("10.244.0.0/16")
    assert c.subnet_len == 24
    assert c.subnet_min == IPv4Address("10.244.1.0")
    assert c.subnet_max == IPv4Address("10.244.255.0")
    assert c.enable_ipv4 is True
    assert c.enable_ipv6 is False
    assert c.ipv6_network is None
    assert c.backend.type == "vxlan"
    assert c.backend.vni == 1
    assert c.backend.port == 0
    assert c.backend.effective_port == 8472
    assert c.backend.mtu is None
    assert (c.backend.gbp, c.backend.learning, c.backend.direct_routing) == (False,) * 3


@pytest.mark.parametrize(
    ("network", "subnet_len", "smin", "smax"),
    [
        ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
        ("10.244.0.0/22", 24, "10.244.1.0", "10.244.3.0"),  # ≤ /22 → /24
        ("10.244.0.0/23", 25, "10.244.0.128", "10.244.1.128"),  # prefix + 2
        ("10.0.0.0/24", 26, "10.0.0.64", "10.0.0.192"),
        ("10.0.0.0/28", 30, "10.0.0.4", "10.0.0.12"),
    ],
)
def test_subnet_len_defaults(network: str, subnet_len: int, smin: str, smax: str) -> None:
    c = cfg(Network=network)
    assert c.subnet_len == subnet_len
    assert c.subnet_min == IPv4Address(smin)
    assert c.subnet_max == IPv4Address(smax)


def test_network_smaller_than_28_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"Network: .*/28"):
        cfg(Network="10.0.0.0/29")


def test_backend_absent_is_udp_as_flannel_code_does() -> None:
    c = cfg(Network="10.244.0.0/16")
    assert c.backend.type == "udp"
    assert c.backend.port == 8285
    assert c.backend.effective_port == 8285
    assert c.backend_type == "udp"


def test_udp_backend_port() -> None:
    assert cfg(Network="10.1.0.0/16", Backend={"Type": "udp"}).backend.effective_port == 8285
    c = cfg(Network="10.1.0.0/16", Backend={"Type": "udp", "Port": 9000})
    assert c.backend.port == 9000
    assert c.backend.effective_port == 9000


def test_host_gw_has_no_port() -> None:
    c = cfg(Network="10.1.0.0/16", Backend={"Type": "host-gw"})
    assert c.backend.type == "host-gw"
    assert c.backend.effective_port is None


def test_vxlan_backend_options() -> None:
    c = cfg(
        Network="10.1.0.0/16",
        Backend={
            "Type": "vxlan",
            "VNI": 42,
            "Port": 4789,
            "MTU": 9001,
            "GBP": True,
            "Learning": True,
            "DirectRouting": True,
        },
    )
    b = c.backend
    assert (b.vni, b.port, b.effective_port, b.mtu) == (42, 4789, 4789, 9001)
    assert (b.gbp, b.learning, b.direct_routing) == (True, True, True)


def test_explicit_subnet_len_min_max() -> None:
    c = cfg(Network="10.0.0.0/16", SubnetLen=20, SubnetMin="10.0.16.0", SubnetMax="10.0.32.0")
    assert (c.subnet_len, c.subnet_min, c.subnet_max) == (
        20,
        IPv4Address("10.0.16.0"),
        IPv4Address("10.0.32.0"),
    )
    # SubnetLen given, min/max default from it
    c = cfg(Network="10.0.0.0/16", SubnetLen=28)
    assert c.subnet_min == IPv4Address("10.0.0.16")
    assert c.subnet_max == IPv4Address("10.0.255.240")


def test_zero_values_mean_default_like_go() -> None:
    c = cfg(Network="10.0.0.0/16", SubnetLen=0, SubnetMin="0.0.0.0", SubnetMax=None)
    assert (c.subnet_len, c.subnet_min, c.subnet_max) == (
        24,
        IPv4Address("10.0.1.0"),
        IPv4Address("10.0.255.0"),
    )


def test_network_host_bits_are_masked_like_parsecidr() -> None:
    assert cfg(Network="10.244.7.9/16").network == IPv4Network("10.244.0.0/16")


# ------------------------------------------------------------ case-insensitive keys


def test_keys_are_case_insensitive_top_level_and_backend() -> None:
    c = parse_network_config(
        '{"network":"10.5.0.0/16","SUBNETLEN":26,"subnetmin":"10.5.1.0",'
        '"backend":{"type":"vxlan","vni":7,"directrouting":true,"PORT":8999}}'
    )
    assert c.network == IPv4Network("10.5.0.0/16")
    assert c.subnet_len == 26
    assert c.subnet_min == IPv4Address("10.5.1.0")
    assert c.backend.type == "vxlan"
    assert c.backend.vni == 7
    assert c.backend.direct_routing is True
    assert c.backend.port == 8999


def test_last_case_variant_duplicate_wins_like_go() -> None:
    c = parse_network_config('{"Network":"10.1.0.0/16","network":"10.2.0.0/16"}')
    assert c.network == IPv4Network("10.2.0.0/16")
    c = parse_network_config(
        '{"Network":"10.1.0.0/16","network":"10.2.0.0/16","Network":"10.3.0.0/16"}'
    )
    assert c.network == IPv4Network("10.3.0.0/16")


def test_unknown_keys_are_ignored() -> None:
    c = cfg(Network="10.1.0.0/16", Comment="x", Backend={"Type": "vxlan", "Foo": [1]})
    assert c.backend.raw == {"Type": "vxlan", "Foo": [1]}


# ---------------------------------------------------------------------- IPv6


def test_ipv6_defaults() -> None:
    c = cfg(Network="10.1.0.0/16", EnableIPv6=True, IPv6Network="fc00::/48")
    assert c.enable_ipv6
    assert c.ipv6_network == IPv6Network("fc00::/48")
    assert c.ipv6_subnet_len == 64
    assert c.ipv6_subnet_min == IPv6Address("fc00:0:0:1::")
    assert c.ipv6_subnet_max == IPv6Address("fc00:0:0:ffff::")


def test_ipv6_small_network() -> None:
    c = cfg(Network="10.1.0.0/16", EnableIPv6=True, IPv6Network="fc00::/120")
    assert c.ipv6_subnet_len == 122
    assert c.ipv6_subnet_min == IPv6Address("fc00::40")
    assert c.ipv6_subnet_max == IPv6Address("fc00::c0")


def test_ipv6_network_ignored_unless_enabled() -> None:
    c = cfg(Network="10.1.0.0/16", IPv6Network="fc00::/48")
    assert c.ipv6_network is None and c.ipv6_subnet_len is None


@pytest.mark.parametrize(
    ("top", "field"),
    [
        ({"EnableIPv6": True}, "IPv6Network"),
        ({"EnableIPv6": True, "IPv6Network": "fc00::/125"}, "IPv6Network"),
        ({"EnableIPv6": True, "IPv6Network": "10.0.0.0/8"}, "IPv6Network"),
        ({"EnableIPv6": True, "IPv6Network": "fc00::/48", "IPv6SubnetLen": 127}, "IPv6SubnetLen"),
        ({"EnableIPv6": True, "IPv6Network": "fc00::/48", "IPv6SubnetLen": 49}, "IPv6SubnetLen"),
        (
            {"EnableIPv6": True, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fd00::"},
            "IPv6SubnetMin",
        ),
        (
            {"EnableIPv6": True, "IPv6Network": "fc00::/48", "IPv6SubnetMax": "fc00:0:0:1::1"},
            "IPv6SubnetMax",
        ),
        ({"EnableIPv6": "yes", "IPv6Network": "fc00::/48"}, "EnableIPv6"),
    ],
)
def test_ipv6_errors_name_the_field(top: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        cfg(Network="10.1.0.0/16", **top)


# -------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("top", "field"),
    [
        ({}, "Network"),
        ({"Network": 5}, "Network"),
        ({"Network": "10.0.0.0"}, "Network"),
        ({"Network": "fc00::/48"}, "Network"),
        ({"Network": "10.0.0.300/16"}, "Network"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 31}, "SubnetLen"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 17}, "SubnetLen"),
        ({"Network": "10.0.0.0/16", "SubnetLen": "24"}, "SubnetLen"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 24.0}, "SubnetLen"),
        ({"Network": "10.0.0.0/16", "SubnetLen": True}, "SubnetLen"),
        ({"Network": "10.0.0.0/16", "SubnetLen": -1}, "SubnetLen"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}, "SubnetMin"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.0.1.1"}, "SubnetMin"),
        ({"Network": "10.0.0.0/16", "SubnetMin": 3}, "SubnetMin"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "nope"}, "SubnetMin"),
        ({"Network": "10.0.0.0/16", "SubnetMax": "11.0.0.0"}, "SubnetMax"),
        ({"Network": "10.0.0.0/16", "SubnetMax": "10.0.3.128"}, "SubnetMax"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.0.9.0", "SubnetMax": "10.0.8.0"}, "SubnetMin"),
        ({"Network": "10.0.0.0/16", "EnableIPv4": False}, "EnableIPv4"),
        ({"Network": "10.0.0.0/16", "EnableIPv4": 1}, "EnableIPv4"),
        ({"Network": "10.0.0.0/16", "EnableNFTables": "true"}, "EnableNFTables"),
        ({"Network": "10.0.0.0/16", "Backend": "vxlan"}, "Backend"),
        ({"Network": "10.0.0.0/16", "Backend": None}, "Backend"),
        ({"Network": "10.0.0.0/16", "Backend": {}}, "Backend.Type"),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": 3}}, "Backend.Type"),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "VNI": "x"}}, "Backend.VNI"),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1 << 24}}, "Backend.VNI"),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}, "Backend.Port"),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "Port": "8472"}}, "Backend.Port"),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": "udp", "Port": -1}}, "Backend.Port"),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "MTU": "1500"}}, "Backend.MTU"),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "MTU": 100}}, "Backend.MTU"),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "GBP": "true"}}, "Backend.GBP"),
        (
            {"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "Learning": 0}},
            "Backend.Learning",
        ),
        (
            {"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": "no"}},
            "Backend.DirectRouting",
        ),
    ],
)
def test_errors_name_the_field(top: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(**top)
    text = str(info.value)
    assert f"{field}:" in text
    assert "\n" not in text


def test_udp_ignores_vxlan_keys_like_flannel() -> None:
    c = cfg(Network="10.0.0.0/16", Backend={"Type": "udp", "VNI": "x"})
    assert c.backend.type == "udp"


@pytest.mark.parametrize("raw", [b"", b"   ", b"{", b"[1,2]", b'"x"', b"null", b"\xff\xfe", b"NaN"])
def test_bad_json(raw: bytes) -> None:
    with pytest.raises(ConfigError) as info:
        parse_network_config(raw)
    assert str(info.value).startswith("network config:")
    assert "\n" not in str(info.value)


def test_bad_json_reports_position() -> None:
    with pytest.raises(ConfigError, match=r"invalid JSON at line 1 column \d+"):
        parse_network_config('{"Network": }')


# ------------------------------------------------------------------- backend types


@pytest.mark.parametrize("btype", ["wireguard", "ipip", "ipsec", "alloc", "extension"])
def test_flannel_backends_weft_lacks(btype: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(Network="10.0.0.0/16", Backend={"Type": btype})
    text = str(info.value)
    assert "Backend.Type" in text
    assert "not implemented by weft" in text
    assert "vxlan, udp, host-gw" in text


def test_unknown_backend_type() -> None:
    with pytest.raises(ConfigError, match=r"Backend\.Type: unknown backend type 'nope'"):
        cfg(Network="10.0.0.0/16", Backend={"Type": "nope"})
    with pytest.raises(ConfigError, match="lower case"):
        cfg(Network="10.0.0.0/16", Backend={"Type": "VXLAN"})


# ------------------------------------------------------------------------- MTU


def test_mtu_for() -> None:
    assert mtu_for("vxlan", 1500) == 1450
    assert mtu_for("udp", 1500) == 1472
    assert mtu_for("host-gw", 1500) == 1500
    assert mtu_for("vxlan", 9001) == 8951
    with pytest.raises(ConfigError, match=r"Backend\.Type"):
        mtu_for("ipip", 1500)
    with pytest.raises(ConfigError, match="MTU"):
        mtu_for("vxlan", 100)


def test_vxlan_backend_mtu_overrides_underlay() -> None:
    c = cfg(Network="10.0.0.0/16", Backend={"Type": "vxlan", "MTU": 9000})
    assert c.mtu(1500) == 8950
    assert cfg(Network="10.0.0.0/16", Backend={"Type": "vxlan"}).mtu(1500) == 1450
    assert cfg(Network="10.0.0.0/16", Backend={"Type": "vxlan", "MTU": 0}).backend.mtu is None
    assert cfg(Network="10.0.0.0/16").mtu(1500) == 1472


# ---------------------------------------------------------------------- to_json


def test_to_json_minimal() -> None:
    c = cfg(Network="10.244.0.0/16", Backend={"Type": "vxlan"})
    assert c.to_json() == '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'
    assert cfg(Network="10.244.0.0/16").to_json() == (
        '{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}'
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}',
        '{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.1.0.0","SubnetMax":"10.2.0.0",'
        '"Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"MTU":9000,"GBP":true,'
        '"Learning":true,"DirectRouting":true}}',
        '{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48",'
        '"IPv6SubnetLen":80,"Backend":{"Type":"host-gw"}}',
        '{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Port":9999}}',
        '{"Network":"10.1.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan","MacPrefix":"0E-2A"}}',
    ],
)
def test_to_json_round_trips(text: str) -> None:
    c = parse_network_config(text)
    assert parse_network_config(c.to_json()) == c
    assert c.to_json() == text


def test_to_json_from_constructed_config() -> None:
    c = NetworkConfig(
        network=IPv4Network("10.9.0.0/16"),
        subnet_len=24,
        subnet_min=IPv4Address("10.9.1.0"),
        subnet_max=IPv4Address("10.9.255.0"),
        backend=BackendConfig(type="vxlan", vni=2),
    )
    assert c.to_json() == '{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan","VNI":2}}'
    assert parse_network_config(c.to_json()) == c


def test_to_json_canonicalises_key_case() -> None:
    c = parse_network_config('{"network":"10.9.0.0/16","backend":{"type":"vxlan","vni":3}}')
    assert c.to_json() == '{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan","VNI":3}}'
