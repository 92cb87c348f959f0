"""Lease keys and values, byte-compatible with flannel (facts §1.2, §1.3).

Pure: no I/O.

* key: ``<prefix>/subnets/10.244.1.0-24`` (dual stack: ``…-24&fc00:0:0:1::-64``),
  parsed with flannel's own regex;
* value: flannel's ``LeaseAttrs`` JSON, written byte-for-byte as Go's
  ``json.Marshal`` writes it, read case-insensitively as Go's ``json.Unmarshal``
  reads it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
)
from typing import Any

from control.config import go_object_pairs

__all__ = [
    "DEFAULT_PREFIX",
    "Lease",
    "LeaseAttrs",
    "LeaseDecodeError",
    "config_key",
    "decode_lease_attrs",
    "encode_lease_attrs",
    "format_mac",
    "parse_mac",
    "parse_subnet_key",
    "subnet_key",
    "subnets_prefix",
    "vtep_mac",
    "vxlan_backend_data",
]

DEFAULT_PREFIX = "/coreos.com/network"

# flannel pkg/subnet/subnet.go, verbatim (the last two dots really are unescaped).
# RE2's \d is ASCII-only, hence re.ASCII.
_SUBNET_KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$", re.ASCII)

_MAC_COLON = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}", re.ASCII)
_MAC_DASH = re.compile(r"[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}", re.ASCII)
_MAC_DOT = re.compile(r"[0-9A-Fa-f]{4}(?:\.[0-9A-Fa-f]{4}){2}", re.ASCII)


class LeaseDecodeError(ValueError):
    """A lease value (or key) that is not a flannel lease. One line of text."""


# --------------------------------------------------------------------------------------
# Keys


def _clean_prefix(prefix: str) -> str:
    """What Go's ``path.Join(prefix, …)`` does to the prefix: no empty segments, no
    trailing slash; a leading slash is kept."""
    parts = [p for p in prefix.split("/") if p]
    joined = "/".join(parts)
    return "/" + joined if prefix.startswith("/") else joined


def config_key(prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>/config``."""
    return f"{_clean_prefix(prefix)}/config"


