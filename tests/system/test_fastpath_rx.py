"""The receive fast paths (dataplane/io/fastpath_receive.py, gro.py, uso.py) end to end.

A burst of same-size UDP datagrams from a pod on another node (weft, or the
kernel's VXLAN as flanneld sets it up) reaches a pod behind weft: every datagram
arrives, byte for byte and in order, while weft wrote most of them to its device
as UDP GSO packets (`uso_write`), which the kernel cut back into datagrams.

`WEFT_FASTPATH_BENCH=1 pytest -n 0 -s tests/system/test_fastpath_rx.py -k bench`
measures kernel VXLAN → weft (64-byte UDP and one TCP stream) with each receive
path on and off (no timing is asserted anywhere).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
    vxlan_args,
)
from weft_helpers import (
    MISSING_PATHS,
    OFFLOAD_ON,
    SLOWDOWN,
    SO_RCVBUFFORCE,
    needs_paths,
    one_backlog,
    send_over_tcp,
    status,
)

from control.lab.netns import in_netns
from control.lab.topology import Lab, Pod
from dataplane.io import fastpath_receive, offloads

PORT = 7000


def udp_socket(pod: Pod, *, bind: bool) -> socket.socket:
    """A UDP socket in the pod's namespace (a socket keeps the namespace it was made in)."""
    with in_netns(pod.ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # a whole burst waits in it before the test reads: SO_RCVBUFFORCE (root), as
        # SO_RCVBUF stops at net.core.rmem_max (212992 on a fresh kernel: ~550 of the
        # 1500 datagrams then arrived)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        if bind:
            sock.bind(("0.0.0.0", PORT))
    return sock


def burst(sender: socket.socket, dst: str, payloads: list[bytes], per_burst: int = 64) -> None:
    """Back-to-back bursts (so that weft's recvmmsg batches fill up), paced so that
    no queue on the way overflows: the test wants every datagram."""
    for i in range(0, len(payloads), per_burst):
        for p in payloads[i : i + per_burst]:
            sender.sendto(p, (dst, PORT))
        time.sleep(0.004 * SLOWDOWN)


def receive(sock: socket.socket, count: int, timeout_s: float = 5.0) -> list[bytes]:
    sock.settimeout(timeout_s)
    got: list[bytes] = []
    try:
        while len(got) < count:
            got.append(sock.recv(65536))
        sock.settimeout(0.3)
        got.append(sock.recv(65536))  # nothing more should come
    except TimeoutError:
        pass
    return got


@pytest.mark.parametrize("peer", ["weft", "kernel"])
def test_a_udp_burst_arrives_intact_and_in_order(lab: Lab, tmp_path: Path, peer: str) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450, gro=True)
    # weft on n1 receives; pod2 on n2 (weft, or the kernel's VXLAN) sends.
    if peer == "kernel":
        peer_mac = kernel_vxlan_node(lab, n2, n1)
    else:
        peer_mac = WEFT_MAC2
        args2 = vxlan_args(n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC, OFFLOAD_ON)
        start(lab, n2, args2, tmp_path, "n2")
    args1 = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, peer_mac, OFFLOAD_ON)
    _, sock1 = start(lab, n1, args1, tmp_path, "n1")
    assert lab.wait_ping(pod2, pod1.ip, timeout_s=10)
    one_backlog(lab, pod2)  # the order seen is weft's, not the pod veth's (one_backlog)
    rx, tx = udp_socket(pod1, bind=True), udp_socket(pod2, bind=False)
    try:
        before = nstat(lab, pod1, "UdpInCsumErrors", "UdpInErrors")
        for size in (64, 1000):
            payloads = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(1500)]
            burst(tx, str(pod1.ip), payloads)
            got = receive(rx, len(payloads))
            assert len(got) == len(payloads)
            assert got == payloads  # every byte, in order
        assert nstat(lab, pod1, "UdpInCsumErrors", "UdpInErrors") == before
    finally:
        rx.close()
        tx.close()
    st = status(sock1)
    fc = st["offload"]["counters"]
    assert not {"write_failed"} & set(st["counters"]["drops"])
    if "uso_write" in MISSING_PATHS:  # before Linux 6.2: one write a datagram
        assert fc["uso_writes"] == 0
        return
    assert "uso_write" in st["offload"]["on"]
    # Most datagrams went to the device merged, several per write.
    assert fc["uso_writes"] > 0 and fc["uso_written_segments"] > 2 * fc["uso_writes"]
    assert fc["uso_written_segments"] > 1500


