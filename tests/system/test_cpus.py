"""--cpus: weft on its CPU, the kernel's work behind its egress writes on the others.

weft vxlan → kernel VXLAN in a lab: the weft process and all its threads are pinned,
the egress TAP's receive queue carries the RPS mask of the CPUs left over, other
CPUs did receive packets steered to them while a TCP transfer ran, and the
transfer arrived whole (no checksum errors in the receiving pod).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_fastpath import (
    SUBNET1,
    SUBNET2,
    WEFT_MAC,
    kernel_vxlan_node,
    nstat,
    start,
    two_node_pods,
    vxlan_args,
)
from weft_helpers import WEFT, iperf3_transfer, needs_paths, status

from control.lab.topology import Lab
from dataplane.io import egress_tap
from dataplane.io.cpus import format_cpu_list, rps_mask

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one for weft, one for RPS"
)


def received_rps() -> list[int]:
    """Per CPU: times it was sent packets by another CPU's RPS (softnet_stat column 10)."""
    rows = Path("/proc/net/softnet_stat").read_text().split("\n")
    return [int(row.split()[9], 16) for row in rows if row.strip()]


def thread_cpus(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


@needs_paths("tunnel_gso")  # the egress TAP's RPS
@pytest.mark.parametrize("queues", [1, 2])
def test_weft_on_its_cpu_and_the_egress_work_on_the_others(
    lab: Lab, tmp_path: Path, queues: int
) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    kmac = kernel_vxlan_node(lab, n2, n1)
    cpu = min(os.sched_getaffinity(0))
    others = sorted(os.sched_getaffinity(0) - {cpu})
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, kmac, "on")
    args += ["--cpus", str(cpu), "--queues", str(queues)]
    proc, sock = start(lab, n1, args, tmp_path, "n1")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)

    st = status(sock)
    assert st["placement"] == f"CPU {cpu}; egress work on CPU {format_cpu_list(others)} (RPS)"
    assert thread_cpus(proc.pid) == {frozenset({cpu})}
    tap = egress_tap.egress_name("weft.1")
    for q in range(queues):  # each queue's process sets its own queue
        mask = lab.run(n1, "cat", f"/sys/class/net/{tap}/queues/rx-{q}/rps_cpus").stdout
        # (the kernel prints as many hex digits as the machine has CPUs)
        assert int(mask.strip().replace(",", ""), 16) == int(rps_mask(others).replace(",", ""), 16)
    if queues > 1:
        workers = [w["pid"] for w in st["queues"]["workers"]]
        assert workers and all(thread_cpus(pid) == {frozenset({cpu})} for pid in workers)

    before_rps = received_rps()
    before_csum = nstat(lab, pod2, "TcpInCsumErrors", "TcpExtTCPCsumErrors")
    end = iperf3_transfer(lab, pod1, pod2)
    assert end["sum_received"]["bytes"] > 1_000_000
    assert nstat(lab, pod2, "TcpInCsumErrors", "TcpExtTCPCsumErrors") == before_csum
    steered = [b - a for a, b in zip(before_rps, received_rps(), strict=True)]
    assert sum(steered[c] for c in others if c < len(steered)) > 0, steered
    fc = status(sock)["offload"]["counters"]
    assert fc["gso_sends"] > 0  # the transfer went through the egress TAP


def test_a_cpu_not_available_is_a_one_line_error(lab: Lab, tmp_path: Path) -> None:
    n1, n2, _pod1, _pod2 = two_node_pods(lab, mtu=1450)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC, "auto")
    cp = lab.run(n1, *WEFT, *args, "--cpus", "4095", check=False)
    assert cp.returncode == 1
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cpus: CPU 4095 is not available" in lines[0], cp.stderr
