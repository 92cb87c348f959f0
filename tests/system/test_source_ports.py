"""One outer UDP source port per inner flow (vxlan), as the kernel's VXLAN device does.

RFC 7348 §5 and the kernel (udp_flow_src_port) take the outer source port from a
hash of the inner flow, so routers (ECMP) and NICs (RSS) spread a node pair's flows.
weft sends each flow's datagrams from one of `--source-ports` sockets, picked by
dataplane/flows.py's hash; its egress TAP path writes the same port into the
headers of the super-packets the kernel cuts. Checked on the wire (tshark on the
receiving node's eth0): every datagram of a flow, from whichever send path,
carries the one port the model gives, and several flows use several ports.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fastpath import (
    SUBNET1,
    SUBNET2,
    WEFT_MAC,
    WEFT_MAC2,
    kernel_vxlan_node,
    start,
    two_node_pods,
    vxlan_args,
)
from weft_helpers import (
    UDP_SEGMENT_NEEDS_TX_CSUM,
    WEFT,
    assert_udp_segment_refused,
    iperf3_run,
    needs_paths,
    status,
)

from control.lab.topology import Lab
from dataplane.flows import flow_hash, source_index
from dataplane.io import offloads

Flow = tuple[str, int, str, int]


def outer_ports(pcap: Path) -> list[tuple[str, int, Flow | None]]:
    """(outer source address, outer source port, inner TCP flow or None) per datagram."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", "udp.port==8472,vxlan", "-T", "fields",
         "-E", "separator=|", "-e", "ip.src", "-e", "udp.srcport", "-e", "ip.dst",
         "-e", "tcp.srcport", "-e", "tcp.dstport"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    rows: list[tuple[str, int, Flow | None]] = []
    for line in out.splitlines():
        src, sport, dst, tsport, tdport = line.split("|")
        outer_src, *inner_src = src.split(",")
        inner_dst = dst.split(",")[1:]
        flow = None
        if tsport and inner_src and inner_dst:
            flow = (inner_src[0], int(tsport), inner_dst[0], int(tdport))
        rows.append((outer_src, int(sport.split(",")[0]), flow))
    return rows


def expected_port(ports: list[int], flow: Flow) -> int:
    """The port dataplane/flows.py picks for a TCP flow (either direction)."""

    def addr(text: str) -> int:
        a, b, c, d = (int(x) for x in text.split("."))
        return a << 24 | b << 16 | c << 8 | d

    src, sport, dst, dport = flow
    return ports[source_index(flow_hash(addr(src) ^ addr(dst), sport ^ dport), len(ports))]


def tcp_flows(lab: Lab, client, server, streams: int) -> None:  # type: ignore[no-untyped-def]
    """`streams` TCP flows carrying 16 MB in all (a few thousand datagrams for tshark)."""
    args = ["-P", str(streams), "-n", "16M"]
    end = iperf3_run(lab, client, server, args, want="sum_received", timeout=40)
    assert end["sum_received"]["bytes"] > 1 << 20  # (iperf3 may stop counting early)


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("egress TAP", marks=needs_paths("tunnel_gso")),
        *("udp_segment", "plain engine", "TAP device", "one port"),
    ],
)
def test_each_flow_leaves_from_the_port_of_its_hash(lab: Lab, tmp_path: Path, mode: str) -> None:
    """weft vxlan → the kernel's VXLAN: TCP data (super-packets through the egress
    TAP, cut in userspace for UDP_SEGMENT, or one by one in the plain engine) and
    the handshake and pings (the socket) of a flow leave from its one port."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    device = "tap" if mode == "TAP device" else "tun"
    offload = "off" if mode == "plain engine" else "auto"
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, offload, device)
    if mode == "one port":
        args += ["--source-ports", "0"]
    env = {offloads.DISABLE_ENV: "tunnel_gso"} if mode == "udp_segment" else None
    _, sock = start(lab, n1, args, tmp_path, "n1", env=env)
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    st = status(sock)
    ports = st["source_ports"]
    if mode == "one port":
        assert ports == []
    else:
        assert len(set(ports)) == 16 and 8472 not in ports
    pcap = tmp_path / "outer.pcap"
    cap = lab.capture(n2, "eth0", pcap, f"udp port 8472 and src host {n1.underlay_ip}")
    assert lab.ping(pod1, pod2.ip, count=3)
    tcp_flows(lab, pod1, pod2, 8)
    time.sleep(1)  # let tcpdump drain its ring before SIGTERM
    lab.stop(cap)
    on = status(sock)["offload"]
    if mode == "egress TAP":
        assert on["counters"]["gso_sends"] > 0
    elif mode == "udp_segment":
        assert on["counters"]["split_packets"] > 0 and on["counters"]["gso_sends"] == 0
    rows = outer_ports(pcap)
    by_flow: dict[Flow, set[int]] = {}
    for _, sport, flow in rows:
        if flow is not None:
            by_flow.setdefault(flow, set()).add(sport)
    assert len(by_flow) >= 9, by_flow.keys()  # iperf3's control connection and 8 streams
    if mode == "one port":
        assert {sport for _, sport, _ in rows} == {8472}
        return
    for flow, seen in by_flow.items():
        assert seen == {expected_port(ports, flow)}, (flow, seen)
    assert len({next(iter(s)) for s in by_flow.values()}) >= 3
    # ICMP has no ports: a ping's datagrams all leave from its addresses' port.
    pings = {sport for _, sport, flow in rows if flow is None}
    assert len(pings) == 1 and pings <= set(ports)


def test_two_weft_nodes_send_a_flow_s_two_directions_from_its_hash(
    lab: Lab, tmp_path: Path
) -> None:
    """weft ↔ weft: each node's datagrams of a flow (data one way, ACKs the other)
    leave from the port its own sockets give the flow's hash — the same hash both
    ways — and the receiving engine takes datagrams from any source port."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    _, s1 = start(
        lab, n1, vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2, "auto"), tmp_path, "n1"
    )
    _, s2 = start(
        lab, n2, vxlan_args(n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC, "auto"), tmp_path, "n2"
    )
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    ports = {str(n1.underlay_ip): status(s1)["source_ports"]}
    ports[str(n2.underlay_ip)] = status(s2)["source_ports"]
    pcap = tmp_path / "outer.pcap"
    cap = lab.capture(n2, "eth0", pcap, "udp port 8472")
    tcp_flows(lab, pod1, pod2, 4)
    time.sleep(1)
    lab.stop(cap)
    seen: dict[tuple[str, Flow], set[int]] = {}
    for outer_src, sport, flow in outer_ports(pcap):
        if flow is not None:
            seen.setdefault((outer_src, flow), set()).add(sport)
    senders = {outer_src for outer_src, _ in seen}
    assert senders == set(ports)
    for (outer_src, flow), sports in seen.items():
        assert sports == {expected_port(ports[outer_src], flow)}, (outer_src, flow, sports)
    for s in (s1, s2):
        drops = status(s)["counters"]["drops"]
        assert not {"spoofed", "send_failed", "truncated"} & set(drops), drops


