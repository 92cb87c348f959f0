"""The send fallback (no UDP-tunnel GSO, as on Linux < 6.17): super-packets read from
the pod device are cut in userspace and sent with UDP_SEGMENT (dataplane/io/segment.py).

Forced here with WEFT_OFFLOAD_DISABLE=tunnel_gso. weft vxlan → the kernel's VXLAN
(flannel.1 as flanneld makes it): the receiving pod sees no TCP checksum errors, and
every datagram on the wire is a standard MTU-sized VXLAN datagram with valid
checksums (tshark recomputes them); weft udp ↔ weft udp; and the per-datagram
sends when udp_segment is switched off too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from test_fastpath import (
    SUBNET1,
    SUBNET2,
    WEFT_MAC,
    kernel_vxlan_node,
    nstat,
    start,
    two_node_pods,
    udp_args,
    vxlan_args,
)
from weft_helpers import (
    UDP_SEGMENT_NEEDS_TX_CSUM,
    assert_udp_segment_refused,
    iperf3_run,
    one_backlog,
    send_over_tcp,
    status,
)

from control.lab.netns import in_netns
from control.lab.topology import Lab, Pod
from dataplane.backends.udp import UdpBackend
from dataplane.forwarder import Forwarder
from dataplane.io import fastpath, offloads
from dataplane.io.sockets import open_udp_socket
from dataplane.peers import Peer

FALLBACK = {offloads.DISABLE_ENV: "tunnel_gso"}
SO_NO_CHECK = 11  # asm-generic/socket.h: no UDP checksums on send (UDP GSO refuses it)


def tshark_rows(pcap: Path, port: int, decode: str) -> list[list[str]]:
    """frame length, UDP dst port, IP checksum status (outer, inner), UDP checksum
    status, TCP checksum status, TCP payload length; one row per frame."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"udp.port=={port},{decode}",
         "-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
         "-o", "tcp.check_checksum:TRUE",
         "-T", "fields", "-E", "separator=|", "-e", "frame.len", "-e", "udp.dstport",
         "-e", "ip.checksum.status", "-e", "udp.checksum.status",
         "-e", "tcp.checksum.status", "-e", "tcp.len", "-e", "vxlan.vni"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return [line.split("|") for line in out.splitlines() if line]


@pytest.mark.parametrize("device", ["tun", "tap"])
def test_fallback_to_kernel_vxlan_sends_standard_datagrams(
    lab: Lab, tmp_path: Path, device: str
) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "auto", device)
    _, sock = start(lab, n1, args, tmp_path, "n1", env=FALLBACK)
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    before = nstat(lab, pod2, "TcpInCsumErrors", "TcpExtTCPCsumErrors")
    pcap = tmp_path / "outer.pcap"
    cap = lab.capture(n2, "eth0", pcap, f"udp port 8472 and src host {n1.underlay_ip}")
    # Every byte read by the receiving pod (an iperf3 client can end with part of
    # its data unsent: the capture then held fewer than 1,000 segments, in CI).
    data = os.urandom(3 << 20)
    assert send_over_tcp(pod1, pod2, data) == data
    time.sleep(1)  # let tcpdump drain its ring before SIGTERM
    lab.stop(cap)
    assert nstat(lab, pod2, "TcpInCsumErrors", "TcpExtTCPCsumErrors") == before
    st = status(sock)
    off = st["offload"]
    assert "WEFT_OFFLOAD_DISABLE" in off["off"]["tunnel_gso"]
    fc = off["counters"]
    assert fc["gso_sends"] == 0
    # Super-packets were cut here, sent many segments per sendmsg (a TSO packet has
    # two segments or more: the kernel sizes them by the pacing rate, two on a slow
    # emulated machine).
    assert fc["split_packets"] > 0 and fc["split_segments"] >= 2 * fc["split_packets"]
    if UDP_SEGMENT_NEEDS_TX_CSUM:
        assert_udp_segment_refused(off)
    else:
        assert "tso_read" in off["on"] and "udp_segment" in off["on"]
        assert fc["udp_segment_sends"] >= fc["split_packets"]
    assert not {"send_failed", "truncated", "too_big"} & set(st["counters"]["drops"])
    # The kernel node's ACKs come a datagram each (its outer UDP checksum 0: no GRO
    # here): batches of them are never offered to the GRO-message planner.
    assert fc["batch_plans"] == fc["batch_plan_declines"] == 0
    rows = tshark_rows(pcap, 8472, "vxlan")
    data = [r for r in rows if r[5] and int(r[5]) > 0]
    assert len(data) > 1000, f"only {len(data)} data segments captured"
    for length, dport, ip_ok, udp_ok, tcp_ok, _, vni in rows:
        assert int(length) <= 1514 and dport.split(",")[0] == "8472" and vni == "1"
        assert set(ip_ok.split(",")) == {"1"} and udp_ok.split(",")[0] == "1", (ip_ok, udp_ok)
        assert tcp_ok == "1"
    # Full-size datagrams: the inner IP packets fill the 1450-byte pod MTU.
    assert max(int(r[0]) for r in rows) == 1514


