"""bench/stats.py and bench/overhead.py: the pure arithmetic behind the reports."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.overhead import (
    OVERHEAD,
    inner_mtu,
    tcp_payload_per_segment,
    tcp_wire_cost,
    udp_frame_bytes,
    udp_wire_bytes_per_payload,
    wire_table,
)
from bench.stats import clean, median, per_unit, percentile, ratio, summarize


def test_percentile_interpolates_between_ranks() -> None:
    data = [1.0, 2.0, 3.0, 4.0]
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 4.0
    assert percentile(data, 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_percentile_rejects_nothing_and_bad_q() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_lies_within_the_data(values: list[float], q: float) -> None:
    p = percentile(values, q)
    assert min(values) - 1e-6 <= p <= max(values) + 1e-6


def test_summarize_skips_missing_samples() -> None:
    assert summarize([3.0, None, 1.0, math.nan, 2.0]) == {
        "min": 1.0,
        "median": 2.0,
        "max": 3.0,
        "n": 3,
    }
    assert summarize([]) == {"min": None, "median": None, "max": None, "n": 0}
    assert clean([None, 1]) == [1.0]


def test_ratio_and_per_unit() -> None:
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None
    assert per_unit(2.0, 4e9, 1e9) == 0.5  # 2 CPU-seconds for 4 GB → 0.5 s/GB
    assert per_unit(2.0, 0, 1e9) is None
    assert per_unit(None, 1.0) is None


def test_overheads_are_flannels() -> None:
    assert OVERHEAD == {"none": 0, "vxlan": 50, "udp": 28, "host-gw": 0}
    assert inner_mtu(1500, 50) == 1450
    assert tcp_payload_per_segment(1500, 0) == 1448  # 1500 − IP 20 − TCP 20 − timestamps 12
    with pytest.raises(ValueError):
        inner_mtu(80, 50)


@pytest.mark.parametrize(
    ("mtu", "encap", "payload", "per_payload", "efficiency"),
    [
        (1500, "none", 1448, 1514 / 1448, 1448 / 1538),
        (1500, "udp", 1420, 1514 / 1420, 1420 / 1538),
        (1500, "vxlan", 1398, 1514 / 1398, 1398 / 1538),
        (9000, "vxlan", 8898, 9014 / 8898, 8898 / 9038),
    ],
)
def test_tcp_wire_cost(
    mtu: int, encap: str, payload: int, per_payload: float, efficiency: float
) -> None:
    cost = tcp_wire_cost(mtu, encap)
    assert cost.tcp_payload == payload
    assert cost.frame_counted == mtu + 14
    assert cost.frame_l1 == mtu + 38
    assert cost.wire_bytes_per_payload == pytest.approx(per_payload)
    assert cost.goodput_efficiency == pytest.approx(efficiency)


def test_vxlan_costs_more_than_udp_costs_more_than_none_at_every_mtu() -> None:
    for mtu in (576, 1500, 9000):
        costs = [tcp_wire_cost(mtu, e).goodput_efficiency for e in ("none", "udp", "vxlan")]
        assert costs == sorted(costs, reverse=True)
    # Jumbo frames shrink the relative cost of the headers.
    assert (
        tcp_wire_cost(9000, "vxlan").goodput_efficiency
        > tcp_wire_cost(1500, "none").goodput_efficiency
    )


def test_udp_small_frames() -> None:
    assert udp_frame_bytes(64, "none") == 106  # Ethernet 14 + IP 20 + UDP 8 + 64
    assert udp_frame_bytes(64, "vxlan") == 156
    assert udp_frame_bytes(64, "udp") == 134
    assert udp_wire_bytes_per_payload(64, "vxlan") == pytest.approx(156 / 64)


def test_wire_table_rows() -> None:
    rows = wire_table((1500,))
    assert [r["encap"] for r in rows] == ["none", "udp", "vxlan"]
    assert {"goodput_efficiency", "wire_bytes_per_payload", "tcp_payload"} <= set(rows[0])
