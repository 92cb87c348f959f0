"""The measurements run inside an environment's pods: iperf3 TCP/UDP, ping, rr.py.

Each probe is bounded: iperf3 and ping get their duration plus a fixed grace as a
subprocess timeout, and rr.py's server and client stop at their own deadlines.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.env import Env
from bench.parse import (
    ParseError,
    TcpResult,
    UdpResult,
    echo_turnarounds,
    parse_iperf3_tcp,
    parse_iperf3_udp,
    parse_rr,
    ping_stats,
)
from bench.stats import percentile

IPERF_GRACE_S = 20.0
IPERF_RETRIES = 10  # the server may still be closing the previous test ("busy")
SMALL_PAYLOAD = 64
RR_PORT = 5301
RR_SCRIPT = Path(__file__).with_name("rr.py")


def _iperf3(env: Env, args: list[str], seconds: float) -> str:
    argv = [
        "iperf3",
        "-c",
        str(env.pod2.ip),
        "-J",
        "--connect-timeout",
        "3000",
        "-t",
        str(seconds),
        *args,
    ]
    last = ""
    for _ in range(IPERF_RETRIES):
        cp = env.lab.run(env.pod1, *argv, check=False, timeout=seconds + IPERF_GRACE_S)
        # iperf3 -J may exit 0 with only {"error": …} (e.g. "unable to connect").
        if cp.returncode == 0 and '"error"' not in cp.stdout[-600:]:
            return cp.stdout
        last = (cp.stdout + cp.stderr)[-500:]
        if "busy" not in last and "refused" not in last:
            break
        time.sleep(0.2)
    raise ParseError(f"iperf3 {' '.join(args)} failed: {last}")


def tcp(env: Env, seconds: float, streams: int = 1, bitrate: str | None = None) -> TcpResult:
    """``streams`` iperf3 TCP streams, as fast as they go, or each at ``bitrate``
    (iperf3's ``-b``, e.g. ``1500M``)."""
    args = ["-P", str(streams)] if streams > 1 else []
    if bitrate is not None:
        args += ["-b", bitrate]
    return parse_iperf3_tcp(_iperf3(env, args, seconds))


def udp_small(
    env: Env, seconds: float, payload: int = SMALL_PAYLOAD, bitrate: str = "0"
) -> UdpResult:
    """As many ``payload``-byte datagrams as one iperf3 sender can make (``-b 0``), or
    as many as ``bitrate`` of payload (iperf3's ``-b``, e.g. ``60M``) takes."""
    out = _iperf3(env, ["-u", "-l", str(payload), "-b", bitrate], seconds)
    return parse_iperf3_udp(out, payload)


def ping(env: Env, count: int, interval_s: float) -> dict[str, float | int | None]:
    """``count`` echo requests every ``interval_s``; per-reply RTTs. No ``-w``: with a
    deadline ping would wait for ``count`` replies and a single loss would stretch
    the run to the deadline; without, it stops after sending ``count`` (``-W 1`` for
    the last reply)."""
    limit = count * interval_s + 15
    cp = env.lab.run(
        env.pod1,
        "ping",
        "-n",
        "-c",
        str(count),
        "-i",
        str(interval_s),
        "-W",
        "1",
        str(env.pod2.ip),
        check=False,
        timeout=limit,
    )
    stats = ping_stats(cp.stdout)
    if stats["received"] == 0:
        raise ParseError(f"ping got no replies: {(cp.stdout + cp.stderr)[-300:]}")
    return stats


def ping_under_load(
    env: Env, seconds: float, bitrate: str, interval_s: float = 0.005
) -> dict[str, float | int | None]:
    """Pings every ``interval_s`` while one TCP stream at ``bitrate`` (iperf3's
    ``-b``) runs the same way: the round trips a packet sees beside a transfer, a
    stall of the path (a forwarder that stops for a while) showing in the tail.
    Returns ping_stats plus ``gbps``, the stream's rate. The pings start a second
    into the stream and end before it does."""
    got: dict[str, TcpResult | BaseException] = {}

    def stream() -> None:
        try:
            got["tcp"] = tcp(env, seconds + 2, bitrate=bitrate)
        except BaseException as exc:  # (raised below, in the caller's thread)
            got["tcp"] = exc

    runner = threading.Thread(target=stream, daemon=True)
    runner.start()
    time.sleep(1.0)
    try:
        stats = ping(env, max(1, int(seconds / interval_s)), interval_s)
    finally:
        runner.join(seconds + 2 + IPERF_GRACE_S + 5)
    result = got.get("tcp")
    if isinstance(result, BaseException):
        raise result
    if result is None:
        raise ParseError("iperf3 beside the pings did not finish")
    return {**stats, "gbps": result.bits_per_second / 1e9}


#: Echo requests and replies inside VXLAN on the underlay: datagrams to the VXLAN
#: port whose inner IPv4 protocol (8 UDP + 8 VXLAN + 14 Ethernet + 9 bytes in) is ICMP.
VXLAN_ICMP_FILTER = "udp dst port 8472 and udp[39] = 1"


def turnaround_under_load(
    env: Env, seconds: float, bitrate: str, interval_s: float = 0.005
) -> dict[str, float | int | None]:
    """ping_under_load with n2's underlay captured: the µs from each echo request's
    arrival at n2 to its reply's departure — n2's forwarder both ways and pod2's
    answer, the one stretch of the round trip where the stream's bulk writes into
    pod2 stand in the way. Less noisy than the round trip, whose other three hops
    move with the machine. VXLAN modes only (the capture decodes VXLAN). Returns
    ``n`` and the p50 / p90 / p99 (µs) of the turnarounds, and the pings' p50 (ms)."""
    if env.mode.encap != "vxlan":
        raise ValueError(f"turnaround: {env.mode.key} is not a VXLAN mode")
    with tempfile.TemporaryDirectory(prefix="weft-turn") as wd:
        listing = Path(wd) / "n2.txt"
        capture = env.lab.spawn(
            env.n2,
            ["tcpdump", "-l", "-nn", "-tt", "--time-stamp-precision=nano", "-T", "vxlan",
             "-i", env.n2.underlay_iface, VXLAN_ICMP_FILTER],
            log=listing,
        )  # fmt: skip
        try:
            time.sleep(1.0)  # tcpdump attached
            pings = ping_under_load(env, seconds, bitrate, interval_s)
            time.sleep(0.5)  # the last reply captured
        finally:
            capture.terminate()
            capture.wait(timeout=10)
        turns = sorted(echo_turnarounds(listing.read_text(errors="replace")))
    if not turns:
        raise ParseError("no echo request and reply seen at n2's underlay")
    return {
        "n": len(turns),
        "p50_us": percentile(turns, 50),
        "p90_us": percentile(turns, 90),
        "p99_us": percentile(turns, 99),
        "rtt_p50_ms": pings["p50_ms"],
    }


def rr(env: Env, seconds: float, *, udp: bool = False) -> dict[str, float]:
    """Ping-pong (Python on both ends) for ``seconds``, 1 byte over TCP or 4 over UDP:
    transactions/s and the round trips' p50/p99 (and, for UDP, requests lost)."""
    host = str(env.pod2.ip)
    server, client = ("udp-server", "udp-client") if udp else ("server", "client")
    srv = env.lab.spawn(
        env.pod2, [sys.executable, str(RR_SCRIPT), server, host, str(RR_PORT), str(seconds + 10)]
    )
    try:
        cp = env.lab.run(
            env.pod1,
            sys.executable,
            str(RR_SCRIPT),
            client,
            host,
            str(RR_PORT),
            str(seconds),
            check=False,
            timeout=seconds + 20,
        )
        return parse_rr(cp.stdout + cp.stderr)
    finally:
        env.lab.stop(srv, grace_s=1.0)


def stop_quietly(proc: subprocess.Popen | None, env: Env) -> None:
    if proc is not None:
        env.lab.stop(proc, grace_s=1.0)
