"""One line per step on stderr: elapsed time, step k of n, what just happened."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.total = 0
        self.done = 0
        self.t0 = time.monotonic()

    def start(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        self.note(text, counted=True)

    def note(self, text: str, counted: bool = False) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.t0
        count = f" {self.done}/{self.total}" if counted and self.total else ""
        print(f"[bench {elapsed:6.1f}s{count}] {text}", file=self.stream, flush=True)
