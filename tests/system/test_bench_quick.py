"""`python -m bench --quick`: the whole pipeline (labs, iperf3, ping, rr, udprr, JSON, markdown,
charts) runs and writes what it promises. No assertion on any speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from control.lab.netns import list_netns

ROOT = Path(__file__).resolve().parents[2]
QUICK_MODES = {"plain", "kernel-vxlan", "weft-vxlan"}


def test_quick_bench_writes_json_markdown_and_charts(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    before = set(list_netns())
    cp = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "[bench" in cp.stderr  # the progress lines
    doc = json.loads((out / "results.json").read_text())
    for key in ("machine", "params", "settings", "modes", "computed", "runs", "elapsed_s"):
        assert key in doc, key
    assert {"nproc", "cpu_model", "kernel"} <= set(doc["machine"])
    runs = doc["runs"]
    assert {r["mode"] for r in runs} >= QUICK_MODES
    assert {r["setting"] for r in runs} == {"wire", "offload"}
    for run in runs:
        assert {"summary", "ratios", "samples", "errors", "knobs", "pod_mtu"} <= set(run)
        for metric in (
            "tcp1_gbps",
            "tcp4_gbps",
            "udp64_kpps",
            "ping_p50_ms",
            "rr_per_s",
            "rr_p50_ms",
            "udp_rr_per_s",
            "udp_rr_p50_ms",
        ):
            assert metric in run["summary"], (run["mode"], metric, run["errors"])
            assert set(run["summary"][metric]) == {"min", "median", "max", "n"}
            assert set(run["ratios"][metric]) == {"vs_kernel_vxlan", "vs_plain"}
        if run["mode"].startswith("weft"):
            cpu = run["summary"]["tcp1_weft_cpu_s_per_gb"]["median"]
            in_user = run["summary"]["tcp1_weft_user_cpu_s_per_gb"]["median"]  # Python, numpy
            assert 0 < in_user <= cpu, (run["mode"], in_user, cpu)
        for where in ("pod_socket", "node_socket", "devices", "weft"):
            lost = run["summary"][f"udp64_lost_{where}_pct"]  # where 64 B datagrams were lost
            assert lost["min"] >= 0, (run["mode"], where, lost)
    md = (out / "results.md").read_text()
    assert "| mode | TCP 1 stream (Gbit/s)" in md and "kernel VXLAN" in md
    assert "Where the UDP 64 B datagrams were lost (% of those sent):" in md
    assert "Computed wire cost" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["dataplane_offload_1500.png", "dataplane_wire_1500.png"]
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in md
    # Nothing left behind: every namespace the bench made is gone.
    leftover = {n for n in set(list_netns()) - before if n.startswith("wl")}
    mine = {n for n in leftover if any(n.startswith(lab_tag) for lab_tag in _tags(out))}
    assert not mine, mine


def _tags(out: Path) -> set[str]:
    """The lab tags the run used (its logs are named after them)."""
    return {p.name.split("-")[0] for p in (out / "logs").glob("wl*")}
