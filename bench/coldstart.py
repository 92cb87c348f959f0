"""A lone datagram after an idle gap: how long its wake-up and first Python take, with
and without a keep-warm timer (decisions §34).

A child process sends a datagram every GAP over a unix datagram socket pair (no
network, nothing leaves the process pair) with its send time inside; the parent, in
uvloop, reads it in an `add_reader` callback and runs a few dozen bytecodes of
packet-like work (a header parse, a dict lookup, a header pack). Reported per
variant, as medians and p90 over the datagrams: *wake*, from the send to the
callback's start (the kernel's wake-up and the event loop), and *work*, the read and
the work (the interpreter, cold or warm). The variants run a timer every WARM µs
that does nothing, or also the read of an empty socket and the work on a dummy
buffer — what `--keep-warm` does in weft.

    python -m bench.coldstart [--gap-ms 10] [--count 300] [--warm-us 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import time

import uvloop

STAMP = struct.Struct("!q")
ROUTES = {(10 << 24) | (244 << 16) | (i << 8): i for i in range(256)}
HEADER = struct.Struct("!HHHH")
SKIP = 20  # datagrams at the start not counted (the process warming up)


def work(buf: bytearray, out: bytearray, n: int) -> int:
    """A stand-in for a hop: the IPv4 header's version, a route lookup by /24, an
    outer header packed, a header sum."""
    view = memoryview(buf)[:n]
    route = ROUTES.get(int.from_bytes(view[16:20], "big") & 0xFFFFFF00, -1)
    HEADER.pack_into(out, 0, 4789, 8472, n + 8, 0)
    total = 0
    for i in range(0, 20, 2):
        total += view[i] << 8 | view[i + 1]
    return (view[0] >> 4) + route + total


def datagram(dst_third: int) -> bytes:
    return STAMP.pack(time.perf_counter_ns()) + bytes(12) + bytes((10, 244, dst_third, 9))


def run(gap_s: float, count: int, warm_s: float, what: str) -> tuple[list[float], list[float]]:
    """(wake µs, work µs) per datagram; `what`: "" (no timer), "timer" or "work"."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    pid = os.fork()
    if pid == 0:  # the sender
        ours.close()
        for _ in range(count + SKIP):
            time.sleep(gap_s)
            theirs.send(datagram(7) + bytes(40))
        os._exit(0)
    theirs.close()
    wake: list[float] = []
    cost: list[float] = []
    buf, out = bytearray(2048), bytearray(64)
    dummy = bytearray(datagram(3) + bytes(40))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        fd = ours.fileno()

        def take(t0: int | None) -> None:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                return
            work(buf, out, n)
            if t0 is not None:  # (one a warm pass took is not measured)
                wake.append((t0 - STAMP.unpack_from(buf)[0]) / 1000)
                cost.append((time.perf_counter_ns() - t0) / 1000)
            if len(wake) >= count + SKIP and not done.done():
                done.set_result(None)

        def warm() -> None:
            if what == "work":
                take(None)
                work(dummy, out, len(dummy))
            loop.call_later(warm_s, warm)

        loop.add_reader(fd, lambda: take(time.perf_counter_ns()))
        if what:
            loop.call_later(warm_s, warm)
        await asyncio.wait_for(done, timeout=(count + SKIP) * gap_s * 3 + 10)

    try:
        uvloop.run(main())
    finally:
        os.waitpid(pid, 0)
        ours.close()
    return wake[SKIP:], cost[SKIP:]


def quantile(xs: list[float], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--warm-us", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    variants = {"none": "", "empty timer": "timer", "timer + read + work": "work"}
    print(f"a datagram every {args.gap_ms} ms; timer every {args.warm_us} µs")
    for r in range(args.rounds):
        for label, what in variants.items():
            wake, cost = run(args.gap_ms / 1000, args.count, args.warm_us / 1e6, what)
            print(
                f"round {r + 1}  {label:20s} wake p50 {quantile(wake, 0.5):6.1f} "
                f"p90 {quantile(wake, 0.9):6.1f} µs   read+work p50 {quantile(cost, 0.5):6.1f} "
                f"p90 {quantile(cost, 0.9):6.1f} µs"
            )


if __name__ == "__main__":
    main()
