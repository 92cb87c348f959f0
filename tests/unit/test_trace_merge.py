"""Events traced by queue workers join the client's stream under its limits
(Tracer.take): the count, the buffer, and one rate for all queues together."""

from __future__ import annotations

from ipaddress import IPv4Address

from dataplane.trace import Subscription, TraceFilter, Tracer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracer(clock: Clock) -> Tracer:
    return Tracer(
        "vxlan", local_ip=IPv4Address("192.168.77.10"), local_mac=b"\x02" * 6, port=8472,
        l2_device=False, clock=clock,
    )  # fmt: skip


def events(n: int) -> list[dict[str, object]]:
    return [{"dir": "tx", "n": i} for i in range(n)]


def test_workers_events_share_the_client_s_rate() -> None:
    clock = Clock()
    t = tracer(clock)
    sub = t.subscribe(Subscription(TraceFilter.parse(""), max_rate=10))
    woken = []
    sub.wakeup = lambda: woken.append(1)
    t.take(sub, events(25))  # two workers' worth at once: only the budget passes
    assert len(sub.events) == 10 and sub.lost == 15 and woken
    t.take(sub, events(5))  # no time has passed: no budget
    assert len(sub.events) == 10 and sub.lost == 20
    clock.now += 0.5  # half a second: five more
    t.take(sub, events(8))
    assert len(sub.events) == 15 and sub.lost == 23
    assert [e["n"] for e in list(sub.events)[10:]] == [0, 1, 2, 3, 4]


def test_count_and_buffer_limits_hold_for_merged_events() -> None:
    clock = Clock()
    t = tracer(clock)
    sub = t.subscribe(Subscription(TraceFilter.parse(""), max_rate=1000, limit=3))
    t.take(sub, events(10))
    assert len(sub.events) == 3 and sub.done
    small = t.subscribe(Subscription(TraceFilter.parse(""), max_rate=1000, maxlen=4))
    t.take(small, events(10))
    assert len(small.events) == 4 and small.lost == 6
