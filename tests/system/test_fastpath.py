"""The fast paths (dataplane/io/fastpath.py and its modules) against the kernel and each other.

The kernel-interop scenario of test_dataplane_interop.py (a weft node and a
kernel VXLAN node made as flanneld makes it, pods on both, ping and iperf3
both ways) runs again with `--offload on` and `--offload off`, TUN and TAP;
then: the datagrams weft's GSO path puts on the wire are standard VXLAN with
valid checksums (tshark checks every one), path MTU discovery still works for
super-packets, two weft nodes (vxlan and udp) with the fast paths on, the
fallback when a path is switched off, and recvmmsg + UDP_GRO on a socket.

`WEFT_FASTPATH_BENCH=1 pytest -n 0 -s tests/system/test_fastpath.py -k bench` runs
the measurements behind the "Fast paths" section of docs/benchmarks.md
(no timing is asserted anywhere).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from weft_helpers import (
    MISSING_PATHS,
    OFFLOAD_ON,
    UDP_SEGMENT_NEEDS_TX_CSUM,
    WEFT,
    assert_paths_on,
    assert_super_packets_sent,
    drop_counters,
    drop_delta,
    iperf3_run,
    iperf3_transfer,
    needs_paths,
    nstat,
    one_backlog,
    send_over_tcp,
    send_udp_datagrams,
    start_weft,
    status,
    udp_datagram,
)

from control.lab.netns import in_netns
from control.lab.topology import Lab, Node, Pod, add_kernel_vxlan_peer, make_kernel_vxlan
from dataplane.io import batch, egress_tap, offloads
from dataplane.io.segment import UDP_SEGMENT

NETWORK = "10.244.0.0/16"
SUBNET1 = "10.244.1.0/24"
SUBNET2 = "10.244.2.0/24"
WEFT_MAC = "02:77:00:00:00:01"
WEFT_MAC2 = "02:77:00:00:00:02"
#: Every fast path of the vxlan and udp backends (packet_gso is host-gw's).
ALL_PATHS = [p for p in offloads.PATHS if p != "packet_gso"]


# -- helpers (the interop test's, with --offload and an environment) ----------------


def start(
    lab: Lab, node: Node, args: list[str], tmp: Path, name: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Path]:
    return start_weft(lab, node, args, tmp, name, env)


def underlay(lab: Lab, node: Node, *, gro: bool = False) -> None:
    """Checksums filled in on the node, as a NIC puts them on a wire (the interop
    tests' wire_like); with gro, also what the benchmark's wire setting does."""
    knobs = ["tx", "off"] + (["tso", "off", "gso", "off", "gro", "on"] if gro else [])
    lab.run(node, "ethtool", "-K", "eth0", *knobs)


def effective_gro(lab: Lab) -> None:
    """Make GRO on the nodes' eth0 actually happen: a veth hands packets to its
    peer's NAPI (where GRO runs) only when the sending end has no TSO
    (veth_skb_is_eligible_for_gro), and the sending ends here are the hub's."""
    for i in range(len(lab.nodes)):
        lab.run(lab.hub, "ethtool", "-K", f"vn{i}", "tso", "off")  # type: ignore[arg-type]


def two_node_pods(lab: Lab, mtu: int, *, gro: bool = False) -> tuple[Node, Node, Pod, Pod]:
    lab.add_underlay()
    n1, n2 = lab.add_node("n1"), lab.add_node("n2")
    for node in (n1, n2):
        underlay(lab, node, gro=gro)
    if gro:
        effective_gro(lab)
    lab.add_cni(n1, SUBNET1, mtu=mtu)
    lab.add_cni(n2, SUBNET2, mtu=mtu)
    return n1, n2, lab.add_pod(n1), lab.add_pod(n2)


def vxlan_args(
    node: Node, subnet: str, peer: Node, peer_subnet: str, own_mac: str, peer_mac: str,
    offload: str, device: str = "tun",
) -> list[str]:  # fmt: skip
    return [
        "dataplane", "run", "--backend", "vxlan", "--device", device,
        "--network", NETWORK, "--subnet", subnet, "--public-ip", str(node.underlay_ip),
        "--vtep-mac", own_mac, "--peer", f"{peer_subnet},{peer.underlay_ip},{peer_mac}",
        "--offload", offload,
    ]  # fmt: skip


def udp_args(node: Node, subnet: str, peer: Node, peer_subnet: str, offload: str) -> list[str]:
    return [
        "dataplane", "run", "--backend", "udp", "--network", NETWORK, "--subnet", subnet,
        "--public-ip", str(node.underlay_ip), "--peer", f"{peer_subnet},{peer.underlay_ip}",
        "--offload", offload,
    ]  # fmt: skip


def kernel_vxlan_node(lab: Lab, node: Node, weft_node: Node, subnet: str = SUBNET2) -> str:
    mac = make_kernel_vxlan(lab, node, subnet)
    add_kernel_vxlan_peer(
        lab, node, peer_subnet=SUBNET1, peer_mac=WEFT_MAC, peer_public_ip=weft_node.underlay_ip
    )
    return mac


def iperf3_bytes(lab: Lab, client: Pod, server: Pod, nbytes: str) -> dict[str, Any]:
    """One TCP iperf3 transfer of `nbytes` (e.g. "4M") from client to server."""
    return iperf3_run(lab, client, server, ["-n", nbytes], want="sum_received", timeout=60)


# Why a sender retransmitted: a probe at the tail, a timeout, a loss inferred from
# SACKs, or reordering seen; and whether the receiver saw segments out of order.
SENDER_TCP = (
    "TcpExtTCPLossProbes", "TcpExtTCPTimeouts", "TcpExtTCPSpuriousRTOs", "TcpExtTCPFastRetrans",
    "TcpExtTCPSlowStartRetrans", "TcpExtTCPLostRetransmit", "TcpExtTCPDSACKRecv",
    "TcpExtTCPSACKReorder", "TcpExtTCPTSReorder", "TcpExtTCPRenoReorder",
)  # fmt: skip
RECEIVER_TCP = ("TcpExtTCPOFOQueue", "TcpExtTCPDSACKOldSent", "TcpExtTCPDSACKOfoSent")


def assert_no_retransmits(lab: Lab, client: Pod, server: Pod, nbytes: str) -> None:
    """A TCP transfer with no segment sent twice (the client's sends in one backlog:
    one_backlog); if one was, the message says which drop counters in the lab moved
    meanwhile and what the two ends' TCP counted."""
    one_backlog(lab, client)
    before = drop_counters(lab), nstat(lab, client, *SENDER_TCP), nstat(lab, server, *RECEIVER_TCP)
    end = iperf3_bytes(lab, client, server, nbytes)
    retransmits = end["sum_sent"].get("retransmits", 0)
    drops = drop_delta(before[0], drop_counters(lab))
    sender = drop_delta(before[1], nstat(lab, client, *SENDER_TCP))
    receiver = drop_delta(before[2], nstat(lab, server, *RECEIVER_TCP))
    assert retransmits == 0, (
        f"{retransmits} retransmits; drop counters that moved: {drops}; "
        f"sender TCP: {sender}; receiver TCP: {receiver}"
    )


# -- the kernel-interop scenario, fast paths on and off -----------------------------


@pytest.mark.parametrize("device", ["tun", "tap"])
@pytest.mark.parametrize("offload", [OFFLOAD_ON, "off"])
def test_kernel_interop(lab: Lab, tmp_path: Path, offload: str, device: str) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, offload, device)
    _, sock = start(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10), "pod1 → pod2 through weft → kernel"
    assert lab.ping(pod1, pod2.ip, count=5)
    assert lab.ping(pod2, pod1.ip, count=5), "pod2 → pod1 through kernel → weft"
    before = nstat(lab, pod2, "TcpInCsumErrors", "TcpExtTCPCsumErrors")
    end = iperf3_transfer(lab, pod1, pod2)
    assert end["sum_received"]["bytes"] > 1_000_000
    assert nstat(lab, pod2, "TcpInCsumErrors", "TcpExtTCPCsumErrors") == before
    end = iperf3_transfer(lab, pod2, pod1)
    assert end["sum_received"]["bytes"] > 1_000_000
    st = status(sock)
    assert st["device_kind"] == device
    c = st["counters"]
    assert c["tx_packets"] > 0 and c["rx_packets"] > 0
    assert not {"write_failed", "send_failed", "truncated"} & set(c["drops"]), c["drops"]
    off = st["offload"]
    assert off["mode"] == offload
    for source in ("device", "network"):  # the runner's batch counters, kept by both engines
        assert st["counters"]["batches"][source]["packets"] > 0
    if offload != "off":
        assert_paths_on(off["on"], ALL_PATHS)
        assert set(off["off"]) == {"packet_gso", *MISSING_PATHS, *set(ALL_PATHS) - set(off["on"])}
        fc = off["counters"]
        # pod1's TCP handed weft super-packets and the kernel cut them up (or weft,
        # on kernels without UDP-tunnel GSO) …
        assert_super_packets_sent(off)
        if "tunnel_gso" in off["on"]:
            assert fc["gso_segments"] > 2 * fc["gso_sends"]
        # … and datagrams were received in batches (no GRO on this underlay: one
        # datagram per message, delivered one by one; see test_two_weft_nodes).
        assert fc["rx_calls"] > 0 and fc["rx_messages"] > fc["rx_calls"]
        assert fc["rx_segments"] == fc["rx_messages"]
    else:
        assert off["on"] == [] and set(off["off"]) == set(offloads.PATHS)
        links = {link["ifname"] for link in lab.ip_json(n1, "link", "show")}
        assert egress_tap.egress_name("weft.1") not in links


