"""idle.IdleGaps: which callbacks take their first packet alone (a ping, a request, the
answer to either), and which batch as before (bulk traffic, a busy side)."""

import pytest

from dataplane.io.idle import IDLE_NS, IdleGaps

US = 1_000
START = 10 * IDLE_NS  # well after the engine started
OTHER = {"device": "network", "network": "device"}


def starts_alone(side: str, history: list[tuple[str, int, bool]], now_us: int) -> bool:
    """Does a `side` callback at START + now_us start after a gap, once the callbacks
    in `history` (side, end in µs after START, took a lone packet) have run?"""
    gaps = IdleGaps()
    for done_side, end_us, lone in history:
        getattr(gaps, f"{done_side}_done")(START + end_us * US, lone)
    return bool(getattr(gaps, f"{side}_idle")(START + now_us * US))


@pytest.mark.parametrize("side", ["device", "network"])
def test_after_the_engine_was_idle_either_side_starts_alone(side: str) -> None:
    assert starts_alone(side, [("device", 0, False)], 251)
    assert starts_alone(side, [("network", 0, False)], 251)
    assert not starts_alone(side, [("device", 0, False)], 100)
    assert not starts_alone(side, [("network", 0, False)], 100)


@pytest.mark.parametrize("side", ["device", "network"])
def test_the_answer_to_a_lone_packet_is_taken_alone(side: str) -> None:
    """network: a ping's echo went out alone after a gap, its reply comes back 0.1 ms
    later; device: a request came in alone, the pod's reply follows 0.1 ms later."""
    history = [(side, 0, True), (OTHER[side], 10_000, True)]  # the last exchange, 10 ms ago
    assert starts_alone(side, history, 10_100)


@pytest.mark.parametrize("side", ["device", "network"])
def test_bulk_traffic_keeps_batching(side: str) -> None:
    """A bulk sender's device callbacks read super-packets, a bulk receiver's network
    callbacks GRO messages (never lone): what the other side does between them is
    read in batches, however quiet that side was."""
    history = [(side, 0, False), (OTHER[side], 10_000, False)]
    assert not starts_alone(side, history, 10_100)


@pytest.mark.parametrize("side", ["device", "network"])
def test_a_busy_side_is_not_idle_for_the_other_sides_lone_packet(side: str) -> None:
    """This side's own last callback ended 0.1 ms ago: it batches, whatever the other
    side did."""
    history = [(side, 0, False), (OTHER[side], 50, True)]
    assert not starts_alone(side, history, 100)
