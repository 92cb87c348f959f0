"""Pure parsers for what the benchmark tools print: ping, iperf3 -J, /proc, rr.py."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

from bench.stats import percentile

_PING_TIME = re.compile(r"icmp_seq=(\d+)\b.*?\btime[=<]([0-9.]+) ms")
_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


class ParseError(ValueError):
    """Tool output that does not have the shape we expect."""


# -- ping ---------------------------------------------------------------------------


def ping_rtts(text: str) -> list[float]:
    """Per-reply round-trip times (ms) from iputils ping output, duplicates ignored."""
    seen: set[int] = set()
    out: list[float] = []
    for line in text.splitlines():
        if "(DUP!)" in line:
            continue
        m = _PING_TIME.search(line)
        if m is None:
            continue
        seq = int(m.group(1))
        if seq in seen:
            continue
        seen.add(seq)
        out.append(float(m.group(2)))
    return out


def ping_counts(text: str) -> tuple[int, int] | None:
    """(transmitted, received) from ping's summary line, or None if it has none."""
    m = _PING_SUMMARY.search(text)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def ping_stats(text: str) -> dict[str, float | int | None]:
    """p50/p99/p99.9/mean/min/max RTT (ms) and loss from one ping run's output."""
    rtts = ping_rtts(text)
    counts = ping_counts(text)
    sent, received = counts if counts is not None else (len(rtts), len(rtts))
    loss = 100.0 * (sent - received) / sent if sent else None
    if not rtts:
        return {
            "sent": sent,
            "received": received,
            "loss_pct": loss,
            "p50_ms": None,
            "p99_ms": None,
            "p999_ms": None,
            "mean_ms": None,
            "min_ms": None,
            "max_ms": None,
        }
    return {
        "sent": sent,
        "received": received,
        "loss_pct": loss,
        "p50_ms": percentile(rtts, 50),
        "p99_ms": percentile(rtts, 99),
        "p999_ms": percentile(rtts, 99.9),
        "mean_ms": sum(rtts) / len(rtts),
        "min_ms": min(rtts),
        "max_ms": max(rtts),
    }


# -- iperf3 -------------------------------------------------------------------------


def _iperf3_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"iperf3 output is not JSON: {text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise ParseError("iperf3 JSON is not an object")
    if data.get("error"):
        raise ParseError(f"iperf3: {data['error']}")
    end = data.get("end")
    if not isinstance(end, dict):
        raise ParseError("iperf3 JSON has no 'end' section")
    return end


@dataclass(frozen=True)
class TcpResult:
    bits_per_second: float  # receiver side
    bytes: int  # payload bytes the receiver got
    seconds: float
    retransmits: int | None


def parse_iperf3_tcp(text: str) -> TcpResult:
    """The receiver's view of a TCP iperf3 run (client -J output)."""
    end = _iperf3_json(text)
    rx = end.get("sum_received")
    if not isinstance(rx, dict) or "bytes" not in rx:
        raise ParseError("iperf3 TCP JSON has no end.sum_received")
    tx = end.get("sum_sent") or {}
    seconds = float(rx.get("seconds") or 0.0)
    bps = float(rx.get("bits_per_second") or 0.0)
    retr = tx.get("retransmits")
    return TcpResult(bps, int(rx["bytes"]), seconds, int(retr) if retr is not None else None)


@dataclass(frozen=True)
class UdpResult:
    sent_packets: int
    lost_packets: int
    received_packets: int
    seconds: float
    received_pps: float
    loss_pct: float
    payload_bytes: int  # payload bytes of the received datagrams


def parse_iperf3_udp(text: str, payload_len: int) -> UdpResult:
    """Sent / lost / received datagrams of a UDP iperf3 run (client -J output).

    iperf3 ≥ 3.11 puts the server's counts in end.sum_received (older: end.sum).
    Received = sent − lost, as iperf3 counts loss from sequence-number gaps.
    """
    end = _iperf3_json(text)
    summ = end.get("sum_received") or end.get("sum")
    if not isinstance(summ, dict) or "packets" not in summ:
        raise ParseError("iperf3 UDP JSON has no end.sum_received / end.sum")
    sent = int(summ["packets"])
    lost = max(0, int(summ.get("lost_packets") or 0))
    received = max(0, sent - lost)
    seconds = float(summ.get("seconds") or 0.0)
    pps = received / seconds if seconds > 0 else 0.0
    loss = 100.0 * lost / sent if sent else 100.0
    return UdpResult(sent, lost, received, seconds, pps, loss, received * payload_len)


