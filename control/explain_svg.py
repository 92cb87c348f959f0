"""`weft trace explain --svg FILE`: the journey of one packet, drawn.

`render_svg(result)` takes what `control.explain.explain()` returns and
draws, as a standalone SVG picture (plain string building, standard library
only):

1. the journey, left to right: pod → cni0 → this node's device (weft.1 /
   weft0 / flannel.1) → eth0 ─ underlay ─ eth0 → the peer's device → its
   cni0 → pod;
2. the three lookups that decide the headers (route → neighbour → FDB), as
   `ip route`, `ip neigh` and `bridge fdb` would print them;
3. the packet as it is on the wire between the nodes: every header in wire
   order with its size and its real values (public IPs, UDP port, VNI,
   VtepMACs, pod IPs), and a brace over the bytes of overhead;
4. a legend that explains each header and the MTU arithmetic.

host-gw, udp, local, outside and no-route get their own, shorter drawings.
Every piece of text is escaped; the output parses with xml.etree.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

SANS = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"

# One colour per header, the same in the packet row and the legend.
COLORS = {
    "pod": ("#e8f5e9", "#2e7d32"),
    "bridge": ("#e3f2fd", "#1565c0"),
    "device": ("#fff3e0", "#e65100"),
    "nic": ("#eceff1", "#455a64"),
    "router": ("#f3e5f5", "#6a1b9a"),
    "stop": ("#ffebee", "#c62828"),
    "outer-eth": ("#cfd8dc", "#455a64"),
    "outer-ip": ("#bbdefb", "#1565c0"),
    "udp": ("#c8e6c9", "#2e7d32"),
    "vxlan": ("#ffe0b2", "#e65100"),
    "inner-eth": ("#e1bee7", "#6a1b9a"),
    "inner-ip": ("#f8bbd0", "#ad1457"),
    "payload": ("#ffffff", "#757575"),
}

MARGIN = 24
ARROW_GAP = 34
UNDERLAY_GAP = 150


def _text_width(text: str, size: float, mono: bool = False, bold: bool = False) -> float:
    """A generous estimate of rendered width (DejaVu is wide), for layout only."""
    per_char = 0.61 if mono else (0.66 if bold else 0.60)
    return len(text) * size * per_char


def _fmt(value: Any) -> str:
    return "?" if value is None or value == "" else str(value)


class _Canvas:
    """Collects SVG elements; every string that reaches the output is escaped here."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def rect(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        fill: str,
        stroke: str,
        *,
        rx: float = 6,
        dash: str | None = None,
        width: float = 1.5,
    ) -> None:
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{rx}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{width}"{extra}/>'
        )

    def text(
        self,
        x: float,
        y: float,
        text: str,
        *,
        size: float = 12,
        anchor: str = "start",
        bold: bool = False,
        mono: bool = False,
        italic: bool = False,
        fill: str = "#212121",
    ) -> None:
        attrs = [
            f'x="{x:.1f}"',
            f'y="{y:.1f}"',
            f"font-family={quoteattr(MONO if mono else SANS)}",
            f'font-size="{size}"',
            f'fill="{fill}"',
        ]
        if anchor != "start":
            attrs.append(f'text-anchor="{anchor}"')
        if bold:
            attrs.append('font-weight="bold"')
        if italic:
            attrs.append('font-style="italic"')
        self.parts.append(f"<text {' '.join(attrs)}>{escape(text)}</text>")

    def line(
        self,
        x1: float,
        y1: float,
        x2: float,
        y2: float,
        *,
        stroke: str = "#424242",
        width: float = 1.5,
        arrow: bool = False,
        dash: str | None = None,
    ) -> None:
        extra = ' marker-end="url(#arrow)"' if arrow else ""
        if dash:
            extra += f' stroke-dasharray="{dash}"'
        self.parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{stroke}" stroke-width="{width}"{extra}/>'
        )

    def group(self, cls: str, **data: str) -> None:
        """Open a <g class=…> with data-* attributes (machine-readable: tests, scripts)."""
        attrs = "".join(f" data-{k}={quoteattr(v)}" for k, v in data.items())
        self.parts.append(f"<g class={quoteattr(cls)}{attrs}>")

    def end(self) -> None:
        self.parts.append("</g>")

    def path(self, d: str, *, stroke: str = "#424242", width: float = 1.5) -> None:
        self.parts.append(f'<path d="{d}" fill="none" stroke="{stroke}" stroke-width="{width}"/>')

    def brace(self, x1: float, x2: float, y: float, *, up: bool, color: str) -> None:
        """A square bracket from x1 to x2 at y, its tick pointing up (above) or down."""
        t = -8 if up else 8
        mid = (x1 + x2) / 2
        self.path(
            f"M{x1:.1f},{y - t:.1f} L{x1:.1f},{y:.1f} L{x2:.1f},{y:.1f} L{x2:.1f},{y - t:.1f} "
            f"M{mid:.1f},{y:.1f} L{mid:.1f},{y + t:.1f}",
            stroke=color,
            width=2,
        )

    def svg(self, width: float, height: float, title: str) -> str:
        w, h = int(width + 0.5), int(height + 0.5)
        head = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}">\n'
            f"<title>{escape(title)}</title>\n"
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" '
            'markerUnits="userSpaceOnUse" markerWidth="11" markerHeight="11" '
            'orient="auto-start-reverse">'
            '<path d="M0,0 L10,5 L0,10 z" fill="#424242"/></marker></defs>\n'
            f'<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>\n'
        )
        return head + "\n".join(self.parts) + "\n</svg>\n"


