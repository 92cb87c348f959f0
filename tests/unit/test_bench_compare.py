"""bench compare: ratios to kernel VXLAN from two runs, regressions flagged by direction."""

from __future__ import annotations

import json
from pathlib import Path

from bench import compare


def _run(mode: str, **ratios: float) -> dict:
    return {
        "setting": "wire",
        "mtu": 1500,
        "mode": mode,
        "ratios": {m: {"vs_kernel_vxlan": v, "vs_plain": None} for m, v in ratios.items()},
    }


OLD = {
    "runs": [
        _run("kernel-vxlan", tcp1_gbps=1.0),
        _run("weft-vxlan", tcp1_gbps=0.40, ping_p50_ms=5.0, rr_per_s=0.30),
    ]
}
NEW = {
    "runs": [
        _run("kernel-vxlan", tcp1_gbps=1.0),
        _run("weft-vxlan", tcp1_gbps=0.30, ping_p50_ms=6.0, rr_per_s=0.32),
        _run("weft-udp", tcp1_gbps=0.5),
    ]
}


def _by_metric(changes: list[compare.Change], mode: str) -> dict[str, compare.Change]:
    return {c.metric: c for c in changes if c.mode == mode}


def test_direction_decides_what_a_regression_is() -> None:
    changes = compare.compare(OLD, NEW)
    assert all(c.mode != "kernel-vxlan" for c in changes)
    weft = _by_metric(changes, "weft-vxlan")
    assert weft["tcp1_gbps"].regression(0.10)  # 0.40 → 0.30: 25 % less throughput
    assert weft["ping_p50_ms"].regression(0.10)  # 5× → 6× the kernel's latency
    assert not weft["rr_per_s"].regression(0.10)  # better
    assert not weft["ping_p50_ms"].regression(0.25)  # +20 % is within a 25 % threshold
    assert weft["udp64_kpps"].change is None  # in neither run


def test_a_mode_in_one_run_only_is_listed_not_a_regression(tmp_path: Path) -> None:
    udp = _by_metric(compare.compare(OLD, NEW), "weft-udp")["tcp1_gbps"]
    assert (udp.old, udp.new) == (None, 0.5) and not udp.regression(0.1)
    text = compare.markdown(compare.compare(OLD, NEW), 0.1, "a", "b")
    assert "only in one run" in text and "**regression**" in text


def test_main_exit_codes(tmp_path: Path, capsys) -> None:
    old, new, bad = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "bad.json"
    old.write_text(json.dumps(OLD))
    new.write_text(json.dumps(NEW))
    bad.write_text("{not json")
    assert compare.main(old, new) == 1
    assert compare.main(old, old) == 0
    assert compare.main(old, bad) == 2
    assert compare.main(old, tmp_path / "missing.json") == 2
    out = capsys.readouterr().out
    assert "bench compare:" in out and "Traceback" not in out


def test_runs_from_different_machines_are_said_to_be(tmp_path: Path, capsys) -> None:
    """The nineteenth round: every weft ratio flagged, and the machine had changed
    (AMD → Intel). The report says which machine fields differ, before the table;
    runs from one machine (or that recorded none) get no such line."""
    amd = {"cpu_model": "AMD EPYC", "nproc": 2, "kernel": "6.18.44-fc-v657", "python": "3.11.7"}
    intel = {
        **amd,
        "cpu_model": "Intel(R) Xeon(R) Processor @ 2.00GHz",
        "kernel": "6.18.44-fc-v782",
    }
    old, new = {**OLD, "machine": amd}, {**NEW, "machine": intel}
    assert compare.machine_differences(old, new) == [
        "CPU: AMD EPYC → Intel(R) Xeon(R) Processor @ 2.00GHz",
        "kernel: 6.18.44-fc-v657 → 6.18.44-fc-v782",
    ]
    assert compare.machine_differences(old, {**NEW, "machine": amd}) == []
    assert compare.machine_differences(OLD, new) == []
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps(new))
    assert compare.main(a, b) == 1  # still flagged: the note explains, it does not excuse
    out = capsys.readouterr().out
    assert out.index("**Different machines** (CPU: AMD EPYC → Intel") < out.index("| setting")
    assert "bench.ab --a-src" in out
    assert compare.main(a, a) == 0
    assert "Different machines" not in capsys.readouterr().out
