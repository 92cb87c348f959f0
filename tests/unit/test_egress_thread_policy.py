"""dataplane/egress_thread.py: when `--egress-thread auto` switches the kernel thread,
from windows of (weft's CPU, the machine's idle CPU) as measured in the lab
(decisions §20, §23)."""

from __future__ import annotations

import pytest

from control.cli import parse_egress_thread
from dataplane.egress_thread import (
    FIRST_HOLD,
    MAX_HOLD,
    EgressThreadPolicy,
    QueueSample,
    QueueTotals,
    Window,
)
from dataplane.io.cpus import machine_ticks

G = 1e9 / 8  # bytes a second in a Gbit/s
# As measured here with the thread off, one TCP stream (weft's CPU, idle CPUs of 2,
# rate, mean datagram, busy CPUs of the machine):
WEFT_TO_KERNEL = Window(0.99, 0.55, 2.0 * G, 1450, 1.40)  # weft the limit, a CPU half idle
WEFT_TO_WEFT = Window(0.71, 0.20, 1.8 * G, 1450, 1.80)  # the receiving weft is the limit
UDP64_TO_KERNEL = Window(1.0, 0.5, 0.03 * G, 92, 1.5)  # small datagrams: a wake-up each
CAPPED = Window(0.84, 0.6, 1.5 * G, 1450, 1.11)  # iperf3 -b 1500M: weft keeps up
# … and with it on:
THREADED = Window(0.55, 0.40, 2.6 * G, 1450, 1.55)  # 30 % more
THREADED_WORSE = Window(0.55, 0.40, 1.7 * G, 1450, 1.5)  # moves less


def run(policy: EgressThreadPolicy, windows: list[Window]) -> list[bool | None]:
    return [policy.observe(w) for w in windows]


def on(policy: EgressThreadPolicy | None = None) -> EgressThreadPolicy:
    """A policy that tried the thread on a weft → kernel stream and kept it."""
    p = policy or EgressThreadPolicy()
    assert run(p, [WEFT_TO_KERNEL] * 2) == [None, True]
    assert p.state == "trial"
    assert run(p, [THREADED] * 3) == [None, None, None]  # the first window not counted
    assert p.state == "on" and p.threaded
    return p


def test_tried_where_weft_is_the_limit_and_kept_where_it_moves_more() -> None:
    p = on()
    assert run(p, [THREADED] * 50) == [None] * 50
    assert p.switches == 1


def test_kept_where_it_moves_as_much_for_less_of_the_machine() -> None:
    p = EgressThreadPolicy()
    run(p, [WEFT_TO_KERNEL] * 2)
    assert (
        run(p, [WEFT_TO_KERNEL._replace(busy=0.55, rate=1.85 * G, machine=1.2)] * 3) == [None] * 3
    )
    assert p.state == "on"


def test_not_kept_where_it_moves_as_much_for_more() -> None:
    """A rate the sender caps, weft just busy enough to try: the same bytes for more
    of the machine's CPU."""
    p = EgressThreadPolicy()
    assert run(p, [CAPPED._replace(busy=0.92)] * 2) == [None, True]
    assert run(p, [CAPPED._replace(busy=0.45, machine=1.28)] * 3) == [None, None, False]
    assert p.state == "off"


@pytest.mark.parametrize(
    "window", [WEFT_TO_WEFT, UDP64_TO_KERNEL, CAPPED, Window(0.95, 0.2, G, 1450)]
)
def test_never_tried_otherwise(window: Window) -> None:
    p = EgressThreadPolicy()
    assert run(p, [window] * 50) == [None] * 50
    assert p.state == "off" and p.switches == 0


def test_a_switch_needs_windows_in_a_row() -> None:
    p = EgressThreadPolicy()
    assert run(p, [WEFT_TO_KERNEL, WEFT_TO_WEFT] * 10) == [None] * 20
    assert run(p, [WEFT_TO_KERNEL, WEFT_TO_KERNEL]) == [None, True]


def test_a_trial_that_moves_less_ends_and_the_next_waits_longer() -> None:
    p = EgressThreadPolicy()
    waits = []
    for _ in range(8):
        windows = 1
        while p.observe(WEFT_TO_KERNEL) is not True:
            windows += 1
        waits.append(windows - 2)  # two windows in a row start it; the rest it was held
        assert run(p, [THREADED_WORSE] * 3) == [None, None, False]
    assert waits[:3] == [0, FIRST_HOLD, 2 * FIRST_HOLD]
    assert waits == sorted(waits) and waits[-1] == MAX_HOLD


def test_off_when_the_sender_slows_and_not_tried_again_while_weft_keeps_up() -> None:
    p = on()
    slowed = THREADED._replace(rate=1.5 * G, busy=0.45)
    assert run(p, [slowed] * 2) == [None, False]
    assert run(p, [CAPPED] * 20) == [None] * 20
    assert run(p, [WEFT_TO_KERNEL] * 2) == [None, True]  # bulk again: no hold