# -- /proc ---------------------------------------------------------------------------


def proc_stat_cpu(text: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from /proc/stat's first ``cpu`` line.

    busy = user + nice + system + irq + softirq + steal (guest time is already in
    user); total adds idle and iowait.
    """
    for line in text.splitlines():
        if line.startswith("cpu "):
            fields = [int(x) for x in line.split()[1:]]
            fields += [0] * (8 - len(fields))
            user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
            busy = user + nice + system + irq + softirq + steal
            return busy, busy + idle + iowait
    raise ParseError("/proc/stat has no aggregate cpu line")


def pid_stat_times(text: str, *, reaped: bool = False) -> tuple[int, int]:
    """(user, system) clock ticks, all threads, from /proc/<pid>/stat: utime and
    stime; with `reaped`, plus cutime and cstime (the children it has waited for).
    User time is the process's own code (for weft: Python and numpy), system time
    the kernel's work inside its system calls and the softirqs run in its context.

    The command name (field 2) may hold spaces and parentheses, so fields are
    counted after the last ')'.
    """
    close = text.rfind(")")
    if close < 0:
        raise ParseError("not a /proc/<pid>/stat line")
    rest = text[close + 1 :].split()
    # rest[0] is field 3 (state); utime is field 14, stime 15, cutime 16, cstime 17.
    if len(rest) < (15 if reaped else 13):
        raise ParseError("/proc/<pid>/stat line is too short")
    user, system = int(rest[11]), int(rest[12])
    if reaped:
        user, system = user + int(rest[13]), system + int(rest[14])
    return user, system


def pid_status_rss_kb(text: str) -> int | None:
    """VmRSS (kB) from /proc/<pid>/status, or None."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def proc_net_snmp(text: str) -> dict[str, int]:
    """/proc/net/snmp as ``{"Udp.RcvbufErrors": n, …}``: each protocol is a line of
    names followed by a line of values. Lines that do not pair up are skipped."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        proto, _, keys = names.partition(":")
        vproto, _, nums = values.partition(":")
        if proto != vproto:
            continue
        for key, num in zip(keys.split(), nums.split(), strict=False):
            with contextlib.suppress(ValueError):
                out[f"{proto}.{key}"] = int(num)
    return out


def cpuinfo_model(text: str) -> str:
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# -- rr.py ------------------------------------------------------------------------------


def parse_rr(text: str) -> dict[str, float]:
    """The JSON line bench/rr.py's client prints: transactions, seconds, per-second
    rate, and where given the round trips' p50/p99 (ms) and lost requests (UDP)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "transactions" in data and "seconds" in data:
                tx = int(data["transactions"])
                secs = float(data["seconds"])
                out = {
                    "transactions": tx,
                    "seconds": secs,
                    "per_second": tx / secs if secs > 0 else 0.0,
                }
                for key in ("p50_ms", "p99_ms", "lost"):
                    if key in data:
                        out[key] = float(data[key])
                return out
    raise ParseError(f"no rr result in {text[-200:]!r}")


_ECHO = re.compile(r"^(\d+\.\d+) .*ICMP echo (request|reply), id (\d+), seq (\d+)")


def echo_turnarounds(text: str) -> list[float]:
    """From a `tcpdump -tt -T vxlan` listing at one node's underlay: the µs from each
    echo request's arrival to its reply's departure, matched by (id, seq); lines
    that do not start with a time continue the one before (tcpdump prints a
    decoded inner packet on its own line)."""
    rows: list[str] = []
    for line in text.splitlines():
        if line[:1].isdigit():
            rows.append(line)
        elif rows:
            rows[-1] += " " + line.strip()
    requests: dict[tuple[str, str], float] = {}
    out = []
    for row in rows:
        m = _ECHO.match(row)
        if m is None:
            continue
        key = (m[3], m[4])
        if m[2] == "request":
            requests.setdefault(key, float(m[1]))
        elif key in requests:
            out.append((float(m[1]) - requests.pop(key)) * 1e6)
    return out
