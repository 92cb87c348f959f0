"""`weft trace explain`: how a node would send a packet to DST, hop by hop.

Pure: it takes what the agent knows (its status: lease, backend, device,
VtepMAC, peers) and walks the same chain the seed article walks for flannel:
route → neighbour (the peer's VTEP MAC) → FDB (the peer's public IP) → the
outer headers. The lines are printed the way `ip route`, `ip neigh` and
`bridge fdb` print them on a flannel node, so a reader can compare.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Any

from dataplane.routes import RouteTable

VXLAN_LAYERS = (("Ethernet", 14), ("IPv4", 20), ("UDP", 8), ("VXLAN", 8))


class ExplainError(ValueError):
    pass


def explain(dst: str, src: str | None, node: dict[str, Any]) -> dict[str, Any]:
    """The journey of a packet from `src` (default: a pod on this node) to `dst`."""
    try:
        dst_ip = ip_address(dst)
    except ValueError:
        raise ExplainError(f"{dst!r} is not an IP address") from None
    if not isinstance(dst_ip, IPv4Address):
        raise ExplainError("weft explains IPv4 destinations")
    subnet = IPv4Network(node["subnet"])
    network = IPv4Network(node["network"])
    backend = node["backend"]
    kernel = node.get("dataplane") == "kernel"
    device = node.get("device") or ("flannel.1" if kernel else "weft0")
    src_ip = src or str(subnet.network_address + 2)
    out: dict[str, Any] = {
        "dst": str(dst_ip),
        "src": src_ip,
        "node": {
            "public_ip": node.get("public_ip"),
            "subnet": str(subnet),
            "iface": node.get("iface", "eth0"),
            "vtep_mac": node.get("vtep_mac"),
            "device": device,
            "device_kind": node.get("device_kind"),
            "backend": backend,
        },
        "steps": [],
    }
    steps: list[str] = out["steps"]
    steps.append(f"{src_ip} → {dst_ip} on node {node.get('public_ip')} (subnet {subnet})")
    if dst_ip in subnet:
        out["kind"] = "local"
        steps.append(f"route: {subnet} dev cni0 proto kernel scope link — a local pod;")
        steps.append("the cni0 bridge delivers it; weft never sees this packet.")
        return out
    if dst_ip not in network:
        out["kind"] = "outside"
        steps.append(
            f"{dst_ip} is outside the cluster network {network}: the node's own routes "
            "take it (masqueraded with --ip-masq); weft is not involved."
        )
        return out

    table: RouteTable[dict[str, Any]] = RouteTable()
    for peer in node.get("peers", []):
        table.insert(peer["subnet"], peer)
    found = table.match(dst_ip)
    tunnel_route = f"{network} dev {device}"
    if found is None:
        out["kind"] = "no-route"
        steps.append(f"route: {tunnel_route} (the whole network goes to weft)")
        steps.append(
            f"weft lookup: no lease covers {dst_ip} among {len(table)} peer subnet(s) "
            f"→ ICMP destination unreachable (net) back to {src_ip}, as flannel's proxy does"
        )
        return out
    prefix, peer = found
    out["peer"] = peer
    out["route"] = {"prefix": str(prefix), "candidates": len(table)}
    public_ip = peer["public_ip"]
    direct = str(prefix) in (node.get("direct_routes") or {})
    if backend == "host-gw" or direct:
        out["kind"] = "host-gw"
        line = f"{prefix} via {public_ip} dev {node.get('iface', 'eth0')}"
        out["route"]["line"] = line
        if kernel or direct:
            steps.append(f"route: {line}")
        else:
            # Userspace host-gw: the kernel hands the whole network to weft, and weft
            # does what the kernel route above would do.
            steps.append(f"route: {tunnel_route}")
            steps.append(
                f"weft lookup: {dst_ip} matches {prefix} (longest prefix of {len(table)}), "
                f"gateway {public_ip} — as the kernel route `{line}` would"
            )
        steps.append(
            f"the IP packet goes unchanged in an Ethernet frame to {public_ip}'s MAC; "
            "the peer's kernel routes it to its cni0. Overhead: 0 bytes."
        )
        out["overhead"] = 0
        return out
    if backend == "udp":
        out["kind"] = "udp"
        port = node.get("port") or 8285
        out["route"]["line"] = tunnel_route
        steps.append(f"route: {tunnel_route}")
        steps.append(f"weft lookup: {dst_ip} matches {prefix} (longest prefix of {len(table)})")
        steps.append(f"peer {prefix} at {public_ip}: raw IP packet as the UDP payload")
        steps.append(
            f"outer: IPv4 {node.get('public_ip')} > {public_ip}, UDP {port} > {port}; "
            "TTL decremented on each side (as flannel). Overhead: 20 + 8 = 28 bytes."
        )
        out["outer"] = [
            {"layer": "Ethernet", "bytes": 14, "underlay": True},
            {"layer": "IPv4", "bytes": 20, "src": node.get("public_ip"), "dst": public_ip},
            {"layer": "UDP", "bytes": 8, "sport": port, "dport": port},
        ]
        out["overhead"] = 28
        return out

    # vxlan: route → neighbour → FDB → outer headers
    out["kind"] = "vxlan"
    vni = node.get("vni", 1)
    port = node.get("port") or 8472
    gw = str(IPv4Network(prefix).network_address)
    mac = peer.get("vtep_mac")
    if kernel or node.get("device_kind") == "tap":
        route_line = f"{prefix} via {gw} dev {device} onlink"
        steps.append(f"route: {route_line}")
    else:
        route_line = tunnel_route
        steps.append(f"route: {route_line}")
        steps.append(
            f"weft lookup: {dst_ip} matches {prefix} (longest prefix of {len(table)}), "
            f"next hop the peer's VTEP {gw}"
        )
    out["route"]["line"] = route_line
    neigh_line = f"{gw} dev {device} lladdr {mac} PERMANENT"
    fdb_line = f"{mac} dev {device} dst {public_ip} self permanent"
    out["neigh"] = {"ip": gw, "mac": mac, "line": neigh_line}
    out["fdb"] = {"mac": mac, "dst": public_ip, "line": fdb_line}
    steps.append(f"neighbour: {neigh_line}")
    steps.append(f"fdb: {fdb_line}")
    source_ports = node.get("source_ports") or []
    sport: int | str = port
    if kernel:
        sport = "flow hash"
    elif source_ports:
        sport = f"flow hash (one of {len(source_ports)} ports)"
    out["outer"] = [
        {"layer": "Ethernet", "bytes": 14, "underlay": True},
        {"layer": "IPv4", "bytes": 20, "src": node.get("public_ip"), "dst": public_ip},
        # The kernel hashes the inner flow into the source port, and so does weft, into
        # one of its send sockets' ports (--source-ports 0: all from the VXLAN port).
        {"layer": "UDP", "bytes": 8, "sport": sport, "dport": port},
        {"layer": "VXLAN", "bytes": 8, "flags": "0x08", "vni": vni},
        {"layer": "Ethernet (inner)", "bytes": 14, "src": node.get("vtep_mac"), "dst": mac},
    ]
    out["overhead"] = 50
    steps.append(
        f"outer: IPv4 {node.get('public_ip')} > {public_ip}, UDP > {port}, "
        f"VXLAN VNI {vni}, inner Ethernet {node.get('vtep_mac')} > {mac}"
    )
    steps.append(
        "overhead: 14 inner Ethernet + 8 VXLAN + 8 UDP + 20 IPv4 = 50 bytes, so a 1500-byte "
        f"underlay carries {1500 - 50}-byte pod packets (device MTU {node.get('device_mtu')})"
    )
    steps.append(
        f"at {public_ip}: UDP {port} → VNI {vni} matches → inner frame to its VTEP "
        f"{mac} → its kernel routes {dst_ip} to cni0 → the pod"
    )
    return out


def render_text(result: dict[str, Any]) -> str:
    return "\n".join(result["steps"]) + "\n"
