"""bench.probes.turnaround_under_load in a real lab: the capture at n2's underlay sees
the pings inside VXLAN (the filter's offsets are right) and pairs them.

No assertion on any speed: only what must hold whatever the machine — every
turnaround is part of its ping's round trip, so the pings' median is longer than
the turnarounds' median."""

from __future__ import annotations

from pathlib import Path

from bench import env as envmod
from bench import probes


def test_turnarounds_at_n2_are_paired_and_inside_the_round_trips(tmp_path: Path) -> None:
    env = envmod.build(envmod.MODES["weft-vxlan"], "wire", 1500, tmp_path, tmp_path)
    try:
        got = probes.turnaround_under_load(env, 2.0, "100M")
    finally:
        env.close()
    assert got["n"] >= 300, got  # of 400 pings, nearly all paired
    assert 0 < got["p50_us"] <= got["p90_us"] <= got["p99_us"], got  # type: ignore[operator]
    assert got["rtt_p50_ms"] * 1000 > got["p50_us"], got  # type: ignore[operator]