# -- the scene: what to draw, independent of where --------------------------------


@dataclass
class Station:
    """One box of the journey row."""

    title: str
    lines: list[str]
    style: str
    side: str  # "src", "dst" (which node frame it sits in) or "" (none)
    note: str = ""  # a last line in italics: what happens here


@dataclass
class Segment:
    """One header of the packet on the wire."""

    name: str
    size: str  # "14 B", "≤ 1430 B"
    fields: list[str]
    style: str
    overhead: bool = False  # under the overhead brace
    outer_frame: bool = False  # the underlay's own Ethernet header


@dataclass
class Scene:
    title: str
    subtitle: str
    stations: list[Station]
    underlay_after: int | None = None  # index of the station before the underlay link
    underlay_label: tuple[str, str] = ("", "")
    lookups: list[tuple[str, str, str]] = field(default_factory=list)  # (title, line, why)
    segments: list[Segment] = field(default_factory=list)
    wire_title: str = ""
    overhead: int | None = None
    legend: list[tuple[str, str, str]] = field(default_factory=list)  # (style, name, text)
    notes: list[str] = field(default_factory=list)  # a boxed explanation (short kinds)
    note_style: str = "bridge"
    mtu_lines: list[str] = field(default_factory=list)
    frame_labels: dict[str, str] = field(default_factory=dict)  # side → "this node 1.2.3.4"


def _outer(result: dict[str, Any], layer: str) -> dict[str, Any]:
    for item in result.get("outer") or []:
        if item.get("layer") == layer:
            return item
    return {}


def _device_kind_label(node: dict[str, Any]) -> str:
    kind = node.get("device_kind")
    return {
        "tun": "TUN · weft in userspace",
        "tap": "TAP · weft in userspace",
        "kernel": "the kernel's VXLAN",
    }.get(str(kind), "weft's device" if kind is None else str(kind))


def _underlay_mtu(result: dict[str, Any], overhead: int) -> tuple[int, int]:
    """(underlay MTU, pod packet MTU): from the device MTU when the node reported it."""
    device_mtu = (result.get("node") or {}).get("device_mtu")
    if isinstance(device_mtu, int) and device_mtu > 0:
        return device_mtu + overhead, device_mtu
    return 1500, 1500 - overhead


def _common_start(result: dict[str, Any]) -> tuple[dict[str, Any], list[Station]]:
    node = result.get("node") or {}
    return node, [
        Station("pod", [_fmt(result.get("src"))], "pod", "src"),
        Station("cni0", ["bridge · gateway", _fmt(node.get("subnet"))], "bridge", "src"),
    ]


