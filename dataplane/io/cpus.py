"""Where the dataplane's work runs (`--cpus LIST`): weft on chosen CPUs, the kernel's
work behind its egress writes on the others.

A super-packet weft writes to the egress TAP (dataplane/io/fastpath_send.py) is received
by the kernel inside that write: segmented, checksummed, routed out of the underlay
and, on a veth underlay, carried through the peer's receive path too, all charged
to weft's system call. On the send path that is most of weft's CPU (weft → kernel
VXLAN, one TCP stream: 0.79 of its 1.0 CPU in system time), and it runs one
super-packet at a time between weft's reads of the pod device. With the process
pinned to one CPU and RPS on the TAP's receive queue pointing at the other CPUs,
the write only queues the packet to another CPU's backlog and returns: weft reads
the next super-packet while the kernel segments the last one.

The pure part (`parse_cpu_list`, `plan`, `rps_mask`) decides; `pin` and `RpsSetting`
are the thin adapters (sched_setaffinity on every thread, a sysfs file). `CpuMeter`
measures the machine's CPU for `--egress-thread auto`
(dataplane/egress_thread.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SYS_CLASS_NET = Path("/sys/class/net")


class CpuListError(ValueError):
    """A --cpus value that does not name CPUs this process may use."""


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """ "0", "0,2", "0-3", "0-1,6" (as taskset and cpusets write them), in order,
    without repeats."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise CpuListError(f"{text!r} is not a CPU list (like 0 or 0,2 or 0-3)")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise CpuListError(f"{text!r}: range {part} runs backwards")
        out += [c for c in range(first, last + 1) if c not in out]
    return tuple(out)


@dataclass(frozen=True)
class Placement:
    """Queue q's process runs on pinned[q % len(pinned)]; the kernel's work behind
    the egress writes goes to `steer` (empty: stays with the writer)."""

    pinned: tuple[int, ...]
    steer: tuple[int, ...]

    def cpu_of(self, queue: int) -> int:
        return self.pinned[queue % len(self.pinned)]


def plan(pinned: tuple[int, ...], allowed: Iterable[int]) -> Placement:
    """The placement for --cpus `pinned` in a process allowed on `allowed`: every
    pinned CPU must be allowed; the rest of `allowed` takes the kernel's work."""
    usable = sorted(set(allowed))
    if not pinned:
        raise CpuListError("--cpus needs at least one CPU")
    missing = [c for c in pinned if c not in usable]
    if missing:
        raise CpuListError(
            f"--cpus: CPU {missing[0]} is not available to this process "
            f"(allowed: {format_cpu_list(usable)})"
        )
    return Placement(pinned, tuple(c for c in usable if c not in pinned))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """0,1,2,5 → "0-2,5"."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def rps_mask(cpus: Iterable[int]) -> str:
    """The hex bitmap sysfs's rps_cpus takes: 32-bit groups, most significant first,
    comma-separated ("00000006" for CPUs 1 and 2; "00000001,00000000" for CPU 32)."""
    mask = 0
    for c in cpus:
        mask |= 1 << c
    groups = [f"{mask >> shift & 0xFFFFFFFF:08x}" for shift in range(0, mask.bit_length() or 1, 32)]
    return ",".join(reversed(groups))


def pin(cpu: int) -> None:
    """Every thread of this process (and the ones it starts later) on `cpu` alone."""
    os.sched_setaffinity(0, {cpu})
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), {cpu})


class RpsSetting:
    """rps_cpus of one receive queue of a device, set and put back as it was."""

    def __init__(self, device: str, queue: int, root: Path = SYS_CLASS_NET) -> None:
        self.path = root / device / "queues" / f"rx-{queue}" / "rps_cpus"
        self.before: str | None = None

    def apply(self, cpus: Iterable[int]) -> None:
        """Raises OSError when the file cannot be read or written (no RPS in the
        kernel, a sysfs of another network namespace)."""
        self.before = self.path.read_text().strip()
        self.path.write_text(rps_mask(cpus) + "\n")

    def restore(self) -> None:
        if self.before is not None:
            with contextlib.suppress(OSError):  # the device may be gone already
                self.path.write_text(self.before + "\n")
            self.before = None


def machine_ticks(stat: str) -> tuple[int, int]:
    """(all, idle and iowait) time of all CPUs, in clock ticks, from /proc/stat's text."""
    fields = stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 6:
        raise ValueError("/proc/stat: no cpu line")
    ticks = [int(f) for f in fields[1:9]]  # user … steal (guest time is inside user)
    return sum(ticks), ticks[3] + ticks[4]


class CpuMeter:
    """The machine's idle and busy time since the last `sample` (dataplane/
    egress_thread.py decides from them; each queue's own CPU time comes with its
    QueueSample). The thin adapter: a monotonic clock and /proc/stat."""

    def __init__(self, stat_path: str = "/proc/stat") -> None:
        self._path = stat_path
        self._tick = os.sysconf("SC_CLK_TCK")
        self._last = self._read()

    def _read(self) -> tuple[float, int, int]:
        with open(self._path) as f:
            total, idle = machine_ticks(f.read())
        return time.monotonic(), total, idle

    def sample(self) -> tuple[float, float]:
        """(the machine's idle CPUs, the machine's busy CPUs) since the last call."""
        now = self._read()
        (t0, a0, i0), (t1, a1, i1) = self._last, now
        self._last = now
        wall = t1 - t0
        if wall <= 0:
            return 0.0, 0.0
        idle = (i1 - i0) / self._tick / wall
        return idle, (a1 - a0 - (i1 - i0)) / self._tick / wall