def subnets_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>/subnets/``: the prefix to list and watch (with its trailing slash)."""
    return f"{_clean_prefix(prefix)}/subnets/"


def subnet_key(prefix: str, subnet: IPv4Network, ipv6: IPv6Network | None = None) -> str:
    """``/coreos.com/network/subnets/10.244.1.0-24`` (``&fc00:0:0:1::-64`` for dual stack)."""
    name = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6 is not None:
        name += f"&{ipv6.network_address}-{ipv6.prefixlen}"
    return subnets_prefix(prefix) + name


def parse_subnet_key(
    key: str, prefix: str = DEFAULT_PREFIX
) -> tuple[IPv4Network, IPv6Network | None] | None:
    """The subnet(s) named by a lease key, or None if the key is not a lease key.

    The key must live under ``<prefix>/subnets/``; the rest is matched with flannel's
    regex (searched, not anchored at the start, as Go's FindStringSubmatch does).
    As in flannel, the IPv4 prefix length must fit 5 bits (≤ 31) and the IPv6 one
    7 bits (≤ 127). Unlike flannel, a key whose address has host bits set
    (``10.244.1.5-24``) is rejected: flannel never writes one.
    """
    base = subnets_prefix(prefix)
    if not key.startswith(base):
        return None
    m = _SUBNET_KEY_RE.search(key, len(base))
    if m is None:
        return None
    ip4_text, len4_text, ip6_text, len6_text = m.groups()
    try:
        len4 = int(len4_text)
        if len4 > 31:
            return None
        sn4 = IPv4Network((IPv4Address(ip4_text), len4))
        sn6: IPv6Network | None = None
        if ip6_text is not None:
            len6 = int(len6_text)
            if len6 > 127:
                return None
            sn6 = IPv6Network((IPv6Address(ip6_text), len6))
    except ValueError:  # AddressValueError / NetmaskValueError / host bits set
        return None
    return sn4, sn6


# --------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class LeaseAttrs:
    """flannel's ``LeaseAttrs``. ``backend_data`` keeps the JSON object as read (key
    order and spelling), so a decoded value re-encodes to the same bytes."""

    public_ip: IPv4Address
    public_ipv6: IPv6Address | None = None
    backend_type: str | None = None
    backend_data: dict[str, Any] | None = None
    backend_v6_data: dict[str, Any] | None = None


@dataclass(frozen=True)
class Lease:
    """A subnet lease: its key's subnets, its value, and etcd's view of its lifetime.

    ``expiration`` is an absolute time in the caller's clock (None for a reservation,
    i.e. a key with no etcd lease); ``etcd_lease_id`` is 0 when there is none.
    """

    subnet: IPv4Network
    subnet_v6: IPv6Network | None
    attrs: LeaseAttrs
    expiration: float | None = None
    etcd_lease_id: int = 0

    def key(self, prefix: str = DEFAULT_PREFIX) -> str:
        return subnet_key(prefix, self.subnet, self.subnet_v6)

    @property
    def is_reservation(self) -> bool:
        return self.etcd_lease_id == 0 and self.expiration is None


def _go_json(value: Any) -> str:
    """``json.Marshal``'s bytes for plain JSON data: compact, UTF-8 (no \\u escapes for
    non-ASCII), with Go's HTML-safe escapes for <, >, & and U+2028/U+2029."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def encode_lease_attrs(attrs: LeaseAttrs) -> bytes:
    """flannel's lease value, byte-exact::

        {"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"vxlan",
         "BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}

    ``PublicIPv6`` is always written (``null`` when unset); ``BackendType``,
    ``BackendData`` and ``BackendV6Data`` are left out when unset (Go's omitempty),
    so the udp backend's value is ``{"PublicIP":"x","PublicIPv6":null}``.
    An empty-but-present ``{}`` is written, as Go writes a non-empty RawMessage.
    """
    parts = [
        '"PublicIP":' + _go_json(str(attrs.public_ip)),
        '"PublicIPv6":'
        + ("null" if attrs.public_ipv6 is None else _go_json(str(attrs.public_ipv6))),
    ]
    if attrs.backend_type:
        parts.append('"BackendType":' + _go_json(attrs.backend_type))
    if attrs.backend_data is not None:
        parts.append('"BackendData":' + _go_json(attrs.backend_data))
    if attrs.backend_v6_data is not None:
        parts.append('"BackendV6Data":' + _go_json(attrs.backend_v6_data))
    return ("{" + ",".join(parts) + "}").encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON literal {name}")


