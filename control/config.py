"""flannel's network config: the JSON stored at ``<prefix>/config``.

Pure: no I/O. Mirrors flannel's ``ParseConfig`` + ``CheckNetworkConfig``
(pkg/subnet/config.go) and the backends' own sub-config parsing:

* keys are matched case-insensitively, as Go's ``encoding/json`` does, at the
  top level and inside ``Backend``; when a key appears twice the last one wins;
* a JSON ``null`` for a scalar field leaves the default in place (Go semantics);
* ``SubnetLen``/``SubnetMin``/``SubnetMax`` and their IPv6 twins get flannel's
  defaults and validation;
* an absent ``Backend`` means ``udp`` (what flannel's code does, whatever its
  docs say).

Every error is a :class:`ConfigError` whose text is one line naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    NetmaskValueError,
)
from typing import Any

__all__ = [
    "BACKEND_OVERHEAD",
    "FLANNEL_ONLY_BACKENDS",
    "SUPPORTED_BACKENDS",
    "UDP_DEFAULT_PORT",
    "VXLAN_DEFAULT_VNI",
    "VXLAN_KERNEL_DEFAULT_PORT",
    "BackendConfig",
    "ConfigError",
    "NetworkConfig",
    "go_object_pairs",
    "mtu_for",
    "parse_network_config",
]

SUPPORTED_BACKENDS: tuple[str, ...] = ("vxlan", "udp", "host-gw")
"""Backend types weft implements."""

FLANNEL_ONLY_BACKENDS: tuple[str, ...] = (
    "ipip",
    "wireguard",
    "ipsec",
    "alloc",
    "tencent-vpc",
    "extension",
    "gce",
    "aws-vpc",
    "ali-vpc",
)
"""Backend types flannel knows (now or in the past) that weft does not implement."""

VXLAN_DEFAULT_VNI = 1
VXLAN_KERNEL_DEFAULT_PORT = 8472
"""``Port: 0`` for vxlan means the Linux vxlan module's default, 8472."""
UDP_DEFAULT_PORT = 8285

BACKEND_OVERHEAD: Mapping[str, int] = {"vxlan": 50, "udp": 28, "host-gw": 0}
"""Bytes subtracted from the underlay MTU to get FLANNEL_MTU (facts §2.2)."""

_MIN_IPV4_MTU = 68
_MAX_MTU = 65535
_MAX_VNI = (1 << 24) - 1


class ConfigError(ValueError):
    """The network config (or an agent setting) is invalid. One line, names the field."""


def _err(field_name: str, text: str) -> ConfigError:
    return ConfigError(f"network config: {field_name}: {text}")


# --------------------------------------------------------------------------------------
# Backend


@dataclass(frozen=True)
class BackendConfig:
    """The ``Backend`` object. ``raw`` keeps the object as given (original key case)."""

    type: str
    vni: int = VXLAN_DEFAULT_VNI
    port: int = 0
    mtu: int | None = None
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def effective_port(self) -> int | None:
        """The UDP port on the wire: vxlan 0 → 8472, udp 0 → 8285; None for host-gw."""
        if self.type == "vxlan":
            return self.port or VXLAN_KERNEL_DEFAULT_PORT
        if self.type == "udp":
            return self.port or UDP_DEFAULT_PORT
        return None

    def device_mtu(self, underlay_mtu: int) -> int:
        """FLANNEL_MTU for this backend: vxlan honours ``Backend.MTU`` over the underlay's."""
        base = self.mtu if (self.type == "vxlan" and self.mtu is not None) else underlay_mtu
        return mtu_for(self.type, base)

    def to_dict(self) -> dict[str, Any]:
        """flannel-style ``Backend`` object: ``Type`` first, non-default known keys, then
        any backend-specific keys from ``raw`` weft does not interpret."""
        out: dict[str, Any] = {"Type": self.type}
        known: set[str] = {"type"}
        if self.type == "vxlan":
            known |= {"vni", "port", "mtu", "gbp", "learning", "directrouting"}
            if self.vni != VXLAN_DEFAULT_VNI:
                out["VNI"] = self.vni
            if self.port != 0:
                out["Port"] = self.port
            if self.mtu is not None:
                out["MTU"] = self.mtu
            if self.gbp:
                out["GBP"] = True
            if self.learning:
                out["Learning"] = True
            if self.direct_routing:
                out["DirectRouting"] = True
        elif self.type == "udp":
            known.add("port")
            if self.port not in (0, UDP_DEFAULT_PORT):
                out["Port"] = self.port
        for key, value in self.raw.items():
            folded = _fold(key)
            if folded not in known:
                known.add(folded)
                out[key] = value
        return out