@pytest.mark.parametrize(
    "window",
    [THREADED._replace(datagram=92, rate=0.03 * G),  # small datagrams now
     THREADED._replace(busy=0.01, rate=0.0, datagram=0)],  # the traffic stopped
)  # fmt: skip
def test_off_when_the_traffic_changes(window: Window) -> None:
    p = on()
    assert run(p, [window] * 2) == [None, False]
    assert run(p, [WEFT_TO_KERNEL] * 2) == [None, True]  # no hold


def test_off_when_the_machine_runs_out_of_idle_cpu_and_held_off() -> None:
    p = on()
    assert run(p, [THREADED._replace(idle=0.05)] * 2) == [None, False]
    assert run(p, [WEFT_TO_KERNEL] * (FIRST_HOLD + 1)) == [None] * (FIRST_HOLD + 1)
    assert p.observe(WEFT_TO_KERNEL) is True


def test_thresholds_from_text() -> None:
    p = EgressThreadPolicy.parse("0, 0, -1, 1e9, 0, 0, 0, 0")
    assert (p.on_busy, p.on_idle, p.off_idle, p.off_busy) == (0, 0, -1, 1e9)
    assert (p.bulk_bytes, p.gain, p.keep, p.drop) == (0, 0, 0, 0)
    # thresholds every window meets: the thread comes and goes (the system test's use)
    quiet = Window(0.0, 0.0, 0.0, 0.0)
    assert run(p, [quiet] * 9) == [None, True, None, None, None, None, False, None, True]
    assert EgressThreadPolicy.parse("1,2,3,4").bulk_bytes == 1000  # the others default
    for bad in ("", "1,2,3", "a,b,c,d", "1,2,3,4,5", "1,2,3,4,5,6,7"):
        with pytest.raises(ValueError):
            EgressThreadPolicy.parse(bad)


def test_ticks_from_proc_stat() -> None:
    stat = "cpu  100 2 30 4000 50 0 7 0 0 0\ncpu0 50 1 15 2000 25 0 3 0 0 0\n"
    assert machine_ticks(stat) == (4189, 4050)
    for bad in ("", "intr 1 2 3\n", "cpu 1 2\n"):
        with pytest.raises(ValueError):
            machine_ticks(bad)


@pytest.mark.parametrize(
    "text, value",
    [("auto", "auto"), ("on", "on"), ("OFF", "off"), ("1", "on"), ("true", "on"),
     ("0", "off"), ("no", "off")],
)  # fmt: skip
def test_egress_thread_values(text: str, value: str) -> None:
    assert parse_egress_thread(text) == value


def test_egress_thread_bad_value() -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="expected auto, on or off"):
        parse_egress_thread("sometimes")


def test_queue_totals_take_the_busiest_queue_and_every_queues_bytes() -> None:
    """--queues 2: queue 0 busy 95 % of a CPU sending 1 Gbit/s in 1450-byte datagrams,
    queue 1 half a CPU sending 0.5 Gbit/s in 500-byte ones."""
    totals = QueueTotals()
    assert totals.step({0: QueueSample(10.0, 3.0, 1000, 1), 1: QueueSample(10.01, 7.0, 0, 0)}) == (
        0.0,
        0.0,
        0.0,
    )  # nothing to compare with yet
    busy, rate, datagram = totals.step(
        {
            0: QueueSample(10.5, 3.0 + 0.475, 1000 + int(G / 2), 1 + int(G / 2 / 1450)),
            1: QueueSample(10.51, 7.25, int(G / 4), int(G / 4 / 500)),
        }
    )
    assert busy == pytest.approx(0.95)
    assert rate == pytest.approx(1.5 * G)
    assert datagram == pytest.approx(G * 0.75 / (G / 2 / 1450 + G / 4 / 500), rel=1e-4)


def test_queue_totals_over_each_queues_own_time() -> None:
    """A worker that did not answer one window is measured over two the next; one
    that started again (its totals went back) counts from zero; one seen for the
    first time counts from the next window."""
    totals = QueueTotals()
    totals.step({0: QueueSample(0.0, 0.0, 0, 0), 1: QueueSample(0.0, 0.0, 0, 0)})
    assert totals.step({0: QueueSample(0.5, 0.25, 500, 1)}) == (0.5, 1000.0, 500.0)
    busy, rate, _ = totals.step(
        {0: QueueSample(1.0, 0.5, 1000, 2), 1: QueueSample(1.0, 0.9, 1000, 1)}
    )
    assert busy == pytest.approx(0.9) and rate == pytest.approx(1000 + 1000)
    restarted = {0: QueueSample(1.5, 0.75, 1500, 3), 1: QueueSample(1.5, 0.2, 300, 1)}
    busy, rate, _ = totals.step(restarted)
    assert busy == pytest.approx(0.5) and rate == pytest.approx(1000 + 600)
    busy, rate, _ = totals.step({0: QueueSample(2.0, 1.0, 2000, 4), 2: QueueSample(2.0, 5.0, 9, 9)})
    assert busy == pytest.approx(0.5) and rate == pytest.approx(1000)