@needs_paths("uso_write")
def test_uso_write_switched_off(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450, gro=True)
    kmac = kernel_vxlan_node(lab, n2, n1)
    env = {offloads.DISABLE_ENV: "uso_write"}
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, OFFLOAD_ON)
    _, sock = start(lab, n1, args, tmp_path, "n1", env=env)
    assert lab.wait_ping(pod2, pod1.ip, timeout_s=10)
    one_backlog(lab, pod2)
    rx, tx = udp_socket(pod1, bind=True), udp_socket(pod2, bind=False)
    try:
        payloads = [i.to_bytes(4, "big") + bytes(60) for i in range(300)]
        burst(tx, str(pod1.ip), payloads)
        assert receive(rx, len(payloads)) == payloads
    finally:
        rx.close()
        tx.close()
    off = status(sock)["offload"]
    assert "WEFT_OFFLOAD_DISABLE" in off["off"]["uso_write"]
    assert off["counters"]["uso_writes"] == 0


def kernel_sends_weft_receives(
    lab: Lab, tmp_path: Path, *, gro: bool
) -> tuple[Pod, Pod, subprocess.Popen, Path]:
    """pod2 behind the kernel's VXLAN on n2, pod1 behind weft on n1 (fast paths on),
    with or without GRO on the underlay: (pod1, pod2, weft's process, its socket)."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450, gro=gro)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, OFFLOAD_ON)
    proc, sock = start(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod2, pod1.ip, timeout_s=10)
    return pod1, pod2, proc, sock


def test_a_tcp_stream_of_single_datagrams_arrives_intact(lab: Lab, tmp_path: Path) -> None:
    """Kernel VXLAN → weft with no GRO on the way (one datagram per read, as from a
    sender whose outer UDP checksum is 0): weft coalesces the TCP stream's datagrams
    across recvmmsg slots (gso_datagrams) and the pod receives every byte in order,
    without checksum errors."""
    pod1, pod2, _, sock = kernel_sends_weft_receives(lab, tmp_path, gro=False)
    data = os.urandom(8 << 20)
    before = nstat(lab, pod1, "TcpInCsumErrors")
    assert send_over_tcp(pod2, pod1, data) == data
    assert nstat(lab, pod1, "TcpInCsumErrors") == before
    fc = status(sock)["offload"]["counters"]
    assert fc["gso_datagram_writes"] > 0
    assert fc["gso_written_segments"] > 2 * fc["gso_writes"]


def test_a_tcp_stream_after_a_backlog_arrives_intact(lab: Lab, tmp_path: Path) -> None:
    """Kernel VXLAN → weft with GRO on the way, weft paused now and then (SIGSTOP, by
    its PID) so that its socket holds a backlog: the next recvmmsg returns many GRO
    messages, planned all at once (gro.Coalescer.plan_batch). The pod receives every
    byte in order, without checksum errors."""
    pod1, pod2, proc, sock = kernel_sends_weft_receives(lab, tmp_path, gro=True)
    data = os.urandom(32 << 20)
    before = nstat(lab, pod1, "TcpInCsumErrors")
    with paused_now_and_then(proc.pid):
        got = send_over_tcp(pod2, pod1, data)
    assert got == data
    assert nstat(lab, pod1, "TcpInCsumErrors") == before
    fc = status(sock)["offload"]["counters"]
    assert fc["batch_plans"] > 0
    assert fc["gso_written_segments"] >= 2 * fc["gso_writes"]  # (two on an emulated machine)


def test_tcp_streams_of_changing_segment_sizes_arrive_intact(lab: Lab, tmp_path: Path) -> None:
    """As above, one stream after another, each with its own segment size (TCP_MAXSEG),
    more sizes than weft keeps payload views and batch shapes for, then the first
    size again: the same receive slots hold segments of each size in turn."""
    pod1, pod2, proc, sock = kernel_sends_weft_receives(lab, tmp_path, gro=True)
    before = nstat(lab, pod1, "TcpInCsumErrors")
    sizes = [1398, 1000, 600, 1200, 800, 1100, 1398]
    assert len(set(sizes)) > fastpath_receive.MAX_PAYLOAD_VIEW_SHAPES
    with paused_now_and_then(proc.pid):
        for mss in sizes:
            data = os.urandom(4 << 20)
            assert send_over_tcp(pod2, pod1, data, mss=mss) == data, mss
    assert nstat(lab, pod1, "TcpInCsumErrors") == before
    fc = status(sock)["offload"]["counters"]
    assert fc["batch_plans"] > 0
    assert fc["gso_written_segments"] >= 2 * fc["gso_writes"]  # (two on an emulated machine)


@contextlib.contextmanager
def paused_now_and_then(pid: int) -> Iterator[None]:
    """The process (one this test started) stopped for 10 ms every 30 ms meanwhile, so
    that its socket holds a backlog and its recvmmsg calls return many messages."""
    stop = threading.Event()

    def pause() -> None:
        while not stop.wait(0.03):
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(0.01)
            finally:
                os.kill(pid, signal.SIGCONT)

    pauser = threading.Thread(target=pause)
    pauser.start()
    try:
        yield
    finally:
        stop.set()
        pauser.join()


# -- measurements (opt-in) -----------------------------------------------------------

BENCH = os.environ.get("WEFT_FASTPATH_BENCH")


def _iperf3(lab: Lab, client: Pod, server: Pod, args: list[str], seconds: int) -> dict:
    srv = lab.spawn(server, ["iperf3", "-s", "-1"])
    try:
        for _ in range(50):
            cp = lab.run(
                client, "iperf3", "-c", str(server.ip), "-t", str(seconds), "-J", *args,
                check=False, timeout=seconds + 30,
            )  # fmt: skip
            result = json.loads(cp.stdout) if cp.stdout.startswith("{") else {}
            end = result.get("end", {})
            if cp.returncode == 0 and ("sum" in end or "sum_received" in end):
                return end
            time.sleep(0.1)
        raise AssertionError(cp.stdout[-1000:] + cp.stderr[-500:])
    finally:
        lab.stop(srv)


@pytest.mark.skipif(not BENCH, reason="set WEFT_FASTPATH_BENCH=1 to measure")
def test_bench_kernel_to_weft(lab: Lab, tmp_path: Path) -> None:
    """Kernel VXLAN (n2, outer checksum 0: no UDP GRO) → weft (n1), the bench's wire
    setting; 64-byte UDP at full speed and one TCP stream, each receive path off in
    turn, interleaved, repeated."""
    gro = os.environ.get("WEFT_FASTPATH_BENCH_GRO", "1") != "0"  # 0: one datagram per read
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450, gro=gro)
    kmac = kernel_vxlan_node(lab, n2, n1)
    rounds = int(os.environ.get("WEFT_FASTPATH_BENCH_ROUNDS", "2"))
    variants = os.environ.get("WEFT_FASTPATH_BENCH_VARIANTS", ",uso_write,gso_datagrams").split(",")
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, OFFLOAD_ON)
    for r in range(rounds):
        for disable in variants:
            env = {offloads.DISABLE_ENV: disable}
            proc, sock = start(lab, n1, [*args[:-1], "auto"], tmp_path, f"n1-{r}-{disable}", env)
            assert lab.wait_ping(pod2, pod1.ip, timeout_s=10)
            udp = _iperf3(lab, pod2, pod1, ["-u", "-l", "64", "-b", "0"], 5)["sum"]
            tcp = _iperf3(lab, pod2, pod1, [], 5)["sum_received"]
            fc = status(sock)["offload"]["counters"]
            lab.stop(proc)
            print(
                f"\nkernel→weft off={disable or '-'}: udp64 "
                f"{udp['packets'] * (1 - udp['lost_percent'] / 100) / udp['seconds'] / 1e3:.0f}"
                f" kpps, {udp['lost_percent']:.1f}% lost; tcp1 "
                f"{tcp['bits_per_second'] / 1e9:.2f} Gbit/s; uso {fc['uso_writes']} writes "
                f"{fc['uso_written_segments']} datagrams; gso {fc['gso_writes']} writes "
                f"{fc['gso_written_segments']} segments ({fc['gso_datagram_writes']} from "
                f"datagrams); rx {fc['rx_calls']} calls "
                f"{fc['rx_segments']} datagrams"
            )
