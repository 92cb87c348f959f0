"""dataplane.gc_pauses: the collector's pauses counted per generation, and what lives
as long as a weft process frozen out of its reach once the dataplane is up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dataplane.gc_pauses import GcPauses

ROOT = Path(__file__).resolve().parents[2]


def test_pauses_are_counted_per_generation_with_the_longest() -> None:
    now = [0]
    pauses = GcPauses(clock=lambda: now[0])
    for generation, took in ((0, 200), (0, 2_000), (2, 40_000_000), (1, 3_000)):
        pauses.on_gc("start", {"generation": generation})
        now[0] += took
        pauses.on_gc("stop", {"generation": generation, "collected": 0, "uncollectable": 0})
    got = pauses.as_dict()
    assert got["collections"] == [2, 1, 1]
    assert got["longest_ms"] == [0.002, 0.003, 40.0]
    assert got["total_ms"] == [0.002, 0.003, 40.0]
    pauses.reset()
    assert pauses.as_dict()["collections"] == [0, 0, 0]


#: In a process of its own (freezing is for good): watching settles at once (the
#: imports frozen), and again once a start-up step returns; garbage made in between
#: is collected, not frozen; the counts start again after each settling collect.
SETTLE = """
import asyncio, gc, weakref
from dataplane import gc_pauses

class Node:
    pass

pauses = gc_pauses.watch()
imports = gc.get_freeze_count()
assert imports > 1000 and pauses.frozen >= imports, (imports, pauses.frozen)
assert gc_pauses.watch() is pauses and gc.callbacks.count(pauses.on_gc) == 1
garbage = Node()
garbage.me = garbage  # a cycle: only the collector frees it
alive = weakref.ref(garbage)
del garbage
gc.disable()  # (so that nothing but settle collects it)

async def main():
    gc_pauses.settle_soon(asyncio.get_running_loop())
    assert alive() is not None  # not before the start-up step returns
    await asyncio.sleep(0)
    await asyncio.sleep(0)

asyncio.run(main())
# (frozen objects freed since leave the count)
print(alive() is None, gc.get_freeze_count() > 1000, pauses.frozen >= gc.get_freeze_count(),
      pauses.as_dict()["collections"])
"""


def test_a_watched_process_collects_then_freezes_once_up() -> None:
    cp = subprocess.run(
        [sys.executable, "-c", SETTLE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["True", "True", "True", "[0,", "0,", "0]"], cp.stdout


def test_an_unwatched_process_is_left_alone() -> None:
    code = (
        "import asyncio, gc\nfrom dataplane import gc_pauses\n"
        "async def main():\n    gc_pauses.settle_soon(asyncio.get_running_loop())\n"
        "    await asyncio.sleep(0)\n"
        "asyncio.run(main())\nprint(gc.get_freeze_count(), gc_pauses.watched())\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["0", "None"]