def _vxlan_scene(result: dict[str, Any]) -> Scene:
    node, stations = _common_start(result)
    peer = result.get("peer") or {}
    neigh = result.get("neigh") or {}
    fdb = result.get("fdb") or {}
    route = result.get("route") or {}
    ip = _outer(result, "IPv4")
    udp = _outer(result, "UDP")
    vx = _outer(result, "VXLAN")
    inner_eth = _outer(result, "Ethernet (inner)")
    vni = _fmt(vx.get("vni"))
    dport = _fmt(udp.get("dport"))
    peer_mac = _fmt(neigh.get("mac") or peer.get("vtep_mac"))
    peer_ip = _fmt(fdb.get("dst") or peer.get("public_ip"))
    our_ip = _fmt(ip.get("src") or node.get("public_ip"))
    our_mac = _fmt(inner_eth.get("src") or node.get("vtep_mac"))
    overhead = int(result.get("overhead") or 50)
    underlay_mtu, pod_mtu = _underlay_mtu(result, overhead)
    device = _fmt(node.get("device"))
    sport = udp.get("sport")
    if isinstance(sport, int):
        # --source-ports 0: weft sends every datagram from its socket on the VXLAN port.
        sport_fields = [f"sport {sport}", "(weft's socket)"]
        sport_text = f"weft sends from its socket bound to {sport}, so the source port is {sport}."
    elif sport is not None or node.get("device_kind") == "kernel":
        sport_fields = ["sport: hash", "of inner flow"]
        who = "the kernel" if node.get("device_kind") == "kernel" else "weft"
        sport_text = (
            f"{who} picks the source port from a hash of the inner flow, "
            "so routers can spread flows over paths."
        )
    else:
        # weft sends every datagram from its one socket, bound to the VXLAN port.
        sport_fields = [f"sport {dport}", "(weft's socket)"]
        sport_text = f"weft sends from its socket bound to {dport}, so the source port is {dport}."
    stations += [
        Station(
            device,
            [_device_kind_label(node), f"VTEP {our_mac}"],
            "device",
            "src",
            note=f"encapsulates: +{overhead} B",
        ),
        Station(_fmt(node.get("iface")), [our_ip], "nic", "src"),
        Station("eth0", [peer_ip], "nic", "dst"),
        Station(
            f"VXLAN device (VNI {vni})",
            [f"flannel.{vni} or weft.{vni}", f"VTEP {peer_mac}"],
            "device",
            "dst",
            note=f"decapsulates: −{overhead} B",
        ),
        Station("cni0", ["bridge", _fmt(peer.get("subnet"))], "bridge", "dst"),
        Station("pod", [_fmt(result.get("dst"))], "pod", "dst"),
    ]
    route_line = _fmt(route.get("line"))
    if route_line.endswith("onlink"):
        route_why = "which device, and which next hop (the peer's VTEP address)?"
    else:
        route_why = (
            f"the whole network goes to {device}; weft picks the peer's lease "
            f"{_fmt(route.get('prefix'))} by longest prefix"
        )
    lookups = [
        ("① route", route_line, route_why),
        (
            "② neighbour (ip neigh)",
            _fmt(neigh.get("line")),
            "next hop → the peer's VtepMAC: the inner Ethernet destination",
        ),
        (
            "③ FDB (bridge fdb)",
            _fmt(fdb.get("line")),
            "VtepMAC → the peer's public IP: the outer IPv4 destination",
        ),
    ]
    segments = [
        *_outer_udp_headers(node, our_ip, peer_ip),
        Segment("UDP", "8 B", [f"dport {dport}", *sport_fields], "udp", overhead=True),
        Segment(
            "VXLAN", "8 B", [f"VNI {vni}", f"flags {_fmt(vx.get('flags'))}"], "vxlan", overhead=True
        ),
        Segment(
            "Ethernet",
            "14 B",
            [f"src {our_mac}", f"dst {peer_mac}", "type IPv4"],
            "inner-eth",
            overhead=True,
        ),
        *_pod_packet(result, pod_mtu),
    ]
    legend = [
        (
            "outer-eth",
            "outer Ethernet · 14 B",
            f"the underlay's own frame for one hop ({_fmt(node.get('iface'))} → next MAC). "
            "Not overhead: the MTU counts the IP packet, and every frame on the link "
            "has this header anyway.",
        ),
        (
            "outer-ip",
            "outer IPv4 · 20 B",
            f"node to node: {our_ip} → {peer_ip}, the address found in the FDB ③.",
        ),
        (
            "udp",
            "UDP · 8 B",
            f"to port {dport}, where the peer's VXLAN listens (Linux and flannel use 8472); "
            + sport_text,
        ),
        (
            "vxlan",
            "VXLAN · 8 B",
            f'flags 0x08 ("a VNI follows") and the 24-bit network id VNI {vni}: '
            "the receiver drops other VNIs.",
        ),
        (
            "inner-eth",
            "inner Ethernet · 14 B",
            f"VXLAN carries whole Ethernet frames: {our_mac} → {peer_mac}, "
            "the peer's VtepMAC found by the neighbour lookup ②.",
        ),
        (
            "inner-ip",
            "inner IPv4 + payload",
            f"the pod's packet, untouched: {_fmt(result.get('src'))} → {_fmt(result.get('dst'))}.",
        ),
    ]
    mtu_lines = [
        "MTU arithmetic: 20 (outer IPv4) + 8 (UDP) + 8 (VXLAN) + 14 (inner Ethernet) = "
        f"{overhead} bytes of overhead in every underlay IP packet,",
        f"so on a {underlay_mtu}-byte underlay a pod's IP packet may be at most "
        f"{underlay_mtu} − {overhead} = {pod_mtu} bytes: the MTU of {device} and of cni0 "
        f"(FLANNEL_MTU={pod_mtu}).",
        "The outer Ethernet header is not counted (an MTU measures the IP packet, not the "
        "frame); the inner one is: it travels inside the outer IP packet.",
    ]
    return Scene(
        title=f"weft trace explain {_fmt(result.get('dst'))} — vxlan",
        subtitle=(
            f"pod {_fmt(result.get('src'))} on node {our_ip} → pod {_fmt(result.get('dst'))} "
            f"on node {peer_ip}, VXLAN VNI {vni}, UDP port {dport}"
        ),
        stations=stations,
        underlay_after=3,
        underlay_label=("underlay", f"UDP → {peer_ip}:{dport}"),
        lookups=lookups,
        segments=segments,
        wire_title=f"the packet on the wire between {our_ip} and {peer_ip}, in wire order",
        overhead=overhead,
        legend=legend,
        mtu_lines=mtu_lines,
    )