@pytest.mark.parametrize("value", ["300", "-1", "many"])
def test_a_bad_count_is_one_line_and_a_non_zero_exit(lab: Lab, tmp_path: Path, value: str) -> None:
    lab.add_underlay()
    n1 = lab.add_node("n1")
    args = vxlan_args(n1, SUBNET1, n1, SUBNET2, WEFT_MAC, WEFT_MAC2, "auto")
    cp = lab.run(
        n1, *WEFT, *args, "--source-ports", value, "--api-socket", str(tmp_path / "s"),
        check=False, timeout=30,
    )  # fmt: skip
    assert cp.returncode != 0 and "Traceback" not in cp.stderr
    assert "--source-ports" in cp.stderr and ("0..256" in cp.stderr or "number" in cp.stderr)


BLAST = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(struct.pack("!I", i) + bytes(28), (sys.argv[1], 9000 + i % 8))
"""


def test_a_run_of_many_flows_goes_as_a_send_per_port_in_order(lab: Lab, tmp_path: Path) -> None:
    """Small datagrams of eight flows, interleaved, read in one drain: tx_batch sends
    the run as one UDP_SEGMENT send per port (`mixed_runs`). On the wire each flow is
    on its model port, and its datagrams are in the order the pod sent them."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    _, sock = start(
        lab, n1, vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "auto"), tmp_path, "n1"
    )
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    ports = status(sock)["source_ports"]
    pcap = tmp_path / "outer.pcap"
    cap = lab.capture(n2, "eth0", pcap, f"udp port 8472 and src host {n1.underlay_ip}")
    count = 20_000
    lab.run(pod1, sys.executable, "-c", BLAST, str(pod2.ip), str(count), timeout=60)
    time.sleep(1)
    lab.stop(cap)
    offload = status(sock)["offload"]
    fc = offload["counters"]
    if UDP_SEGMENT_NEEDS_TX_CSUM:  # no runs there: a sendto a datagram, from its port
        assert_udp_segment_refused(offload)
    else:
        assert fc["mixed_runs"] > 0 and fc["batched_datagrams"] > 0, fc
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", "udp.port==8472,vxlan", "-T", "fields",
         "-E", "separator=|", "-e", "udp.srcport", "-e", "udp.dstport", "-e", "data.data"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    last: dict[int, int] = {}
    seen = 0
    for line in out.splitlines():
        sports, dports, data = line.split("|")
        if not data:
            continue
        seen += 1
        outer_sport, inner_sport = (int(p) for p in sports.split(","))
        inner_dport = int(dports.split(",")[1])
        want = expected_port(ports, (str(pod1.ip), inner_sport, str(pod2.ip), inner_dport))
        assert outer_sport == want, (inner_dport, outer_sport, want)
        seq = int(data[:8], 16)
        assert seq > last.get(inner_dport, -1), (inner_dport, seq, last.get(inner_dport))
        last[inner_dport] = seq
    assert len(last) == 8 and seen > 1000  # (the blast outruns weft: the TUN drops some)
