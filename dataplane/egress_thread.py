"""When the egress TAP's kernel work should run in a kernel thread (`--egress-thread auto`).

weft writes each super-packet to its egress TAP, and without a thread the kernel's
whole send path (tunnel GSO, checksums, forwarding, on one machine the receiver's
softirq too) runs inside that write: weft reads the pod's next super-packet only
when the kernel is done with the last. Where weft's one thread is the limit and a
CPU sits idle, a kernel thread (threaded NAPI) takes that work beside weft: weft →
kernel VXLAN moved ~30 % more here (decisions §20, §23). Elsewhere it costs: every
CPU busy (weft ↔ weft on one 2-CPU machine lost 20 %), small packets (a wake-up of
the thread per write), a rate the sender caps (the same bytes for ~30 % more CPU).

So the thread is tried, and kept only where it pays:

- off → trial: weft busy all the time (`on_busy` of a CPU), `on_idle` CPUs idle,
  and bulk traffic (datagrams of `bulk_bytes` on average) — `windows` in a row;
- trial → on: the `windows` windows after the next move `gain` times the bytes a
  second of the windows before, or nearly as many (`keep`) for no more of the
  machine's CPU a byte (where weft is the limit, the thread costs the machine less
  CPU a byte, so a gain lost in a second's noise still shows; where the sender caps
  the rate it costs more); else off, held off (below);
- on → off: the machine out of idle CPU (`off_idle`; held off), the traffic no
  longer bulk, nearly stopped (`off_busy`), or the rate fallen below `drop` of what
  it was (the sender slowed: see whether weft is still the limit without it).

After a trial that did not pay or a switch for want of CPU, the thread may not
come on for a while, doubled at each such switch, so that a machine on the edge
does not see it come and go every second.

With `--queues N` the TAP has one switch for all its queues, so queue 0 decides
from every queue's process: the busiest one's CPU (each process's one thread is its
own limit) and the bytes all of them sent (`QueueTotals`), and it tells the workers
of a switch (dataplane/io/queues.py: before the thread comes on, so that each
orders its flows' packets from then on; after it goes off).

Pure: fed one measurement window at a time (the node measures: dataplane/io/cpus.
CpuMeter the machine, QueueSample each queue's process and forwarder counters); the
caller writes the kernel's switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

#: How long one measurement window lasts.
WINDOW_S = 0.5
#: A trial is measured against this many windows before it (a single stream's rate
#: varies by a tenth or more from one second to the next) …
BASE_WINDOWS = 4
#: … and its CPU a byte may come out this much higher and still count as no more.
COST_NOISE = 1.05
#: Windows the thread stays off after the first trial that did not pay (or a switch
#: for want of CPU), doubled at each such switch up to MAX_HOLD.
FIRST_HOLD = 2
MAX_HOLD = 120


class Window(NamedTuple):
    """One measurement window."""

    busy: float  # weft's CPU time as a share of one CPU (its thread is the limit near 1)
    idle: float  # the machine's idle time, in CPUs (0.5: half a CPU to spare)
    rate: float  # bytes weft sent to the network a second
    datagram: float  # … and their mean size (MTU-sized for bulk TCP, ~100 for small UDP)
    machine: float = 0.0  # the machine's busy time, in CPUs (every process, the kernel)


class QueueSample(NamedTuple):
    """One queue's process at one moment: running totals since it started."""

    at: float  # when it was taken (monotonic seconds)
    cpu: float  # the process's CPU time (seconds)
    nbytes: int  # bytes it sent to the network
    packets: int  # … in this many datagrams


class QueueTotals:
    """Every queue's running totals into one window's busy, rate and datagram size.

    A queue's share of a CPU and its rate are taken over its own time between two
    samples (a worker answers a few milliseconds after being asked, and one that did
    not answer this window is measured over two next time); a queue whose totals went
    back has restarted and counts from zero; a queue seen for the first time counts
    from the next window."""

    def __init__(self) -> None:
        self._last: dict[int, QueueSample] = {}

    def step(self, samples: dict[int, QueueSample]) -> tuple[float, float, float]:
        """(the busiest queue's share of one CPU, bytes a second sent by all of them,
        their mean datagram size) since each queue's last sample."""
        busy = rate = 0.0
        nbytes = packets = 0
        for queue, now in samples.items():
            last = self._last.get(queue)
            self._last[queue] = now
            if last is None or now.at <= last.at:
                continue
            if now.cpu < last.cpu or now.nbytes < last.nbytes or now.packets < last.packets:
                last = QueueSample(last.at, 0.0, 0, 0)  # a new process since
            wall = now.at - last.at
            busy = max(busy, (now.cpu - last.cpu) / wall)
            rate += (now.nbytes - last.nbytes) / wall
            nbytes += now.nbytes - last.nbytes
            packets += now.packets - last.packets
        return busy, rate, nbytes / max(packets, 1)


