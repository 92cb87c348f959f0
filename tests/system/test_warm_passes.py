"""--keep-warm on real devices: two weft vxlan nodes (TUN, fast paths on) keep their
packet path warm while pods ping each other now and then, move exactly the pods'
packets (the warm passes send and count nothing but themselves), stop once the pods
are quiet for longer than the hold, and refuse a period out of range in one line."""

from __future__ import annotations

import time
from pathlib import Path

from test_fastpath import SUBNET1, SUBNET2, WEFT_MAC, WEFT_MAC2, start, two_node_pods, vxlan_args
from weft_helpers import SLOWDOWN, WEFT, status

from control.lab.topology import Lab
from dataplane.io.idle import WARM_HOLD_NS

PINGS = 20


def test_warm_passes_while_pods_ping_and_none_after(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1450)
    warm = ["--keep-warm", "2000"]
    a1 = [*vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2, "on"), *warm]
    a2 = [*vxlan_args(n2, SUBNET2, n1, SUBNET1, WEFT_MAC2, WEFT_MAC, "on"), *warm]
    _, s1 = start(lab, n1, a1, tmp_path, "n1")
    _, s2 = start(lab, n2, a2, tmp_path, "n2")
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    before = [status(s)["counters"] for s in (s1, s2)]
    assert lab.ping(pod1, pod2.ip, count=PINGS, timeout_s=30, interval_s=0.05)
    after = [status(s)["counters"] for s in (s1, s2)]
    for was, now in zip(before, after, strict=True):
        assert now["warm_passes"] > was["warm_passes"], (was, now)
        # The echo requests (n1) or replies (n2), nothing the passes made up.
        assert now["tx_packets"] - was["tx_packets"] == PINGS, (was, now)
        assert now["rx_packets"] - was["rx_packets"] == PINGS, (was, now)
        assert now["drops"] == was["drops"]
    st = status(s1)
    assert st["keep_warm_us"] == 2000
    text = lab.run(n1, *WEFT, "status", "--api-socket", str(s1)).stdout
    assert "keeping warm: a pass every 2000 µs" in text, text
    # (and, as in every weft process, what lives as long as it is frozen out of the
    # garbage collector's reach once the dataplane is up: dataplane/gc_pauses.py)
    assert st["gc"]["frozen"] > 1000, st["gc"]
    assert "objects frozen at start-up" in text, text

    # Quiet for longer than the hold: no more passes.
    time.sleep(WARM_HOLD_NS / 1e9 + 0.5 * SLOWDOWN)
    quiet = status(s1)["counters"]["warm_passes"]
    time.sleep(1.0)
    assert status(s1)["counters"]["warm_passes"] == quiet


def test_a_period_out_of_range_is_refused_in_one_line(lab: Lab, tmp_path: Path) -> None:
    n1, n2, _, _ = two_node_pods(lab, mtu=1450)
    args = vxlan_args(n1, SUBNET1, n2, SUBNET2, WEFT_MAC, WEFT_MAC2, "on")
    for bad in ("50", "200000", "-1", "often"):
        cp = lab.run(n1, *WEFT, *args, "--keep-warm", bad, check=False)
        assert cp.returncode == 2, cp
        assert "Traceback" not in cp.stderr
        errors = [line for line in cp.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "--keep-warm" in errors[0], cp.stderr
