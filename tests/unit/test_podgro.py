"""control/podgro.py's choice of which bridge ports to tune (pure), and its option."""

from __future__ import annotations

import argparse

import pytest

from control.cli import parse_flush_us
from control.podgro import ports_to_tune


def test_new_veths_only_and_each_once() -> None:
    tuned: set[int] = set()
    ports = [(7, "veth1", "veth"), (8, "vxlan0", "vxlan"), (9, "eth1", ""), (10, "veth2", "veth")]
    assert ports_to_tune(ports, tuned) == [(7, "veth1"), (10, "veth2")]
    tuned |= {7, 10}
    assert ports_to_tune(ports, tuned) == []


def test_an_index_that_left_the_bridge_is_forgotten() -> None:
    """A deleted pod's index may come back with a new pod's veth: tuned again."""
    tuned = {7, 10}
    assert ports_to_tune([(10, "veth2", "veth")], tuned) == []
    assert tuned == {10}
    assert ports_to_tune([(10, "veth2", "veth"), (7, "veth9", "veth")], tuned) == [(7, "veth9")]


def test_flush_timeout_option_takes_1_to_10000_us() -> None:
    assert parse_flush_us("20") == 20 and parse_flush_us("10000") == 10_000
    for bad, why in (("0", "0: expected 1..10000 µs"), ("20000", "20000: expected 1..10000 µs"),
                     ("20us", "expected microseconds, got '20us'")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            parse_flush_us(bad)