@pytest.mark.parametrize("disable", ["tunnel_gso", "tunnel_gso,udp_segment"])
def test_fallback_between_weft_udp_nodes(lab: Lab, tmp_path: Path, disable: str) -> None:
    """flannel's udp backend, both nodes weft: with UDP_SEGMENT, and one datagram
    per sendto when udp_segment is off too (super-packets are still cut here)."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1472)
    env = {offloads.DISABLE_ENV: disable}
    _, s1 = start(lab, n1, udp_args(n1, SUBNET1, n2, SUBNET2, "auto"), tmp_path, "n1", env)
    _, s2 = start(lab, n2, udp_args(n2, SUBNET2, n1, SUBNET1, "auto"), tmp_path, "n2", env)
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    before = nstat(lab, pod2, "TcpInCsumErrors")
    pcap = tmp_path / "outer.pcap"
    cap = lab.capture(n2, "eth0", pcap, f"udp port 8285 and src host {n1.underlay_ip}")
    data = os.urandom(3 << 20)
    assert send_over_tcp(pod1, pod2, data) == data  # every byte (see above)
    time.sleep(1)
    lab.stop(cap)
    assert nstat(lab, pod2, "TcpInCsumErrors") == before
    st = status(s1)
    fc = st["offload"]["counters"]
    assert fc["split_packets"] > 0 and fc["split_segments"] >= 2 * fc["split_packets"]
    if "udp_segment" in disable:
        assert fc["udp_segment_sends"] == 0 and "udp_segment" not in st["offload"]["on"]
    elif UDP_SEGMENT_NEEDS_TX_CSUM:
        assert_udp_segment_refused(st["offload"])
    else:
        assert fc["udp_segment_sends"] >= fc["split_packets"]
    assert not {"send_failed", "truncated"} & set(st["counters"]["drops"])
    assert not {"spoofed", "truncated"} & set(status(s2)["counters"]["drops"])
    rows = tshark_rows(pcap, 8285, "ip")
    assert len([r for r in rows if r[5] and int(r[5]) > 0]) > 1000
    for length, _, ip_ok, udp_ok, tcp_ok, _, _ in rows:
        assert int(length) <= 1514
        assert set(ip_ok.split(",")) == {"1"} and udp_ok.split(",")[0] == "1", (ip_ok, udp_ok)
        assert tcp_ok == "1"
    assert max(int(r[0]) for r in rows) == 1514


def iperf3_udp(lab: Lab, client: Pod, server: Pod, size: int, seconds: int = 1) -> dict[str, Any]:
    """iperf3 UDP at full speed (-b 0) with `size`-byte payloads; the JSON end summary."""
    args = ["-u", "-l", str(size), "-b", "0", "-t", str(seconds)]
    return iperf3_run(lab, client, server, args, want="sum", timeout=seconds + 30)


def test_small_datagrams_leave_in_runs(lab: Lab, tmp_path: Path) -> None:
    """tx_batch: 64-byte UDP packets read in one drain of the device go to the kernel
    VXLAN peer as runs of one sendmsg each; on the wire they are single standard
    VXLAN datagrams, and nothing is reordered."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "auto")
    _, sock = start(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    assert lab.ping(pod1, pod2.ip, count=3)  # one packet per drain: a run of one
    one_backlog(lab, pod1)  # the order seen is weft's, not the pod veth's (one_backlog)
    pcap = tmp_path / "outer.pcap"
    cap = lab.capture(n2, "eth0", pcap, f"udp port 8472 and src host {n1.underlay_ip}")
    end = iperf3_udp(lab, pod1, pod2, 64)
    time.sleep(1)
    lab.stop(cap)
    received = end["sum"]["packets"] - end["sum"]["lost_packets"]
    assert received > 1000
    assert end["sum"].get("out_of_order", 0) == 0
    st = status(sock)
    fc = st["offload"]["counters"]
    if UDP_SEGMENT_NEEDS_TX_CSUM:  # no runs: one sendto a datagram, in order
        assert_udp_segment_refused(st["offload"])
        assert "tx_batch" not in st["offload"]["on"]
    else:
        assert "tx_batch" in st["offload"]["on"]
        assert fc["udp_segment_sends"] > 0
        assert fc["batched_datagrams"] > 2 * fc["udp_segment_sends"]
    rows = tshark_rows(pcap, 8472, "vxlan")
    small = [r for r in rows if r[0] == "156"]  # 14 + 20 + 8 + 8 + 14 + 20 + 8 + 64
    assert len(small) > 1000
    for length, dport, ip_ok, udp_ok, _, _, vni in rows:
        assert int(length) <= 1514 and dport.split(",")[0] == "8472" and vni == "1"
        assert set(ip_ok.split(",")) == {"1"} and set(udp_ok.split(",")) <= {"1", "2"}


def test_a_refused_udp_segment_send_falls_back_to_one_datagram_per_call(lab: Lab) -> None:
    """The kernel refuses UDP_SEGMENT sends on some set-ups (Linux < 6.11 when the
    underlay device has no checksum offload: EIO); here a socket with SO_NO_CHECK
    makes it refuse (EINVAL). A run read from a real TUN still arrives, whole and in
    order, one datagram per sendto; udp_segment and tx_batch go off with the reason,
    and, without the egress TAP, so does TSO on the device."""
    ns = lab.add_netns("tx")
    with in_netns(ns):
        dev, paths = offloads.open_pod_device("wtx0", tap=False, mode="auto")
        peer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx = open_udp_socket("127.0.0.1", 0)
        try:
            for cmd in (
                ["link", "set", "wtx0", "up"],
                ["addr", "add", "10.244.1.0/32", "dev", "wtx0"],
                ["route", "add", "10.244.2.0/24", "dev", "wtx0"],
            ):
                subprocess.run(["ip", *cmd], check=True)
            peer_sock.bind(("127.0.0.1", 0))
            peer_sock.settimeout(2)
            port = peer_sock.getsockname()[1]
            tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            offloads.setup_socket(paths, tx)
            assert paths.on["tso_read"] and paths.on["udp_segment"] and paths.on["tx_batch"]
            fwd = Forwarder(UdpBackend(port=port), local_ip=IPv4Address("10.244.1.0"))
            fwd.add_peer(Peer(IPv4Network(SUBNET2), IPv4Address("127.0.0.1"), port=port))
            engine = fastpath.FastEngine(
                fwd, dev.fileno(), tx, paths,
                public_ip="127.0.0.1", underlay_mac=bytes(6), port=tx.getsockname()[1],
            )  # fmt: skip
            payloads = [bytes([i]) * 100 for i in range(10)]
            for p in payloads:
                app.sendto(p, ("10.244.2.5", 9999))
            engine._on_device()  # one drain: the ten packets, one run
            got = [peer_sock.recv(2048) for _ in payloads]
            # udp backend: the inner IP packet is the datagram; UDP payload after 28 bytes.
            assert [g[28:] for g in got] == payloads
            assert paths.counters.udp_segment_sends == 0
            for path in ("udp_segment", "tx_batch", "tso_read"):
                assert not paths.on[path] and "EINVAL" in paths.why_off[path], path
            # The device was told: the next packets are read one by one, still sent.
            app.sendto(b"x" * 100, ("10.244.2.5", 9999))
            engine._on_device()
            assert peer_sock.recv(2048)[28:] == b"x" * 100
        finally:
            for s in (peer_sock, app, tx):
                s.close()
            paths.close()
            dev.close()