@needs_paths("tunnel_gso")  # the fallback's datagrams: test_fastpath_tx.py
def test_gso_datagrams_on_the_wire_are_standard_vxlan(lab: Lab, tmp_path: Path) -> None:
    """Every frame weft's GSO path sends: at most 1514 bytes, VNI 1 to port 8472,
    weft's VtepMAC to the kernel's, and valid outer IP/UDP and inner IP/TCP
    checksums (tshark recomputes them; the kernel peer would drop bad ones)."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on")
    _, sock = start(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    pcap = tmp_path / "outer.pcap"
    cap = lab.capture(n2, "eth0", pcap, f"udp port 8472 and src host {n1.underlay_ip}")
    # Every byte read by the receiving pod (an iperf3 client can end while some of
    # its data is still unsent: the capture then held ~900 of ~2,200 segments).
    data = os.urandom(3 << 20)
    assert send_over_tcp(pod1, pod2, data) == data
    time.sleep(1)  # let tcpdump drain its ring before SIGTERM
    lab.stop(cap)
    assert status(sock)["offload"]["counters"]["gso_sends"] > 0
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", "udp.port==8472,vxlan",
         "-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
         "-o", "tcp.check_checksum:TRUE",
         "-T", "fields", "-E", "separator=|", "-e", "frame.len", "-e", "vxlan.vni",
         "-e", "udp.dstport", "-e", "eth.src", "-e", "eth.dst", "-e", "ip.checksum.status",
         "-e", "udp.checksum.status", "-e", "tcp.checksum.status", "-e", "tcp.len"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    rows = [line.split("|") for line in out.splitlines() if line]
    data = [r for r in rows if r[8] and int(r[8]) > 0]
    assert len(data) > 1000, f"only {len(data)} data segments captured"
    for length, vni, dport, eth_src, eth_dst, ip_ok, udp_ok, tcp_ok, _ in rows:
        assert int(length) <= 1514
        assert vni == "1" and dport.split(",")[0] == "8472"
        assert eth_src.split(",")[-1] == WEFT_MAC and eth_dst.split(",")[-1] == kmac
        # 1 = good; both IP headers (outer, inner) and the outer UDP checksum.
        assert set(ip_ok.split(",")) == {"1"} and udp_ok.split(",")[0] == "1", (ip_ok, udp_ok)
        assert tcp_ok == "1"
    # Full-size segments: the inner IP packets fill the 1450-byte pod MTU.
    assert max(int(r[0]) for r in rows) == 1514


def check_udp_burst(lab: Lab, pod1: Pod, pod2: Pod, sock: Path, count: int, size: int) -> None:
    """send_udp_datagrams through weft's uso_read path: every datagram arrives, in
    order and byte-exact, with no UDP checksum error at the pod, and weft read
    most of them in UDP super-packets (uso_sends). How many datagrams GRO glues
    into one depends on the kernel and machine: tens on the machine these tests
    were written on, 2-3 on a slower one (session 11), where 80-94 % of the
    datagrams still came merged."""
    before = status(sock)["offload"]["counters"]
    got = send_udp_datagrams(pod1, pod2, count, size)
    assert len(got) == count, f"{len(got)} of {count} datagrams arrived"
    assert got == [udp_datagram(i, size) for i in range(count)]
    assert nstat(lab, pod2, "UdpInCsumErrors", "UdpInErrors") == {
        "UdpInCsumErrors": 0, "UdpInErrors": 0,
    }  # fmt: skip
    after = status(sock)["offload"]["counters"]
    sends = after["uso_sends"] - before["uso_sends"]
    segments = sum(after[k] - before[k] for k in ("gso_segments", "split_segments"))
    assert sends > 0 and segments >= count // 2, (sends, segments)


@needs_paths("uso_read", "tunnel_gso")
@pytest.mark.parametrize(
    ("size", "send"),
    [(18, "tap"), (64, "tap"), (1000, "tap"), (64, "split"), (1001, "split"), (64, "l2-device")],
)
def test_udp_super_packets_from_gro_forwarding_leave_as_standard_vxlan(
    lab: Lab, tmp_path: Path, size: int, send: str
) -> None:
    """A pod's small UDP datagrams merged by GRO forwarding on its veth reach weft as
    UDP super-packets (uso_read); each leaves whole through the egress TAP and the
    kernel cuts it into one standard VXLAN datagram per pod datagram (or, without
    the TAP, weft cuts it and sends one UDP_SEGMENT sendmsg): a kernel VXLAN peer
    takes them all, and on the wire every frame holds one inner UDP datagram of
    the pod's size, with valid inner and outer checksums. l2-device: weft's pod
    device is a TAP (`--device tap`), whose frames carry an Ethernet header."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    lab.udp_gro_forwarding(pod1)
    kmac = kernel_vxlan_node(lab, n2, n1)
    device = "tap" if send == "l2-device" else "tun"
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "auto", device)
    env = {offloads.DISABLE_ENV: "tunnel_gso"} if send == "split" else None
    _, sock = start(lab, n1, args, tmp_path, "n1", env)
    on = status(sock)["offload"]["on"]
    assert "uso_read" in on and ("tunnel_gso" in on) == (send != "split")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    pcap = tmp_path / "outer.pcap"
    cap = lab.capture(n2, "eth0", pcap, f"udp port 8472 and src host {n1.underlay_ip}")
    check_udp_burst(lab, pod1, pod2, sock, 3000, size)
    time.sleep(1)  # let tcpdump drain its ring before SIGTERM
    lab.stop(cap)
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", "udp.port==8472,vxlan",
         "-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
         "-T", "fields", "-E", "separator=|", "-e", "vxlan.vni", "-e", "eth.dst",
         "-e", "ip.checksum.status", "-e", "udp.checksum.status", "-e", "udp.length"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    rows = [line.split("|") for line in out.splitlines() if line]
    inner = [r for r in rows if len(r[4].split(",")) == 2 and r[4].split(",")[1] == str(8 + size)]
    assert len(inner) >= 3000, f"only {len(inner)} inner datagrams of {size} bytes captured"
    for vni, eth_dst, ip_ok, udp_ok, _ in inner:
        assert vni == "1" and eth_dst.split(",")[-1] == kmac
        assert set(ip_ok.split(",")) == {"1"} and set(udp_ok.split(",")) == {"1"}, (ip_ok, udp_ok)


