"""The lab itself, and the kernel ↔ kernel baselines the userspace dataplane
is measured against (flannel's vxlan and host-gw, built as flanneld does)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from control.lab.netns import LabError, RunState, _members, list_netns, pid_alive
from control.lab.topology import (
    HUB_BRIDGE_NETFILTER,
    Lab,
    add_kernel_hostgw_route,
    add_kernel_vxlan_peer,
    make_kernel_vxlan,
    remove_kernel_vxlan_peer,
)

NET1 = IPv4Network("10.244.1.0/24")
NET2 = IPv4Network("10.244.2.0/24")


def test_nodes_ping_each_other_on_the_underlay(lab: Lab, two_nodes) -> None:
    n1, n2 = two_nodes
    assert n1.underlay_ip == IPv4Address("192.168.77.10")
    assert n2.underlay_ip == IPv4Address("192.168.77.11")
    assert lab.ping(n1, n2.underlay_ip)
    assert lab.ping(n2, n1.underlay_ip)
    # node setup: forwarding on, rp_filter off, no default route, no way out
    assert lab.run(n1, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert lab.run(n1, "sysctl", "-n", "net.ipv4.conf.all.rp_filter").stdout.strip() == "0"
    routes = lab.ip_json(n1, "route", "show")
    assert [r["dst"] for r in routes] == ["192.168.77.0/24"]
    assert lab.link_mac(n1, "eth0") == n1.mac
    assert lab.ip_json(n1, "link", "show", "eth0")[0]["mtu"] == 1500
    # each link's counters, by name: n1's eth0 sent the pings n2's eth0 received
    sent, got = lab.link_stats(n1, "eth0"), lab.link_stats(n2)
    assert list(sent) == ["eth0"] and {"eth0", "lo"} <= set(got)
    assert sent["eth0"]["tx"]["packets"] >= 2 and got["eth0"]["rx"]["packets"] >= 2


def test_the_hub_bridges_without_netfilter(lab: Lab, two_nodes) -> None:
    """The hub is the lab's switch: no iptables for its bridged frames (where the host
    has br_netfilter), while a node's namespace keeps the host's default, as a
    Kubernetes node's cni0 needs it."""
    hub = lab.hub_bridge_netfilter()
    if not hub:
        pytest.skip("no br_netfilter on this host: nothing to switch off")
    assert hub == dict.fromkeys(HUB_BRIDGE_NETFILTER, 0)
    out = lab.run(two_nodes[0], "sysctl", "-n", HUB_BRIDGE_NETFILTER[0]).stdout
    assert out.strip() == "1"


def test_underlay_mtu_and_node_names(lab: Lab) -> None:
    lab.add_underlay("10.77.0.0/24", mtu=9000)
    n = lab.add_node("big")
    assert n.ns == f"{lab.tag}-big" and n.mtu == 9000
    assert lab.ip_json(n, "link", "show", "eth0")[0]["mtu"] == 9000
    with pytest.raises(LabError):
        lab.add_node("big")


def test_pods_ping_their_gateway_and_each_other(lab: Lab, two_nodes) -> None:
    n1, _ = two_nodes
    cni = lab.add_cni(n1, NET1, mtu=1450)
    p0 = lab.add_pod(n1, mtu=1450)
    p1 = lab.add_pod(n1, IPv4Address("10.244.1.77"), mtu=1450)
    assert (p0.ip, p1.ip) == (IPv4Address("10.244.1.2"), IPv4Address("10.244.1.77"))
    assert cni.gateway == IPv4Address("10.244.1.1")
    assert lab.ping(p0, cni.gateway)
    assert lab.ping(p1, p0.ip)
    routes = lab.ip_json(p0, "route", "show", "default")
    assert routes[0]["gateway"] == "10.244.1.1"
    assert lab.ip_json(p0, "link", "show", "eth0")[0]["mtu"] == 1450
    # a pod outside the node's subnet is refused
    with pytest.raises(LabError):
        lab.add_pod(n1, IPv4Address("10.244.9.9"))


