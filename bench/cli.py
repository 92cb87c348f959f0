"""Command line of the benchmarks: ``python -m bench [...]`` and ``weft bench [...]``.

python -m bench [--quick] [--seconds 5] [--repeat 3] [--jumbo] [--out DIR]   # dataplane
python -m bench micro [--quick] [--out DIR]                                   # in-memory
python -m bench control [--leases 1000,5000] [--out DIR]                      # etcd at scale
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path
from typing import Any

from bench import env as envmod
from control.podgro import FLUSH_TIMEOUT_US


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The dataplane benchmark's options, and the micro / control sub-commands."""
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 repeat of 1 s, modes plain, kernel-vxlan, weft-vxlan (~45 s)",
    )
    p.add_argument("--seconds", type=float, help="length of each iperf3 run (default 5)")
    p.add_argument("--repeat", type=int, help="repeats of every figure (default 3)")
    p.add_argument(
        "--modes",
        type=_csv,
        help=f"comma-separated, from: {', '.join(envmod.MODES)}; or 'all' "
        "(default: all but the opt-in naive-udp)",
    )
    p.add_argument(
        "--settings", type=_csv, help="underlay settings, from: wire, offload (default: both)"
    )
    p.add_argument(
        "--tests", type=_csv, help="from: tcp1, tcp4, udp64, ping, rr, udprr (default: all)"
    )
    p.add_argument("--underlay-mtu", type=int, default=1500, help="underlay MTU (default 1500)")
    p.add_argument(
        "--jumbo", action="store_true", help="also run the wire setting with underlay MTU 9000"
    )
    p.add_argument(
        "--budget-min",
        type=float,
        help="stop measuring after this many minutes (default 20; quick 4)",
    )
    p.add_argument("--out", type=Path, help="output directory (default results/<timestamp>/)")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument(
        "--weft-offload",
        choices=["auto", "on", "off"],
        help="pass --offload to every `weft dataplane run` (default: weft's own)",
    )
    p.add_argument(
        "--weft-busy-poll",
        type=int,
        metavar="USEC",
        help="pass --busy-poll USEC to every `weft dataplane run` (default: off)",
    )
    p.add_argument(
        "--weft-keep-warm",
        type=int,
        metavar="USEC",
        help="pass --keep-warm USEC to every `weft dataplane run` (default: off)",
    )
    p.add_argument(
        "--weft-queues",
        type=int,
        metavar="N",
        help="pass --queues N to every `weft dataplane run` (default: 1, one process)",
    )
    p.add_argument(
        "--weft-cpus",
        metavar="LIST",
        help="pass --cpus LIST to every `weft dataplane run` (weft on those CPUs, the "
        "kernel's egress work on the others; both nodes get the same list)",
    )
    p.add_argument(
        "--weft-egress-thread",
        action="store_true",
        help="pass --egress-thread (on) to every `weft dataplane run`: a kernel thread "
        "always segments and sends what weft writes to its egress TAP (weft's default, "
        "auto, uses it only where it pays)",
    )
    p.add_argument(
        "--pod-gro",
        choices=["on", "off"],
        default="on",
        help="UDP GRO forwarding on the pods' node-side veths, every mode (default on: "
        "ethtool -K gro on rx-udp-gro-forwarding on, and --pod-gro-flush-us)",
    )
    p.add_argument(
        "--pod-gro-flush-us",
        type=int,
        default=FLUSH_TIMEOUT_US,
        metavar="US",
        help="gro_flush_timeout of the pods' node-side veths with --pod-gro on, in µs "
        f"(default {FLUSH_TIMEOUT_US}, as `weft agent --pod-udp-gro`): a lone UDP "
        "datagram may wait this long (the udprr test shows it)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after measuring, sample the weft processes with py-spy during one "
        "extra TCP and one extra 64-byte UDP run (not counted in the figures)",
    )
    sub = p.add_subparsers(dest="bench_what", metavar="{micro,control,compare}")
    micro = sub.add_parser("micro", help="in-memory microbenchmarks (codec, routes, forwarder)")
    micro.add_argument("--quick", action="store_true", default=argparse.SUPPRESS)
    micro.add_argument("--out", type=Path, default=argparse.SUPPRESS)
    micro.add_argument("--best-of", type=int, default=5, help="report the best of N rounds")
    ctl = sub.add_parser("control", help="control plane at scale: a real etcd with N leases")
    ctl.add_argument(
        "--leases",
        type=_ints,
        default=(1000, 5000),
        help="comma-separated lease counts (default 1000,5000)",
    )
    ctl.add_argument(
        "--puts", type=int, default=50, help="new leases timed from put to watcher (default 50)"
    )
    ctl.add_argument("--quick", action="store_true", default=argparse.SUPPRESS)
    ctl.add_argument("--out", type=Path, default=argparse.SUPPRESS)
    cmp = sub.add_parser(
        "compare",
        help="two results.json: which ratios to kernel VXLAN got worse (exit 1 if any)",
    )
    cmp.add_argument("old", type=Path)
    cmp.add_argument("new", type=Path)
    cmp.add_argument(
        "--threshold", type=float, default=0.10,
        help="a ratio worse by more than this fraction is a regression (default 0.10)",
    )  # fmt: skip
    p.set_defaults(func=cmd_bench, bench_what=None)


