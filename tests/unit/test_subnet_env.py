"""control/subnet_env.py: flannel's subnet.env text and a godotenv-ish reader."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import pytest

from control.allocator import ipv6_subnet_from_env_hint, subnet_from_env_hint
from control.subnet_env import parse_subnet_env, render_subnet_env


def test_render_ipv4() -> None:
    text = render_subnet_env(
        IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"), 1450, False
    )
    assert text == (
        "FLANNEL_NETWORK=10.244.0.0/16\n"
        "FLANNEL_SUBNET=10.244.1.1/24\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=false\n"
    )


def test_render_dual_stack_order() -> None:
    text = render_subnet_env(
        IPv4Network("10.244.0.0/16"),
        IPv4Network("10.244.1.0/24"),
        1450,
        True,
        ipv6_network=IPv6Network("fc00::/48"),
        ipv6_subnet=IPv6Network("fc00:0:0:1::/64"),
    )
    assert text == (
        "FLANNEL_NETWORK=10.244.0.0/16\n"
        "FLANNEL_SUBNET=10.244.1.1/24\n"
        "FLANNEL_IPV6_NETWORK=fc00::/48\n"
        "FLANNEL_IPV6_SUBNET=fc00:0:0:1::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_render_small_subnet_keeps_lease_prefix() -> None:
    text = render_subnet_env(IPv4Network("10.0.0.0/24"), IPv4Network("10.0.0.64/26"), 1472, False)
    assert "FLANNEL_SUBNET=10.0.0.65/26\n" in text


def test_render_requires_subnet() -> None:
    with pytest.raises(ValueError):
        render_subnet_env(IPv4Network("10.0.0.0/16"), None, 1450, False)
    with pytest.raises(ValueError):
        render_subnet_env(
            IPv4Network("10.0.0.0/16"),
            IPv4Network("10.0.1.0/24"),
            1450,
            False,
            ipv6_network=IPv6Network("fc00::/48"),
        )


def test_render_parse_round_trip_and_hint() -> None:
    text = render_subnet_env(
        IPv4Network("10.5.0.0/16"),
        IPv4Network("10.5.72.0/24"),
        1450,
        False,
        IPv6Network("fc00::/48"),
        IPv6Network("fc00:0:0:48::/64"),
    )
    env = parse_subnet_env(text)
    assert env == {
        "FLANNEL_NETWORK": "10.5.0.0/16",
        "FLANNEL_SUBNET": "10.5.72.1/24",
        "FLANNEL_IPV6_NETWORK": "fc00::/48",
        "FLANNEL_IPV6_SUBNET": "fc00:0:0:48::1/64",
        "FLANNEL_MTU": "1450",
        "FLANNEL_IPMASQ": "false",
    }
    assert subnet_from_env_hint(env["FLANNEL_SUBNET"]) == IPv4Network("10.5.72.0/24")
    assert ipv6_subnet_from_env_hint(env["FLANNEL_IPV6_SUBNET"]) == IPv6Network("fc00:0:0:48::/64")


def test_parse_godotenv_forms() -> None:
    text = (
        "# written by hand\n"
        "\n"
        "   FLANNEL_NETWORK = 10.1.0.0/16   \n"
        "export FLANNEL_SUBNET=10.1.7.1/24\n"
        "FLANNEL_MTU='1400'\n"
        'FLANNEL_IPMASQ="true"\n'
        'QUOTED="a\\nb \\"c\\" # not a comment"\n'
        "SINGLE='x # y \\n'\n"
        "INLINE=value # a comment\n"
        "HASH=a#b\n"
        "YAML: style\n"
        "EMPTY=\n"
        "not a line at all\n"
        "DUP=1\n"
        "DUP=2\r\n"
    )
    assert parse_subnet_env(text) == {
        "FLANNEL_NETWORK": "10.1.0.0/16",
        "FLANNEL_SUBNET": "10.1.7.1/24",
        "FLANNEL_MTU": "1400",
        "FLANNEL_IPMASQ": "true",
        "QUOTED": 'a\nb "c" # not a comment',
        "SINGLE": "x # y \\n",
        "INLINE": "value",
        "HASH": "a#b",
        "YAML": "style",
        "EMPTY": "",
        "DUP": "2",
    }


def test_parse_comma_list_value_kept_verbatim() -> None:
    env = parse_subnet_env("FLANNEL_SUBNET=10.1.7.1/24,10.2.7.1/24\n")
    assert env["FLANNEL_SUBNET"] == "10.1.7.1/24,10.2.7.1/24"
    assert subnet_from_env_hint(env["FLANNEL_SUBNET"]) is None


def test_parse_empty() -> None:
    assert parse_subnet_env("") == {}
