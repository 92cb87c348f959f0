"""--egress-thread: a kernel thread sends what weft writes to its egress TAP, in order.

weft vxlan → kernel VXLAN in a lab. The TAP's NAPI is threaded (sysfs, a `napi/gso-…`
kernel thread, `weft status` says so), and a flow that sends a 64 KB super-packet and
right after it a 100-byte segment, two hundred times, arrives whole and in order: the
small segments go through the TAP behind their super-packets (counted), not through
the socket, where they would overtake what the kernel thread has not sent yet
(the receiving pod's TCP counts out-of-order segments: none). A bulk transfer fills
the thread's queue: weft waits for room rather than drop. Without an egress TAP the
option says it does nothing. And weft ↔ weft, the receiver cuts the GRO messages that
the sender's back-to-back super-packets make.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from test_fastpath import (
    SUBNET1,
    SUBNET2,
    WEFT_MAC,
    WEFT_MAC2,
    iperf3_bytes,
    kernel_vxlan_node,
    nstat,
    start,
    two_node_pods,
    vxlan_args,
)
from weft_helpers import (
    SLOWDOWN,
    WEFT,
    kill_queue_worker,
    needs_paths,
    one_backlog,
    port_on_queue,
    send_over_tcp,
    status,
)

from control.lab.topology import Lab, Pod
from dataplane.io import egress_tap, offloads
from dataplane.io.node import EGRESS_POLICY_ENV

PORT = 5301
ROUNDS = 200
BIG, SMALL = 65536, 100

SINK = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
n = 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    n += len(b)
print("received", n, flush=True)
"""

# A super-packet, then at once a small segment of the same flow (TCP_NODELAY: it
# leaves on its own, right behind the big one).
SOURCE = f"""
import socket, sys, time
bind = ("", int(sys.argv[2])) if len(sys.argv) > 2 else None
for _ in range(100):
    try:
        s = socket.create_connection((sys.argv[1], {PORT}), timeout=5, source_address=bind)
        break
    except OSError:
        time.sleep(0.05)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
big, small = bytes({BIG}), bytes({SMALL})
for _ in range({ROUNDS}):
    s.sendall(big)
    s.sendall(small)
    time.sleep(0.002)
s.close()
"""


def napi_threads() -> list[str]:
    names = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                names.append((entry / "comm").read_text().strip())
            except OSError:
                continue
    return [n for n in names if n.startswith("napi/gso-weft")]


def send_failed(sock: Path) -> int:
    return status(sock)["counters"]["drops"].get("send_failed", 0)


def big_then_small(
    lab: Lab, pod1: Pod, pod2: Pod, log: Path, sock: Path, source_port: int | None = None
) -> None:
    """SOURCE in pod1 to SINK in pod2: every byte arrives, no bad checksum, and the
    receiving pod's TCP saw no segment out of order — unless weft dropped a write
    (send_failed: the kernel thread left the TAP's queue full for EGRESS_WAIT_MS,
    seen with the CPUs shared by two test workers and a hog), a hole that TCP fills
    out of order; at most a few of those."""
    sink = lab.spawn(pod2, [sys.executable, "-c", SINK], log=log)
    counted = ("TcpExtTCPOFOQueue", "TcpInCsumErrors")
    before, failed = nstat(lab, pod2, *counted), send_failed(sock)
    bind = [] if source_port is None else [str(source_port)]
    lab.run(pod1, sys.executable, "-c", SOURCE, str(pod2.ip), *bind, timeout=60)
    assert sink.wait(timeout=30) == 0
    assert f"received {ROUNDS * (BIG + SMALL)}" in log.read_text()
    after, dropped = nstat(lab, pod2, *counted), send_failed(sock) - failed
    st = status(sock)
    detail = (
        f"receiving pod's TCP {before} -> {after}; weft dropped {dropped}; its offload "
        f"counters {st['offload']['counters']}"
    )
    assert dropped <= ROUNDS // 50, detail
    if dropped:
        assert after["TcpInCsumErrors"] == before["TcpInCsumErrors"], detail
    else:
        assert after == before, detail


