"""Where the time goes: py-spy samples of the weft processes during extra runs.

Optional (``--profile``; needs ``py-spy`` on PATH or next to this Python). The
profiled runs come after the measurements and are not counted in them:
sampling perturbs what it samples. Idle samples (the event loop waiting in
epoll) are left out, so the shares are of the time each process was busy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

PYSPY_RATE = 250  # samples per second


def pyspy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() and os.access(local, os.X_OK) else None


def leaf_shares(raw: str, top: int = 12) -> tuple[int, list[tuple[str, float]]]:
    """From py-spy's ``--format raw`` (collapsed stacks: ``f1;f2;…;leaf COUNT``): the
    total samples and the ``top`` leaf functions by share of samples.

    A frame reads ``function (file.py:line)``; lines of one function are merged, and
    the file is shortened to its last two path parts.
    """
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        line = line.strip()
        if not line or " " not in line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        total += n
        leaves[_function_of(stack.split(";")[-1])] += n
    if total == 0:
        return 0, []
    return total, [(name, n / total) for name, n in leaves.most_common(top)]


def _function_of(frame: str) -> str:
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:]) if path else "?"
    return f"{name.strip()} ({short})"


def profile_run(env: Any, run: Any, seconds: float, out: Path, label: str) -> dict[str, Any]:
    """Sample every weft process of ``env`` while ``run()`` runs; shares per node."""
    exe = pyspy()
    if exe is None:
        return {"error": "py-spy not found (pip install py-spy)"}
    spies: dict[str, tuple[subprocess.Popen, Path]] = {}
    for name, proc in env.weft.items():
        path = out / f"profile-{label}-{name}.txt"
        argv = [
            exe,
            "record",
            "--pid",
            str(proc.pid),
            "--format",
            "raw",
            "--rate",
            str(PYSPY_RATE),
            "--duration",
            str(int(seconds + 2)),
            "--nonblocking",
            "-o",
            str(path),
        ]
        spies[name] = (
            subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
            path,
        )
    result: dict[str, Any] = {}
    try:
        result["run"] = run()
    finally:
        for name, (spy, path) in spies.items():
            try:
                _, err = spy.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                with contextlib.suppress(Exception):
                    spy.communicate(timeout=5)
                err = "py-spy timed out"
            if path.exists():
                total, shares = leaf_shares(path.read_text())
                result[name] = {"samples": total, "top": shares}
            else:
                result[name] = {"error": (err or "no output")[-300:]}
    return result