def mtu_for(backend_type: str, underlay_mtu: int) -> int:
    """FLANNEL_MTU / device MTU for ``backend_type`` on an underlay of ``underlay_mtu``.

    vxlan −50, udp −28, host-gw 0 (facts §2.2). Raises ConfigError for an unknown
    backend or a result below the IPv4 minimum MTU (68).
    """
    try:
        overhead = BACKEND_OVERHEAD[backend_type]
    except KeyError:
        raise _err("Backend.Type", _unsupported_backend_text(backend_type)) from None
    mtu = underlay_mtu - overhead
    if mtu < _MIN_IPV4_MTU:
        raise ConfigError(
            f"MTU: underlay MTU {underlay_mtu} leaves {mtu} for {backend_type} "
            f"(overhead {overhead}); the minimum is {_MIN_IPV4_MTU}"
        )
    return mtu


def _unsupported_backend_text(backend_type: str) -> str:
    supported = ", ".join(SUPPORTED_BACKENDS)
    if backend_type in FLANNEL_ONLY_BACKENDS:
        return (
            f"flannel backend {backend_type!r} is not implemented by weft (supported: {supported})"
        )
    hint = ""
    if backend_type.lower() in SUPPORTED_BACKENDS:
        hint = "; backend types are lower case"
    return f"unknown backend type {backend_type!r} (supported: {supported}){hint}"


# --------------------------------------------------------------------------------------
# Network config


@dataclass(frozen=True)
class NetworkConfig:
    """A validated flannel network config with every default filled in."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend: BackendConfig
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int | None = None
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    enable_nftables: bool = False

    @property
    def backend_type(self) -> str:
        return self.backend.type

    @property
    def subnet_size(self) -> int:
        """Number of addresses in one lease subnet."""
        return 1 << (32 - self.subnet_len)

    def mtu(self, underlay_mtu: int) -> int:
        """FLANNEL_MTU for this config's backend (honours vxlan ``Backend.MTU``)."""
        return self.backend.device_mtu(underlay_mtu)

    def to_json(self) -> str:
        """flannel-style JSON (for ``weft config set``).

        Fields equal to the default flannel would compute are left out, so
        ``parse_network_config(cfg.to_json()) == cfg`` and the text stays what a
        human would write: ``{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}``.
        """
        out: dict[str, Any] = {"Network": str(self.network)}
        d_len, _, _ = _ipv4_defaults(self.network, None)
        if self.subnet_len != d_len:
            out["SubnetLen"] = self.subnet_len
        d_min, d_max = _ipv4_range_defaults(self.network, self.subnet_len)
        if self.subnet_min != d_min:
            out["SubnetMin"] = str(self.subnet_min)
        if self.subnet_max != d_max:
            out["SubnetMax"] = str(self.subnet_max)
        if self.enable_ipv6:
            assert self.ipv6_network is not None and self.ipv6_subnet_len is not None
            out["EnableIPv6"] = True
            out["IPv6Network"] = str(self.ipv6_network)
            if self.ipv6_subnet_len != _ipv6_default_len(self.ipv6_network):
                out["IPv6SubnetLen"] = self.ipv6_subnet_len
            d6_min, d6_max = _ipv6_range_defaults(self.ipv6_network, self.ipv6_subnet_len)
            if self.ipv6_subnet_min != d6_min:
                out["IPv6SubnetMin"] = str(self.ipv6_subnet_min)
            if self.ipv6_subnet_max != d6_max:
                out["IPv6SubnetMax"] = str(self.ipv6_subnet_max)
        if self.enable_nftables:
            out["EnableNFTables"] = True
        out["Backend"] = self.backend.to_dict()
        return json.dumps(out, separators=(",", ":"))