@pytest.mark.parametrize("send", ["tap", "split"])
def test_a_pod_sending_with_udp_segment_is_cut_into_its_datagrams(
    lab: Lab, tmp_path: Path, send: str
) -> None:
    """A pod that sends with UDP_SEGMENT itself (QUIC stacks do), no GRO on the way:
    its UDP GSO packets reach weft whole (uso_read) and arrive as the datagrams the
    pod meant, each with a valid checksum, last one shorter. (Without uso_read,
    before Linux 6.2, the kernel cuts them before the device: they arrive all the same.)"""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "auto")
    env = {offloads.DISABLE_ENV: "tunnel_gso"} if send == "split" else None
    _, sock = start(lab, n1, args, tmp_path, "n1", env)
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    with in_netns(pod2.ns):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(pod1.ns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind((str(pod2.ip), 7002))
        rx.settimeout(5)
        data = bytes(i * 7 & 0xFF for i in range(20 * 1200 + 345))
        tx.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, 1200)
        for _ in range(3):
            tx.sendto(data, (str(pod2.ip), 7002))
        got = [rx.recv(65536) for _ in range(3 * 21)]
    finally:
        tx.close()
        rx.close()
    want = [data[i : i + 1200] for i in range(0, len(data), 1200)]
    assert got == want * 3
    assert nstat(lab, pod2, "UdpInCsumErrors") == {"UdpInCsumErrors": 0}
    uso_sends = status(sock)["offload"]["counters"]["uso_sends"]
    assert uso_sends == 0 if "uso_read" in MISSING_PATHS else uso_sends >= 3


