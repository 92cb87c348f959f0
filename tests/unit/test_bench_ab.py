"""bench.ab: the summary of interleaved pairs, and its argument errors."""

from __future__ import annotations

import pytest

from bench import ab


def test_summary_gives_means_and_ratios_to_kernel_vxlan() -> None:
    records = [
        {"round": 0, "mode": "kernel-vxlan", "variant": "A", "test": "tcp4", "value": 4.0},
        {"round": 1, "mode": "kernel-vxlan", "variant": "A", "test": "tcp4", "value": 6.0},
        {"round": 0, "mode": "weft-vxlan-kernel", "variant": "A", "test": "tcp4", "value": 3.0},
        {"round": 0, "mode": "weft-vxlan-kernel", "variant": "B", "test": "tcp4", "value": 5.0},
    ]
    lines = ab.summary(records)
    assert lines[0].startswith("kernel-vxlan") and "mean 5.00 (1.00× kernel VXLAN)" in lines[0]
    assert "A   tcp4   3.00  mean 3.00 (0.60× kernel VXLAN)" in lines[1]
    assert "B   tcp4   5.00  mean 5.00 (1.00× kernel VXLAN)" in lines[2]


def test_unknown_modes_and_tests_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert ab.main(["--modes", "weft-vxlan,warp", "--tests", "tcp9"]) == 2
    err = capsys.readouterr().err
    assert err == "python -m bench.ab: unknown mode or test: warp, tcp9\n"
