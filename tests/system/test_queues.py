"""Queue workers (`--queues N`, dataplane/io/queues.py) with real multi-queue devices.

Two weft nodes (and a weft node against a kernel VXLAN node) with two queues
each: many TCP flows spread over both processes, every byte arrives with no
TCP checksum error, routes added after start reach the worker, a killed worker
is started again while traffic goes on, and stopping weft ends its workers and
removes its devices.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_fastpath import (
    SUBNET1,
    SUBNET2,
    WEFT_MAC,
    WEFT_MAC2,
    kernel_vxlan_node,
    nstat,
    start,
    two_node_pods,
    udp_args,
    vxlan_args,
)
from weft_helpers import (
    OFFLOAD_ON,
    SLOWDOWN,
    WEFT,
    assert_super_packets_sent,
    iperf3_run,
    kill_queue_worker,
    port_on_queue,
    status,
)

from control.api import api_stream
from control.lab.netns import in_netns
from control.lab.topology import Lab, Node, Pod
from dataplane.io.queues import attach_steering, attach_tun_steering, steering_queue
from dataplane.io.sockets import open_udp_socket
from dataplane.io.tun import open_tun

STREAMS = 16  # flows hashed over two queues: all on one has a chance of 2 ** -15


def _args(
    backend: str, node: Node, subnet: str, peer: Node, peer_subnet: str, own: str, other: str
):  # type: ignore[no-untyped-def]
    if backend == "vxlan":
        args = vxlan_args(node, subnet, peer, peer_subnet, own, other, OFFLOAD_ON)
    else:
        args = udp_args(node, subnet, peer, peer_subnet, OFFLOAD_ON)
    return [*args, "--queues", "2"]


def _pids_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}") and _not_zombie(p)]


def _not_zombie(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return False


def _links(lab: Lab, node: Node) -> str:
    return lab.ip(node, "-o", "link", "show")


def _transfer(lab: Lab, client: Pod, server: Pod) -> dict[str, Any]:
    return iperf3_run(
        lab, client, server, ["-t", "2", "-P", str(STREAMS)], want="sum_received", timeout=60
    )


@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_two_weft_nodes_with_two_queues(lab: Lab, tmp_path: Path, backend: str) -> None:
    """Each node's TUN steers a flow's packets to a queue by the flow (eBPF), and its
    sockets steer datagrams by the inner flow (classic BPF): n1 sends the data from
    both queues, n2 receives it on both and sends the ACKs from both. (n1 may take
    the ACKs on one queue: n2 sends small datagrams of many flows in one
    UDP_SEGMENT call, from one port, which arrive as one message — decisions §11.)"""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450 if backend == "vxlan" else 1472, gro=True)
    a1 = _args(backend, n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2)
    a2 = _args(backend, n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC)
    _, s1 = start(lab, n1, a1, tmp_path, "n1")
    _, s2 = start(lab, n2, a2, tmp_path, "n2")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    before = nstat(lab, pod2, "TcpInCsumErrors")
    end = _transfer(lab, pod1, pod2)
    assert end["sum_received"]["bytes"] > 1_000_000
    assert nstat(lab, pod2, "TcpInCsumErrors") == before
    for sock in (s1, s2):
        st = status(sock)
        queues = st["queues"]
        assert queues["count"] == 2 and queues["restarts"] == 0
        assert queues["workers"][0]["running"] and queues["workers"][0]["ready"]
        assert_super_packets_sent(st["offload"])
        assert not {"write_failed", "send_failed", "no_route"} & set(st["counters"]["drops"])
    # The peers were added after start: the workers got their routes through queue 0.
    for sock, keys in ((s1, ("tx_packets",)), (s2, ("rx_packets", "tx_packets"))):
        st = status(sock)
        [worker] = st["queues"]["workers"]
        for key in keys:
            assert worker[key] > 100, (sock.name, key, st["queues"])
            assert st["counters"][key] - worker[key] > 100, (sock.name, key, st["counters"])


@pytest.mark.parametrize(
    ("device", "offload"), [("tun", OFFLOAD_ON), ("tap", OFFLOAD_ON), ("tun", "off")]
)
def test_queues_against_a_kernel_vxlan_node(
    lab: Lab, tmp_path: Path, device: str, offload: str
) -> None:
    """The kernel's VXLAN source ports (one per flow) spread its flows over weft's
    sockets; what weft sends is what the kernel accepts. With --device tap the
    neighbour and route entries are queue 0's alone."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450, gro=True)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = [*vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, offload, device), "--queues", "2"]
    _, sock = start(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    for client, server in ((pod1, pod2), (pod2, pod1)):
        before = nstat(lab, server, "TcpInCsumErrors")
        end = _transfer(lab, client, server)
        assert end["sum_received"]["bytes"] > 1_000_000
        assert nstat(lab, server, "TcpInCsumErrors") == before
    # The kernel picks a source port per flow, and steering looks at the inner
    # flow anyway: both queues received and sent (the TUN queue of a flow is the
    # one that last wrote its other direction).
    st = status(sock)
    [worker] = st["queues"]["workers"]
    for key in ("rx_packets", "tx_packets"):
        assert worker[key] > 100, st["queues"]
        assert st["counters"][key] - worker[key] > 100, st["counters"]


def test_a_killed_worker_is_started_again_and_stop_ends_them_all(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    p1, s1 = start(
        lab, n1, _args("vxlan", n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2), tmp_path, "n1"
    )
    p2, s2 = start(
        lab, n2, _args("vxlan", n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC), tmp_path, "n2"
    )
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    _transfer(lab, pod1, pod2)
    # n2 receives the data: its worker's queue is the one that carries some for sure.
    st = status(s2)
    total = st["counters"]["rx_packets"]
    killed, queues = kill_queue_worker(s2)
    assert queues["workers"][0]["running"] and queues["workers"][0]["pid"] != killed
    assert "queue 1: worker up again" in (tmp_path / "n2.log").read_text()
    # Traffic goes on over both queues (the new worker got the routes again); the
    # ended worker's counters are kept.
    end = _transfer(lab, pod1, pod2)
    assert end["sum_received"]["bytes"] > 1_000_000
    st = status(s2)
    assert st["counters"]["rx_packets"] > total
    assert st["queues"]["workers"][0]["rx_packets"] > 100

    # SIGTERM to queue 0 alone (not its process group): it ends its workers.
    workers = [status(s)["queues"]["workers"][0]["pid"] for s in (s1, s2)]
    p1.send_signal(signal.SIGTERM)
    assert p1.wait(timeout=10) == 0
    # SIGKILL to queue 0 alone: the worker follows it (PR_SET_PDEATHSIG).
    p2.kill()
    p2.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _pids_alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _pids_alive(workers) == []
    for node in (n1, n2):
        assert "weft.1" not in _links(lab, node), "the devices go with their last queue"


SEND_FROM_PORT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", int(sys.argv[2])))
for _ in range(int(sys.argv[3])):
    s.sendto(bytes(100), (sys.argv[1], 9))
"""


def _vxlan_rx_packets(lab: Lab, node: Node) -> int:
    return int(lab.link_stats(node, "flannel.1")["flannel.1"]["rx"]["packets"])


def test_status_counts_every_queue_as_of_now(lab: Lab, tmp_path: Path) -> None:
    """`weft status` asks each worker for its counters (the workers otherwise report
    once a second): datagrams of a flow that queue 1 carries count in its worker's
    and the node's totals as soon as they are sent."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = [*vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on"), "--queues", "2"]
    _, sock = start(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    sent = 300
    for round_ in range(3):
        before = status(sock)
        arrived = _vxlan_rx_packets(lab, n2)
        port = port_on_queue(pod1, pod2, 9, 1, 2, 30000 + 100 * round_)
        lab.run(pod1, sys.executable, "-c", SEND_FROM_PORT, str(pod2.ip), str(port), str(sent))
        # Once the kernel node has them all, the worker has sent them all (a loaded
        # machine may leave some in its device queue for a while after the sender ends).
        deadline = time.monotonic() + 10 * SLOWDOWN
        while _vxlan_rx_packets(lab, n2) - arrived < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        after = status(sock)
        [was], [now] = before["queues"]["workers"], after["queues"]["workers"]
        assert now["tx_packets"] - was["tx_packets"] == sent, (was, now)
        assert now["gc"]["frozen"] > 1000, now  # the worker's own collector, settled
        assert after["counters"]["tx_packets"] - before["counters"]["tx_packets"] >= sent


def test_queues_are_refused_for_host_gw_with_one_line(lab: Lab, tmp_path: Path) -> None:
    lab.add_underlay()
    n1 = lab.add_node("n1")
    argv = [
        *WEFT, "dataplane", "run", "--backend", "host-gw", "--network", "10.244.0.0/16",
        "--subnet", SUBNET1, "--public-ip", str(n1.underlay_ip), "--queues", "2",
        "--api-socket", str(tmp_path / "n1.sock"),
    ]  # fmt: skip
    cp = lab.run(n1, *argv, check=False, timeout=30)
    assert cp.returncode != 0
    assert "Traceback" not in cp.stderr
    assert "--queues above 1 is for the vxlan and udp backends" in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1
    vxlan = [a if a != "host-gw" else "vxlan" for a in argv]
    bad = lab.run(n1, *vxlan[: vxlan.index("--queues")], "--queues", "0", check=False, timeout=30)
    assert bad.returncode != 0 and "expected 1..64 queues" in bad.stderr


def test_the_kernel_steers_as_the_model_says(lab: Lab) -> None:
    """steering_program on a real SO_REUSEPORT group: every datagram reaches the
    socket steering_queue names (vxlan's and udp's inner offsets)."""
    lab.add_underlay()
    n1 = lab.add_node("n1")
    with in_netns(n1.ns):
        for ip_off, port in ((22, 8472), (0, 8285)):
            socks = [open_udp_socket(str(n1.underlay_ip), port, reuse_port=True) for _ in range(3)]
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                attach_steering(socks[0], ip_off, 3)
                want = [0, 0, 0]
                # TCP flows (ports count), ICMP echoes and UDP fragments (they do not)
                for sport in range(40000, 40096, 2):
                    for proto, frag, l4 in (
                        (6, 0, struct.pack("!HH", sport, 5201)),
                        (1, 0, struct.pack("!BBHHH", 8, 0, sport, 7, sport)),
                        (17, 0x2000 if sport % 4 else 185, struct.pack("!HH", sport, 5201)),
                    ):
                        ip = struct.pack(
                            "!BBHHHBBH4s4s", 0x45, 0, 60, 0, frag, 64, proto, 0,
                            bytes([10, 244, 1, 2]), bytes([10, 244, 2 + sport % 3, 3]),
                        )  # fmt: skip
                        datagram = b"\0" * ip_off + ip + l4 + b"x" * 20
                        want[steering_queue(datagram, ip_off, 3)] += 1
                        tx.sendto(datagram, (str(n1.underlay_ip), port))
                time.sleep(0.2)
                got = []
                for sock in socks:
                    n = 0
                    while True:
                        try:
                            sock.recv(2048)
                        except BlockingIOError:
                            break
                        n += 1
                    got.append(n)
                assert got == want and min(want) > 0
            finally:
                tx.close()
                for sock in socks:
                    sock.close()


def test_thousands_of_routes_reach_the_worker(lab: Lab, tmp_path: Path) -> None:
    """More route updates at once than the pipe holds (a big cluster's leases at
    start): they wait in queue 0's outbox and all reach the worker, with no restart."""
    lab.add_underlay()
    n1 = lab.add_node("n1")
    count = 3000
    peers = [
        f"10.{i // 256 + 1}.{i % 256}.0/24,172.16.{i // 256}.{i % 256},"
        f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}"
        for i in range(count)
    ]
    args = [
        "dataplane", "run", "--backend", "vxlan", "--network", "10.0.0.0/8",
        "--subnet", "10.244.1.0/24", "--public-ip", str(n1.underlay_ip),
        "--vtep-mac", WEFT_MAC, "--queues", "2",
    ]  # fmt: skip
    for peer in peers:
        args += ["--peer", peer]
    _, sock = start(lab, n1, args, tmp_path, "n1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        queues = status(sock)["queues"]
        if queues["workers"][0]["peers"] == count:
            break
        time.sleep(0.2)
    assert queues["workers"][0]["peers"] == count, queues
    assert queues["restarts"] == 0 and queues["workers"][0]["unsent"] == 0
    # SIGTERM to a worker is a stop (as when the node's process group is stopped),
    # not a crash: it is not started again.
    os.kill(queues["workers"][0]["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while status(sock)["queues"]["workers"][0]["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    queues = status(sock)["queues"]
    assert queues["restarts"] == 0 and not queues["workers"][0]["running"], queues
    assert not queues["workers"][0]["ready"]


def test_the_tun_steers_as_the_model_says(lab: Lab) -> None:
    """tun_steering_program on a real two-queue TUN: every packet the kernel routes
    into it comes out of the queue steering_queue names."""
    lab.add_underlay()
    n1 = lab.add_node("n1")
    with in_netns(n1.ns):
        queues = [open_tun("steer0", multi_queue=True) for _ in range(2)]
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            attach_tun_steering(queues[0].fileno(), 0)
            lab.ip(n1, "link", "set", "steer0", "up")
            lab.ip(n1, "route", "add", "10.99.0.0/16", "dev", "steer0")
            want: list[list[int]] = [[], []]
            for sport in range(41000, 41064):
                tx.close()
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                tx.bind(("0.0.0.0", sport))
                tx.sendto(b"x" * 8, ("10.99.1.2", 5201))
            # ICMP echoes (their checksum where ports would be) and the fragments of
            # a datagram larger than the device's MTU
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as icmp:
                for seq in range(16):
                    echo = struct.pack("!BBHHH", 8, 0, 0, 7, seq) + bytes([seq]) * 8
                    icmp.sendto(echo, (f"10.99.{1 + seq % 4}.2", 0))
            tx.sendto(b"y" * 4000, ("10.99.1.2", 5201))
            time.sleep(0.2)
            icmp_seen = fragments = 0
            for q, dev in enumerate(queues):
                while True:
                    try:
                        packet = dev.read()
                    except BlockingIOError:
                        break
                    if packet[0] >> 4 != 4:
                        continue
                    assert steering_queue(packet, 0, 2) == q, (q, packet.hex())
                    if packet[9] == 1:
                        icmp_seen += 1
                    elif struct.unpack_from("!H", packet, 6)[0] & 0x3FFF:
                        fragments += 1
                    elif packet[9] == 17:
                        want[q].append(struct.unpack_from("!H", packet, 20)[0])
            assert len(want[0]) + len(want[1]) == 64 and want[0] and want[1]
            assert icmp_seen == 16 and fragments >= 3, (icmp_seen, fragments)
        finally:
            tx.close()
            for dev in queues:
                dev.close()


def test_trace_live_sees_every_queue(lab: Lab, tmp_path: Path) -> None:
    """`weft trace live` on queue 0's socket: the workers trace too, and every event
    says which queue's process saw it."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450, gro=True)
    a1 = _args("vxlan", n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2)
    a2 = _args("vxlan", n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC)
    start(lab, n1, a1, tmp_path, "n1")
    _, s2 = start(lab, n2, a2, tmp_path, "n2")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    events: list[dict[str, Any]] = []

    def read() -> None:
        # No count: the workers' events come in every 50 ms, queue 0's at once.
        for event in api_stream(str(s2), {"op": "trace", "filter": "tcp", "rate": 2000}):
            if "heartbeat" not in event:
                events.append(event)

    threading.Thread(target=read, daemon=True).start()
    time.sleep(1.5)  # the workers have the request
    _transfer(lab, pod1, pod2)
    time.sleep(0.5)
    seen = list(events)
    assert len(seen) > 1000, len(seen)
    assert {e["queue"] for e in seen} == {0, 1}
    assert {e["dir"] for e in seen} == {"rx", "tx"}  # data in, ACKs out
