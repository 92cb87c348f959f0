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