def parse_network_config(raw: bytes | str) -> NetworkConfig:
    """Parse and validate ``<prefix>/config``. Raises ConfigError."""
    doc = _loads(raw)
    if not isinstance(doc, dict):
        raise ConfigError(f"network config: must be a JSON object, got {_json_type(doc)}")
    top = _fold_keys(doc)

    enable_ipv4 = _get_bool(top, "EnableIPv4", True)
    enable_ipv6 = _get_bool(top, "EnableIPv6", False)
    enable_nftables = _get_bool(top, "EnableNFTables", False)
    if not enable_ipv4:
        raise _err("EnableIPv4", "false (IPv6-only networks) is not supported by weft")

    network = _get_ipv4_network(top, "Network")
    if network is None:
        raise _err("Network", 'missing; set an IPv4 CIDR such as "10.244.0.0/16"')
    subnet_len_in = _get_uint(top, "SubnetLen")
    subnet_min_in = _get_ipv4_address(top, "SubnetMin")
    subnet_max_in = _get_ipv4_address(top, "SubnetMax")
    subnet_len, subnet_min, subnet_max = _check_ipv4(
        network, subnet_len_in, subnet_min_in, subnet_max_in
    )

    ipv6_network = _get_ipv6_network(top, "IPv6Network")
    ipv6_len_in = _get_uint(top, "IPv6SubnetLen")
    ipv6_min_in = _get_ipv6_address(top, "IPv6SubnetMin")
    ipv6_max_in = _get_ipv6_address(top, "IPv6SubnetMax")
    ipv6_len: int | None = None
    ipv6_min: IPv6Address | None = None
    ipv6_max: IPv6Address | None = None
    if enable_ipv6:
        if ipv6_network is None:
            raise _err("IPv6Network", "missing; required when EnableIPv6 is true")
        ipv6_len, ipv6_min, ipv6_max = _check_ipv6(
            ipv6_network, ipv6_len_in, ipv6_min_in, ipv6_max_in
        )
    else:
        ipv6_network = None

    backend = _parse_backend(top)

    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend=backend,
        enable_ipv4=enable_ipv4,
        enable_ipv6=enable_ipv6,
        ipv6_network=ipv6_network,
        ipv6_subnet_len=ipv6_len,
        ipv6_subnet_min=ipv6_min,
        ipv6_subnet_max=ipv6_max,
        enable_nftables=enable_nftables,
    )


# --------------------------------------------------------------------------------------
# IPv4 / IPv6 defaults and checks (CheckNetworkConfig)


def _ipv4_defaults(
    network: IPv4Network, subnet_len: int | None
) -> tuple[int, IPv4Address, IPv4Address]:
    if not subnet_len:
        if network.prefixlen > 28:
            raise _err(
                "Network",
                f"{network} is too small; the minimum useful network prefix is /28",
            )
        subnet_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
    smin, smax = _ipv4_range_defaults(network, subnet_len)
    return subnet_len, smin, smax


def _ipv4_range_defaults(network: IPv4Network, subnet_len: int) -> tuple[IPv4Address, IPv4Address]:
    size = 1 << (32 - subnet_len)
    base = int(network.network_address)
    nxt = base + network.num_addresses
    return IPv4Address(base + size), IPv4Address(nxt - size)


def _check_ipv4(
    network: IPv4Network,
    subnet_len: int | None,
    smin: IPv4Address | None,
    smax: IPv4Address | None,
) -> tuple[int, IPv4Address, IPv4Address]:
    if subnet_len:
        if subnet_len > 30:
            raise _err("SubnetLen", f"/{subnet_len} is too long; it must be at most 30")
        if subnet_len < network.prefixlen + 2:
            raise _err(
                "SubnetLen",
                f"/{subnet_len} must be at least /{network.prefixlen + 2} so that Network "
                f"{network} holds at least four subnets",
            )
    subnet_len, d_min, d_max = _ipv4_defaults(network, subnet_len)
    # flannel treats 0.0.0.0 as "not set"
    if smin is None or int(smin) == 0:
        smin = d_min
    elif smin not in network:
        raise _err("SubnetMin", f"{smin} is not inside Network {network}")
    if smax is None or int(smax) == 0:
        smax = d_max
    elif smax not in network:
        raise _err("SubnetMax", f"{smax} is not inside Network {network}")
    mask = (0xFFFFFFFF << (32 - subnet_len)) & 0xFFFFFFFF
    if int(smin) & mask != int(smin):
        raise _err("SubnetMin", f"{smin} is not on a /{subnet_len} (SubnetLen) boundary")
    if int(smax) & mask != int(smax):
        raise _err("SubnetMax", f"{smax} is not on a /{subnet_len} (SubnetLen) boundary")
    if smin > smax:
        raise _err("SubnetMin", f"{smin} is above SubnetMax {smax}")
    return subnet_len, smin, smax


def _ipv6_default_len(network: IPv6Network) -> int:
    if network.prefixlen > 124:
        raise _err(
            "IPv6Network",
            f"{network} is too small; the minimum useful network prefix is /124",
        )
    return 64 if network.prefixlen <= 62 else network.prefixlen + 2