@needs_paths("uso_read", "uso_write")
@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_udp_super_packets_between_weft_nodes(lab: Lab, tmp_path: Path, backend: str) -> None:
    """uso_read on both backends, weft to weft: the receiving weft takes the datagrams
    with UDP GRO and writes them to its pod as UDP GSO (uso_write)."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450 if backend == "vxlan" else 1472, gro=True)
    lab.udp_gro_forwarding(pod1)
    socks = []
    for node, subnet, peer, peer_subnet, own, other in (
        (n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2),
        (n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC),
    ):
        if backend == "vxlan":
            args = vxlan_args(node, subnet, peer, peer_subnet, own, other, "on")
        else:
            args = udp_args(node, subnet, peer, peer_subnet, "on")
        socks.append(start(lab, node, args, tmp_path, node.name)[1])
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    check_udp_burst(lab, pod1, pod2, socks[0], 3000, 64)
    assert status(socks[1])["offload"]["counters"]["uso_writes"] > 0


def test_path_mtu_discovery_with_super_packets(lab: Lab, tmp_path: Path) -> None:
    """A pod whose route allows 1500 bytes: weft gets super-packets whose segments
    do not fit the underlay, answers frag-needed (mtu 1450), and TCP goes on with
    smaller segments."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1500)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, OFFLOAD_ON)
    _, sock = start(lab, n1, args, tmp_path, "n1")
    lab.ip(n1, "link", "set", "weft.1", "mtu", "1500")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    out = lab.ping_output(pod1, pod2.ip, count=2, size=1472, dont_fragment=True)
    assert "mtu = 1450" in out.stdout + out.stderr or "mtu=1450" in out.stdout + out.stderr
    end = iperf3_transfer(lab, pod1, pod2)
    assert end["sum_received"]["bytes"] > 1_000_000
    st = status(sock)
    assert st["counters"]["drops"]["too_big"] >= 1
    assert st["counters"]["icmp_sent"] >= 1
    fc = st["offload"]["counters"]
    assert fc["gso_sends"] + fc["split_packets"] > 0  # super-packets, sent whole or cut


