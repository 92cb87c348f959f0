"""The userspace dataplane against the real thing: the Linux kernel's VXLAN and routing.

Topology (all in lab namespaces): nodes n1 (192.168.77.10) and n2 (.11) on an
underlay bridge, each with cni0 and one pod, as the CNI bridge plugin makes
them. The kernel peer is set up here with ip/bridge exactly as flanneld
would, not with weft's code.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from weft_helpers import iperf3_transfer, send_datagrams, start_weft, status

from control.lab.topology import (
    Lab,
    Node,
    Pod,
    add_kernel_hostgw_route,
    add_kernel_vxlan_peer,
    make_kernel_vxlan,
    wire_like,
)

NETWORK = "10.244.0.0/16"
SUBNET1 = "10.244.1.0/24"
SUBNET2 = "10.244.2.0/24"
WEFT_MAC = "02:77:00:00:00:01"
WEFT_MAC2 = "02:77:00:00:00:02"


def two_node_pods(lab: Lab, mtu: int) -> tuple[Node, Node, Pod, Pod]:
    lab.add_underlay()
    n1, n2 = lab.add_node("n1"), lab.add_node("n2")
    for node in (n1, n2):
        wire_like(lab, node)
    lab.add_cni(n1, SUBNET1, mtu=mtu)
    lab.add_cni(n2, SUBNET2, mtu=mtu)
    return n1, n2, lab.add_pod(n1), lab.add_pod(n2)


def weft_vxlan_args(node: Node, peer: Node, peer_mac: str, device: str = "tun") -> list[str]:
    return [
        "dataplane", "run", "--backend", "vxlan", "--device", device,
        "--network", NETWORK, "--subnet", SUBNET1, "--public-ip", str(node.underlay_ip),
        "--vtep-mac", WEFT_MAC, "--peer", f"{SUBNET2},{peer.underlay_ip},{peer_mac}",
    ]  # fmt: skip


def kernel_vxlan_node(lab: Lab, node: Node, weft_node: Node) -> str:
    mac = make_kernel_vxlan(lab, node, SUBNET2)
    add_kernel_vxlan_peer(
        lab, node, peer_subnet=SUBNET1, peer_mac=WEFT_MAC, peer_public_ip=weft_node.underlay_ip
    )
    return mac


@pytest.mark.parametrize("device", ["tun", "tap"])
def test_weft_vxlan_interoperates_with_kernel_vxlan(lab: Lab, tmp_path: Path, device: str) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    _, sock = start_weft(lab, n1, weft_vxlan_args(n1, n2, kmac, device), tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10), "pod1 → pod2 through weft → kernel"
    assert lab.ping(pod1, pod2.ip, count=5)
    assert lab.ping(pod2, pod1.ip, count=5), "pod2 → pod1 through kernel → weft"
    end = iperf3_transfer(lab, pod1, pod2)
    assert end["sum_received"]["bytes"] > 1_000_000
    end = iperf3_transfer(lab, pod2, pod1)
    assert end["sum_received"]["bytes"] > 1_000_000
    st = status(sock)
    assert st["device_kind"] == device
    assert st["counters"]["tx_packets"] > 0 and st["counters"]["rx_packets"] > 0
    # The device queue flannel's proxy needed under TCP bursts (a TUN's default is 500).
    assert lab.ip_json(n1, "link", "show", "dev", st["device"])[0]["txqlen"] == 1000


def test_tshark_decodes_weft_vxlan(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    start_weft(lab, n1, weft_vxlan_args(n1, n2, kmac), tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    pcap = tmp_path / "outer.pcap"
    cap = lab.capture(n2, "eth0", pcap, "udp port 8472")
    assert lab.ping(pod1, pod2.ip, count=3)
    lab.stop_capture(cap, pcap)
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", "udp.port==8472,vxlan",
         "-Y", f"ip.src=={n1.underlay_ip} && icmp",
         "-T", "fields", "-E", "separator=|",
         "-e", "vxlan.vni", "-e", "eth.src", "-e", "eth.dst", "-e", "ip.src", "-e", "ip.dst",
         "-e", "udp.dstport"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    rows = [line.split("|") for line in out.splitlines() if line]
    assert rows, "tshark found no weft VXLAN packets"
    vni, eth_src, eth_dst, ip_src, ip_dst, dport = rows[0]
    assert vni == "1"
    assert eth_src.split(",")[-1] == WEFT_MAC and eth_dst.split(",")[-1] == kmac
    assert ip_src.split(",") == [str(n1.underlay_ip), str(pod1.ip)]
    assert ip_dst.split(",") == [str(n2.underlay_ip), str(pod2.ip)]
    assert dport.split(",")[0] == "8472"


def test_two_weft_nodes_with_the_udp_backend(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1472)

    def args(node: Node, subnet: str, peer: Node, peer_subnet: str) -> list[str]:
        return [
            "dataplane", "run", "--backend", "udp", "--network", NETWORK, "--subnet", subnet,
            "--public-ip", str(node.underlay_ip), "--peer", f"{peer_subnet},{peer.underlay_ip}",
        ]  # fmt: skip

    _, s1 = start_weft(lab, n1, args(n1, SUBNET1, n2, SUBNET2), tmp_path, "n1")
    start_weft(lab, n2, args(n2, SUBNET2, n1, SUBNET1), tmp_path, "n2")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    assert lab.ping(pod2, pod1.ip, count=3)
    out = lab.ping_output(pod1, pod2.ip, count=1).stdout
    # TTL 64 from pod2, −1 by n2's kernel, −1 by each proxy (flannel: both ways), −1 by n1's kernel.
    assert "ttl=60" in out, out
    # A destination in the network that no node leases: ICMP net unreachable, from weft0's address.
    # The connected socket sees the ICMP as ENETUNREACH (101) on its next receive.
    udp_probe = lab.run(
        pod1, "python3", "-c",
        "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        "s.setsockopt(socket.IPPROTO_IP,11,1);"  # IP_RECVERR: report soft errors too
        "s.connect(('10.244.9.9',9));s.send(b'x');s.settimeout(5)\n"
        "try:\n s.recv(9)\nexcept OSError as e:\n print('errno', e.errno)",
        check=False,
    )  # fmt: skip
    assert "errno 101" in udp_probe.stdout, udp_probe
    end = iperf3_transfer(lab, pod1, pod2)
    assert end["sum_received"]["bytes"] > 1_000_000
    st = status(s1)
    assert st["device"] == "weft0" and st["device_mtu"] == 1472
    assert st["counters"]["drops"].get("no_route", 0) >= 1
    assert st["counters"]["icmp_sent"] >= 1


def test_weft_hostgw_with_a_kernel_hostgw_node(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1500)
    add_kernel_hostgw_route(lab, n2, SUBNET1, n1.underlay_ip)
    args = [
        "dataplane", "run", "--backend", "host-gw", "--network", NETWORK, "--subnet", SUBNET1,
        "--public-ip", str(n1.underlay_ip), "--peer", f"{SUBNET2},{n2.underlay_ip}",
        "--peer", "10.244.3.0/24,10.99.0.1",  # not on-link: must be refused, never routed
    ]  # fmt: skip
    _, sock = start_weft(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    assert lab.ping(pod1, pod2.ip, count=3)
    assert lab.ping(pod2, pod1.ip, count=3)
    assert not lab.ping(pod1, "10.244.3.5", count=2, timeout_s=3)
    st = status(sock)
    assert st["counters"]["drops"].get("not_onlink", 0) >= 2
    assert "not on a connected network" in (tmp_path / "n1.log").read_text()


def test_path_mtu_discovery_gets_frag_needed_from_weft(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1500)
    kmac = kernel_vxlan_node(lab, n2, n1)
    _, sock = start_weft(lab, n1, weft_vxlan_args(n1, n2, kmac), tmp_path, "n1")
    # Widen the TUN so the kernel hands weft packets that cannot fit the underlay.
    lab.ip(n1, "link", "set", "weft.1", "mtu", "1500")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    out = lab.ping_output(pod1, pod2.ip, count=2, size=1472, dont_fragment=True)
    text = out.stdout + out.stderr
    assert "mtu = 1450" in text or "mtu=1450" in text, text
    assert status(sock)["counters"]["drops"]["too_big"] >= 1
    assert lab.ping(pod1, pod2.ip, count=2, size=1422, dont_fragment=True)


def test_hostile_datagrams_are_counted_and_ping_keeps_passing(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    n3 = lab.add_node("n3")  # a stranger on the underlay
    kmac = kernel_vxlan_node(lab, n2, n1)
    _, sock = start_weft(lab, n1, weft_vxlan_args(n1, n2, kmac), tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", pod2.ns, "ping", "-n", "-i", "0.1", "-c", "40", "-W", "1",
         str(pod1.ip)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        rng = random.Random(1234)
        good_inner = bytes.fromhex("4500001c0001000040016fe30af402020af40102") + bytes(8)
        header = bytes.fromhex("0800000000000100")
        eth = bytes.fromhex(WEFT_MAC.replace(":", "")) + bytes.fromhex(kmac.replace(":", ""))
        frame = header + eth + b"\x08\x00" + good_inner
        junk = [os.urandom(rng.randrange(0, 200)) for _ in range(200)]
        junk += [frame[:i] for i in range(len(frame))]  # every truncation
        junk += [bytes.fromhex("0800000000000200") + frame[8:]] * 50  # wrong VNI
        junk += [bytes.fromhex("0c00000000000100") + frame[8:]] * 50  # GPE flags
        junk += [frame] * 50  # well-formed, but from a stranger
        send_datagrams(lab, n3.ns, str(n1.underlay_ip), 8472, junk)
        out, _ = pinger.communicate(timeout=30)
    finally:
        if pinger.poll() is None:
            pinger.kill()
    assert " 0% packet loss" in out, out
    drops = status(sock)["counters"]["drops"]
    for reason in ("truncated", "wrong_vni", "bad_flags", "unknown_source"):
        assert drops.get(reason, 0) > 0, (reason, drops)
    assert lab.ping(pod1, pod2.ip, count=3)