def _ipv6_range_defaults(network: IPv6Network, subnet_len: int) -> tuple[IPv6Address, IPv6Address]:
    size = 1 << (128 - subnet_len)
    base = int(network.network_address)
    nxt = base + network.num_addresses
    return IPv6Address(base + size), IPv6Address(nxt - size)


def _check_ipv6(
    network: IPv6Network,
    subnet_len: int | None,
    smin: IPv6Address | None,
    smax: IPv6Address | None,
) -> tuple[int, IPv6Address, IPv6Address]:
    if subnet_len:
        if subnet_len > 126:
            raise _err("IPv6SubnetLen", f"/{subnet_len} is too long; it must be at most 126")
        if subnet_len < network.prefixlen + 2:
            raise _err(
                "IPv6SubnetLen",
                f"/{subnet_len} must be at least /{network.prefixlen + 2} so that "
                f"IPv6Network {network} holds at least four subnets",
            )
    else:
        subnet_len = _ipv6_default_len(network)
    d_min, d_max = _ipv6_range_defaults(network, subnet_len)
    if smin is None or int(smin) == 0:
        smin = d_min
    elif smin not in network:
        raise _err("IPv6SubnetMin", f"{smin} is not inside IPv6Network {network}")
    if smax is None or int(smax) == 0:
        smax = d_max
    elif smax not in network:
        raise _err("IPv6SubnetMax", f"{smax} is not inside IPv6Network {network}")
    host_bits = (1 << (128 - subnet_len)) - 1
    if int(smin) & host_bits:
        raise _err("IPv6SubnetMin", f"{smin} is not on a /{subnet_len} (IPv6SubnetLen) boundary")
    if int(smax) & host_bits:
        raise _err("IPv6SubnetMax", f"{smax} is not on a /{subnet_len} (IPv6SubnetLen) boundary")
    if smin > smax:
        raise _err("IPv6SubnetMin", f"{smin} is above IPv6SubnetMax {smax}")
    return subnet_len, smin, smax


# --------------------------------------------------------------------------------------
# Backend parsing


def _parse_backend(top: dict[str, tuple[str, Any]]) -> BackendConfig:
    if "backend" not in top:
        return BackendConfig(type="udp", port=UDP_DEFAULT_PORT)
    _, obj = top["backend"]
    if obj is None:
        raise _err("Backend", 'is null; give an object such as {"Type": "vxlan"}')
    if not isinstance(obj, dict):
        raise _err("Backend", f"must be a JSON object, got {_json_type(obj)}")
    keys = _fold_keys(obj)
    btype = _get_str(keys, "Type", "Backend.")
    supported = ", ".join(SUPPORTED_BACKENDS)
    if not btype:
        raise _err("Backend.Type", f"missing (supported: {supported})")
    if btype not in SUPPORTED_BACKENDS:
        raise _err("Backend.Type", _unsupported_backend_text(btype))

    raw = dict(obj)
    if btype == "udp":
        port = _get_int(keys, "Port", "Backend.", UDP_DEFAULT_PORT)
        _check_port(port)
        return BackendConfig(type="udp", port=port, raw=raw)
    if btype == "host-gw":
        return BackendConfig(type="host-gw", port=0, raw=raw)

    vni = _get_int(keys, "VNI", "Backend.", VXLAN_DEFAULT_VNI)
    if not 0 <= vni <= _MAX_VNI:
        raise _err("Backend.VNI", f"{vni} is out of range 0..{_MAX_VNI}")
    port = _get_int(keys, "Port", "Backend.", 0)
    _check_port(port)
    mtu: int | None = _get_int(keys, "MTU", "Backend.", 0)
    if mtu == 0:
        mtu = None  # 0 = "use the external interface's MTU"
    elif mtu is not None and not _MIN_IPV4_MTU + BACKEND_OVERHEAD["vxlan"] <= mtu <= _MAX_MTU:
        raise _err(
            "Backend.MTU",
            f"{mtu} is out of range {_MIN_IPV4_MTU + BACKEND_OVERHEAD['vxlan']}..{_MAX_MTU}",
        )
    gbp = _get_bool(keys, "GBP", False, "Backend.")
    learning = _get_bool(keys, "Learning", False, "Backend.")
    direct_routing = _get_bool(keys, "DirectRouting", False, "Backend.")
    # Windows-only keys: type-checked so a typo'd value is reported, otherwise ignored
    _get_str(keys, "MacPrefix", "Backend.")
    _get_str(keys, "Name", "Backend.")
    return BackendConfig(
        type="vxlan",
        vni=vni,
        port=port,
        mtu=mtu,
        gbp=gbp,
        learning=learning,
        direct_routing=direct_routing,
        raw=raw,
    )


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise _err("Backend.Port", f"{port} is out of range 0..65535")


