"""Python's cyclic garbage collector, kept out of the packet path's way.

A full collection (generation 2) walks every container object the process holds. In
a weft process that is ~41,500 of them, nearly all from its imports, and on the Intel
VM of decisions §36 one took 30–46 ms in the middle of a TCP stream: a stall in which
nothing is forwarded (pings through it then took up to 54 ms). So once the dataplane
is up, `settle` collects what garbage there is and moves every object left out of
the collector's reach for good (`gc.freeze`): later full collections walk only what
came after, 0.1–0.2 ms. The imports are frozen without a collection when the
process starts watching (a collection over them would itself be the long pause);
the collection once the dataplane is up walks only what its start made. Objects
frozen are still freed when their last reference goes; only a cycle among them
would stay.

Only in weft's own processes (`watch`, called by the command line's `dataplane run`,
`agent` — with the userspace engine — and each queue worker): a program that
imports weft tunes its own collector.
`GcPauses` counts the collections of each generation since then and keeps the
longest, for `weft status`.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

GENERATIONS = 3


class GcPauses:
    """Collections per generation, their total and longest time (gc.callbacks)."""

    __slots__ = (
        "_clock", "_started", "collections", "frozen", "longest_ns", "settle_ns", "total_ns",
    )  # fmt: skip

    def __init__(self, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self._clock = clock
        self._started = 0
        self.frozen = 0  # objects moved out of the collector's reach by settle()
        self.settle_ns = 0  # how long the last settle() took
        self.reset()

    def reset(self) -> None:
        self.collections = [0] * GENERATIONS
        self.total_ns = [0] * GENERATIONS
        self.longest_ns = [0] * GENERATIONS

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        took = self._clock() - self._started
        g = info["generation"]
        self.collections[g] += 1
        self.total_ns[g] += took
        if took > self.longest_ns[g]:
            self.longest_ns[g] = took

    def as_dict(self) -> dict[str, object]:
        return {
            "frozen": self.frozen,
            "settle_ms": round(self.settle_ns / 1e6, 3),
            "collections": list(self.collections),
            "total_ms": [round(ns / 1e6, 3) for ns in self.total_ns],
            "longest_ms": [round(ns / 1e6, 3) for ns in self.longest_ns],
        }


_watched: GcPauses | None = None


def watch() -> GcPauses:
    """Freeze what the process holds now (its imports), count its collections from
    here on, and let `settle_soon` collect and freeze what the dataplane's start adds
    (a short collection: only what is not yet frozen). Freezing alone costs next to
    nothing; a collection first would walk all of it (~40 ms here, more on a loaded
    machine), and an agent restarted under traffic would carry packets that much
    later. What garbage the imports left stays, once: a bounded few cycles.
    Idempotent."""
    global _watched
    if _watched is None:
        _watched = GcPauses()
        gc.freeze()
        _watched.frozen = gc.get_freeze_count()
        gc.callbacks.append(_watched.on_gc)
    return _watched


def watched() -> GcPauses | None:
    return _watched


def settle(pauses: GcPauses) -> None:
    """Collect, then freeze everything left (nothing that is garbage is frozen); the
    counts start again from here, so the collect's own pause is not among them."""
    started = time.perf_counter_ns()
    gc.collect()
    gc.freeze()
    pauses.settle_ns = time.perf_counter_ns() - started
    pauses.frozen = gc.get_freeze_count()
    pauses.reset()


def settle_soon(loop: asyncio.AbstractEventLoop) -> None:
    """In a watched process, settle once the current start-up step has returned."""
    if _watched is not None:
        loop.call_soon(settle, _watched)
