"""The control plane at scale: a real etcd on 127.0.0.1 holding N flannel leases.

For each N (``--leases 1000,5000``) the parent writes N vxlan leases (flannel's
JSON, keys ``<prefix>/subnets/10.a.b.0-24``) into a private etcd, then runs two
fresh child processes, so each N gets a clean process and a clean RSS:

* ``agent`` child (root namespace, talks to etcd on 127.0.0.1): the agent's own
  pieces from control/agent.py — ``Agent.wait_for_config``, ``Agent.acquire``
  (a CAS create after a full listing, as flanneld), then what its watch loop
  does first: ``Agent.list_leases`` + ``LeaseWatcher.reset`` + ``Agent._apply``
  per peer, feeding an in-memory ``Forwarder`` (the userspace dataplane without
  its device). Then ``Agent.watch_loop`` runs for real while another etcd
  client puts new leases, one at a time: put → watch event → decode → watcher
  → forwarder, timed per lease. RSS is read from /proc/self/status before and
  after the peers are loaded.
* ``kernel`` child (inside a lab namespace, no etcd): ``KernelDataplane`` (weft
  ``--dataplane kernel``) programs flannel.1 and, per peer, neighbour + FDB +
  route over netlink, from inside a running event loop as the agent does;
  bounded to ``KERNEL_LIMIT_S`` seconds (the per-peer cost is what it reports).

The agent's logger is left at WARNING: the real agent also logs one INFO line
per peer, which this does not count.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from bench.sampling import pid_rss_kb
from bench.stats import percentile

PREFIX = "/coreos.com/network"
CONFIG = '{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}'
OWN_IP = IPv4Address("192.168.0.1")
KERNEL_LIMIT_S = 60.0
PUT_TIMEOUT_S = 5.0
WRITE_BATCH = 200


def lease_subnet(i: int) -> IPv4Network:
    """The i-th benchmark lease: 10.1.0.0/24, 10.1.1.0/24, … (10.200+ is for new puts)."""
    return IPv4Network(((10 << 24) | ((1 + i // 256) << 16) | ((i % 256) << 8), 24))


def lease_value(i: int) -> bytes:
    from control.model import LeaseAttrs, encode_lease_attrs

    mac = f"02:bb:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
    ip = IPv4Address((172 << 24) | (16 << 16) + i + 1)
    return encode_lease_attrs(LeaseAttrs(ip, None, "vxlan", {"VNI": 1, "VtepMAC": mac}))


def lease_key(subnet: IPv4Network) -> str:
    from control.model import subnet_key

    return subnet_key(PREFIX, subnet)


def new_lease(j: int) -> tuple[IPv4Network, bytes]:
    """The j-th lease put while the watcher runs (outside the preloaded range)."""
    subnet = IPv4Network(((10 << 24) | (200 << 16) | (j << 8), 24))
    return subnet, lease_value(1_000_000 + j)


async def write_leases(endpoint: str, start: int, stop: int) -> None:
    from control.etcd_store import EtcdStore

    store = EtcdStore([endpoint])
    try:
        from control.model import config_key

        await store.put(config_key(PREFIX), CONFIG.encode())
        for lo in range(start, stop, WRITE_BATCH):
            hi = min(stop, lo + WRITE_BATCH)
            await asyncio.gather(
                *(store.put(lease_key(lease_subnet(i)), lease_value(i)) for i in range(lo, hi))
            )
    finally:
        await store.close()


# -- the agent child ---------------------------------------------------------------


class TimedForwarder:
    """The agent's Dataplane, in memory: a Forwarder, with add_peer timed and watched."""

    def __init__(self) -> None:
        from dataplane.backends.vxlan import VxlanBackend
        from dataplane.forwarder import Forwarder

        self.forwarder = Forwarder(VxlanBackend(1, bytes.fromhex("02aa00000001")))
        self.add_s = 0.0
        self.adds = 0
        self.seen: dict[IPv4Network, float] = {}
        self.waiting: dict[IPv4Network, asyncio.Future[float]] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def add_peer(self, peer: Any) -> None:
        t0 = time.perf_counter()
        self.forwarder.add_peer(peer)
        t1 = time.perf_counter()
        self.add_s += t1 - t0
        self.adds += 1
        fut = self.waiting.pop(peer.subnet, None)
        if fut is not None and not fut.done():
            fut.set_result(t1)

    def remove_peer(self, subnet: IPv4Network) -> Any:
        return self.forwarder.remove_peer(subnet)

    def stop(self) -> None:
        pass


