"""Interleaved A/B pairs: weft with one set of options against another, lab by lab.

On a noisy machine two `python -m bench` runs an hour apart differ by more than
most changes bring; pairs built one after the other, in alternating order, do
not. Each round builds a fresh lab per mode and variant (bench.env.build, as the
bench does) and runs the probes in it; kernel modes run once per round, for the
ratios.

    python -m bench.ab --modes kernel-vxlan,weft-vxlan-kernel --tests tcp4,tcp1 \\
        --rounds 3 --b "--queues 2" --out ab.json

Or two versions of weft's code, each a source tree (a `git archive` export): the
variant's weft processes run from it (their working directory and PYTHONPATH),
the bench and the lab from this one:

    git archive OLD | tar -x -C /tmp/old
    python -m bench.ab --modes kernel-vxlan,kernel-weft-vxlan --tests tcp1 \\
        --a-src /tmp/old --b "" --out ab.json

Prints one JSON line per probe and a summary (mean, ratio to kernel VXLAN, and
the CPU time the weft processes took per GB moved or per million datagrams).
Tests: tcp1, tcp4 (Gbit/s), udp64 (thousand datagrams/s received), rr and udprr
(1-byte TCP or 4-byte UDP transactions/s), ping (RTT median, ms: there the ratio is
lower-is-better). And
tcp1@RATE, tcp4@RATE, udp64@RATE: the same at a fixed offered rate (iperf3's -b,
per stream: tcp1@1500M, udp64@60M), below what either variant can do, so that the
weft CPU per GB or per datagram compares variants doing the same work: at full
speed on two CPUs it moves with who wins the CPU. pingload@RATE: pings every 5 ms
beside one TCP stream at RATE, their p99.9 (ms, lower is better): a path that
stalls now and then shows there.

`--a-python PATH` / `--b-python PATH`: the variant's weft processes run with
that Python (a venv's, with weft's dependencies): the same code under two
interpreters, lab by lab (dataplane modes; not weft-kernel, whose agents only
run weft's control plane).

`--counters ordered_sends,egress_waits,drops.send_failed` records, per probe, how
much each of weft's status counters grew (summed over the lab's weft nodes; a name
is looked up in the fast paths' counters, then the forwarder's, dots for nested
ones): what a variant did differently, beside what it cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from bench import env as envmod
from bench import probes
from bench.sampling import delta, snapshot
from bench.stats import per_unit

TESTS = ("tcp1", "tcp4", "udp64", "rr", "udprr", "ping")
#: Pings per `ping` probe, one every 10 ms (as the bench's ping test).
PINGS = 200


def known_test(test: str) -> bool:
    """One of TESTS, or ``tcp1@RATE``, ``tcp4@RATE``, ``udp64@RATE``: the test at a
    fixed offered rate (iperf3's ``-b``, per stream: ``1500M``, ``60M``), where the
    weft CPU per GB or per datagram compares variants doing the same work (at full
    speed it moves with who wins the CPU, and for udp64 how many the pod drops); or
    ``pingload@RATE``: the p99.9 of pings every 5 ms beside a TCP stream at RATE; or
    ``turnload@RATE``: the same pings' turnaround at n2 (request in, reply out of its
    underlay, µs: probes.turnaround_under_load), their p50."""
    pattern = r"(tcp1|tcp4|udp64|pingload|turnload)@[1-9][0-9]*[KMG]?"
    return test in TESTS or re.fullmatch(pattern, test) is not None


class Reading(NamedTuple):
    """One probe's result: `value` in the test's unit; the CPU seconds the weft
    processes and the whole machine took per GB or per million datagrams (None
    where they do not apply); the TCP sender's retransmits (None but for TCP)."""

    value: float
    weft_cpu: float | None = None
    machine_cpu: float | None = None
    retransmits: int | None = None
    weft_user_cpu: float | None = None  # the part of weft_cpu in user space
    extra: dict[str, float] | None = None  # more figures of the same probe, by name


def _figures(stats: dict[str, float | int | None], *keys: str) -> dict[str, float]:
    """The named figures of a probe's result that it has (not None)."""
    return {k: float(v) for k in keys if (v := stats.get(k)) is not None}