def decode_lease_attrs(raw: bytes | str) -> LeaseAttrs:
    """Read a lease value. Keys are case-insensitive (Go); raises LeaseDecodeError with
    the reason for anything that is not a usable flannel lease."""
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise LeaseDecodeError("lease value is not UTF-8 text") from None
    else:
        text = raw
    try:
        doc = json.loads(text, object_pairs_hook=go_object_pairs, parse_constant=_reject_constant)
    except ValueError as exc:
        msg = getattr(exc, "msg", str(exc))
        raise LeaseDecodeError(f"lease value is not JSON: {msg}") from None
    if not isinstance(doc, dict):
        raise LeaseDecodeError(f"lease value is not a JSON object: {_short(text)}")
    keys = {k.casefold(): v for k, v in doc.items()}

    if "publicip" not in keys or keys["publicip"] is None:
        raise LeaseDecodeError("lease value has no PublicIP")
    pub = keys["publicip"]
    if not isinstance(pub, str):
        raise LeaseDecodeError(f"lease PublicIP is not a string: {_short(json.dumps(pub))}")
    try:
        public_ip = IPv4Address(pub)
    except (AddressValueError, ValueError):
        raise LeaseDecodeError(f"lease PublicIP {pub!r} is not an IPv4 address") from None

    public_ipv6: IPv6Address | None = None
    pub6 = keys.get("publicipv6")
    if pub6 is not None:
        if not isinstance(pub6, str):
            raise LeaseDecodeError(f"lease PublicIPv6 is not a string: {_short(json.dumps(pub6))}")
        try:
            public_ipv6 = IPv6Address(pub6)
        except (AddressValueError, ValueError):
            raise LeaseDecodeError(f"lease PublicIPv6 {pub6!r} is not an IPv6 address") from None

    btype = keys.get("backendtype")
    if btype is not None and not isinstance(btype, str):
        raise LeaseDecodeError(f"lease BackendType is not a string: {_short(json.dumps(btype))}")

    data = _backend_object(keys, "backenddata", "BackendData")
    data6 = _backend_object(keys, "backendv6data", "BackendV6Data")
    for name, obj in (("BackendData", data), ("BackendV6Data", data6)):
        if obj is not None:
            _check_backend_data(name, obj)

    return LeaseAttrs(
        public_ip=public_ip,
        public_ipv6=public_ipv6,
        backend_type=btype or None,
        backend_data=data,
        backend_v6_data=data6,
    )


def _backend_object(keys: dict[str, Any], folded: str, name: str) -> dict[str, Any] | None:
    value = keys.get(folded)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LeaseDecodeError(f"lease {name} is not a JSON object: {_short(json.dumps(value))}")
    return value


def _check_backend_data(name: str, obj: dict[str, Any]) -> None:
    fields = {k.casefold(): v for k, v in obj.items()}
    if "vtepmac" in fields:
        mac = fields["vtepmac"]
        if not isinstance(mac, str) or parse_mac(mac) is None:
            raise LeaseDecodeError(f"lease {name}.VtepMAC is malformed: {_short(json.dumps(mac))}")
    vni = fields.get("vni")
    if vni is not None and (isinstance(vni, bool) or not isinstance(vni, int) or vni < 0):
        raise LeaseDecodeError(
            f"lease {name}.VNI is not a non-negative integer: {_short(json.dumps(vni))}"
        )


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# VTEP MAC


def parse_mac(text: str) -> bytes | None:
    """A 6-byte MAC in one of the forms Go's ``net.ParseMAC`` accepts for EUI-48
    (``aa:bb:cc:dd:ee:ff``, ``aa-bb-cc-dd-ee-ff``, ``aabb.ccdd.eeff``), or None."""
    if _MAC_COLON.fullmatch(text) or _MAC_DASH.fullmatch(text):
        return bytes.fromhex(text.replace(":", "").replace("-", ""))
    if _MAC_DOT.fullmatch(text):
        return bytes.fromhex(text.replace(".", ""))
    return None


def format_mac(mac: bytes) -> str:
    """``aa:bb:cc:dd:ee:ff`` (Go's ``HardwareAddr.String()``: lower case, colons)."""
    if len(mac) != 6:
        raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
    return ":".join(f"{b:02x}" for b in mac)


def vtep_mac(attrs: LeaseAttrs) -> bytes | None:
    """The VtepMAC from ``BackendData`` (key case-insensitive), or None if absent.
    Raises LeaseDecodeError if it is there but malformed."""
    if attrs.backend_data is None:
        return None
    for key, value in attrs.backend_data.items():
        if key.casefold() == "vtepmac":
            mac = parse_mac(value) if isinstance(value, str) else None
            if mac is None:
                raise LeaseDecodeError(
                    f"lease BackendData.VtepMAC is malformed: {_short(json.dumps(value))}"
                )
            return mac
    return None


def vxlan_backend_data(vni: int, mac: bytes) -> dict[str, Any]:
    """The vxlan backend's ``BackendData``: ``{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}``."""
    return {"VNI": vni, "VtepMAC": format_mac(mac)}