# --------------------------------------------------------------------------------------
# Go-style JSON access helpers


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON literal {name}")


def _loads(raw: bytes | str) -> Any:
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"network config: not valid UTF-8 ({exc.reason})") from None
    else:
        text = raw
    if not text.strip():
        raise ConfigError("network config: empty; expected a JSON object")
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=go_object_pairs)
    except ValueError as exc:
        msg = getattr(exc, "msg", str(exc))
        where = ""
        if isinstance(exc, json.JSONDecodeError):
            where = f" at line {exc.lineno} column {exc.colno}"
        raise ConfigError(f"network config: invalid JSON{where}: {msg}") from None


def go_object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook giving Go's view of an object: when keys repeat, even in a
    different letter case, the last one wins (and keeps its own spelling)."""
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in pairs:
        folded = _fold(key)
        previous = seen.get(folded)
        if previous is not None:
            del out[previous]
        seen[folded] = key
        out[key] = value
    return out


def _fold(key: str) -> str:
    return key.casefold()


def _fold_keys(obj: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Folded key → (original key, value); the last of case-variant duplicates wins."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in obj.items():
        out[_fold(key)] = (key, value)
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, int | float):
        return f"number {json.dumps(value)}"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _lookup(keys: dict[str, tuple[str, Any]], name: str) -> Any:
    hit = keys.get(_fold(name))
    return None if hit is None else hit[1]


def _get_bool(keys: dict[str, tuple[str, Any]], name: str, default: bool, where: str = "") -> bool:
    value = _lookup(keys, name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _err(where + name, f"must be true or false, got {_json_type(value)}")
    return value


def _get_uint(keys: dict[str, tuple[str, Any]], name: str, where: str = "") -> int | None:
    value = _lookup(keys, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(where + name, f"must be a non-negative integer, got {_json_type(value)}")
    if value < 0:
        raise _err(where + name, f"must be a non-negative integer, got {value}")
    return value


def _get_int(keys: dict[str, tuple[str, Any]], name: str, where: str, default: int) -> int:
    value = _lookup(keys, name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(where + name, f"must be an integer, got {_json_type(value)}")
    return value


def _get_str(keys: dict[str, tuple[str, Any]], name: str, where: str = "") -> str | None:
    value = _lookup(keys, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _err(where + name, f"must be a string, got {_json_type(value)}")
    return value


def _get_ipv4_network(keys: dict[str, tuple[str, Any]], name: str) -> IPv4Network | None:
    text = _get_str(keys, name)
    if text is None:
        return None
    if "/" not in text:
        raise _err(name, f"{text!r} is not a CIDR (expected a.b.c.d/len)")
    try:
        # flannel (net.ParseCIDR) masks host bits: "10.244.1.5/16" is 10.244.0.0/16
        return IPv4Network(text, strict=False)
    except (AddressValueError, NetmaskValueError, ValueError):
        raise _err(name, f"{text!r} is not an IPv4 CIDR") from None


def _get_ipv6_network(keys: dict[str, tuple[str, Any]], name: str) -> IPv6Network | None:
    text = _get_str(keys, name)
    if text is None:
        return None
    if "/" not in text:
        raise _err(name, f"{text!r} is not a CIDR (expected addr/len)")
    try:
        return IPv6Network(text, strict=False)
    except (AddressValueError, NetmaskValueError, ValueError):
        raise _err(name, f"{text!r} is not an IPv6 CIDR") from None


def _get_ipv4_address(keys: dict[str, tuple[str, Any]], name: str) -> IPv4Address | None:
    text = _get_str(keys, name)
    if text is None:
        return None
    try:
        return IPv4Address(text)
    except (AddressValueError, ValueError):
        raise _err(name, f"{text!r} is not an IPv4 address") from None


def _get_ipv6_address(keys: dict[str, tuple[str, Any]], name: str) -> IPv6Address | None:
    text = _get_str(keys, name)
    if text is None:
        return None
    try:
        return IPv6Address(text)
    except (AddressValueError, ValueError):
        raise _err(name, f"{text!r} is not an IPv6 address") from None