def _outer_udp_headers(node: dict[str, Any], our_ip: str, peer_ip: str) -> list[Segment]:
    """The underlay frame's Ethernet and IPv4 headers in front of a UDP tunnel."""
    return [
        Segment(
            "Ethernet",
            "14 B",
            [f"{_fmt(node.get('iface'))} MAC →", f"MAC of {peer_ip}", "(ARP, underlay)"],
            "outer-eth",
            outer_frame=True,
        ),
        Segment(
            "IPv4",
            "20 B",
            [f"src {our_ip}", f"dst {peer_ip}", "proto UDP"],
            "outer-ip",
            overhead=True,
        ),
    ]


def _pod_packet(result: dict[str, Any], pod_mtu: int, *notes: str) -> list[Segment]:
    """The pod's own IPv4 header and payload, as the tunnel carries them."""
    return [
        Segment(
            "IPv4",
            "20 B",
            [f"src {_fmt(result.get('src'))}", f"dst {_fmt(result.get('dst'))}", *notes],
            "inner-ip",
        ),
        Segment("payload", f"≤ {pod_mtu - 20} B", ["ICMP, TCP…", "unchanged"], "payload"),
    ]


def _udp_scene(result: dict[str, Any]) -> Scene:
    node, stations = _common_start(result)
    peer = result.get("peer") or {}
    route = result.get("route") or {}
    ip = _outer(result, "IPv4")
    udp = _outer(result, "UDP")
    port = _fmt(udp.get("dport"))
    peer_ip = _fmt(ip.get("dst") or peer.get("public_ip"))
    our_ip = _fmt(ip.get("src") or node.get("public_ip"))
    overhead = int(result.get("overhead") or 28)
    underlay_mtu, pod_mtu = _underlay_mtu(result, overhead)
    device = _fmt(node.get("device"))
    stations += [
        Station(
            device,
            [_device_kind_label(node), f"UDP socket :{port}"],
            "device",
            "src",
            note=f"encapsulates: +{overhead} B",
        ),
        Station(_fmt(node.get("iface")), [our_ip], "nic", "src"),
        Station("eth0", [peer_ip], "nic", "dst"),
        Station(
            "its TUN",
            ["flannel0 or weft0", f"UDP socket :{port}"],
            "device",
            "dst",
            note=f"decapsulates: −{overhead} B",
        ),
        Station("cni0", ["bridge", _fmt(peer.get("subnet"))], "bridge", "dst"),
        Station("pod", [_fmt(result.get("dst"))], "pod", "dst"),
    ]
    lookups = [
        ("① route", _fmt(route.get("line")), f"the whole network goes to {device}"),
        (
            "② weft's lease table",
            f"{_fmt(result.get('dst'))} ∈ {_fmt(route.get('prefix'))} → {peer_ip}",
            "longest prefix over the leases: the peer's public IP, the outer destination",
        ),
    ]
    segments = [
        *_outer_udp_headers(node, our_ip, peer_ip),
        Segment("UDP", "8 B", [f"sport {port}", f"dport {port}"], "udp", overhead=True),
        *_pod_packet(result, pod_mtu, "TTL − 1"),
    ]
    legend = [
        (
            "outer-eth",
            "outer Ethernet · 14 B",
            "the underlay's own frame for one hop; outside the MTU, not overhead.",
        ),
        ("outer-ip", "outer IPv4 · 20 B", f"node to node: {our_ip} → {peer_ip}."),
        (
            "udp",
            "UDP · 8 B",
            f"port {port} on both sides: flannel's udp backend (a process reads the TUN).",
        ),
        (
            "inner-ip",
            "inner IPv4 + payload",
            "the pod's raw IP packet, no inner Ethernet: the TTL drops by one at each proxy.",
        ),
    ]
    mtu_lines = [
        f"MTU arithmetic: 20 (outer IPv4) + 8 (UDP) = {overhead} bytes of overhead; "
        f"a {underlay_mtu}-byte underlay carries pod packets of up to {pod_mtu} bytes.",
        "No inner Ethernet header here: the TUN device hands over bare IP packets.",
    ]
    return Scene(
        title=f"weft trace explain {_fmt(result.get('dst'))} — udp",
        subtitle=(
            f"pod {_fmt(result.get('src'))} on node {our_ip} → pod {_fmt(result.get('dst'))} "
            f"on node {peer_ip}, the IP packet inside UDP port {port}"
        ),
        stations=stations,
        underlay_after=3,
        underlay_label=("underlay", f"UDP → {peer_ip}:{port}"),
        lookups=lookups,
        segments=segments,
        wire_title=f"the packet on the wire between {our_ip} and {peer_ip}, in wire order",
        overhead=overhead,
        legend=legend,
        mtu_lines=mtu_lines,
    )


