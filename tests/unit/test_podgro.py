"""control/podgro.py's choice of which bridge ports to tune (pure)."""

from __future__ import annotations

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