@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_two_weft_nodes(lab: Lab, tmp_path: Path, backend: str) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450 if backend == "vxlan" else 1472, gro=True)
    if backend == "vxlan":
        a1 = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2, OFFLOAD_ON)
        a2 = vxlan_args(n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC, OFFLOAD_ON)
    else:
        a1 = udp_args(n1, SUBNET1, n2, SUBNET2, OFFLOAD_ON)
        a2 = udp_args(n2, SUBNET2, n1, SUBNET1, OFFLOAD_ON)
    _, s1 = start(lab, n1, a1, tmp_path, "n1")
    _, s2 = start(lab, n2, a2, tmp_path, "n2")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    assert lab.ping(pod2, pod1.ip, count=3)
    before = nstat(lab, pod2, "TcpInCsumErrors")
    end = iperf3_transfer(lab, pod1, pod2)
    assert end["sum_received"]["bytes"] > 1_000_000
    assert nstat(lab, pod2, "TcpInCsumErrors") == before
    end = iperf3_transfer(lab, pod2, pod1)
    assert end["sum_received"]["bytes"] > 1_000_000
    for sock in (s1, s2):
        st = status(sock)
        fc = st["offload"]["counters"]
        assert_paths_on(st["offload"]["on"], ALL_PATHS)
        assert_super_packets_sent(st["offload"])
        assert fc["gso_writes"] > 0
        # With GRO effective on eth0, the kernel glued datagrams: fewer messages (not
        # where the sender, its UDP_SEGMENT refused, sends them one by one: a veth's
        # NAPI then polls each alone).
        assert fc["rx_segments"] > fc["rx_messages"] or UDP_SEGMENT_NEEDS_TX_CSUM
        assert not {"write_failed", "send_failed"} & set(st["counters"]["drops"])


