"""idle.IdleGaps: which callbacks take their first packet alone (a ping, a request, the
answer to either), and which batch as before (bulk traffic, a busy side)."""

from dataplane.io.idle import IDLE_NS, IdleGaps

US = 1_000
START = 10 * IDLE_NS  # well after the engine started


def test_after_the_engine_was_idle_either_side_starts_alone() -> None:
    gaps = IdleGaps()
    gaps.device_done(START, lone=False)
    assert gaps.device_idle(START + IDLE_NS + 1)
    assert gaps.network_idle(START + IDLE_NS + 1)
    assert not gaps.device_idle(START + 100 * US)
    assert not gaps.network_idle(START + 100 * US)


def test_the_answer_to_a_lone_packet_sent_is_taken_alone() -> None:
    """A ping's echo went out alone after a gap; its reply comes back 0.1 ms later."""
    gaps = IdleGaps()
    gaps.network_done(START, lone=True)  # the last reply, 10 ms before
    gaps.device_done(START + 10_000 * US, lone=True)  # the next echo request
    assert gaps.network_idle(START + 10_100 * US)


def test_the_reply_to_a_lone_datagram_received_is_sent_alone() -> None:
    """A request came in alone after a gap; the pod's reply follows 0.1 ms later."""
    gaps = IdleGaps()
    gaps.device_done(START, lone=True)  # the last reply sent, 10 ms before
    gaps.network_done(START + 10_000 * US, lone=True)
    assert gaps.device_idle(START + 10_100 * US)


def test_bulk_traffic_keeps_batching() -> None:
    """A bulk sender's device callbacks read super-packets (never lone): the ACKs
    received between them are read in batches, however quiet the socket was."""
    gaps = IdleGaps()
    gaps.network_done(START, lone=False)
    gaps.device_done(START + 10_000 * US, lone=False)
    assert not gaps.network_idle(START + 10_100 * US)
    # … and a receiver of bulk traffic (GRO messages, never lone) sends its ACKs so.
    gaps = IdleGaps()
    gaps.device_done(START, lone=False)
    gaps.network_done(START + 10_000 * US, lone=False)
    assert not gaps.device_idle(START + 10_100 * US)


def test_a_busy_side_is_not_idle_for_the_other_sides_lone_packet() -> None:
    """The receive side's own last callback ended 0.1 ms ago: it batches, whatever the
    device side did."""
    gaps = IdleGaps()
    gaps.network_done(START, lone=False)
    gaps.device_done(START + 50 * US, lone=True)
    assert not gaps.network_idle(START + 100 * US)
    gaps = IdleGaps()
    gaps.device_done(START, lone=False)
    gaps.network_done(START + 50 * US, lone=True)
    assert not gaps.device_idle(START + 100 * US)
