"""Where a ping's time goes on the sending node: `python -m bench.hops [--mode M] [--interval S]`.

Builds the bench's two-node lab for one mode (`wire` setting), captures on n1's
overlay device (weft.1 or flannel.1) and on its eth0 with nanosecond timestamps,
pings pod2 from pod1, and pairs the timestamps:

- send hop: an echo request seen on the overlay device → the next frame on eth0
  (what n1's forwarder took to encapsulate and send it);
- receive hop: the reply's frame on eth0 → the reply on the overlay device.

The lab lives in namespaces this command creates and deletes. Needs root and tcpdump.
"""

from __future__ import annotations

import argparse
import bisect
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def _p50(values: list[float]) -> str:
    if not values:
        return "–"
    v = sorted(values)
    return f"p50 {v[len(v) // 2]:.0f} µs, min {v[0]:.0f} µs ({len(v)} packets)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="weft-vxlan-kernel", choices=sorted(envmod.MODES))
    p.add_argument("--interval", type=float, default=0.01, help="ping interval (s)")
    p.add_argument("--count", type=int, default=100)
    args = p.parse_args(argv)
    mode = envmod.MODES[args.mode]
    if mode.key == "weft-kernel":
        print("bench.hops: weft-kernel runs the kernel's path; use kernel-vxlan", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="weft-hops-"))
    env = envmod.build(mode, "wire", 1500, work, work)
    try:
        device = "flannel.1" if mode.n1 == "kernel" else "weft.1" if mode.n1 == "vxlan" else "weft0"
        caps = []
        for iface in (device, "eth0"):
            out = (work / f"{iface}.txt").open("w")
            proc = subprocess.Popen(
                ["ip", "netns", "exec", env.n1.ns, "tcpdump", "-l", "-n", "-tt",
                 "--time-stamp-precision=nano", "-i", iface, "icmp or udp"],
                stdout=out, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            caps.append((proc, out, work / f"{iface}.txt"))
        time.sleep(1.5)  # tcpdump attached
        ping = subprocess.run(
            ["ip", "netns", "exec", env.pod1.ns, "ping", "-q", "-c", str(args.count),
             "-i", str(args.interval), str(env.pod2.ip)],
            capture_output=True, text=True, timeout=60 + args.count * args.interval,
        )  # fmt: skip
        time.sleep(0.5)
        for proc, out, _ in caps:
            proc.terminate()
            proc.wait(timeout=10)
            out.close()
        send, receive = pair_hops(_timestamps(caps[0][2]), _timestamps(caps[1][2]))
        rtt = ping.stdout.strip().splitlines()[-1] if ping.stdout.strip() else ping.stderr
        print(f"{mode.label}, ping every {args.interval} s: {rtt}")
        print(f"  send hop ({device} → eth0):    {_p50(send)}")
        print(f"  receive hop (eth0 → {device}): {_p50(receive)}")
    finally:
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