@dataclass
class EgressThreadPolicy:
    """The state machine above; `observe` one Window at a time."""

    on_busy: float = 0.9
    on_idle: float = 0.4
    off_idle: float = 0.1
    off_busy: float = 0.1
    bulk_bytes: float = 1000.0
    gain: float = 1.1
    keep: float = 0.9
    drop: float = 0.7
    windows: int = 2
    state: str = "off"  # off | trial | on
    switches: int = 0
    _streak: int = 0
    _seen: tuple[Window, ...] = ()  # trial: its windows so far
    _base: float = 0.0  # off: the rate before the trial; on: a moving mean of the rate
    _base_machine: float = 0.0  # the machine's busy CPUs before the trial
    _recent: tuple[Window, ...] = ()  # off: the last BASE_WINDOWS windows
    _hold: int = 0
    _next_hold: int = FIRST_HOLD

    @property
    def threaded(self) -> bool:
        return self.state != "off"

    def observe(self, w: Window) -> bool | None:
        """One window's measurement. The new setting of the thread when it should
        switch (True: on), else None."""
        if self._hold > 0:
            self._hold -= 1
            return None
        bulk = w.datagram >= self.bulk_bytes
        if self.state == "off":
            self._recent = (*self._recent[1 - BASE_WINDOWS :], w)
            want = w.busy >= self.on_busy and w.idle >= self.on_idle and bulk
            if self._count(want):
                self._base, self._base_machine = _means(self._recent)
                return self._switch("trial")
            return None
        if self.state == "trial":
            self._seen += (w,)
            if len(self._seen) <= self.windows:
                return None
            rate, machine = _means(self._seen[1:])  # (the first saw the switch itself)
            self._seen = ()
            faster = rate >= self._base * self.gain
            cheaper = rate >= self._base * self.keep and (
                machine * self._base <= self._base_machine * rate * COST_NOISE
            )
            if (faster or cheaper) and w.idle >= self.off_idle:
                self._base = rate
                self.state = "on"  # (the thread is on already: nothing to write)
                return None
            return self._switch("off", hold=True)
        starved = w.idle < self.off_idle
        fallen = w.rate < self._base * self.drop
        want = starved or fallen or not bulk or w.busy < self.off_busy
        if not want:
            self._base = 0.8 * self._base + 0.2 * w.rate
        if self._count(want):
            return self._switch("off", hold=starved)
        return None

    def _count(self, want: bool) -> bool:
        """Another window asking for a switch: enough in a row?"""
        if not want:
            self._streak = 0
            return False
        self._streak += 1
        if self._streak < self.windows:
            return False
        self._streak = 0
        return True

    def _switch(self, state: str, hold: bool = False) -> bool:
        self._seen = self._recent = ()
        self._streak = 0
        self.switches += 1
        self.state = state
        if hold:
            self._hold = self._next_hold
            self._next_hold = min(self._next_hold * 2, MAX_HOLD)
        elif state == "off":
            self._next_hold = FIRST_HOLD  # the traffic changed: start afresh
        return state != "off"

    @classmethod
    def parse(cls, text: str) -> EgressThreadPolicy:
        """`on_busy,on_idle,off_idle,off_busy[,bulk_bytes,gain,keep,drop]`
        (WEFT_EGRESS_POLICY, for tests and experiments), else ValueError."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (4, 8):
            raise ValueError(
                "expected on_busy,on_idle,off_idle,off_busy[,bulk_bytes,gain,keep,drop], "
                f"got {text!r}"
            )
        names = ("on_busy", "on_idle", "off_idle", "off_busy", "bulk_bytes", "gain", "keep",
                 "drop")  # fmt: skip
        return cls(**{n: float(p) for n, p in zip(names, parts, strict=False)})  # type: ignore[arg-type]


def _means(windows: tuple[Window, ...]) -> tuple[float, float]:
    """The mean rate and the mean busy CPUs of the machine over some windows."""
    n = len(windows)
    return sum(w.rate for w in windows) / n, sum(w.machine for w in windows) / n