@needs_paths("tunnel_gso")
def test_a_forward_policy_of_drop_does_not_drop_the_gso_datagrams(lab: Lab, tmp_path: Path) -> None:
    """The kernel forwards what weft writes to the egress TAP; with Docker's FORWARD
    policy DROP (and flannel's ACCEPT rules for the pod network) weft's own ACCEPT
    rule for the TAP lets them through, and goes when weft stops."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    lab.run(n1, "iptables", "-P", "FORWARD", "DROP")
    for flag in ("-s", "-d"):
        lab.run(n1, "iptables", "-A", "FORWARD", flag, NETWORK, "-j", "ACCEPT")
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on")
    proc, sock = start(lab, n1, args, tmp_path, "n1")
    tap = egress_tap.egress_name("weft.1")
    assert f"-A FORWARD -i {tap} -j ACCEPT" in lab.run(n1, "iptables", "-S", "FORWARD").stdout
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    assert_no_retransmits(lab, pod1, pod2, "4M")
    assert status(sock)["offload"]["counters"]["gso_sends"] > 0
    lab.stop(proc)
    assert tap not in lab.run(n1, "iptables", "-S", "FORWARD").stdout


@needs_paths("tunnel_gso")
@pytest.mark.parametrize("rp_filter", [1, 2])
def test_reverse_path_filtering_leaves_the_send_fast_path_off(
    lab: Lab, tmp_path: Path, rp_filter: int
) -> None:
    """rp_filter is max(all, device), so the TAP's own 0 does not win over all=1 or 2,
    and either mode drops frames from our own address coming in on an address-less
    TAP. The probe leaves the egress TAP off (super-packets are cut in userspace and
    go through the socket), and `--offload on` refuses to start."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    lab.sysctl(n1, "net.ipv4.conf.all.rp_filter", rp_filter)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "auto")
    proc, sock = start(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    assert_no_retransmits(lab, pod1, pod2, "4M")
    off = status(sock)["offload"]
    assert f"rp_filter={rp_filter}" in off["off"]["tunnel_gso"]
    assert off["on"] == [p for p in ALL_PATHS if p != "tunnel_gso"]
    assert off["counters"]["gso_sends"] == 0 and off["counters"]["split_packets"] > 0
    lab.stop(proc)
    with pytest.raises(AssertionError, match=f"rp_filter={rp_filter}"):
        start(lab, n1, [*args[:-1], "on"], tmp_path, "n1-on")


@pytest.mark.parametrize(
    ("disable", "left_on"),
    [
        (
            "tunnel_gso,udp_gro",
            [
                "tso_read",
                "uso_read",
                "udp_segment",
                "tx_batch",
                "recvmmsg",
                "gso_write",
                "gso_datagrams",
                "uso_write",
            ],
        ),
        ("recvmmsg,gso_write", ["tso_read", "tunnel_gso", "uso_read", "udp_segment", "tx_batch"]),
        (
            "tso_read",
            [
                "udp_segment",
                "tx_batch",
                "udp_gro",
                "recvmmsg",
                "gso_write",
                "gso_datagrams",
                "uso_write",
            ],
        ),
    ],
)
def test_a_path_switched_off_falls_back_and_says_so(
    lab: Lab, tmp_path: Path, disable: str, left_on: list[str]
) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "auto")
    _, sock = start(lab, n1, args, tmp_path, "n1", env={offloads.DISABLE_ENV: disable})
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    assert lab.ping(pod2, pod1.ip, count=3)
    end = iperf3_transfer(lab, pod1, pod2)
    assert end["sum_received"]["bytes"] > 1_000_000
    end = iperf3_transfer(lab, pod2, pod1)
    assert end["sum_received"]["bytes"] > 1_000_000
    off = status(sock)["offload"]
    assert_paths_on(off["on"], left_on)
    for path in disable.split(","):
        assert "WEFT_OFFLOAD_DISABLE" in off["off"][path]
    log = (tmp_path / "n1.log").read_text()
    at_start = [p for p in left_on if p not in MISSING_PATHS]
    assert log.count(f"fast paths on: {', '.join(at_start)}") == 1
    if "tunnel_gso" not in left_on:
        assert off["counters"]["gso_sends"] == 0
    if "tso_read" in left_on and "tunnel_gso" not in left_on:
        assert off["counters"]["split_packets"] > 0  # cut in userspace
    if "tso_read" not in left_on:
        assert off["counters"]["split_packets"] == 0
        assert "fast path tunnel_gso off: used only with tso_read" in log
    if "recvmmsg" not in left_on:
        assert off["counters"]["rx_calls"] == 0
        assert "fast path udp_gro off: needs recvmmsg" in log
        if "uso_write" not in MISSING_PATHS:  # else the kernel's refusal is the reason
            assert "fast path uso_write off: needs recvmmsg" in log


@pytest.mark.skipif(not MISSING_PATHS, reason="this kernel has every fast path")
def test_offload_on_is_refused_with_one_line_on_a_kernel_without_a_path(
    lab: Lab, tmp_path: Path
) -> None:
    """`--offload on` wants every fast path: on a kernel without one (before 6.17:
    no UDP-tunnel GSO) weft does not start, and says which path and why."""
    n1, n2, _pod1, _pod2 = two_node_pods(lab, mtu=1450)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2, "on")
    cp = lab.run(n1, *WEFT, *args, check=False)
    assert cp.returncode == 1
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weft: error: --offload on: "), cp.stderr
    assert any(f"--offload on: {p}: " in lines[0] for p in MISSING_PATHS), lines[0]