async def agent_child(endpoint: str, n: int, puts: int, workdir: str) -> dict[str, Any]:
    import random

    from control.agent import Agent, AgentOptions, Underlay
    from control.etcd_store import EtcdStore

    rss_start = pid_rss_kb_self()
    dp = TimedForwarder()
    opts = AgentOptions(
        etcd_endpoints=[endpoint],
        etcd_prefix=PREFIX,
        subnet_file=f"{workdir}/subnet.env",
        state_dir=f"{workdir}/state",
    )
    underlay = Underlay("eth0", IPv4Interface(f"{OWN_IP}/16"), 1500, OWN_IP)
    store = EtcdStore([endpoint])
    writer = EtcdStore([endpoint])
    agent = Agent(opts, store, lambda _agent: dp, underlay=underlay, rng=random.Random(1))
    stop = asyncio.Event()
    out: dict[str, Any] = {"leases": n}
    put_keys: list[str] = []
    watch: asyncio.Task[None] | None = None
    try:
        t0 = time.perf_counter()
        config = await agent.wait_for_config(stop)
        t_config = time.perf_counter()
        assert config is not None
        agent.config = config
        agent.vtep_mac = bytes.fromhex("02aa00000001")
        agent.lease = await agent.acquire()
        put_keys.append(agent.lease.key(PREFIX))
        agent.watcher.set_own_subnet(agent.lease.subnet)
        agent.dataplane = dp
        t_ready = time.perf_counter()
        rss_ready = pid_rss_kb_self()
        _, leases = await agent.list_leases()
        t_list = time.perf_counter()
        events = agent.watcher.reset(leases)
        t_reset = time.perf_counter()
        for event in events:
            agent._apply(event.kind, event.lease)
        t_applied = time.perf_counter()
        rss_loaded = pid_rss_kb_self()
        out.update(
            connect_and_config_s=t_config - t0,
            acquire_s=t_ready - t_config,
            ready_s=t_ready - t0,
            list_s=t_list - t_ready,
            listed=len(leases),
            reset_s=t_reset - t_list,
            apply_s=t_applied - t_reset,
            peers=dp.adds,
            peers_loaded_s=t_applied - t0,
            apply_per_peer_us=1e6 * (t_applied - t_reset) / max(1, dp.adds),
            forwarder_add_per_peer_us=1e6 * dp.add_s / max(1, dp.adds),
            rss_start_kb=rss_start,
            rss_ready_kb=rss_ready,
            rss_loaded_kb=rss_loaded,
        )
        # The real watch loop (it lists again, finds nothing new, then watches).
        watch = asyncio.get_running_loop().create_task(agent.watch_loop())
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        missed = 0
        for j in range(puts + 1):  # j = 0 is a warm-up: it proves the watch is live
            subnet, value = new_lease(j)
            fut: asyncio.Future[float] = loop.create_future()
            dp.waiting[subnet] = fut
            key = lease_key(subnet)
            put_keys.append(key)
            t_put = time.perf_counter()
            await writer.put(key, value)
            try:
                t_seen = await asyncio.wait_for(fut, PUT_TIMEOUT_S if j else 15.0)
            except TimeoutError:
                missed += 1
                continue
            if j:
                latencies.append(1e3 * (t_seen - t_put))
        out.update(
            puts=puts,
            put_to_forwarder_ms_p50=percentile(latencies, 50) if latencies else None,
            put_to_forwarder_ms_p99=percentile(latencies, 99) if latencies else None,
            put_to_forwarder_ms_max=max(latencies) if latencies else None,
            puts_missed=missed,
            rss_end_kb=pid_rss_kb_self(),
        )
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib_suppress():
                await watch
        for key in put_keys:
            with contextlib_suppress():
                await writer.delete(key)
        await writer.close()
        await store.close()
    return out


def contextlib_suppress() -> Any:
    import contextlib

    return contextlib.suppress(Exception, asyncio.CancelledError)


def pid_rss_kb_self() -> int | None:
    import os

    return pid_rss_kb(os.getpid())


# -- the kernel child ------------------------------------------------------------------


def kernel_child(n: int, local_ip: str, limit_s: float) -> dict[str, Any]:
    import uvloop

    from control.kernel import KernelDataplane, KernelSpec
    from dataplane.peers import Peer

    spec = KernelSpec(
        backend="vxlan",
        subnet=IPv4Network("10.0.0.0/24"),
        local_ip=IPv4Address(local_ip),
        underlay_iface="eth0",
        device_mtu=1450,
        vni=1,
        port=8472,
        vtep_mac=bytes.fromhex("02aa00000001"),
    )
    dp = KernelDataplane(spec)
    result: dict[str, Any] = {"leases": n}

    async def main() -> None:
        dp.start(asyncio.get_running_loop())
        t0 = time.perf_counter()
        done = 0
        for i in range(n):
            if time.perf_counter() - t0 > limit_s:
                break
            value = json.loads(lease_value(i))
            mac = bytes.fromhex(value["BackendData"]["VtepMAC"].replace(":", ""))
            dp.add_peer(Peer(lease_subnet(i), IPv4Address(value["PublicIP"]), mac, 8472))
            done += 1
        elapsed = time.perf_counter() - t0
        result.update(
            programmed=done,
            seconds=elapsed,
            per_peer_ms=1e3 * elapsed / max(1, done),
            limited=done < n,
        )

    uvloop.run(main())
    return result