def _two_pod_nodes(lab: Lab, two_nodes, mtu: int):
    n1, n2 = two_nodes
    lab.add_cni(n1, NET1, mtu=mtu)
    lab.add_cni(n2, NET2, mtu=mtu)
    return n1, n2, lab.add_pod(n1), lab.add_pod(n2)


def test_kernel_vxlan_interop_baseline(lab: Lab, two_nodes, tmp_path: Path) -> None:
    n1, n2, p1, p2 = _two_pod_nodes(lab, two_nodes, mtu=1450)
    mac1 = make_kernel_vxlan(lab, n1, NET1, mac="02:00:00:00:01:01")
    mac2 = make_kernel_vxlan(lab, n2, NET2)
    assert mac1 == "02:00:00:00:01:01"
    add_kernel_vxlan_peer(lab, n1, vni=1, peer_subnet=NET2, peer_mac=mac2,
                          peer_public_ip=n2.underlay_ip)  # fmt: skip
    add_kernel_vxlan_peer(lab, n2, vni=1, peer_subnet=NET1, peer_mac=mac1,
                          peer_public_ip=n1.underlay_ip)  # fmt: skip

    # the device is flanneld's: vxlan id 1, dstport 8472, local, dev eth0, nolearning
    link = lab.ip_json(n1, "-d", "link", "show", "flannel.1")[0]
    info = link["linkinfo"]["info_data"]
    assert link["mtu"] == 1450
    assert (info["id"], info["port"], info["local"], info["learning"]) == (
        1, 8472, "192.168.77.10", False)  # fmt: skip
    addrs = lab.ip_json(n1, "addr", "show", "flannel.1")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [
        ("10.244.1.0", 32)
    ]
    fdb = lab.bridge(n1, "fdb", "show", "dev", "flannel.1")
    assert f"{mac2} dst 192.168.77.11 self permanent" in fdb
    route = lab.ip_json(n1, "route", "show", str(NET2))[0]
    assert route["gateway"] == "10.244.2.0" and "onlink" in route["flags"]

    pcap = tmp_path / "underlay.pcap"
    cap = lab.capture(n2, "eth0", pcap, "udp port 8472")
    assert lab.ping(p1, p2.ip), lab.ping_output(p1, p2.ip).stdout
    assert lab.ping(p2, p1.ip)
    # a full-size packet (1450 MTU - 28) crosses without fragmentation
    assert lab.ping(p1, p2.ip, count=2, size=1422, dont_fragment=True)
    lab.stop_capture(cap, pcap)

    if shutil.which("tshark"):
        out = subprocess.run(
            ["tshark", "-r", str(pcap), "-d", "udp.port==8472,vxlan", "-Y", "icmp",
             "-T", "fields", "-e", "vxlan.vni", "-e", "eth.src", "-e", "eth.dst",
             "-e", "ip.src", "-e", "ip.dst"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        rows = [line.split("\t") for line in out.splitlines() if line]
        assert rows, "no VXLAN-encapsulated ICMP captured"
        # first request: outer n1 → n2, inner VtepMAC1 → VtepMAC2, pod → pod
        vni, eth_src, eth_dst, ip_src, ip_dst = rows[0]
        assert vni == "1"
        assert eth_src.split(",")[-1] == mac1 and eth_dst.split(",")[-1] == mac2
        assert ip_src.split(",") == ["192.168.77.10", str(p1.ip)]
        assert ip_dst.split(",") == ["192.168.77.11", str(p2.ip)]

    # EventRemoved: the peer becomes unreachable
    remove_kernel_vxlan_peer(lab, n1, vni=1, peer_subnet=NET2, peer_mac=mac2,
                             peer_public_ip=n2.underlay_ip)  # fmt: skip
    assert not lab.ping(p1, p2.ip, count=1, timeout_s=1)
    assert lab.bridge(n1, "fdb", "show", "dev", "flannel.1").count("dst") == 0


def test_kernel_hostgw_baseline(lab: Lab, two_nodes) -> None:
    n1, n2, p1, p2 = _two_pod_nodes(lab, two_nodes, mtu=1500)
    add_kernel_hostgw_route(lab, n1, NET2, n2.underlay_ip)
    add_kernel_hostgw_route(lab, n2, NET1, n1.underlay_ip)
    route = lab.ip_json(n1, "route", "show", str(NET2))[0]
    assert (route["gateway"], route["dev"]) == ("192.168.77.11", "eth0")
    assert lab.ping(p1, p2.ip)
    assert lab.ping(p2, p1.ip, size=1472, dont_fragment=True)


def test_close_removes_namespaces_and_processes(tmp_path: Path) -> None:
    lab = Lab()
    tag = lab.tag
    try:
        lab.add_underlay()
        n1 = lab.add_node("n1")
        lab.add_cni(n1, NET1)
        lab.add_pod(n1)
        sleeper = lab.spawn(n1, ["sleep", "300"], log=tmp_path / "sleep.log")
        # ignores SIGTERM, and so does the grandchild it forks
        stubborn = lab.spawn(n1, ["sh", "-c", "trap '' TERM; sleep 300; true"])
        cap = lab.capture(n1, "eth0", tmp_path / "x.pcap")
        procs = (sleeper, stubborn, cap)
        pids = [p.pid for p in procs]
        assert all(pid_alive(pid) for pid in pids)
        state = RunState.load(tag)
        assert state is not None and set(pids) <= set(state["pids"])
        assert sorted(n for n in list_netns() if n.startswith(tag + "-")) == sorted(lab.namespaces)
        assert len(lab.namespaces) == 3
        grandchildren = [m for m in _members(stubborn.pid) if m != stubborn.pid]
    finally:
        lab.close()
    lab.close()  # idempotent
    assert [n for n in list_netns() if n.startswith(tag + "-")] == []
    assert not any(pid_alive(pid) for pid in pids + grandchildren)
    assert all(p.returncode is not None for p in procs)
    assert RunState.load(tag) is None
    with pytest.raises(LabError):
        lab.add_netns("late")


def test_close_after_a_failure_midway() -> None:
    tag = None
    with pytest.raises(LabError), Lab() as lab:
        tag = lab.tag
        lab.add_underlay()
        lab.add_node("n1")
        lab.run("no-such-namespace-" + tag, "true")  # raises
    assert tag and [n for n in list_netns() if n.startswith(tag + "-")] == []


def test_cleanup_stale_removes_only_dead_runs() -> None:
    live, crashed = Lab(), Lab()
    try:
        live.add_netns("a")
        crashed.add_netns("a")
        ns_b = crashed.add_netns("b")
        leftover = crashed.spawn(ns_b, ["sh", "-c", "trap '' TERM; sleep 300; true"])
        time.sleep(0.2)
        inner = [m for m in _members(leftover.pid) if m != leftover.pid]
        # pretend the owner of `crashed` died: point its state at a dead pid
        dead = subprocess.Popen(["true"])
        dead.wait()
        state = json.loads(crashed._state.path.read_text())
        state["owner_pid"] = dead.pid
        crashed._state.path.write_text(json.dumps(state))

        assert Lab.cleanup_stale(live.tag) == []
        removed = Lab.cleanup_stale(crashed.tag)
        assert sorted(removed) == [f"{crashed.tag}-a", f"{crashed.tag}-b"]
        assert f"{live.tag}-a" in list_netns()
        assert not crashed._state.path.exists()
        assert not any(pid_alive(p) for p in [leftover.pid, *inner])
    finally:
        crashed.close()
        live.close()
    assert not [n for n in list_netns() if n.startswith((live.tag, crashed.tag))]