def test_recvmmsg_with_udp_gro_on_a_socket(lab: Lab) -> None:
    """MmsgReceiver: lengths, sources, ports, a GRO segment size from the cmsg,
    truncation; in a lab namespace's loopback."""
    ns = lab.add_netns("rx")
    with in_netns(ns):
        rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rx_sock.bind(("127.0.0.1", 0))
            rx_sock.setblocking(False)
            batch.enable_udp_gro(rx_sock)
            tx.bind(("127.0.0.1", 0))
            dst = rx_sock.getsockname()
            receiver = batch.MmsgReceiver(slots=4, slot_size=4096)
            assert receiver.receive(rx_sock.fileno()) == 0  # nothing queued: no error
            tx.sendto(b"a" * 100, dst)
            tx.sendto(b"b" * 5000, dst)  # bigger than a slot
            # UDP GSO on loopback arrives as one message of 3 × 1000 bytes.
            tx.setsockopt(batch.SOL_UDP, batch.UDP_SEGMENT, 1000)
            tx.sendto(b"c" * 2500, dst)
            time.sleep(0.2)
            n = receiver.receive(rx_sock.fileno())
            assert n == 3
            assert receiver.sources == ["127.0.0.1"] * 3
            assert receiver.ports == [tx.getsockname()[1]] * 3
            assert receiver.lengths[0] == 100 and receiver.segment_sizes[0] == 100
            assert receiver.truncated == [False, True, False]
            assert receiver.lengths[2] == 2500 and receiver.segment_sizes[2] == 1000
            off = receiver.offsets[2]
            assert bytes(receiver.buf[off : off + 2500]) == b"c" * 2500
            assert receiver.receive(rx_sock.fileno()) == 0
            # One at a time: a plain datagram leaves its slot's control length at 0,
            # which must be reset before the next call, or a GRO size goes missing.
            for _ in range(2):
                tx.setsockopt(batch.SOL_UDP, batch.UDP_SEGMENT, 0)
                tx.sendto(b"d" * 100, dst)
                time.sleep(0.05)
                assert receiver.receive(rx_sock.fileno()) == 1
                assert receiver.segment_sizes == [100] and receiver.lengths == [100]
                tx.setsockopt(batch.SOL_UDP, batch.UDP_SEGMENT, 1000)
                tx.sendto(b"e" * 2500, dst)
                time.sleep(0.05)
                assert receiver.receive(rx_sock.fileno()) == 1
                assert receiver.segment_sizes == [1000] and receiver.lengths == [2500]
            # receive_one (Python's recvmsg_into, into slot 0): the same fields.
            tx.setsockopt(batch.SOL_UDP, batch.UDP_SEGMENT, 0)
            tx.sendto(b"b" * 5000, dst)
            tx.setsockopt(batch.SOL_UDP, batch.UDP_SEGMENT, 1000)
            tx.sendto(b"c" * 2500, dst)
            time.sleep(0.2)
            assert receiver.receive_one(rx_sock) == 1
            assert receiver.truncated == [True] and receiver.ports == [tx.getsockname()[1]]
            assert receiver.receive_one(rx_sock) == 1
            assert receiver.lengths == [2500] and receiver.segment_sizes == [1000]
            assert receiver.sources == ["127.0.0.1"] and receiver.truncated == [False]
            off = receiver.offsets[0]
            assert bytes(receiver.buf[off : off + 2500]) == b"c" * 2500
            assert receiver.receive_one(rx_sock) == 0
            assert receiver.receive(rx_sock.fileno()) == 0
        finally:
            rx_sock.close()
            tx.close()


# -- measurements (opt-in) -----------------------------------------------------------

BENCH = os.environ.get("WEFT_FASTPATH_BENCH")


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class BenchLab:
    """Two nodes with one pod each; n1 → n2 is the measured direction."""

    def __init__(
        self, kind: str, offload: str, tmp: Path, disable: str = "", *, gro: bool = True
    ) -> None:
        self.kind, self.offload, self.gro = kind, offload, gro
        self.lab = Lab()
        self.pids: list[int] = []
        try:
            self._build(tmp, disable)
        except BaseException:
            self.lab.close()
            raise

    def _build(self, tmp: Path, disable: str) -> None:
        lab = self.lab
        n1, n2, self.pod1, self.pod2 = two_node_pods(lab, mtu=1450, gro=self.gro)
        sender, receiver = self.kind.split("-")  # kernel|weft - kernel|weft
        env = {offloads.DISABLE_ENV: disable} if disable else None
        macs = {}
        for node, what, subnet, mac in (
            (n1, sender, SUBNET1, WEFT_MAC),
            (n2, receiver, SUBNET2, WEFT_MAC2),
        ):
            macs[node.name] = make_kernel_vxlan(lab, node, subnet) if what == "kernel" else mac
        for node, what, subnet, peer, peer_subnet in (
            (n1, sender, SUBNET1, n2, SUBNET2),
            (n2, receiver, SUBNET2, n1, SUBNET1),
        ):
            if what == "kernel":
                add_kernel_vxlan_peer(
                    lab, node, peer_subnet=peer_subnet, peer_mac=macs[peer.name],
                    peer_public_ip=peer.underlay_ip,
                )  # fmt: skip
                continue
            args = vxlan_args(
                node, subnet, peer, peer_subnet, macs[node.name], macs[peer.name], self.offload
            )
            proc, _ = start(lab, node, args, tmp, f"{lab.tag}-{node.name}", env=env)
            self.pids.append(proc.pid)
        for a, b in ((self.pod1, self.pod2), (self.pod2, self.pod1)):
            assert lab.wait_ping(a, b.ip, timeout_s=15)
        self.server = lab.spawn(self.pod2, ["iperf3", "-s"])
        time.sleep(0.3)

    def tcp1(self, seconds: float) -> tuple[float, float, int, float]:
        """(Gbit/s received, weft CPU seconds per GB, retransmits, the user-space share
        of that CPU) for one stream."""
        before = [_cpu_seconds(p) for p in self.pids]
        cp = self.lab.run(
            self.pod1, "iperf3", "-c", str(self.pod2.ip), "-t", str(seconds), "-J",
            check=False, timeout=seconds + 30,
        )  # fmt: skip
        after = [_cpu_seconds(p) for p in self.pids]
        user = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
        system = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
        end = json.loads(cp.stdout)["end"]
        nbytes = end["sum_received"]["bytes"]
        return (
            end["sum_received"]["bits_per_second"] / 1e9,
            (user + system) / (nbytes / 1e9) if nbytes else 0.0,
            end["sum_sent"].get("retransmits", 0),
            user / (user + system) if user + system else 0.0,
        )

    def close(self) -> None:
        self.lab.close()


