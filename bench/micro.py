"""Microbenchmarks of the pure packet path, in memory (no kernel, no sockets).

* codec: ``Forwarder.from_device`` (route lookup + encapsulation) and
  ``Forwarder.from_network`` (decapsulation + source check) on a preloaded buffer,
  for the vxlan and udp backends, at 64 and 1400 bytes;
* route lookup: ``RouteTable.lookup_v4`` with 10 / 1,000 / 10,000 /24 routes (one
  prefix length, as flannel's leases) and 10,000 routes of mixed lengths;
* forwarder round trip: sender ``from_device`` → copy of the datagram into a
  receive buffer (the copy the kernel would make) → receiver ``from_network``:
  packets per second one core could forward if syscalls were free.

Each figure is the best of N rounds of ``time.perf_counter_ns`` around a tight
loop; the loop's own cost (an empty loop of the same shape) is reported too and
not subtracted.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import random
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bench import trace_cost
from dataplane.backends.udp import UdpBackend
from dataplane.backends.vxlan import VxlanBackend
from dataplane.flows import inner_flow_hash, source_index
from dataplane.forwarder import Forwarder, Verdict
from dataplane.packet.ipv4 import build_ipv4
from dataplane.peers import Peer
from dataplane.routes import RouteTable

MAC_A = bytes.fromhex("027700000001")
MAC_B = bytes.fromhex("027700000002")
NET_A = IPv4Network("10.244.1.0/24")
NET_B = IPv4Network("10.244.2.0/24")
IP_A = IPv4Address("192.168.77.10")
IP_B = IPv4Address("192.168.77.11")
TTL_RESET_EVERY = 200  # the udp backend decrements the TTL: refill it before it runs out


def best_ns_per_op(loop: Callable[[int], object], iterations: int, best_of: int) -> float:
    """Best of ``best_of`` rounds of ``loop(iterations)``, in wall-clock ns per iteration."""
    return best_wall_and_cpu(loop, iterations, best_of)[0]


def best_wall_and_cpu(
    loop: Callable[[int], object], iterations: int, best_of: int
) -> tuple[float, float]:
    """Best of ``best_of`` rounds, in ns per iteration, by the wall clock
    (``time.perf_counter_ns``) and by this thread's CPU time (``time.thread_time_ns``,
    which does not count time the thread waited for a CPU on a busy machine)."""
    best_wall = best_cpu = float("inf")
    for _ in range(best_of):
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        loop(iterations)
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        best_wall = min(best_wall, (w1 - w0) / iterations)
        best_cpu = min(best_cpu, (c1 - c0) / iterations)
    return best_wall, best_cpu


def inner_packet(size: int, src: str = "10.244.1.2", dst: str = "10.244.2.2") -> bytes:
    """An IPv4/UDP-ish packet of ``size`` bytes from pod A to pod B."""
    return build_ipv4(src, dst, 17, bytes(size - 20), ttl=255)


def make_pair(backend: str) -> tuple[Forwarder, Forwarder]:
    """Node A's and node B's forwarders, each knowing the other as its peer."""
    if backend == "vxlan":
        a = Forwarder(VxlanBackend(1, MAC_A), local_ip=NET_A.network_address)
        b = Forwarder(VxlanBackend(1, MAC_B), local_ip=NET_B.network_address)
        a.add_peer(Peer(NET_B, IP_B, MAC_B, 8472))
        b.add_peer(Peer(NET_A, IP_A, MAC_A, 8472))
    elif backend == "udp":
        a = Forwarder(UdpBackend(), local_ip=NET_A.network_address)
        b = Forwarder(UdpBackend(), local_ip=NET_B.network_address)
        a.add_peer(Peer(NET_B, IP_B, None, 8285))
        b.add_peer(Peer(NET_A, IP_A, None, 8285))
    else:
        raise ValueError(backend)
    return a, b


def _loop_overhead(iterations: int) -> None:
    for _ in range(iterations):
        pass


def codec_loops(
    backend: str, size: int, pair: tuple[Forwarder, Forwarder] | None = None
) -> dict[str, Callable[[int], object]]:
    a, b = pair or make_pair(backend)
    head = a.headroom
    pkt = inner_packet(size)
    dev_buf = bytearray(head + len(pkt) + 64)
    dev_buf[head : head + len(pkt)] = pkt
    end = head + len(pkt)
    assert a.from_device(dev_buf, head, end) == Verdict.SEND
    datagram = bytes(dev_buf[a.out_start : a.out_end])
    net_buf = bytearray(len(datagram) + 64)
    net_buf[: len(datagram)] = datagram
    n = len(datagram)
    src = str(IP_A)
    assert b.from_network(net_buf, n, src) == Verdict.DELIVER
    ttl_dev = head + 8
    ttl_net = 8 if backend == "udp" else None

    def encap(iterations: int) -> None:
        fd = a.from_device
        for i in range(iterations):
            if i % TTL_RESET_EVERY == 0:
                dev_buf[ttl_dev] = 255
            fd(dev_buf, head, end)

    def decap(iterations: int) -> None:
        fn = b.from_network
        for i in range(iterations):
            if ttl_net is not None and i % TTL_RESET_EVERY == 0:
                net_buf[ttl_net] = 255
            fn(net_buf, n, src)

    def round_trip(iterations: int) -> None:
        fd = a.from_device
        fn = b.from_network
        rbuf = bytearray(len(net_buf))
        out = memoryview(dev_buf)
        for i in range(iterations):
            if i % TTL_RESET_EVERY == 0:
                dev_buf[ttl_dev] = 255
            fd(dev_buf, head, end)
            m = a.out_end - a.out_start
            rbuf[:m] = out[a.out_start : a.out_end]
            fn(rbuf, m, src)

    return {"from_device": encap, "from_network": decap, "round_trip": round_trip}


def route_table(n: int, rng: random.Random, mixed: bool = False) -> tuple[RouteTable, list[int]]:
    """``n`` random routes in 10.0.0.0/8 and 1,000 addresses that hit one of them."""
    table: RouteTable[int] = RouteTable()
    hits: list[int] = []
    while len(table) < n:
        length = rng.randint(16, 28) if mixed else 24
        addr = (10 << 24) | rng.getrandbits(24)
        net = IPv4Network((addr, length), strict=False)
        if net in table:
            continue
        table.insert(net, len(table) + 1)
        hits.append(int(net.network_address) | 1)
    rng.shuffle(hits)
    return table, (hits * (1000 // len(hits) + 1))[:1000]


def lookup_loop(table: RouteTable, addrs: list[int]) -> Callable[[int], object]:
    def loop(iterations: int) -> None:
        lookup = table.lookup_v4
        k = len(addrs)
        for i in range(iterations):
            lookup(addrs[i % k])

    return loop


def _index_loop(addrs: list[int]) -> Callable[[int], object]:
    def loop(iterations: int) -> None:
        k = len(addrs)
        for i in range(iterations):
            addrs[i % k]

    return loop


def source_port_loop() -> Callable[[int], object]:
    """What picking a vxlan datagram's outer source port costs the send loop: the
    inner flow hash of a UDP packet (ports read) and its index among 16 ports
    (dataplane/flows.py)."""
    packet = inner_packet(64)
    end = len(packet)

    def loop(iterations: int) -> None:
        for _ in range(iterations):
            source_index(inner_flow_hash(packet, 0, end), 16)

    return loop


def run(quick: bool = False, best_of: int = 5) -> dict[str, Any]:
    iterations = 20_000 if quick else 200_000
    best_of = 2 if quick else best_of
    results: dict[str, Any] = {
        "kind": "micro",
        "python": platform.python_version(),
        "iterations": iterations,
        "best_of": best_of,
        "loop_overhead_ns": best_ns_per_op(_loop_overhead, iterations, best_of),
        "codec": [],
        "routes": [],
    }
    for backend in ("vxlan", "udp"):
        for size in (64, 1400):
            row: dict[str, Any] = {"backend": backend, "packet_bytes": size}
            for name, loop in codec_loops(backend, size).items():
                ns, cpu_ns = best_wall_and_cpu(loop, iterations, best_of)
                row[f"{name}_ns"] = ns
                row[f"{name}_cpu_ns"] = cpu_ns
                row[f"{name}_mpps"] = 1e3 / ns
            results["codec"].append(row)
    rng = random.Random(7)
    for n, mixed in ((10, False), (1_000, False), (10_000, False), (10_000, True)):
        table, addrs = route_table(n, rng, mixed)
        levels = len({net.prefixlen for net, _ in table.items()})
        ns, cpu_ns = best_wall_and_cpu(lookup_loop(table, addrs), iterations, best_of)
        base = best_ns_per_op(_index_loop(addrs), iterations, best_of)
        results["routes"].append(
            {
                "routes": n,
                "prefix_lengths": levels,
                "lookup_ns": ns,
                "lookup_cpu_ns": cpu_ns,
                "loop_and_index_ns": base,
            }
        )
    ns, cpu_ns = best_wall_and_cpu(source_port_loop(), iterations, best_of)
    results["source_port"] = {"ns": ns, "cpu_ns": cpu_ns}
    results["trace"] = trace_cost.run(batches=200 if quick else 2000, rounds=2 if quick else 5)
    return results


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# weft microbenchmarks (in memory)",
        "",
        f"- command: `{res.get('command', '')}`",
        f"- load average when it finished: {' '.join(res.get('loadavg', []))} "
        "(2 CPUs; a busy machine slows the wall clock of every round: the CPU-time "
        "figures, this thread's own time on a CPU, are the steadier ones)",
        f"- Python {res['python']}, best of {res['best_of']} rounds × {res['iterations']} "
        f"iterations; an empty loop costs {res['loop_overhead_ns']:.1f} ns per iteration "
        "(included in the figures below)",
        "",
        "Wall clock / CPU time, ns per packet:",
        "",
        "| backend | packet | from_device (lookup + encap) | from_network (decap + check) "
        "| round trip A→B | round trip rate (by CPU time) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["codec"]:
        cpu = r.get("round_trip_cpu_ns") or r["round_trip_ns"]
        lines.append(
            f"| {r['backend']} | {r['packet_bytes']} B "
            f"| {r['from_device_ns']:.0f} / {r.get('from_device_cpu_ns', 0):.0f} "
            f"| {r['from_network_ns']:.0f} / {r.get('from_network_cpu_ns', 0):.0f} "
            f"| {r['round_trip_ns']:.0f} / {cpu:.0f} | {1e6 / cpu:.0f} kpps |"
        )
    lines += [
        "",
        "| routes | prefix lengths | lookup_v4 (wall / CPU) | loop + list index alone |",
        "|---|---|---|---|",
    ]
    for r in res["routes"]:
        lines.append(
            f"| {r['routes']:,} | {r['prefix_lengths']} "
            f"| {r['lookup_ns']:.0f} / {r.get('lookup_cpu_ns', 0):.0f} ns "
            f"| {r['loop_and_index_ns']:.0f} ns |"
        )
    if "source_port" in res:
        sp = res["source_port"]
        lines += [
            "",
            f"Outer source port of a datagram (inner flow hash, one of 16 ports): "
            f"{sp['ns']:.0f} / {sp['cpu_ns']:.0f} ns per packet (wall / CPU).",
        ]
    if "trace" in res:
        lines += trace_cost.markdown(res["trace"])
    return "\n".join(lines) + "\n"


def main(out: Path, *, quick: bool = False, best_of: int = 5, command: str = "") -> int:
    res = run(quick=quick, best_of=best_of)
    res["command"] = command
    res["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    res["started"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    (out / "micro.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / "micro.md").write_text(md)
    print(md)
    return 0