def _hostgw_scene(result: dict[str, Any]) -> Scene:
    node, stations = _common_start(result)
    peer = result.get("peer") or {}
    route = result.get("route") or {}
    peer_ip = _fmt(peer.get("public_ip"))
    our_ip = _fmt(node.get("public_ip"))
    iface = _fmt(node.get("iface"))
    if node.get("device_kind") in ("tun", "tap") and node.get("backend") == "host-gw":
        # weft's userspace host-gw: the network routes to its TUN, weft frames the
        # packet to the gateway's MAC itself and sends it on the underlay (AF_PACKET).
        # (A vxlan DirectRouting peer also comes here, but through a kernel route.)
        first = Station(
            _fmt(node.get("device")),
            [_device_kind_label(node), f"via {peer_ip}"],
            "device",
            "src",
            note="re-framed, not encapsulated",
        )
    else:
        first = Station(
            "kernel routing",
            [f"via {peer_ip}", f"dev {iface}"],
            "router",
            "src",
            note="no encapsulation",
        )
    stations += [
        first,
        Station(iface, [our_ip], "nic", "src"),
        Station("eth0", [peer_ip], "nic", "dst"),
        Station("kernel routing", [f"{_fmt(peer.get('subnet'))}", "dev cni0"], "router", "dst"),
        Station("cni0", ["bridge", _fmt(peer.get("subnet"))], "bridge", "dst"),
        Station("pod", [_fmt(result.get("dst"))], "pod", "dst"),
    ]
    lookups = [
        ("① route", _fmt(route.get("line")), "the peer node itself is the gateway"),
        (
            "② ARP on the underlay",
            f"who has {peer_ip}? → its eth0 MAC",
            "the frame's destination MAC: the peer node, not the pod",
        ),
    ]
    segments = [
        Segment(
            "Ethernet",
            "14 B",
            [f"{iface} MAC →", f"MAC of {peer_ip}"],
            "outer-eth",
            outer_frame=True,
        ),
        *_pod_packet(result, 1500),
    ]
    legend = [
        (
            "outer-eth",
            "Ethernet · 14 B",
            f"to the MAC of {peer_ip}: the peer node is the next hop, as for any router.",
        ),
        (
            "inner-ip",
            "IPv4 + payload",
            "the pod's packet itself, pod addresses and all: no tunnel, 0 bytes of overhead.",
        ),
    ]
    return Scene(
        title=f"weft trace explain {_fmt(result.get('dst'))} — host-gw",
        subtitle=(
            f"pod {_fmt(result.get('src'))} on node {our_ip} → pod {_fmt(result.get('dst'))} "
            f"on node {peer_ip}, routed, not tunnelled"
        ),
        stations=stations,
        underlay_after=3,
        underlay_label=("underlay", "same L2 segment needed"),
        lookups=lookups,
        segments=segments,
        wire_title=f"the frame on the wire between {our_ip} and {peer_ip}",
        overhead=0,
        legend=legend,
        mtu_lines=[
            "MTU arithmetic: nothing is added, so pods get the underlay's full MTU. The price: "
            "every node must reach every other node on one L2 segment."
        ],
    )


