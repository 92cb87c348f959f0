"""Where a ping's time goes on the sending node: `python -m bench.hops [--mode M] [--interval S]`.

Builds the bench's two-node lab for one mode (`wire` setting), captures on n1's
overlay device (weft.1 or flannel.1) and on its eth0 with nanosecond timestamps,
pings pod2 from pod1, and pairs the timestamps:

- send hop: an echo request seen on the overlay device → the next frame on eth0
  (what n1's forwarder took to encapsulate and send it);
- receive hop: the reply's frame on eth0 → the reply on the overlay device.

With `--syscalls` (needs `perf`), the system calls of n1's weft during the pings
are recorded too (`perf record -e raw_syscalls:*`), and the time between them is
reported: between two calls weft runs in user space (Python), inside one the
kernel works. So a hop splits into, e.g., `epoll_pwait → readv` (the wake-up: the
event loop and the drain's set-up), `readv → sendto` (the packet's Python),
`sendto` itself (the kernel's send path) — decisions §28.

The lab lives in namespaces this command creates and deletes. Needs root and tcpdump.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from bench import env as envmod


def _timestamps(path: Path) -> list[tuple[float, str]]:
    """(time, text) per packet of a `tcpdump -tt` listing; continuation lines joined."""
    rows: list[tuple[float, str]] = []
    for line in path.read_text(errors="replace").splitlines():
        head = line.split(" ", 1)[0]
        if head[:1].isdigit():
            rows.append((float(head), line))
        elif rows:
            rows[-1] = (rows[-1][0], rows[-1][1] + " " + line.strip())
    return rows


def pair_hops(
    device: list[tuple[float, str]], wire: list[tuple[float, str]]
) -> tuple[list[float], list[float]]:
    """Send and receive hops in µs (see the module docstring)."""
    wire_t = [t for t, _ in wire]
    send, receive = [], []
    for t, text in device:
        if "echo request" in text:
            i = bisect.bisect_right(wire_t, t)
            if i < len(wire_t):
                send.append((wire_t[i] - t) * 1e6)
        elif "echo reply" in text:
            i = bisect.bisect_left(wire_t, t) - 1
            if i >= 0:
                receive.append((t - wire_t[i]) * 1e6)
    return send, receive


#: x86-64 numbers of the system calls weft's loops make (others print as `NR n`).
SYSCALL_NAMES = {
    0: "read", 1: "write", 7: "poll", 19: "readv", 20: "writev", 24: "sched_yield",
    44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 232: "epoll_wait",
    281: "epoll_pwait", 299: "recvmmsg", 307: "sendmmsg",
}  # fmt: skip
_SYSCALL_EVENT = re.compile(r"\s(\d+\.\d+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)\b")


def syscall_stretches(
    script: str,
) -> tuple[dict[tuple[str, str], list[float]], dict[str, list[float]]]:
    """From `perf script` over raw_syscalls:sys_enter/sys_exit of one thread: the
    µs spent in user space between the exit of one call and the entry of the next,
    by (previous call, next call), and the µs inside each call, by call (waits
    included: epoll's time inside is idle time)."""
    events: list[tuple[float, bool, str]] = []
    for line in script.splitlines():
        m = _SYSCALL_EVENT.search(line)
        if m:
            nr = int(m.group(3))
            events.append(
                (float(m.group(1)), m.group(2) == "enter", SYSCALL_NAMES.get(nr, f"NR {nr}"))
            )
    between: dict[tuple[str, str], list[float]] = {}
    inside: dict[str, list[float]] = {}
    for (t0, enter0, name0), (t1, enter1, name1) in itertools.pairwise(events):
        if not enter0 and enter1:
            between.setdefault((name0, name1), []).append((t1 - t0) * 1e6)
        elif enter0 and not enter1 and name0 == name1:
            inside.setdefault(name0, []).append((t1 - t0) * 1e6)
    return between, inside


def syscall_report(script: str, least: int) -> list[str]:
    """The stretches seen at least `least` times, most frequent first."""
    between, inside = syscall_stretches(script)
    lines = ["  the forwarder on n1, in user space between system calls (wall time: a stretch"]
    lines.append("  includes any wait for a CPU; the min is the bare cost):")
    for (a, b), v in sorted(between.items(), key=lambda kv: -len(kv[1])):
        if len(v) >= least:
            lines.append(f"    {a} → {b}: {_p50(v, 'times')}")
    lines.append("  … and inside them:")
    for name, v in sorted(inside.items(), key=lambda kv: -len(kv[1])):
        if len(v) >= least and not name.startswith("epoll"):
            lines.append(f"    {name}: {_p50(v, 'times')}")
    return lines


def _p50(values: list[float], what: str = "packets") -> str:
    if not values:
        return "–"
    v = sorted(values)
    return f"p50 {v[len(v) // 2]:.0f} µs, min {v[0]:.0f} µs ({len(v)} {what})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="weft-vxlan-kernel", choices=sorted(envmod.MODES))
    p.add_argument("--interval", type=float, default=0.01, help="ping interval (s)")
    p.add_argument("--count", type=int, default=100)
    p.add_argument(
        "--syscalls", action="store_true", help="also time n1's weft between its system calls"
    )
    p.add_argument(
        "--weft-args", default="", metavar="ARGS",
        help="options for every `weft dataplane run`, e.g. '--keep-warm 2000'",
    )  # fmt: skip
    args = p.parse_args(argv)
    mode = envmod.MODES[args.mode]
    if mode.key == "weft-kernel":
        print("bench.hops: weft-kernel runs the kernel's path; use kernel-vxlan", file=sys.stderr)
        return 2
    if args.syscalls and (mode.n1 == "kernel" or shutil.which("perf") is None):
        why = "n1 runs no weft" if mode.n1 == "kernel" else "needs perf (Debian: linux-perf)"
        print(f"bench.hops: --syscalls: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="weft-hops-"))
    env = envmod.build(
        mode, "wire", 1500, work, work, weft_extra=tuple(shlex.split(args.weft_args))
    )
    caps: list[tuple[subprocess.Popen, IO[str], Path]] = []
    perf: subprocess.Popen | None = None
    try:
        device = "flannel.1" if mode.n1 == "kernel" else "weft.1" if mode.n1 == "vxlan" else "weft0"
        for iface in (device, "eth0"):
            out = (work / f"{iface}.txt").open("w")
            proc = subprocess.Popen(
                ["ip", "netns", "exec", env.n1.ns, "tcpdump", "-l", "-n", "-tt",
                 "--time-stamp-precision=nano", "-i", iface, "icmp or udp"],
                stdout=out, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            caps.append((proc, out, work / f"{iface}.txt"))
        if args.syscalls:
            perf = subprocess.Popen(
                ["perf", "record", "-q", "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit",
                 "-p", str(env.weft["n1"].pid), "-o", str(work / "syscalls.data")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        time.sleep(1.5)  # tcpdump (and perf) attached
        ping = subprocess.run(
            ["ip", "netns", "exec", env.pod1.ns, "ping", "-q", "-c", str(args.count),
             "-i", str(args.interval), str(env.pod2.ip)],
            capture_output=True, text=True, timeout=60 + args.count * args.interval,
        )  # fmt: skip
        time.sleep(0.5)
        if perf is not None:
            perf.send_signal(signal.SIGINT)  # perf writes its file on SIGINT
            perf.wait(timeout=30)
        for proc, out, _ in caps:
            proc.terminate()
            proc.wait(timeout=10)
            out.close()
        send, receive = pair_hops(_timestamps(caps[0][2]), _timestamps(caps[1][2]))
        rtt = ping.stdout.strip().splitlines()[-1] if ping.stdout.strip() else ping.stderr
        print(f"{mode.label}, ping every {args.interval} s: {rtt}")
        print(f"  send hop ({device} → eth0):    {_p50(send)}")
        print(f"  receive hop (eth0 → {device}): {_p50(receive)}")
        if perf is not None:
            script = subprocess.run(
                ["perf", "script", "-i", str(work / "syscalls.data")],
                capture_output=True, text=True, timeout=60,
            ).stdout  # fmt: skip
            print("\n".join(syscall_report(script, least=args.count // 2)))
    finally:
        # What this command started, by PID, even when a step above failed.
        for proc in [perf] + [c[0] for c in caps]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for _, out, _ in caps:
            out.close()
        env.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