def probe(env: envmod.Env, test: str, seconds: float) -> Reading:
    """Gbit/s for TCP, thousands of datagrams a second received for udp64, 1-byte
    TCP (rr) or 4-byte UDP (udprr) transactions a second, the ping RTT's median in ms
    for ping, and its p99.9 beside a TCP stream for pingload@RATE (and the pings'
    turnaround at n2 for turnload@RATE, µs); then the CPU
    seconds the weft processes took and those the whole machine took (every process
    and the kernel's own threads: work weft hands to a kernel thread shows only
    here), per GB received (TCP) or per million datagrams received (udp64); None for
    rr, udprr and the pings, and weft's for modes without weft. TCP also gives its
    retransmits: a variant's speed bought with losses shows there."""
    if test in ("rr", "udprr"):
        return Reading(probes.rr(env, seconds, udp=test == "udprr")["per_second"])
    if test == "ping":
        p50 = probes.ping(env, PINGS, 0.01)["p50_ms"]
        return Reading(float(p50) if p50 is not None else float("nan"))
    name, _, rate = test.partition("@")
    if name == "pingload":
        stats = probes.ping_under_load(env, seconds, rate)
        p999 = stats["p999_ms"]
        # (the median and p99 beside it: where a change moves the body, not the tail)
        extra = _figures(stats, "p50_ms", "p99_ms", "gbps")
        return Reading(float(p999) if p999 is not None else float("nan"), extra=extra)
    if name == "turnload":
        turns = probes.turnaround_under_load(env, seconds, rate)
        extra = _figures(turns, "p90_us", "p99_us", "rtt_p50_ms")
        return Reading(float(turns["p50_us"]), extra=extra)  # type: ignore[arg-type]
    before = snapshot(env.weft_pids, None)
    retransmits = None
    if name == "udp64":
        udp = probes.udp_small(env, seconds, bitrate=rate or "0")
        value, moved, scale = udp.received_pps / 1e3, udp.received_packets, 1e6
    else:
        tcp = probes.tcp(env, seconds, streams=4 if name == "tcp4" else 1, bitrate=rate or None)
        value, moved, scale = tcp.bits_per_second / 1e9, tcp.bytes, 1e9
        retransmits = tcp.retransmits
    d = delta(before, snapshot(env.weft_pids, None))  # procs_cpu_s None without weft
    return Reading(
        value,
        per_unit(d.procs_cpu_s, moved, scale),
        per_unit(d.machine_cpu_s, moved, scale),
        retransmits,
        per_unit(d.procs_user_cpu_s, moved, scale),
    )


def status_count(status: dict[str, Any], name: str) -> int:
    """Counter `name` of one weft node's status: the fast paths' (offload.counters)
    first, then the forwarder's; ``drops.send_failed`` walks nested dicts. 0 when
    the node has no such counter (another backend, the plain engine)."""
    for where in ((status.get("offload") or {}).get("counters") or {}, status.get("counters")):
        value: Any = where
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int):
            return value
    return 0


def weft_counts(env: envmod.Env, names: list[str]) -> dict[str, int]:
    """The named counters summed over the lab's weft nodes."""
    nodes = env.weft_status().values() if names else ()
    return {name: sum(status_count(st, name) for st in nodes) for name in names}


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Environment variable `name` set to `value` meanwhile, then as it was."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def weft_python(python: Path | None) -> Iterator[None]:
    """Weft processes started meanwhile run with `python` (None: the bench's own)."""
    if python is None:
        yield
        return
    with _environ(envmod.WEFT_PYTHON_ENV, str(python)):
        yield


@contextlib.contextmanager
def weft_source(src: Path | None) -> Iterator[None]:
    """Weft processes started meanwhile run the code in `src` (their working
    directory comes first on their path, then PYTHONPATH); None: this tree's."""
    if src is None:
        yield
        return
    cwd = os.getcwd()
    os.chdir(src)
    try:
        with _environ("PYTHONPATH", str(src)):
            yield
    finally:
        os.chdir(cwd)


def run(
    modes: list[str],
    tests: list[str],
    rounds: int,
    variants: dict[str, list[str]],
    seconds: float,
    sources: dict[str, Path | None] | None = None,
    underlay_mtu: int = 1500,
    counters: list[str] | None = None,
    pythons: dict[str, Path | None] | None = None,
) -> list[dict[str, Any]]:
    counted = counters or []
    out: list[dict[str, Any]] = []
    for r in range(rounds):
        for mode in modes:
            m = envmod.MODES[mode]
            names = list(variants) if "weft" in mode else [next(iter(variants))]
            for name in names if r % 2 == 0 else names[::-1]:
                with tempfile.TemporaryDirectory(prefix="weft-ab") as wd:
                    with (
                        weft_source((sources or {}).get(name)),
                        weft_python((pythons or {}).get(name)),
                    ):
                        env = envmod.build(
                            m, "wire", underlay_mtu, Path(wd), Path(wd), tuple(variants[name])
                        )
                    try:
                        for test in tests:
                            before = weft_counts(env, counted)
                            got = probe(env, test, seconds)
                            after = weft_counts(env, counted)
                            rec = {"round": r, "mode": mode, "variant": name, "test": test}
                            rec["value"] = round(got.value, 3)
                            if got.weft_cpu is not None:
                                rec["weft_cpu"] = round(got.weft_cpu, 3)
                            if got.weft_user_cpu is not None:
                                rec["weft_user_cpu"] = round(got.weft_user_cpu, 3)
                            if got.machine_cpu is not None:
                                rec["machine_cpu"] = round(got.machine_cpu, 3)
                            if got.retransmits is not None:
                                rec["retransmits"] = got.retransmits
                            if got.extra:
                                rec["extra"] = {k: round(v, 3) for k, v in got.extra.items()}
                            if counted and "weft" in mode:
                                rec["counters"] = {c: after[c] - before[c] for c in counted}
                            print(json.dumps(rec), flush=True)
                            out.append(rec)
                    finally:
                        env.lab.close()
    return out


