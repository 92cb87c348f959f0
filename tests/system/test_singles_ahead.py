"""A lone datagram does not wait behind a stream's writes (gro.lone_first), in a lab.

weft ↔ weft and kernel VXLAN → weft, pings every 5 ms from one pod to the other
while a TCP stream runs the same way at full speed: the receiving weft delivers
pings that arrived in a batch behind the stream's segments ahead of their GSO writes
(counted: `singles_ahead`) and reads its device before those writes, so that the
echo replies leave first too (`answers_first`); every ping is answered and the
stream runs beside them.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP
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
from weft_helpers import iperf3_run, status

from bench.parse import ping_stats
from control.lab.topology import Lab
from dataplane.flows import inner_flow_hash, source_index
from dataplane.io.sockets import SOURCE_PORTS

PINGS = 400


def outer_port_index(packet: bytes) -> int:
    """Which of weft's SOURCE_PORTS outer source ports an inner packet leaves from."""
    return source_index(inner_flow_hash(packet, 0, len(packet)), SOURCE_PORTS)


def stream_port(src: IPv4Address, dst: IPv4Address) -> int:
    """A client port for iperf3 whose stream leaves from another outer source port
    than the pings: on one port the node's UDP GRO would put a ping at the end of a
    stream's GRO message (a smaller datagram ends one), not in a message of its own."""
    pings = outer_port_index(bytes(IP(src=str(src), dst=str(dst)) / ICMP()))
    return next(
        p
        for p in range(40000, 65536)
        if outer_port_index(bytes(IP(src=str(src), dst=str(dst)) / TCP(sport=p, dport=5201)))
        != pings
    )


@pytest.mark.parametrize("sender", ["weft", "kernel"])
def test_pings_beside_a_stream_go_ahead_of_its_writes(
    lab: Lab, tmp_path: Path, sender: str
) -> None:
    """The receiving weft takes GRO messages from the weft sender (the underlay's
    GRO on), single datagrams from the kernel VXLAN one (GRO off, as on a node
    whose NIC does none: gro.DatagramPlanner's runs)."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450, gro=sender == "weft")
    if sender == "weft":
        a1 = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2, "on")
        start(lab, n1, a1, tmp_path, "n1")
        a2 = vxlan_args(n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC, "on")
        _, sock = start(lab, n2, a2, tmp_path, "n2")
        src, dst = pod1, pod2
    else:
        kmac = kernel_vxlan_node(lab, n2, n1)
        a1 = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on")
        _, sock = start(lab, n1, a1, tmp_path, "n1")
        src, dst = pod2, pod1  # kernel VXLAN → weft
    assert lab.wait_ping(src, dst.ip, timeout_s=10)
    counters = status(sock)["offload"]["counters"]
    before, answered = counters["singles_ahead"], counters["answers_first"]

    log = tmp_path / "ping.log"
    pinger = lab.spawn(
        src, ["ping", "-n", "-i", "0.005", "-c", str(PINGS), "-W", "2", str(dst.ip)], log=log
    )
    port = stream_port(src.ip, dst.ip)
    end = iperf3_run(
        lab, src, dst, ["-t", "4", "--cport", str(port)], want="sum_received", timeout=30
    )
    assert pinger.wait(timeout=30) == 0, log.read_text()[-2000:]
    pings = ping_stats(log.read_text())
    assert pings["received"] == PINGS, pings
    assert end["sum_received"]["bytes"] > 10 << 20  # a stream ran beside them

    counters = status(sock)["offload"]["counters"]
    assert counters["singles_ahead"] - before > 0, counters
    # … and each time the device was read before the stream's writes: the echo
    # replies left before them too
    assert counters["answers_first"] - answered > 0, counters