def _short_scene(result: dict[str, Any]) -> Scene:
    """local, outside, no-route: a short journey and the explanation."""
    kind = str(result.get("kind"))
    node, stations = _common_start(result)
    dst = _fmt(result.get("dst"))
    if kind == "local":
        stations.append(Station("pod", [dst], "pod", "src", note="same bridge"))
        note_style = "bridge"
        headline = f"{dst} is a pod on this node: the cni0 bridge delivers it."
    elif kind == "no-route":
        stations.append(
            Station(
                _fmt(node.get("device")),
                [_device_kind_label(node)],
                "device",
                "src",
                note="no lease matches",
            )
        )
        stations.append(
            Station("✗ dropped", ["ICMP net unreachable", "back to the pod"], "stop", "src")
        )
        note_style = "stop"
        headline = f"no node leases a subnet that contains {dst}."
    else:
        stations.append(
            Station("node's routes", ["not weft's", "(--ip-masq: SNAT)"], "router", "src")
        )
        stations.append(
            Station(
                _fmt(node.get("iface")),
                [_fmt(node.get("public_ip"))],
                "nic",
                "src",
                note="out of the cluster",
            )
        )
        note_style = "nic"
        headline = f"{dst} is outside the cluster network."
    return Scene(
        title=f"weft trace explain {dst} — {kind}",
        subtitle=headline,
        stations=stations,
        notes=[str(s) for s in result.get("steps") or []],
        note_style=note_style,
    )


def scene_for(result: dict[str, Any]) -> Scene:
    kind = result.get("kind")
    if kind == "vxlan":
        scene = _vxlan_scene(result)
    elif kind == "udp":
        scene = _udp_scene(result)
    elif kind == "host-gw":
        scene = _hostgw_scene(result)
    else:
        scene = _short_scene(result)
    node = result.get("node") or {}
    peer = result.get("peer") or {}
    scene.frame_labels = {
        "src": f"this node {_fmt(node.get('public_ip'))}",
        "dst": f"the peer node {_fmt(peer.get('public_ip'))}",
    }
    return scene


# -- layout and drawing -----------------------------------------------------------


def _station_size(st: Station) -> tuple[float, float]:
    widths = [_text_width(st.title, 14, bold=True)]
    widths += [_text_width(line, 11, mono=True) for line in st.lines]
    if st.note:
        widths.append(_text_width(st.note, 11))
    height = 30 + 15 * len(st.lines) + (16 if st.note else 0) + 6
    return max(widths) + 20, height


def _segment_width(seg: Segment) -> float:
    widths = [_text_width(seg.name, 13, bold=True), _text_width(seg.size, 12, bold=True)]
    widths += [_text_width(f, 10.5, mono=True) for f in seg.fields]
    return max(max(widths) + 22, 70)


def _segment_widths(scene: Scene, width: float) -> list[float]:
    """Widths that fit the text, then the spare room shared by header size in bytes,
    so a 20-byte header ends up wider than an 8-byte one (the payload keeps its own)."""
    widths = [_segment_width(s) for s in scene.segments]
    spare = width - 2 * MARGIN - sum(widths)
    weights = [_header_bytes(s) for s in scene.segments]
    total = sum(weights)
    if spare > 0 and total:
        spare = min(spare, total * 12.0)
        widths = [w + spare * b / total for w, b in zip(widths, weights, strict=True)]
    return widths


def _header_bytes(seg: Segment) -> int:
    first = seg.size.split()[0]
    return int(first) if first.isdigit() else 0


def _underlay_gap(scene: Scene) -> float:
    labels = scene.underlay_label
    return max(
        UNDERLAY_GAP,
        _text_width(labels[0], 12, bold=True) + 30,
        _text_width(labels[1], 10, mono=True) + 30,
    )


def _wrap(text: str, width_px: float, size: float, mono: bool = False) -> list[str]:
    chars = max(20, int(width_px / (size * (0.61 if mono else 0.6))))
    return textwrap.wrap(text, chars) or [""]


