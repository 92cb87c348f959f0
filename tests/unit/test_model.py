"""control/model.py: lease keys and byte-exact lease values."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.model import (
    Lease,
    LeaseAttrs,
    LeaseDecodeError,
    config_key,
    decode_lease_attrs,
    encode_lease_attrs,
    format_mac,
    parse_mac,
    parse_subnet_key,
    subnet_key,
    subnets_prefix,
    vtep_mac,
    vxlan_backend_data,
)

P = "/coreos.com/network"

# Documentation/reservations.md, verbatim (facts §1.3)
RESERVATION = (
    b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)


# ------------------------------------------------------------------------- keys


def test_subnet_key() -> None:
    assert (
        subnet_key(P, IPv4Network("10.244.1.0/24")) == "/coreos.com/network/subnets/10.244.1.0-24"
    )
    assert (
        subnet_key(P, IPv4Network("10.244.1.0/24"), IPv6Network("fc00:0:0:1::/64"))
        == "/coreos.com/network/subnets/10.244.1.0-24&fc00:0:0:1::-64"
    )


def test_prefix_is_cleaned_like_path_join() -> None:
    assert subnet_key("/coreos.com/network/", IPv4Network("10.1.2.0/24")) == (
        "/coreos.com/network/subnets/10.1.2.0-24"
    )
    assert subnets_prefix("//a//b/") == "/a/b/subnets/"
    assert config_key() == "/coreos.com/network/config"
    assert config_key("/x/") == "/x/config"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("/coreos.com/network/subnets/10.244.1.0-24", (IPv4Network("10.244.1.0/24"), None)),
        ("/coreos.com/network/subnets/10.0.0.0-8", (IPv4Network("10.0.0.0/8"), None)),
        ("/coreos.com/network/subnets/10.0.0.4-30", (IPv4Network("10.0.0.4/30"), None)),
        (
            "/coreos.com/network/subnets/10.244.1.0-24&fc00:0:0:1::-64",
            (IPv4Network("10.244.1.0/24"), IPv6Network("fc00:0:0:1::/64")),
        ),
        # flannel's regex is not anchored at the start
        ("/coreos.com/network/subnets/x10.244.1.0-24", (IPv4Network("10.244.1.0/24"), None)),
        ("/coreos.com/network/subnets/10.244.1.0-024", (IPv4Network("10.244.1.0/24"), None)),
    ],
)
def test_parse_subnet_key_good(key: str, expected: tuple[IPv4Network, IPv6Network | None]) -> None:
    assert parse_subnet_key(key, P) == expected


@pytest.mark.parametrize(
    "key",
    [
        "/coreos.com/network/config",
        "/coreos.com/network/subnets/",
        "/coreos.com/network/subnets/10.244.1.0/24",
        "/coreos.com/network/subnets/10.244.1.0-24-",
        "/coreos.com/network/subnets/10.244.1.0-32",  # 5-bit prefix: ≤ 31, as ParseUint(…, 5)
        "/coreos.com/network/subnets/10.244.1.0-99",
        "/coreos.com/network/subnets/10.244.1.5-24",  # host bits set
        "/coreos.com/network/subnets/10.244.1.256-24",
        "/coreos.com/network/subnets/010.244.1.0-24",
        "/coreos.com/network/subnets/10.244x1y0-24",  # regex matches, address does not
        "/coreos.com/network/subnets/10.244.1.0-24&FC00::-64",  # upper-case hex: no match
        "/coreos.com/network/subnets/10.244.1.0-24&fc00::-128",
        "/coreos.com/network/subnets/10.244.1.0-24&fc00::1-64",
        "/coreos.com/network/subnets/10.244.1.0-24&fc00:::-64",
        "/other/prefix/subnets/10.244.1.0-24",
        "/coreos.com/network/subnetsX/10.244.1.0-24",
        "/coreos.com/network/subnets/10.244.1.0-\u0662\u0664",  # Arabic-Indic digits
    ],
)
def test_parse_subnet_key_bad(key: str) -> None:
    assert parse_subnet_key(key, P) is None


def test_key_round_trip() -> None:
    for sn4, sn6 in [
        (IPv4Network("10.244.255.0/24"), None),
        (IPv4Network("172.16.0.64/26"), IPv6Network("2001:db8:0:ab00::/56")),
    ]:
        assert parse_subnet_key(subnet_key(P, sn4, sn6), P) == (sn4, sn6)


def test_lease_key_method() -> None:
    lease = Lease(IPv4Network("10.1.2.0/24"), None, LeaseAttrs(IPv4Address("1.2.3.4")))
    assert lease.key() == "/coreos.com/network/subnets/10.1.2.0-24"
    assert lease.is_reservation
    assert not Lease(lease.subnet, None, lease.attrs, 100.0, 7).is_reservation


# ------------------------------------------------------------------------ values


def test_flannel_reservation_example_round_trips_byte_for_byte() -> None:
    attrs = decode_lease_attrs(RESERVATION)
    assert attrs == LeaseAttrs(
        public_ip=IPv4Address("192.168.64.3"),
        public_ipv6=None,
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"},
    )
    assert encode_lease_attrs(attrs) == RESERVATION
    assert vtep_mac(attrs) == bytes.fromhex("c6d2326f8f44")


def test_encode_vxlan() -> None:
    attrs = LeaseAttrs(
        public_ip=IPv4Address("192.168.1.10"),
        backend_type="vxlan",
        backend_data=vxlan_backend_data(1, bytes.fromhex("aabbccddeeff")),
    )
    assert encode_lease_attrs(attrs) == (
        b'{"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}'
    )


def test_encode_udp_omits_backend_fields() -> None:
    attrs = LeaseAttrs(public_ip=IPv4Address("10.0.0.5"))
    assert encode_lease_attrs(attrs) == b'{"PublicIP":"10.0.0.5","PublicIPv6":null}'
    assert encode_lease_attrs(LeaseAttrs(IPv4Address("10.0.0.5"), backend_type="")) == (
        b'{"PublicIP":"10.0.0.5","PublicIPv6":null}'
    )


def test_encode_host_gw_and_ipv6() -> None:
    attrs = LeaseAttrs(
        public_ip=IPv4Address("10.0.0.5"),
        public_ipv6=IPv6Address("2001:db8::1"),
        backend_type="host-gw",
    )
    assert encode_lease_attrs(attrs) == (
        b'{"PublicIP":"10.0.0.5","PublicIPv6":"2001:db8::1","BackendType":"host-gw"}'
    )


def test_encode_v6_data_and_empty_object() -> None:
    attrs = LeaseAttrs(
        public_ip=IPv4Address("10.0.0.5"),
        backend_type="vxlan",
        backend_data={},
        backend_v6_data={"VNI": 1, "VtepMAC": "02:00:00:00:00:01"},
    )
    raw = encode_lease_attrs(attrs)
    assert raw == (
        b'{"PublicIP":"10.0.0.5","PublicIPv6":null,"BackendType":"vxlan","BackendData":{},'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}'
    )
    assert decode_lease_attrs(raw) == attrs


def test_encode_escapes_like_go() -> None:
    attrs = LeaseAttrs(
        public_ip=IPv4Address("10.0.0.5"),
        backend_type="x",
        backend_data={"K": "<a&b>\u00e9\u2028\n"},
    )
    assert encode_lease_attrs(attrs) == (
        b'{"PublicIP":"10.0.0.5","PublicIPv6":null,"BackendType":"x",'
        b'"BackendData":{"K":"\\u003ca\\u0026b\\u003e\xc3\xa9\\u2028\\n"}}'
    )


@pytest.mark.parametrize(
    "raw",
    [
        RESERVATION,
        b'{"PublicIP":"10.0.0.5","PublicIPv6":null}',
        b'{"PublicIP":"10.0.0.5","PublicIPv6":"fc00::5","BackendType":"host-gw"}',
        b'{"PublicIP":"0.0.0.0","PublicIPv6":"fc00::5","BackendType":"wireguard",'
        b'"BackendData":{"PublicKey":"abc=","Port":51820}}',
    ],
)
def test_round_trip(raw: bytes) -> None:
    assert encode_lease_attrs(decode_lease_attrs(raw)) == raw


def test_decode_is_case_insensitive() -> None:
    attrs = decode_lease_attrs(
        b'{"publicip":"10.0.0.5","PUBLICIPV6":"fc00::1","backendtype":"vxlan",'
        b'"backenddata":{"vtepmac":"02:AA:bb:cc:dd:ee"}}'
    )
    assert attrs.public_ip == IPv4Address("10.0.0.5")
    assert attrs.public_ipv6 == IPv6Address("fc00::1")
    assert attrs.backend_type == "vxlan"
    assert vtep_mac(attrs) == bytes.fromhex("02aabbccddee")


def test_decode_old_vxlan_lease_with_only_vtepmac() -> None:
    attrs = decode_lease_attrs(
        b'{"PublicIP":"10.0.0.5","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:09"}}'
    )
    assert attrs.public_ipv6 is None
    assert vtep_mac(attrs) == bytes.fromhex("020000000009")


def test_decode_null_backend_data_and_str_input() -> None:
    attrs = decode_lease_attrs('{"PublicIP":"10.0.0.5","BackendType":"host-gw","BackendData":null}')
    assert attrs.backend_data is None
    assert vtep_mac(attrs) is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not JSON"),
        (b"hello", "not JSON"),
        (b'{"PublicIP":', "not JSON"),
        (b"\xff", "not UTF-8"),
        (b"[]", "not a JSON object"),
        (b'"10.0.0.1"', "not a JSON object"),
        (b"{}", "no PublicIP"),
        (b'{"PublicIP":null}', "no PublicIP"),
        (b'{"PublicIP":5}', "PublicIP is not a string"),
        (b'{"PublicIP":"fc00::1"}', "not an IPv4 address"),
        (b'{"PublicIP":"10.0.0.256"}', "not an IPv4 address"),
        (b'{"PublicIP":"10.0.0.1","PublicIPv6":"10.0.0.1"}', "not an IPv6 address"),
        (b'{"PublicIP":"10.0.0.1","PublicIPv6":7}', "PublicIPv6 is not a string"),
        (b'{"PublicIP":"10.0.0.1","BackendType":1}', "BackendType is not a string"),
        (b'{"PublicIP":"10.0.0.1","BackendData":"x"}', "BackendData is not a JSON object"),
        (b'{"PublicIP":"10.0.0.1","BackendData":{"VtepMAC":"zz"}}', "VtepMAC is malformed"),
        (b'{"PublicIP":"10.0.0.1","BackendData":{"VtepMAC":null}}', "VtepMAC is malformed"),
        (
            b'{"PublicIP":"10.0.0.1","BackendData":{"VtepMAC":"aa:bb:cc:dd:ee"}}',
            "VtepMAC is malformed",
        ),
        (
            b'{"PublicIP":"10.0.0.1","BackendV6Data":{"vtepmac":"aa:bb:cc:dd:ee:ff:00:11"}}',
            "BackendV6Data.VtepMAC is malformed",
        ),
        (b'{"PublicIP":"10.0.0.1","BackendData":{"VNI":"1"}}', "VNI is not a non-negative"),
        (b'{"PublicIP":"10.0.0.1","BackendData":{"VNI":NaN}}', "not JSON"),
    ],
)
def test_decode_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(LeaseDecodeError) as info:
        decode_lease_attrs(raw)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_lease_decode_error_is_value_error() -> None:
    assert issubclass(LeaseDecodeError, ValueError)


# -------------------------------------------------------------------------- MACs


@pytest.mark.parametrize(
    "text", ["aa:bb:cc:dd:ee:ff", "AA-BB-CC-DD-EE-FF", "aabb.ccdd.eeff", "Aa:bB:cc:dd:ee:ff"]
)
def test_parse_mac_forms(text: str) -> None:
    assert parse_mac(text) == bytes.fromhex("aabbccddeeff")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "aa:bb:cc:dd:ee",
        "aa:bb:cc:dd:ee:ff:00:11",
        "aabbccddeeff",
        "a:b:c:d:e:f",
        "aa:bb-cc:dd:ee:ff",
    ],
)
def test_parse_mac_rejects(text: str) -> None:
    assert parse_mac(text) is None


def test_format_mac() -> None:
    assert format_mac(bytes.fromhex("0a0b0c0d0e0f")) == "0a:0b:0c:0d:0e:0f"
    with pytest.raises(ValueError):
        format_mac(b"\x00")


def test_vtep_mac_malformed_in_constructed_attrs() -> None:
    attrs = LeaseAttrs(IPv4Address("1.2.3.4"), backend_type="vxlan", backend_data={"VtepMAC": 5})
    with pytest.raises(LeaseDecodeError, match="VtepMAC"):
        vtep_mac(attrs)
    assert vtep_mac(LeaseAttrs(IPv4Address("1.2.3.4"))) is None


# ------------------------------------------------------------------ properties


_v4_nets = st.builds(
    lambda addr, plen: IPv4Network((addr, plen), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 31),
)
_MAPPED = IPv6Network("::ffff:0:0/96")  # newer Pythons print these dotted; flannel never keys them
_v6_nets = st.builds(
    lambda addr, plen: IPv6Network((addr, plen), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 127),
).filter(lambda n: not n.overlaps(_MAPPED))


@given(_v4_nets, st.none() | _v6_nets)
def test_property_key_round_trip(sn4: IPv4Network, sn6: IPv6Network | None) -> None:
    assert parse_subnet_key(subnet_key(P, sn4, sn6), P) == (sn4, sn6)


@given(
    st.integers(0, 2**32 - 1),
    st.none() | st.integers(0, 2**128 - 1),
    st.none() | st.sampled_from(["vxlan", "host-gw", "wireguard"]),
    st.none() | st.binary(min_size=6, max_size=6),
    st.integers(0, 2**24 - 1),
)
def test_property_value_round_trip(
    ip: int, ip6: int | None, btype: str | None, mac: bytes | None, vni: int
) -> None:
    attrs = LeaseAttrs(
        IPv4Address(ip),
        None if ip6 is None else IPv6Address(ip6),
        btype,
        None if mac is None else vxlan_backend_data(vni, mac),
    )
    raw = encode_lease_attrs(attrs)
    assert decode_lease_attrs(raw) == attrs
    assert encode_lease_attrs(decode_lease_attrs(raw)) == raw
    assert vtep_mac(attrs) == mac


@given(st.binary(max_size=80))
def test_property_decode_never_raises_anything_else(raw: bytes) -> None:
    with contextlib.suppress(LeaseDecodeError):
        decode_lease_attrs(raw)
