"""host-gw's fast path (dataplane/io/packet_gso.py) on real devices: weft on n1 reads
TCP super-packets from its TUN and hands them, with their vnet header, to an
AF_PACKET socket on an underlay without TSO or checksum offload, so the kernel
cuts and checksums them in software. The peer is a second weft node or a kernel
host-gw route (flanneld's own host-gw: `ip route <subnet> via <PublicIP>`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from test_fastpath import (
    NETWORK,
    SUBNET1,
    SUBNET2,
    check_udp_burst,
    nstat,
    start,
    two_node_pods,
)
from weft_helpers import MISSING_PATHS, OFFLOAD_ON, UDP_PORT, needs_paths, send_over_tcp, status

from control.lab.netns import in_netns
from control.lab.topology import Lab, Node, Pod, add_kernel_hostgw_route


def hostgw_args(node: Node, subnet: str, peer: Node, peer_subnet: str, offload: str) -> list[str]:
    return [
        "dataplane", "run", "--backend", "host-gw", "--network", NETWORK, "--subnet", subnet,
        "--public-ip", str(node.underlay_ip), "--peer", f"{peer_subnet},{peer.underlay_ip}",
        "--offload", offload,
    ]  # fmt: skip


def wire_frames(lab: Lab, node: Node) -> tuple[int, int]:
    """(bytes, packets) node's eth0 has sent."""
    stats = lab.link_stats(node, "eth0")["eth0"]["tx"]
    return int(stats["bytes"]), int(stats["packets"])


def udp_datagrams(sender: Pod, receiver: Pod, payloads: list[bytes]) -> list[bytes]:
    """Each payload from `sender` to `receiver` (one at a time: none may be lost)."""
    with in_netns(receiver.ns):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("0.0.0.0", UDP_PORT))
    with in_netns(sender.ns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got = []
    try:
        rx.settimeout(5)
        for p in payloads:
            tx.sendto(p, (str(receiver.ip), UDP_PORT))
            got.append(rx.recv(65536))
    finally:
        rx.close()
        tx.close()
    return got


@pytest.mark.parametrize("offload", [OFFLOAD_ON, "off"])
@pytest.mark.parametrize("peer", ["weft", "kernel"])
def test_hostgw_sends_super_packets_whole_and_the_wire_sees_mtu_frames(
    lab: Lab, tmp_path: Path, peer: str, offload: str
) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1500, gro=True)
    if peer == "kernel":
        add_kernel_hostgw_route(lab, n2, SUBNET1, n1.underlay_ip)
    else:
        start(lab, n2, hostgw_args(n2, SUBNET2, n1, SUBNET1, offload), tmp_path, "n2")
    _, sock = start(lab, n1, hostgw_args(n1, SUBNET1, n2, SUBNET2, offload), tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    before = nstat(lab, pod2, "TcpInCsumErrors", "UdpInCsumErrors", "UdpInErrors")
    sent_before = wire_frames(lab, n1)
    data = os.urandom(16 << 20)
    assert send_over_tcp(pod1, pod2, data) == data  # every byte, in order
    after = wire_frames(lab, n1)
    sent_bytes, sent_frames = after[0] - sent_before[0], after[1] - sent_before[1]
    # What left n1's eth0 were MTU-sized frames (Ethernet header included).
    assert sent_bytes > len(data) and sent_bytes / sent_frames <= 1514
    assert sent_frames >= len(data) // 1448
    # UDP whose checksum the pod left to offload (NEEDS_CSUM): completed on the way.
    payloads = [os.urandom(n) for n in (1, 63, 64, 1000, 1471, 1472)]
    assert udp_datagrams(pod1, pod2, payloads) == payloads
    assert nstat(lab, pod2, "TcpInCsumErrors", "UdpInCsumErrors", "UdpInErrors") == before
    st = status(sock)
    if offload != "off":
        fc = st["offload"]["counters"]
        paths = ["tso_read", "uso_read", "packet_gso"]
        assert st["offload"]["on"] == [p for p in paths if p not in MISSING_PATHS]
        # (two segments or more a super-packet: TCP sizes them by its pacing rate, two
        # on a slow emulated machine)
        assert fc["gso_sends"] > 0 and fc["gso_segments"] >= 2 * fc["gso_sends"]
    else:
        assert st["offload"]["on"] == []  # the plain engine: a packet per system call
    assert not {"send_failed", "write_failed"} & set(st["counters"]["drops"])


@needs_paths("uso_read")
@pytest.mark.parametrize("peer", ["weft", "kernel"])
def test_hostgw_sends_udp_super_packets_whole(lab: Lab, tmp_path: Path, peer: str) -> None:
    """With GRO forwarding on the pod's veth, host-gw reads UDP super-packets
    (uso_read) and hands each to the AF_PACKET socket whole: the kernel cuts it
    into one frame per pod datagram, each with its own valid UDP checksum."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1500, gro=True)
    lab.udp_gro_forwarding(pod1)
    if peer == "kernel":
        add_kernel_hostgw_route(lab, n2, SUBNET1, n1.underlay_ip)
    else:
        start(lab, n2, hostgw_args(n2, SUBNET2, n1, SUBNET1, "on"), tmp_path, "n2")
    _, sock = start(lab, n1, hostgw_args(n1, SUBNET1, n2, SUBNET2, "on"), tmp_path, "n1")
    assert "uso_read" in status(sock)["offload"]["on"]
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    sent_before = wire_frames(lab, n1)
    check_udp_burst(lab, pod1, pod2, sock, 3000, 100)
    after = wire_frames(lab, n1)
    sent_bytes, sent_frames = after[0] - sent_before[0], after[1] - sent_before[1]
    assert sent_frames >= 3000 and sent_bytes / sent_frames <= 14 + 20 + 8 + 100 + 10
