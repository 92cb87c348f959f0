"""subnet.env, the file the flannel CNI plugin reads (facts §2.1).

Pure: render the text and parse it; writing it atomically (temp file + rename,
mode 0644) is the edge's job.

Order and values are flannel's ``WriteSubnetFile``::

    FLANNEL_NETWORK=10.244.0.0/16
    FLANNEL_SUBNET=10.244.1.1/24
    FLANNEL_IPV6_NETWORK=fc00::/48
    FLANNEL_IPV6_SUBNET=fc00:0:0:1::1/64
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=false
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network

__all__ = ["parse_subnet_env", "render_subnet_env"]


def render_subnet_env(
    network: IPv4Network | None,
    subnet: IPv4Network | None,
    mtu: int,
    ipmasq: bool,
    ipv6_network: IPv6Network | None = None,
    ipv6_subnet: IPv6Network | None = None,
) -> str:
    """subnet.env text. FLANNEL_SUBNET is the lease's first address + 1 with the
    lease's prefix length; the IPv4 pair is written when ``network`` is given (flannel:
    EnableIPv4), the IPv6 pair when ``ipv6_network`` is."""
    lines: list[str] = []
    if network is not None:
        if subnet is None:
            raise ValueError("render_subnet_env: subnet is required with network")
        lines.append(f"FLANNEL_NETWORK={network}")
        lines.append(f"FLANNEL_SUBNET={subnet.network_address + 1}/{subnet.prefixlen}")
    if ipv6_network is not None:
        if ipv6_subnet is None:
            raise ValueError("render_subnet_env: ipv6_subnet is required with ipv6_network")
        lines.append(f"FLANNEL_IPV6_NETWORK={ipv6_network}")
        lines.append(
            f"FLANNEL_IPV6_SUBNET={ipv6_subnet.network_address + 1}/{ipv6_subnet.prefixlen}"
        )
    lines.append(f"FLANNEL_MTU={int(mtu)}")
    lines.append(f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}")
    return "\n".join(lines) + "\n"


_LINE = re.compile(
    r"""^\s*(?:export\s+)?          # optional "export "
        ([A-Za-z_][A-Za-z0-9_.]*)   # key
        \s*[=:]\s*                  # = (or YAML-ish ":")
        (.*?)\s*$""",
    re.VERBOSE,
)
_DOUBLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$"}


def parse_subnet_env(text: str) -> dict[str, str]:
    """Read a subnet.env the way godotenv (what flanneld uses) mostly does.

    ``KEY=VALUE`` (or ``export KEY=VALUE`` / ``KEY: VALUE``) lines; blank lines and
    ``#`` comment lines are skipped; single-quoted values are literal; double-quoted
    values understand ``\\n \\r \\t \\" \\\\``; an unquoted value ends at `` #``.
    Lines that are none of these are skipped. Variable expansion is not done.
    A key given twice keeps the last value.
    """
    out: dict[str, str] = {}
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        key, value = m.group(1), m.group(2)
        out[key] = _value(value)
    return out


def _value(value: str) -> str:
    if len(value) >= 2 and value[0] == "'" and "'" in value[1:]:
        return value[1 : value.index("'", 1)]
    if len(value) >= 2 and value[0] == '"':
        buf: list[str] = []
        i = 1
        while i < len(value):
            ch = value[i]
            if ch == "\\" and i + 1 < len(value):
                nxt = value[i + 1]
                buf.append(_DOUBLE_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
                continue
            if ch == '"':
                return "".join(buf)
            buf.append(ch)
            i += 1
        # no closing quote: take the text literally, as written
        return value
    # unquoted: an inline comment starts at whitespace + '#'
    m = re.search(r"\s#", value)
    if m is not None:
        value = value[: m.start()]
    return value.strip()