def _draw_journey(c: _Canvas, scene: Scene, y0: float) -> tuple[float, dict[int, tuple]]:
    """The stations in a row; returns (bottom y, {index: (x, y, w, h)})."""
    sizes = [_station_size(st) for st in scene.stations]
    row_h = max(h for _, h in sizes)
    top = y0 + 34  # room for the node frames' labels
    x = MARGIN + 14
    boxes: dict[int, tuple[float, float, float, float]] = {}
    for i, (w, _h) in enumerate(sizes):
        boxes[i] = (x, top, w, row_h)
        x += w + (_underlay_gap(scene) if scene.underlay_after == i else ARROW_GAP)
    # node frames behind the stations
    for side, label in (("src", "this node"), ("dst", "the peer node")):
        idx = [i for i, st in enumerate(scene.stations) if st.side == side]
        if not idx:
            continue
        fx = boxes[idx[0]][0] - 12
        fw = boxes[idx[-1]][0] + boxes[idx[-1]][2] + 12 - fx
        c.rect(fx, y0, fw, row_h + 48, "#fafafa", "#9e9e9e", rx=10, dash="6 4")
        text = scene.frame_labels.get(side, label)
        c.text(fx + 10, y0 + 20, text, size=13, bold=True, fill="#616161")
    for i, st in enumerate(scene.stations):
        bx, by, bw, bh = boxes[i]
        fill, stroke = COLORS[st.style]
        c.group("station", name=st.title, side=st.side)
        c.rect(bx, by, bw, bh, fill, stroke)
        cx = bx + bw / 2
        c.text(cx, by + 20, st.title, size=14, bold=True, anchor="middle", fill=stroke)
        for j, line in enumerate(st.lines):
            c.text(cx, by + 38 + 15 * j, line, size=11, mono=True, anchor="middle")
        if st.note:
            c.text(cx, by + bh - 9, st.note, size=11, italic=True, anchor="middle", fill=stroke)
        c.end()
        if i + 1 < len(scene.stations):
            nx = boxes[i + 1][0]
            mid_y = by + bh / 2
            if scene.underlay_after == i:
                c.line(bx + bw, mid_y, nx - 2, mid_y, stroke="#37474f", width=4, arrow=True)
                top_label, bottom_label = scene.underlay_label
                gap_mid = (bx + bw + nx) / 2
                c.text(
                    gap_mid,
                    mid_y - 10,
                    top_label,
                    size=12,
                    bold=True,
                    anchor="middle",
                    fill="#37474f",
                )
                c.text(
                    gap_mid,
                    mid_y + 20,
                    bottom_label,
                    size=10,
                    mono=True,
                    anchor="middle",
                    fill="#37474f",
                )
            else:
                c.line(bx + bw + 2, mid_y, nx - 2, mid_y, arrow=True)
    return y0 + row_h + 48, boxes


def _draw_lookups(c: _Canvas, scene: Scene, y0: float, width: float) -> float:
    c.text(MARGIN, y0 + 16, "the lookups that fill in the headers", size=14, bold=True)
    y = y0 + 26
    n = len(scene.lookups)
    col_w = (width - 2 * MARGIN - (n - 1) * 12) / n
    wrapped = [
        (_wrap(line, col_w - 16, 11, mono=True), _wrap(why, col_w - 16, 11))
        for _t, line, why in scene.lookups
    ]
    box_h = max(30 + 15 * len(a) + 15 * len(b) + 8 for a, b in wrapped)
    for k, ((title, _line, _why), (mono_lines, why_lines)) in enumerate(
        zip(scene.lookups, wrapped, strict=True)
    ):
        x = MARGIN + k * (col_w + 12)
        c.rect(x, y, col_w, box_h, "#fffde7", "#f9a825")
        c.text(x + 8, y + 18, title, size=13, bold=True, fill="#795548")
        yy = y + 36
        for line in mono_lines:
            c.text(x + 8, yy, line, size=11, mono=True)
            yy += 15
        for line in why_lines:
            c.text(x + 8, yy, line, size=11, italic=True, fill="#5d4037")
            yy += 15
    return y + box_h


