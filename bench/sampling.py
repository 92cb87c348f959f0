"""Counters read before and after each measurement: CPU of our processes and of the
machine, and the underlay interface's byte and packet counters."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.parse import pid_stat_times, pid_status_rss_kb, proc_stat_cpu

CLK_TCK = os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (of all its threads); [] if it is gone."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        pass
    return out


def pid_cpu_times(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of ``pid`` (all its threads) and of its descendants —
    the live ones, and those it has reaped (cutime + cstime), so a child that ends
    between two readings still counts once; None if ``pid`` is gone. weft --queues N
    runs queues 1…N-1 as child processes."""
    try:
        user, system = pid_stat_times(Path(f"/proc/{pid}/stat").read_text(), reaped=True)
    except (OSError, ValueError):
        return None
    user_s, system_s = user / CLK_TCK, system / CLK_TCK
    for child in child_pids(pid):
        got = pid_cpu_times(child)
        if got is not None:
            user_s, system_s = user_s + got[0], system_s + got[1]
    return user_s, system_s


def pid_rss_kb(pid: int) -> int | None:
    try:
        return pid_status_rss_kb(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (all CPUs)."""
    busy, total = proc_stat_cpu(Path("/proc/stat").read_text())
    return busy / CLK_TCK, total / CLK_TCK


@dataclass(frozen=True)
class Snapshot:
    wall: float
    procs_cpu: float | None  # sum over the PIDs given (None if there were none)
    procs_user: float | None  # … of which user time (weft: Python and numpy)
    machine_busy: float
    machine_total: float
    wire_bytes: int | None
    wire_packets: int | None


def snapshot(pids: Sequence[int], wire: tuple[int, int] | None) -> Snapshot:
    cpu: float | None = None
    user: float | None = None
    if pids:
        cpu = user = 0.0
        for pid in pids:
            got = pid_cpu_times(pid)
            if got is not None:
                user += got[0]
                cpu += got[0] + got[1]
    busy, total = machine_cpu_seconds()
    return Snapshot(
        time.monotonic(),
        cpu,
        user,
        busy,
        total,
        wire[0] if wire else None,
        wire[1] if wire else None,
    )


@dataclass(frozen=True)
class Delta:
    wall_s: float
    procs_cpu_s: float | None
    procs_user_cpu_s: float | None  # … of which user time
    machine_cpu_s: float
    machine_util: float  # busy / total over the interval (0..1, all CPUs)
    wire_bytes: int | None
    wire_packets: int | None


def delta(a: Snapshot, b: Snapshot) -> Delta:
    total = b.machine_total - a.machine_total
    busy = b.machine_busy - a.machine_busy
    return Delta(
        wall_s=b.wall - a.wall,
        procs_cpu_s=(b.procs_cpu - a.procs_cpu)
        if a.procs_cpu is not None and b.procs_cpu is not None
        else None,
        procs_user_cpu_s=(b.procs_user - a.procs_user)
        if a.procs_user is not None and b.procs_user is not None
        else None,
        machine_cpu_s=busy,
        machine_util=busy / total if total > 0 else 0.0,
        wire_bytes=(b.wire_bytes - a.wire_bytes)
        if a.wire_bytes is not None and b.wire_bytes is not None
        else None,
        wire_packets=(b.wire_packets - a.wire_packets)
        if a.wire_packets is not None and b.wire_packets is not None
        else None,
    )