@pytest.mark.skipif(not BENCH, reason="opt-in measurement: WEFT_FASTPATH_BENCH=1")
def test_bench_fast_paths(tmp_path: Path) -> None:
    """kernel↔kernel, weft→kernel, kernel→weft and weft↔weft, one TCP stream, each weft
    mode with the fast paths off, each technique added, and all on; round-robin
    repeats so background load hits every mode alike. Prints a Markdown table and
    writes JSON to WEFT_FASTPATH_BENCH_OUT (default: the test's tmp dir)."""
    seconds = float(os.environ.get("WEFT_FASTPATH_BENCH_SECONDS", "5"))
    # 0: the interop tests' underlay (tx off only; GRO off, so one datagram per read).
    gro = os.environ.get("WEFT_FASTPATH_BENCH_GRO", "1") != "0"
    repeat = int(os.environ.get("WEFT_FASTPATH_BENCH_REPEAT", "3"))
    configs = [("kernel-kernel", "off", "")]
    for kind in ("weft-kernel", "kernel-weft", "weft-weft"):
        configs.append((kind, "off", ""))
        if kind != "kernel-weft":  # the send path: TSO + tunnel GSO only
            configs.append((kind, "auto", "udp_gro,recvmmsg,gso_write"))
        if kind != "weft-kernel":  # the receive path, one technique at a time
            configs.append((kind, "auto", "tso_read,tunnel_gso,udp_gro,gso_write"))
            configs.append((kind, "auto", "tso_read,tunnel_gso,gso_write"))
            configs.append((kind, "auto", "tso_read,tunnel_gso"))
        configs.append((kind, "on", ""))
    labs: dict[tuple[str, str, str], BenchLab] = {}
    results: dict[tuple[str, str, str], list[tuple[float, float, int, float]]] = {}
    try:
        for config in configs:
            labs[config] = BenchLab(*config[:2], tmp_path, config[2], gro=gro)
        for _ in range(repeat):
            for config, bl in labs.items():
                results.setdefault(config, []).append(bl.tcp1(seconds))
    finally:
        for bl in labs.values():
            bl.close()
    base = statistics.median(r[0] for r in results[("kernel-kernel", "off", "")])
    lines = [
        "| n1 → n2 | weft fast paths | Gbit/s (median, min–max) | ÷ kernel↔kernel "
        "| weft CPU s/GB (user share) | retransmits |",
        "|---|---|---|---|---|---|",
    ]
    out = []
    for (kind, offload, disable), rs in results.items():
        gbit = [r[0] for r in rs]
        on = [p for p in ALL_PATHS if p not in disable.split(",")] if offload != "off" else []
        label = (
            "off" if offload == "off" else ("all" if len(on) == len(ALL_PATHS) else "+".join(on))
        )
        med = statistics.median(gbit)
        cpu = statistics.median(r[1] for r in rs)
        user = statistics.median(r[3] for r in rs)
        lines.append(
            f"| {kind.replace('-', ' → ')} | {label if 'weft' in kind else '–'} | {med:.2f} "
            f"({min(gbit):.2f}–{max(gbit):.2f}) | {med / base:.2f}× | "
            f"{cpu:.1f} ({user:.0%}) | {sum(r[2] for r in rs)} |"
        )
        out.append({"kind": kind, "offload": offload, "disabled": disable, "runs": rs})
    table = "\n".join(lines)
    setting = "wire + effective GRO" if gro else "tx off only (no GRO)"
    print(f"\none TCP stream, {setting}, {repeat} × {seconds:.0f} s, load {os.getloadavg()}")
    print(table)
    dest = Path(os.environ.get("WEFT_FASTPATH_BENCH_OUT", tmp_path / "bench.json"))
    meta = {"seconds": seconds, "repeat": repeat, "gro": gro, "load": os.getloadavg()}
    dest.write_text(json.dumps({**meta, "results": out}, indent=1))
    (dest.with_suffix(".md")).write_text(table + "\n")
    assert sys.version_info  # nothing to assert: a measurement