@needs_paths("tunnel_gso")
def test_a_flows_packets_leave_the_threaded_tap_in_order(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = [*vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on"), "--egress-thread"]
    proc, sock = start(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)

    tap = egress_tap.egress_name("weft.1")
    assert lab.run(n1, "cat", f"/sys/class/net/{tap}/threaded").stdout.strip() == "1"
    assert napi_threads(), "no napi/gso-weft… kernel thread"
    assert status(sock)["offload"]["egress_thread"] is True
    # The queue in front of the thread holds two super-packets (TUNGETSNDBUF).
    assert status(sock)["offload"]["egress_queue_bytes"] == egress_tap.EGRESS_QUEUE_BYTES
    text = lab.run(n1, *WEFT, "status", "--api-socket", str(sock)).stdout
    assert "egress: the TAP's NAPI runs in a kernel thread" in text

    one_backlog(lab, pod1)  # the flow's order into weft is the pod's, not the lab's
    one_backlog(lab, n1)  # … and what reaches n2, the order weft's two contexts sent
    one_backlog(lab, n2)  # (the hub's end of n1's link, and n2's own)
    big_then_small(lab, pod1, pod2, tmp_path / "sink.log", sock)
    fc = status(sock)["offload"]["counters"]
    assert fc["gso_sends"] >= ROUNDS  # the big ones: super-packets through the TAP
    assert fc["ordered_sends"] >= ROUNDS // 2  # the small ones: behind them

    # A bulk transfer fills the thread's small queue (EGRESS_QUEUE_BYTES): weft
    # waits for room (counted) instead of dropping a super-packet (but for a
    # thread that leaves it full for EGRESS_WAIT_MS: a CPU shared by many).
    failed, waits = send_failed(sock), status(sock)["offload"]["counters"]["egress_waits"]
    iperf3_bytes(lab, pod1, pod2, "40M")
    total = status(sock)["offload"]["counters"]["egress_waits"]
    assert total > 0
    assert send_failed(sock) - failed <= (total - waits) // 10, (send_failed(sock), failed, total)

    # Without an egress TAP (here switched off, as on a kernel before 6.17) the
    # option has nothing to do, and says so.
    lab.stop(proc)
    auto = [*args[: args.index("--offload") + 1], "auto", "--egress-thread"]
    _, sock = start(lab, n1, auto, tmp_path, "n1-no-tap", {offloads.DISABLE_ENV: "tunnel_gso"})
    assert status(sock)["offload"]["egress_thread"] is False
    assert "--egress-thread does nothing here" in (tmp_path / "n1-no-tap.log").read_text()
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)


@needs_paths("tunnel_gso")
def test_a_receiver_cuts_gro_messages_between_super_packets(lab: Lab, tmp_path: Path) -> None:
    """weft ↔ weft, the sender with the thread: its super-packets reach the other
    node back to back, and that node's GRO cuts at its poll's packet quota, so one
    GRO message holds the end of one super-packet (PSH, its timestamp) and the start
    of the next. The receiving weft cuts such a message there (`gro_cuts`: writes
    that begin or end inside a message) and every byte arrives, in order."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450, gro=True)
    a1 = [*vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2, "on"), "--egress-thread"]
    a2 = vxlan_args(n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC, "on")
    start(lab, n1, a1, tmp_path, "n1")
    _, sock2 = start(lab, n2, a2, tmp_path, "n2")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    data = os.urandom(32 << 20)
    # A write that took the wrong segments would not match its own headers: the
    # node's IP drops it (counted) and TCP sends the bytes again, so they still arrive.
    bad = ("IpExtInTruncatedPkts", "IpInHdrErrors", "IpInDiscards", "TcpInCsumErrors")
    before = nstat(lab, n2, *bad), nstat(lab, pod2, *bad)
    assert send_over_tcp(pod1, pod2, data) == data
    assert (nstat(lab, n2, *bad), nstat(lab, pod2, *bad)) == before
    fc = status(sock2)["offload"]["counters"]
    assert fc["gro_cuts"] > 0
    assert fc["gso_written_segments"] > 30 * fc["gso_writes"]  # nearly 64 KB a write


@needs_paths("tunnel_gso")
def test_auto_switches_the_thread_and_keeps_order(lab: Lab, tmp_path: Path) -> None:
    """--egress-thread auto, the default: weft itself switches the TAP's NAPI into its
    kernel thread and back as its policy says (dataplane/egress_thread.py; here
    thresholds every window meets, so the thread comes and goes every second), and a
    flow's packets keep their order across the switches."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on")
    _, sock = start(lab, n1, args, tmp_path, "n1", {EGRESS_POLICY_ENV: "0,0,-1,1e9,0,0,0,0"})
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    off = status(sock)["offload"]
    assert off["egress_thread_mode"] == "auto"
    assert off["egress_queue_bytes"] == egress_tap.EGRESS_QUEUE_BYTES
    one_backlog(lab, pod1)
    one_backlog(lab, n1)
    one_backlog(lab, n2)
    tap = f"/sys/class/net/{egress_tap.egress_name('weft.1')}/threaded"
    seen = set()
    for i in range(20):
        big_then_small(lab, pod1, pod2, tmp_path / f"sink{i}.log", sock)
        seen.add(lab.run(n1, "cat", tap).stdout.strip())
        if status(sock)["offload"]["counters"]["egress_thread_switches"] >= 4 and len(seen) == 2:
            break
    off = status(sock)["offload"]
    assert off["counters"]["egress_thread_switches"] >= 4 and seen == {"0", "1"}, (off, seen)
    assert off["counters"]["ordered_sends"] > 0
    text = lab.run(n1, *WEFT, "status", "--api-socket", str(sock)).stdout
    assert "(--egress-thread auto, " in text, text


@needs_paths("tunnel_gso")
def test_auto_with_queues_tells_every_worker_and_keeps_order(lab: Lab, tmp_path: Path) -> None:
    """--egress-thread auto with --queues 2: queue 0 switches the TAP's one NAPI switch
    from every queue's measurements and tells the worker, which orders its flows'
    packets behind their super-packets while the thread runs; a flow that queue 1
    sends keeps its order across the switches."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = [*vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on"), "--queues", "2"]
    _, sock = start(lab, n1, args, tmp_path, "n1", {EGRESS_POLICY_ENV: "0,0,-1,1e9,0,0,0,0"})
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    assert status(sock)["offload"]["egress_thread_mode"] == "auto"
    one_backlog(lab, pod1)
    one_backlog(lab, n1)
    one_backlog(lab, n2)
    tap = f"/sys/class/net/{egress_tap.egress_name('weft.1')}/threaded"
    seen = set()
    for i in range(20):
        port = port_on_queue(pod1, pod2, PORT, 1, 2, 40000 + 100 * i)
        big_then_small(lab, pod1, pod2, tmp_path / f"sink{i}.log", sock, port)
        seen.add(lab.run(n1, "cat", tap).stdout.strip())
        if status(sock)["offload"]["counters"]["egress_thread_switches"] >= 4 and len(seen) == 2:
            break
    st = status(sock)
    off = st["offload"]
    assert off["counters"]["egress_thread_switches"] >= 4 and seen == {"0", "1"}, (off, seen)
    [worker] = st["queues"]["workers"]
    assert worker["tx_packets"] > 1000, st["queues"]  # queue 1 sent the flows …
    assert off["counters"]["ordered_sends"] > 0  # … in order while the thread ran
    log = (tmp_path / "n1.log").read_text()
    assert "in its busiest queue" in log and "did not answer" not in log, log[-3000:]


@needs_paths("tunnel_gso")
def test_a_worker_started_again_while_the_thread_runs_keeps_order(lab: Lab, tmp_path: Path) -> None:
    """--queues 2, auto with thresholds that switch the thread on and never off: a
    worker killed and started again while the thread runs finds it on (sysfs) and
    orders its flows from its first packet, before any switch tells it so."""
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = [*vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on"), "--queues", "2"]
    _, sock = start(lab, n1, args, tmp_path, "n1", {EGRESS_POLICY_ENV: "0,0,-1,-1,0,0,0,0"})
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    tap = f"/sys/class/net/{egress_tap.egress_name('weft.1')}/threaded"
    deadline = time.monotonic() + 15 * SLOWDOWN
    while lab.run(n1, "cat", tap).stdout.strip() != "1" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lab.run(n1, "cat", tap).stdout.strip() == "1"
    kill_queue_worker(sock)
    one_backlog(lab, pod1)
    one_backlog(lab, n1)
    one_backlog(lab, n2)
    switches = status(sock)["offload"]["counters"]["egress_thread_switches"]
    port = port_on_queue(pod1, pod2, PORT, 1, 2, 42000)
    big_then_small(lab, pod1, pod2, tmp_path / "sink.log", sock, port)
    st = status(sock)
    assert st["offload"]["counters"]["egress_thread_switches"] == switches  # none since
    assert st["queues"]["workers"][0]["tx_packets"] > 1000, st["queues"]
    assert lab.run(n1, "cat", tap).stdout.strip() == "1"


@needs_paths("tunnel_gso")
def test_bad_thresholds_are_refused(lab: Lab, tmp_path: Path) -> None:
    """A bad WEFT_EGRESS_POLICY stops weft with a one-line error."""
    n1, n2, _, _ = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on")
    bad = lab.run(n1, "env", f"{EGRESS_POLICY_ENV}=fast", *WEFT, *args, check=False, timeout=20)
    assert bad.returncode != 0
    assert "WEFT_EGRESS_POLICY" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