def summary(records: list[dict[str, Any]]) -> list[str]:
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    cpus: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    user: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    machine: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    retransmits: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    counts: dict[tuple[str, str, str], dict[str, list[int]]] = defaultdict(dict)
    for rec in records:
        key = (rec["mode"], rec["variant"], rec["test"])
        values[key].append(rec["value"])
        if "weft_cpu" in rec:
            cpus[key].append(rec["weft_cpu"])
        if "weft_user_cpu" in rec:
            user[key].append(rec["weft_user_cpu"])
        if "machine_cpu" in rec:
            machine[key].append(rec["machine_cpu"])
        if "retransmits" in rec:
            retransmits[key].append(rec["retransmits"])
        for name, n in (*rec.get("extra", {}).items(), *rec.get("counters", {}).items()):
            counts[key].setdefault(name, []).append(n)
    lines = []
    for (mode, variant, test), vs in sorted(values.items()):
        mean = statistics.mean(vs)
        base = [v for (m, _, t), v in values.items() if m == "kernel-vxlan" and t == test]
        ratio = f" ({mean / statistics.mean(base[0]):.2f}× kernel VXLAN)" if base else ""
        shown = " / ".join(f"{v:.2f}" for v in vs)
        cpu = cpus.get((mode, variant, test))
        unit = "s/M datagrams" if test.startswith("udp64") else "s/GB"
        used = f", weft CPU {statistics.mean(cpu):.2f} {unit}" if cpu else ""
        in_user = user.get((mode, variant, test))
        used += f" (user space {statistics.mean(in_user):.2f})" if cpu and in_user else ""
        whole = machine.get((mode, variant, test))
        used += f", machine CPU {statistics.mean(whole):.2f} {unit}" if whole else ""
        retr = retransmits.get((mode, variant, test))
        used += f", retransmits {' / '.join(map(str, retr))}" if retr else ""
        for name, ns in counts.get((mode, variant, test), {}).items():
            used += f", {name} {' / '.join(map(str, ns))}"
        lines.append(f"{mode:<20} {variant:<3} {test:<6} {shown}  mean {mean:.2f}{ratio}{used}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="kernel-vxlan,weft-vxlan")
    p.add_argument("--tests", default="tcp4,tcp1,udp64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--a", default="", help="options for every weft of variant A (default none)")
    p.add_argument("--b", default="--queues 2", help="options for variant B")
    p.add_argument("--a-src", type=Path, help="source tree variant A's weft runs from")
    p.add_argument("--b-src", type=Path, help="source tree variant B's weft runs from")
    p.add_argument("--a-python", type=Path, help="the Python variant A's weft runs with")
    p.add_argument("--b-python", type=Path, help="the Python variant B's weft runs with")
    p.add_argument("--underlay-mtu", type=int, default=1500, help="underlay MTU (default 1500)")
    p.add_argument(
        "--counters",
        default="",
        help="weft status counters to record per probe, comma-separated "
        "(e.g. ordered_sends,egress_waits,drops.send_failed)",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    tests = [t for t in args.tests.split(",") if t]
    bad = [m for m in modes if m not in envmod.MODES] + [t for t in tests if not known_test(t)]
    if bad:
        print(f"python -m bench.ab: unknown mode or test: {', '.join(bad)}", file=sys.stderr)
        return 2
    vxlan_only = [t for t in tests if t.startswith("turnload@")]
    not_vxlan = [m for m in modes if envmod.MODES[m].encap != "vxlan"]
    if vxlan_only and not_vxlan:
        print(f"python -m bench.ab: {vxlan_only[0]} needs VXLAN modes, not {', '.join(not_vxlan)}",
              file=sys.stderr)  # fmt: skip
        return 2
    sources = {"A": args.a_src, "B": args.b_src}
    for name, src in sources.items():
        if src is not None:
            sources[name] = src = src.resolve()
            if not (src / "control" / "cli.py").is_file():
                print(f"python -m bench.ab: {src}: not a weft source tree", file=sys.stderr)
                return 2
    pythons = {"A": args.a_python, "B": args.b_python}
    for python in pythons.values():
        if python is not None and not (python.is_file() and os.access(python, os.X_OK)):
            print(f"python -m bench.ab: {python}: not an executable Python", file=sys.stderr)
            return 2
    if any(pythons.values()) and "weft-kernel" in modes:
        # (its agents come from the lab cluster, with this Python: only weft's control
        # plane runs there, the kernel moves the packets)
        print("python -m bench.ab: --a-python/--b-python: weft-kernel runs weft's control "
              "plane only; choose dataplane modes", file=sys.stderr)  # fmt: skip
        return 2
    variants = {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    counters = [c for c in args.counters.split(",") if c]
    records = run(
        modes, tests, args.rounds, variants, args.seconds, sources, args.underlay_mtu, counters,
        pythons,
    )  # fmt: skip
    print("\n".join(summary(records)))
    if args.out:
        doc = {
            "variants": variants,
            "sources": {k: str(v) for k, v in sources.items() if v},
            "pythons": {k: str(v) for k, v in pythons.items() if v},
            "underlay_mtu": args.underlay_mtu,
        }
        args.out.write_text(json.dumps({**doc, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
