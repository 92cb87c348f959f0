"""Interleaved A/B pairs: weft with one set of options against another, lab by lab.

On a noisy machine two `python -m bench` runs an hour apart differ by more than
most changes bring; pairs built one after the other, in alternating order, do
not. Each round builds a fresh lab per mode and variant (bench.env.build, as the
bench does) and runs the probes in it; kernel modes run once per round, for the
ratios.

    python -m bench.ab --modes kernel-vxlan,weft-vxlan-kernel --tests tcp4,tcp1 \\
        --rounds 3 --b "--queues 2" --out ab.json

Prints one JSON line per probe and a summary (mean, ratio to kernel VXLAN).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import env as envmod
from bench import probes

TESTS = ("tcp1", "tcp4", "udp64")


def probe(env: envmod.Env, test: str, seconds: float) -> float:
    """Gbit/s for TCP, thousands of datagrams a second received for udp64."""
    if test == "udp64":
        return probes.udp_small(env, seconds).received_pps / 1e3
    streams = 4 if test == "tcp4" else 1
    return probes.tcp(env, seconds, streams=streams).bits_per_second / 1e9


def run(
    modes: list[str], tests: list[str], rounds: int, variants: dict[str, list[str]], seconds: float
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in range(rounds):
        for mode in modes:
            m = envmod.MODES[mode]
            names = list(variants) if "weft" in mode else [next(iter(variants))]
            for name in names if r % 2 == 0 else names[::-1]:
                with tempfile.TemporaryDirectory(prefix="weft-ab") as wd:
                    env = envmod.build(m, "wire", 1500, Path(wd), Path(wd), tuple(variants[name]))
                    try:
                        for test in tests:
                            value = probe(env, test, seconds)
                            rec = {"round": r, "mode": mode, "variant": name, "test": test}
                            rec["value"] = round(value, 3)
                            print(json.dumps(rec), flush=True)
                            out.append(rec)
                    finally:
                        env.lab.close()
    return out


def summary(records: list[dict[str, Any]]) -> list[str]:
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for rec in records:
        values[(rec["mode"], rec["variant"], rec["test"])].append(rec["value"])
    lines = []
    for (mode, variant, test), vs in sorted(values.items()):
        mean = statistics.mean(vs)
        base = [v for (m, _, t), v in values.items() if m == "kernel-vxlan" and t == test]
        ratio = f" ({mean / statistics.mean(base[0]):.2f}× kernel VXLAN)" if base else ""
        shown = " / ".join(f"{v:.2f}" for v in vs)
        lines.append(f"{mode:<20} {variant:<3} {test:<6} {shown}  mean {mean:.2f}{ratio}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="kernel-vxlan,weft-vxlan")
    p.add_argument("--tests", default="tcp4,tcp1,udp64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--a", default="", help="options for every weft of variant A (default none)")
    p.add_argument("--b", default="--queues 2", help="options for variant B")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    tests = [t for t in args.tests.split(",") if t]
    bad = [m for m in modes if m not in envmod.MODES] + [t for t in tests if t not in TESTS]
    if bad:
        print(f"python -m bench.ab: unknown mode or test: {', '.join(bad)}", file=sys.stderr)
        return 2
    variants = {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    records = run(modes, tests, args.rounds, variants, args.seconds)
    print("\n".join(summary(records)))
    if args.out:
        args.out.write_text(json.dumps({"variants": variants, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