# -- the parent ---------------------------------------------------------------------


def _child_json(cp: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    for line in reversed(cp.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{what} child failed (rc {cp.returncode}): {cp.stderr[-1500:]}")


def run(counts: tuple[int, ...], puts: int, quick: bool) -> dict[str, Any]:
    from bench.progress import Progress
    from control.lab.etcd import EtcdServer
    from control.lab.topology import Lab

    progress = Progress()
    counts = tuple(sorted(set(counts)))
    if not counts or counts[0] < 1 or counts[-1] > 60_000:
        raise ValueError("--leases must be between 1 and 60000")
    progress.start(len(counts) * 3)
    kernel_limit = 10.0 if quick else KERNEL_LIMIT_S
    doc: dict[str, Any] = {
        "kind": "control",
        "puts": puts,
        "kernel_limit_s": kernel_limit,
        "rows": [],
    }
    written = 0
    with EtcdServer("127.0.0.1") as etcd, Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        lab.add_underlay()
        node = lab.add_node("n1")
        for n in counts:
            t0 = time.perf_counter()
            asyncio.run(write_leases(etcd.endpoint, written, n))
            written = n
            progress.step(f"{n} leases in etcd (wrote them in {time.perf_counter() - t0:.1f} s)")
            cp = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.controlplane",
                    "agent-child",
                    etcd.endpoint,
                    str(n),
                    str(puts),
                    tmp,
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            row = _child_json(cp, "agent")
            progress.step(
                f"{n} leases: ready {row['ready_s'] * 1e3:.0f} ms, all peers loaded "
                f"{row['peers_loaded_s'] * 1e3:.0f} ms, put→forwarder p50 "
                f"{row['put_to_forwarder_ms_p50'] or 0:.1f} ms"
            )
            kcp = lab.run(
                node,
                sys.executable,
                "-m",
                "bench.controlplane",
                "kernel-child",
                str(n),
                str(node.underlay_ip),
                str(kernel_limit),
                check=False,
                timeout=kernel_limit + 60,
            )
            krow = _child_json(kcp, "kernel")
            row["kernel"] = krow
            progress.step(
                f"{n} leases: kernel mode {krow['per_peer_ms']:.2f} ms per peer "
                f"({krow['programmed']} programmed)"
            )
            doc["rows"].append(row)
    return doc


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# weft control plane at scale",
        "",
        f"- command: `{doc.get('command', '')}`",
        f"- load average when it finished: {' '.join(doc.get('loadavg', []))}",
        "- a real etcd on 127.0.0.1; the agent's own code (control/agent.py) feeding an "
        "in-memory Forwarder; kernel mode programming flannel.1 over netlink in a lab namespace",
        "",
        "| leases | ready (config + acquire) | list | watcher reset | apply (all peers) "
        "| all peers loaded | per peer: apply / Forwarder.add_peer | new lease → forwarder "
        "p50 / p99 | RSS: imported → peers loaded → after the puts | kernel mode per peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        k = r.get("kernel", {})
        rss = " → ".join(
            f"{r[k] / 1024:.1f}" if r.get(k) else "?"
            for k in ("rss_start_kb", "rss_loaded_kb", "rss_end_kb")
        )
        p50, p99 = r.get("put_to_forwarder_ms_p50"), r.get("put_to_forwarder_ms_p99")
        lines.append(
            f"| {r['leases']:,} | {r['ready_s'] * 1e3:.0f} ms | {r['list_s'] * 1e3:.0f} ms "
            f"| {r['reset_s'] * 1e3:.1f} ms | {r['apply_s'] * 1e3:.0f} ms "
            f"| {r['peers_loaded_s'] * 1e3:.0f} ms "
            f"| {r['apply_per_peer_us']:.1f} µs / {r['forwarder_add_per_peer_us']:.1f} µs "
            f"| {p50 if p50 is None else f'{p50:.1f}'} / {p99 if p99 is None else f'{p99:.1f}'}"
            f" ms | {rss} MB | {k.get('per_peer_ms', 0):.2f} ms ({k.get('programmed')} peers"
            f"{', time-limited' if k.get('limited') else ''}) |"
        )
    return "\n".join(lines) + "\n"


def main(
    out: Path, counts: tuple[int, ...], *, puts: int = 50, quick: bool = False, command: str = ""
) -> int:
    if quick:
        counts, puts = (200,), min(puts, 10)
    doc = run(counts, puts, quick)
    doc["command"] = command
    doc["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    doc["started"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    (out / "control.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    (out / "control.md").write_text(md)
    print(md)
    return 0


def _child_main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if argv[0] == "agent-child":
        import uvloop

        endpoint, n, puts, workdir = argv[1], int(argv[2]), int(argv[3]), argv[4]
        res = uvloop.run(agent_child(endpoint, n, puts, workdir))
    elif argv[0] == "kernel-child":
        res = kernel_child(int(argv[1]), argv[2], float(argv[3]))
    else:
        print(f"unknown child {argv[0]!r}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
