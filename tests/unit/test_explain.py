"""`weft trace explain`: explain() on hand-made status dicts, and its SVG drawing."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from control.explain import ExplainError, explain, render_text
from control.explain_svg import render_svg

PEER_MAC = "8e:1f:22:aa:bb:cc"
OUR_MAC = "02:77:00:00:00:01"
SVG = "{http://www.w3.org/2000/svg}"


def status(**over: Any) -> dict[str, Any]:
    """What `weft status --json` reports for a userspace vxlan node on a TUN."""
    st: dict[str, Any] = {
        "ready": True,
        "public_ip": "192.168.77.10",
        "iface": "eth0",
        "backend": "vxlan",
        "subnet": "10.244.1.0/24",
        "network": "10.244.0.0/16",
        "vtep_mac": OUR_MAC,
        "vni": 1,
        "port": 8472,
        "device": "weft.1",
        "device_kind": "tun",
        "device_mtu": 1450,
        "peers": [
            {"subnet": "10.244.2.0/24", "public_ip": "192.168.77.11", "vtep_mac": PEER_MAC},
            {"subnet": "10.244.3.0/24", "public_ip": "192.168.77.12",
             "vtep_mac": "02:00:00:00:00:03"},
        ],
    }  # fmt: skip
    st.update(over)
    return st


def kernel_status() -> dict[str, Any]:
    return status(dataplane="kernel", device="flannel.1", device_kind="kernel")


def svg_texts(svg: str) -> str:
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert float(root.get("width", "0")) > 0 and float(root.get("height", "0")) > 0
    return "\n".join(el.text or "" for el in root.iter())


# -- explain() --------------------------------------------------------------------


def test_vxlan_userspace_tun_walks_route_neighbour_fdb() -> None:
    r = explain("10.244.2.5", None, status())
    assert r["kind"] == "vxlan"
    assert r["src"] == "10.244.1.2" and r["dst"] == "10.244.2.5"
    # On a TUN the kernel only knows "the network goes to weft.1"; weft picks the lease.
    assert r["route"] == {
        "prefix": "10.244.2.0/24", "candidates": 2, "line": "10.244.0.0/16 dev weft.1",
    }  # fmt: skip
    assert r["neigh"] == {
        "ip": "10.244.2.0", "mac": PEER_MAC,
        "line": f"10.244.2.0 dev weft.1 lladdr {PEER_MAC} PERMANENT",
    }  # fmt: skip
    assert r["fdb"] == {
        "mac": PEER_MAC, "dst": "192.168.77.11",
        "line": f"{PEER_MAC} dev weft.1 dst 192.168.77.11 self permanent",
    }  # fmt: skip
    assert r["peer"]["public_ip"] == "192.168.77.11"
    layers = {o["layer"]: o for o in r["outer"]}
    assert [o["layer"] for o in r["outer"]] == [
        "Ethernet", "IPv4", "UDP", "VXLAN", "Ethernet (inner)",
    ]  # fmt: skip
    assert layers["IPv4"]["src"] == "192.168.77.10" and layers["IPv4"]["dst"] == "192.168.77.11"
    assert layers["UDP"]["dport"] == 8472
    assert layers["VXLAN"] == {"layer": "VXLAN", "bytes": 8, "flags": "0x08", "vni": 1}
    assert layers["Ethernet (inner)"]["src"] == OUR_MAC
    assert layers["Ethernet (inner)"]["dst"] == PEER_MAC
    # The 50 bytes: everything but the underlay's own Ethernet header.
    assert r["overhead"] == 50
    assert sum(o["bytes"] for o in r["outer"] if not o.get("underlay")) == 50
    assert r["node"]["device"] == "weft.1" and r["node"]["vtep_mac"] == OUR_MAC
    text = render_text(r)
    assert "weft lookup: 10.244.2.5 matches 10.244.2.0/24" in text
    assert "VXLAN VNI 1" in text and "50 bytes" in text and "device MTU 1450" in text


def test_vxlan_kernel_prints_what_ip_route_neigh_and_bridge_fdb_print() -> None:
    r = explain("10.244.2.5", None, kernel_status())
    assert r["kind"] == "vxlan"
    lines = r["steps"]
    # The three lines a flannel node shows (seed article: ip route / ip neigh / bridge fdb).
    assert "route: 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink" in lines
    assert f"neighbour: 10.244.2.0 dev flannel.1 lladdr {PEER_MAC} PERMANENT" in lines
    assert f"fdb: {PEER_MAC} dev flannel.1 dst 192.168.77.11 self permanent" in lines
    assert not any(line.startswith("weft lookup") for line in lines)
    assert r["route"]["line"] == "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink"


def test_vxlan_tap_device_is_routed_onlink_like_the_kernel() -> None:
    r = explain("10.244.3.9", "10.244.1.7", status(device_kind="tap"))
    assert r["src"] == "10.244.1.7"
    assert r["route"]["line"] == "10.244.3.0/24 via 10.244.3.0 dev weft.1 onlink"
    assert r["fdb"]["dst"] == "192.168.77.12" and r["neigh"]["mac"] == "02:00:00:00:00:03"


def test_vxlan_device_defaults_when_the_status_has_none() -> None:
    st = status()
    del st["device"], st["device_kind"]
    assert explain("10.244.2.5", None, st)["node"]["device"] == "weft0"
    st = kernel_status()
    del st["device"]
    assert explain("10.244.2.5", None, st)["route"]["line"].endswith("dev flannel.1 onlink")


def test_vxlan_custom_vni_and_port_reach_the_outer_headers() -> None:
    r = explain("10.244.2.5", None, status(vni=4096, port=4789))
    layers = {o["layer"]: o for o in r["outer"]}
    assert layers["VXLAN"]["vni"] == 4096 and layers["UDP"]["dport"] == 4789
    svg = svg_texts(render_svg(r))
    assert "VNI 4096" in svg and "dport 4789" in svg


def test_longest_prefix_wins_among_many_peers() -> None:
    peers = [
        {"subnet": f"10.244.{i}.0/24", "public_ip": f"192.168.77.{i + 10}", "vtep_mac": None}
        for i in range(2, 200)
    ]
    r = explain("10.244.150.9", None, status(peers=peers))
    assert r["route"]["prefix"] == "10.244.150.0/24" and r["route"]["candidates"] == 198
    assert r["fdb"]["dst"] == "192.168.77.160"


def test_udp_carries_the_raw_ip_packet_in_28_bytes() -> None:
    st = status(backend="udp", device="weft0", port=None, vtep_mac=None, device_mtu=1472)
    for p in st["peers"]:
        p["vtep_mac"] = None
    r = explain("10.244.2.5", None, st)
    assert r["kind"] == "udp" and r["overhead"] == 28
    assert r["route"]["line"] == "10.244.0.0/16 dev weft0"
    assert "neigh" not in r and "fdb" not in r
    layers = {o["layer"]: o for o in r["outer"]}
    assert layers["UDP"]["sport"] == layers["UDP"]["dport"] == 8285  # flannel's default
    assert layers["IPv4"]["dst"] == "192.168.77.11"
    assert sum(o["bytes"] for o in r["outer"] if not o.get("underlay")) == 28
    assert "TTL decremented" in render_text(r)


def test_hostgw_routes_via_the_peer_with_no_overhead() -> None:
    st = status(backend="host-gw", device="weft0", vtep_mac=None, device_mtu=1500)
    r = explain("10.244.2.5", None, st)
    assert r["kind"] == "host-gw" and r["overhead"] == 0
    assert r["route"]["line"] == "10.244.2.0/24 via 192.168.77.11 dev eth0"
    assert "outer" not in r and "neigh" not in r


def test_local_pod_never_reaches_weft() -> None:
    r = explain("10.244.1.9", None, status())
    assert r["kind"] == "local"
    assert "route" not in r and "peer" not in r
    assert any("cni0" in s for s in r["steps"])


def test_outside_the_network_is_not_weft_business() -> None:
    r = explain("8.8.8.8", None, status())
    assert r["kind"] == "outside"
    assert any("outside the cluster network 10.244.0.0/16" in s for s in r["steps"])


def test_no_lease_means_icmp_net_unreachable() -> None:
    r = explain("10.244.9.9", None, status())
    assert r["kind"] == "no-route"
    assert "peer" not in r
    assert any("ICMP destination unreachable" in s and "2 peer subnet(s)" in s for s in r["steps"])


@pytest.mark.parametrize("dst", ["nonsense", "10.244.2", "", "fd00::1", "10.244.2.5/24"])
def test_bad_destination_is_an_explain_error(dst: str) -> None:
    with pytest.raises(ExplainError):
        explain(dst, None, status())


def test_direct_routing_peer_is_explained_as_a_plain_route() -> None:
    st = status(direct_routes={"10.244.2.0/24": "eth0"})
    r = explain("10.244.2.5", None, st)
    assert r["kind"] == "host-gw"
    assert r["route"]["line"] == "10.244.2.0/24 via 192.168.77.11 dev eth0"


def test_userspace_vxlan_source_port_is_a_flow_hash_or_the_socket_port() -> None:
    spread = status(source_ports=[40001, 40002, 40003])
    udp = {o["layer"]: o for o in explain("10.244.2.5", None, spread)["outer"]}["UDP"]
    assert udp["sport"] == "flow hash (one of 3 ports)" and udp["dport"] == 8472
    one = status(source_ports=[])  # --source-ports 0
    udp = {o["layer"]: o for o in explain("10.244.2.5", None, one)["outer"]}["UDP"]
    assert udp["sport"] == 8472


# -- render_svg() -----------------------------------------------------------------


def test_svg_of_vxlan_names_every_real_value() -> None:
    svg = render_svg(explain("10.244.2.5", None, status()))
    assert svg.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    text = svg_texts(svg)
    for value in (
        PEER_MAC, OUR_MAC, "VNI 1", "192.168.77.10", "192.168.77.11", "dport 8472",
        "10.244.1.2", "10.244.2.5", "weft.1", "cni0", "pod",
    ):  # fmt: skip
        assert value in text, value
    # every header with its size, the brace and the arithmetic
    assert "50 bytes of overhead = 20 + 8 + 8 + 14" in text
    for layer, size in (("Ethernet", "14 B"), ("IPv4", "20 B"), ("UDP", "8 B"), ("VXLAN", "8 B")):
        assert layer in text and size in text
    assert "1500 − 50 = 1450" in text
    # the three lookups, as the kernel tools print them
    assert f"10.244.2.0 dev weft.1 lladdr {PEER_MAC} PERMANENT" in text
    assert f"{PEER_MAC} dev weft.1 dst 192.168.77.11 self permanent" in text


def test_svg_headers_and_stations_are_in_order() -> None:
    root = ET.fromstring(render_svg(explain("10.244.2.5", None, status())))
    groups = list(root.iter(f"{SVG}g"))
    headers = [(g.get("data-layer"), g.get("data-bytes")) for g in groups
               if g.get("class") == "header"]  # fmt: skip
    assert headers == [
        ("Ethernet", "14 B"), ("IPv4", "20 B"), ("UDP", "8 B"), ("VXLAN", "8 B"),
        ("Ethernet", "14 B"), ("IPv4", "20 B"), ("payload", "≤ 1430 B"),
    ]  # fmt: skip
    # drawn left to right in wire order
    xs = [float(g.find(f"{SVG}rect").get("x")) for g in groups if g.get("class") == "header"]
    assert xs == sorted(xs)
    stations = [(g.get("data-name"), g.get("data-side")) for g in groups
                if g.get("class") == "station"]  # fmt: skip
    assert stations == [
        ("pod", "src"), ("cni0", "src"), ("weft.1", "src"), ("eth0", "src"),
        ("eth0", "dst"), ("VXLAN device (VNI 1)", "dst"), ("cni0", "dst"), ("pod", "dst"),
    ]  # fmt: skip


def test_svg_of_kernel_vxlan_shows_flannel_lines() -> None:
    text = svg_texts(render_svg(explain("10.244.2.5", None, kernel_status())))
    assert "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink" in text
    assert "the kernel's VXLAN" in text and PEER_MAC in text
    assert "sport: hash" in text  # the kernel hashes the inner flow into the source port


def test_svg_of_userspace_vxlan_draws_the_real_source_port() -> None:
    text = svg_texts(render_svg(explain("10.244.2.5", None, status())))
    assert "sport 8472" in text and "sport: hash" not in text


def test_svg_of_a_direct_routing_peer_is_a_kernel_route() -> None:
    r = explain("10.244.2.5", None, status(direct_routes={"10.244.2.0/24": "eth0"}))
    root = ET.fromstring(render_svg(r))
    stations = [g.get("data-name") for g in root.iter(f"{SVG}g") if g.get("class") == "station"]
    assert stations[2] == "kernel routing", stations  # not through weft.1
    text = svg_texts(render_svg(r))
    assert "10.244.2.0/24 via 192.168.77.11 dev eth0" in text and "VXLAN" not in text


def test_svg_of_userspace_hostgw_goes_through_weft0() -> None:
    st = status(backend="host-gw", device="weft0", vtep_mac=None, device_mtu=1500)
    root = ET.fromstring(render_svg(explain("10.244.2.5", None, st)))
    stations = [g.get("data-name") for g in root.iter(f"{SVG}g") if g.get("class") == "station"]
    assert stations[2] == "weft0", stations


def test_svg_of_udp_shows_28_bytes_and_no_inner_ethernet() -> None:
    st = status(backend="udp", device="weft0", port=8285, vtep_mac=None, device_mtu=1472)
    text = svg_texts(render_svg(explain("10.244.2.5", None, st)))
    assert "28 bytes of overhead = 20 + 8" in text
    assert "sport 8285" in text and "dport 8285" in text
    assert "VXLAN" not in text and "1472" in text


def test_svg_of_hostgw_shows_no_encapsulation() -> None:
    st = status(backend="host-gw", device="weft0", vtep_mac=None, device_mtu=1500)
    text = svg_texts(render_svg(explain("10.244.2.5", None, st)))
    assert "10.244.2.0/24 via 192.168.77.11 dev eth0" in text
    assert "bytes of overhead =" not in text  # no brace: nothing is added
    assert "0 bytes of overhead" in text and "VXLAN" not in text


@pytest.mark.parametrize(
    ("dst", "kind", "needle"),
    [
        ("10.244.1.9", "local", "cni0 bridge delivers it"),
        ("8.8.8.8", "outside", "outside the cluster network"),
        ("10.244.9.9", "no-route", "ICMP destination unreachable"),
    ],
)
def test_svg_of_the_short_kinds_explains_in_a_box(dst: str, kind: str, needle: str) -> None:
    r = explain(dst, None, status())
    assert r["kind"] == kind
    text = svg_texts(render_svg(r))
    assert f"— {kind}" in text
    assert needle in text.replace("\n", " ")
    assert "what weft says" in text


def test_svg_escapes_hostile_text() -> None:
    st = status(device="<weft&\"'>", iface="eth0]]>")
    r = explain("10.244.2.5", None, st)
    svg = render_svg(r)
    text = svg_texts(svg)  # parses: the text was escaped
    assert "<weft&\"'>" in text and "eth0]]>" in text
    assert "<weft&" not in svg


def test_svg_survives_missing_fields() -> None:
    bare = {"kind": "vxlan", "dst": "10.244.2.5", "steps": []}
    assert "?" in svg_texts(render_svg(bare))
    assert svg_texts(render_svg({"kind": "mystery"}))