def _draw_wire(c: _Canvas, scene: Scene, y0: float, width: float) -> float:
    c.text(MARGIN, y0 + 16, scene.wire_title, size=14, bold=True)
    widths = _segment_widths(scene, width)
    seg_h = 46 + 14 * max(len(s.fields) for s in scene.segments)
    brace_y = y0 + 46
    top = brace_y + 14
    x = MARGIN
    spans: list[tuple[float, float]] = []
    for seg, w in zip(scene.segments, widths, strict=True):
        fill, stroke = COLORS[seg.style]
        c.group("header", layer=seg.name, bytes=seg.size, role=seg.style)
        c.rect(x, top, w, seg_h, fill, stroke, rx=2, dash="5 3" if seg.outer_frame else None)
        cx = x + w / 2
        c.text(cx, top + 17, seg.name, size=13, bold=True, anchor="middle", fill=stroke)
        c.text(cx, top + 32, seg.size, size=12, bold=True, anchor="middle")
        for j, f in enumerate(seg.fields):
            c.text(cx, top + 48 + 14 * j, f, size=10.5, mono=True, anchor="middle")
        c.end()
        spans.append((x, x + w))
        x += w
    over = [sp for sp, seg in zip(spans, scene.segments, strict=True) if seg.overhead]
    if over and scene.overhead:
        x1, x2 = over[0][0] + 2, over[-1][1] - 2
        c.brace(x1, x2, brace_y, up=True, color="#c62828")
        parts = " + ".join(seg.size.split()[0] for seg in scene.segments if seg.overhead)
        c.text(
            (x1 + x2) / 2,
            brace_y - 14,
            f"{scene.overhead} bytes of overhead = {parts}",
            size=13,
            bold=True,
            anchor="middle",
            fill="#c62828",
        )
    framed = [sp for sp, seg in zip(spans, scene.segments, strict=True) if seg.outer_frame]
    if framed:
        fx1, fx2 = framed[0]
        c.text(
            (fx1 + fx2) / 2,
            brace_y - 14,
            "link framing",
            size=11,
            italic=True,
            anchor="middle",
            fill="#455a64",
        )
    # below: what the MTU counts
    bottom = top + seg_h
    counted = [sp for sp, seg in zip(spans, scene.segments, strict=True) if not seg.outer_frame]
    if counted:
        x1, x2 = counted[0][0] + 2, counted[-1][1] - 2
        c.brace(x1, x2, bottom + 10, up=False, color="#1565c0")
        c.text(
            (x1 + x2) / 2,
            bottom + 36,
            "counted in the underlay's MTU (the IP packet)",
            size=12,
            anchor="middle",
            fill="#1565c0",
        )
    return bottom + 44


def _draw_legend(c: _Canvas, scene: Scene, y0: float, width: float) -> float:
    c.text(MARGIN, y0 + 16, "what each header is for", size=14, bold=True)
    y = y0 + 30
    name_w = max(_text_width(name, 12, bold=True) for _s, name, _t in scene.legend) + 30
    text_w = width - 2 * MARGIN - name_w
    for style, name, text in scene.legend:
        fill, stroke = COLORS[style]
        lines = _wrap(text, text_w, 12)
        c.rect(MARGIN, y, 16, 14, fill, stroke, rx=2)
        c.text(MARGIN + 24, y + 12, name, size=12, bold=True, fill=stroke)
        for j, line in enumerate(lines):
            c.text(MARGIN + name_w, y + 12 + 16 * j, line, size=12)
        y += 16 * len(lines) + 6
    y += 6
    for line in scene.mtu_lines:
        for part in _wrap(line, (width - 2 * MARGIN) * 0.9, 12.5):
            c.text(MARGIN, y + 12, part, size=12.5, bold=True, fill="#b71c1c")
            y += 17
    return y


def _draw_notes(c: _Canvas, scene: Scene, y0: float, width: float) -> float:
    lines: list[str] = []
    for note in scene.notes:
        wrapped = _wrap(note, width - 2 * MARGIN - 24, 12, mono=True)
        lines += wrapped
    fill, stroke = COLORS[scene.note_style]
    h = 16 * len(lines) + 40
    c.rect(MARGIN, y0, width - 2 * MARGIN, h, fill, stroke)
    c.text(MARGIN + 12, y0 + 20, "what weft says", size=13, bold=True, fill=stroke)
    for j, line in enumerate(lines):
        c.text(MARGIN + 12, y0 + 40 + 16 * j, line, size=12, mono=True)
    return y0 + h


def _content_width(scene: Scene) -> float:
    row = sum(_station_size(st)[0] for st in scene.stations) + MARGIN * 2 + 28
    row += sum(
        _underlay_gap(scene) if scene.underlay_after == i else ARROW_GAP
        for i in range(len(scene.stations) - 1)
    )
    wire = sum(_segment_width(s) for s in scene.segments) + 2 * MARGIN
    title = _text_width(scene.subtitle, 13) + 2 * MARGIN
    return max(row, wire, title, 760)


def render_svg(result: dict[str, Any]) -> str:
    """The journey of `explain()`'s result as a standalone SVG document."""
    scene = scene_for(result)
    width = _content_width(scene)
    c = _Canvas()
    c.text(MARGIN, 32, scene.title, size=20, bold=True)
    c.text(MARGIN, 54, scene.subtitle, size=13, fill="#424242")
    y, _boxes = _draw_journey(c, scene, 72)
    if scene.lookups:
        y = _draw_lookups(c, scene, y + 18, width)
    if scene.segments:
        y = _draw_wire(c, scene, y + 22, width)
    if scene.legend:
        y = _draw_legend(c, scene, y + 8, width)
    if scene.notes:
        y = _draw_notes(c, scene, y + 18, width)
    return c.svg(width, y + MARGIN, scene.title)
