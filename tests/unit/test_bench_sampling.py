"""bench.sampling.pid_cpu_seconds counts a process's children (weft --queues N runs
its queue workers as children) while they live and after they are reaped."""

from __future__ import annotations

import subprocess
import sys

from bench.sampling import child_pids, pid_cpu_seconds

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


def test_a_child_s_cpu_counts_while_it_lives_and_after_it_is_reaped() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None and parent.stdin is not None
        assert parent.stdout.readline().strip() == "burnt"
        assert len(child_pids(parent.pid)) == 1
        live = pid_cpu_seconds(parent.pid)
        assert live is not None and live >= 0.39  # the parent alone used far less
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "reaped"
        assert child_pids(parent.pid) == []
        reaped = pid_cpu_seconds(parent.pid)
        assert reaped is not None and reaped >= live
    finally:
        parent.kill()
        parent.wait()
    assert pid_cpu_seconds(parent.pid) is None