def default_out() -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / stamp


def dataplane_params(args: argparse.Namespace, command: str) -> Any:
    from bench.dataplane import TESTS, Params

    quick = bool(args.quick)
    modes = args.modes or (envmod.QUICK_MODES if quick else envmod.DEFAULT_MODES)
    if modes == ("all",):
        modes = tuple(envmod.MODES)
    settings = args.settings or envmod.SETTINGS
    tests = args.tests or TESTS
    for m in modes:
        if m not in envmod.MODES:
            raise ValueError(f"unknown mode {m!r} (have: {', '.join(envmod.MODES)})")
    for s in settings:
        if s not in envmod.SETTINGS:
            raise ValueError(f"unknown setting {s!r} (have: {', '.join(envmod.SETTINGS)})")
    for t in tests:
        if t not in TESTS:
            raise ValueError(f"unknown test {t!r} (have: {', '.join(TESTS)})")
    seconds = args.seconds if args.seconds is not None else (1.0 if quick else 5.0)
    repeat = args.repeat if args.repeat is not None else (1 if quick else 3)
    if seconds <= 0 or seconds > 60 or repeat < 1 or repeat > 20:
        raise ValueError("--seconds must be in (0, 60] and --repeat in 1..20")
    if not 0 <= args.pod_gro_flush_us <= 10_000:
        raise ValueError("--pod-gro-flush-us must be in 0..10000")
    budget = args.budget_min if args.budget_min is not None else (4.0 if quick else 20.0)
    return Params(
        seconds=seconds,
        repeat=repeat,
        modes=tuple(modes),
        settings=tuple(settings),
        mtu=args.underlay_mtu,
        jumbo=args.jumbo,
        ping_count=50 if quick else 200,
        ping_interval_s=0.01,
        rr_seconds=min(seconds, 2.0),
        tests=tuple(tests),
        budget_s=budget * 60,
        quick=quick,
        profile=args.profile,
        weft_offload=args.weft_offload,
        weft_busy_poll=args.weft_busy_poll,
        weft_keep_warm=args.weft_keep_warm,
        weft_queues=args.weft_queues,
        weft_cpus=args.weft_cpus,
        weft_egress_thread=args.weft_egress_thread,
        pod_gro=args.pod_gro == "on",
        pod_gro_flush_us=args.pod_gro_flush_us,
        command=command,
    )


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every lab's ``finally`` tears it down."""
    import signal

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def cmd_bench(args: argparse.Namespace) -> int:
    _exit_on_sigterm()
    command = getattr(args, "bench_command", None) or shlex.join(sys.argv)
    if args.bench_what == "compare":
        from bench import compare

        return compare.main(args.old, args.new, args.threshold)
    out: Path = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    if args.bench_what == "micro":
        from bench import micro

        return micro.main(out, quick=bool(args.quick), best_of=args.best_of, command=command)
    if args.bench_what == "control":
        from bench import controlplane

        return controlplane.main(
            out, args.leases, puts=args.puts, quick=bool(args.quick), command=command
        )
    return run_dataplane(args, out, command)


def run_dataplane(args: argparse.Namespace, out: Path, command: str) -> int:
    from bench import charts, dataplane, report
    from bench.progress import Progress

    params = dataplane_params(args, command)
    progress = Progress()
    progress.note(f"writing to {out}/")

    def save(doc: dict[str, Any]) -> None:
        report.write_json(doc, out)
        report.write_markdown(doc, out)

    doc = dataplane.run(params, out, progress, on_block=save)
    names: list[str] = []
    if not args.no_charts:
        if charts.available():
            names = charts.write_charts(doc, out)
        else:
            progress.note("matplotlib is not installed: no charts (pip install 'weft[bench]')")
    doc["charts"] = names
    report.write_json(doc, out)
    md = report.write_markdown(doc, out, names)
    progress.note(
        f"done in {doc['elapsed_s']} s: {out / 'results.json'}, {md}"
        + (f", {len(names)} chart(s)" if names else "")
    )
    errors = sum(len(r.get("errors", [])) for r in doc["runs"])
    if errors:
        progress.note(f"{errors} step(s) failed; see the Errors sections of {md}")
    return 0


def register(sub: Any) -> None:
    """``weft bench``: the same arguments as ``python -m bench``."""
    p = sub.add_parser("bench", help="benchmarks: weft against the kernel, side by side")
    add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="weft benchmarks: the dataplane against the Linux kernel, in one run",
    )
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.bench_command = shlex.join(["python", "-m", "bench", *argv])
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
