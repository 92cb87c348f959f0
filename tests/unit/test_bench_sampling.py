"""bench.sampling.pid_cpu_times counts a process's children (weft --queues N runs
its queue workers as children) while they live and after they are reaped, and tells
user time from system time."""

from __future__ import annotations

import subprocess
import sys

from bench.sampling import child_pids, delta, pid_cpu_times, snapshot

CHILD = """
import sys, time
start = time.process_time()
while time.process_time() - start < 0.4:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""

PARENT = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdin=subprocess.PIPE)
sys.stdin.readline()
child.stdin.close()
child.wait()
print("reaped", flush=True)
sys.stdin.readline()
"""


def _cpu_seconds(pid: int) -> float | None:
    times = pid_cpu_times(pid)
    return None if times is None else sum(times)


def test_a_child_s_cpu_counts_while_it_lives_and_after_it_is_reaped() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None and parent.stdin is not None
        assert parent.stdout.readline().strip() == "burnt"
        assert len(child_pids(parent.pid)) == 1
        live = _cpu_seconds(parent.pid)
        assert live is not None and live >= 0.39  # the parent alone used far less
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "reaped"
        assert child_pids(parent.pid) == []
        reaped = _cpu_seconds(parent.pid)
        assert reaped is not None and reaped >= live
    finally:
        parent.kill()
        parent.wait()
    assert pid_cpu_times(parent.pid) is None


#: Burns ~0.4 s of CPU when told to, either in its own code or inside system calls
#: (the kernel clearing the pages a read of /dev/zero fills), then waits.
BURNER = """
import os, sys, time
fd = os.open("/dev/zero", os.O_RDONLY)
buf = bytearray(1 << 22)
print("ready", flush=True)
sys.stdin.readline()
start = time.process_time()
while time.process_time() - start < 0.4:  # (itself a system call: seldom)
    if sys.argv[1] == "system":
        os.readv(fd, [buf])
    else:
        sum(range(100_000))
print("burnt", flush=True)
sys.stdin.read()
"""


def test_user_and_system_time_are_told_apart() -> None:
    for where in ("user", "system"):
        proc = subprocess.Popen(
            [sys.executable, "-c", BURNER, where],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "ready"
            before = pid_cpu_times(proc.pid)
            snap = snapshot([proc.pid], None)
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "burnt"
            after = pid_cpu_times(proc.pid)
            d = delta(snap, snapshot([proc.pid], None))
            assert d.procs_cpu_s is not None and d.procs_user_cpu_s is not None
            in_user = d.procs_user_cpu_s / d.procs_cpu_s
            assert in_user > 2 / 3 if where == "user" else in_user < 1 / 3, (where, in_user)
            assert before is not None and after is not None
            user, system = after[0] - before[0], after[1] - before[1]
            busy, other = (user, system) if where == "user" else (system, user)
            assert busy >= 0.2 and busy > 2 * other, (where, user, system)
        finally:
            proc.kill()
            proc.wait()
