"""Issue 7: a node agent is never the reason a cluster's pods lose traffic.

Real etcd, real `weft agent` processes, real kernel, everything in lab
namespaces (control/lab/cluster.py). The figures these tests measure are
printed (``pytest -n 0 -s``) and written down in docs/reliability.md.

One 4-node cluster is shared by most tests (``rel``): n1 and n2 userspace TUN,
n3 userspace TAP (kernel neighbour + route per peer, as flannel.1), n4 kernel
mode (flannel.1 programmed by the agent); one pod each. Every test leaves it
with all four agents up and every pod pair pinging. The three-member etcd
test has its own cluster.

Constants sized for CI: ``OUTAGE_S`` (the issue's 30 s) and the soak's
duration, ``WEFT_SOAK_SECONDS`` (default 60; the issue's 10 minutes is
``WEFT_SOAK_SECONDS=600``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from control.lab.cluster import Cluster, ClusterNode, flannel_lease_json, lease_key
from control.lab.topology import Lab, Node, Pod

OUTAGE_S = 30.0  # etcd unreachable for this long (issue 7: 30 s)
OUTAGE_PING_INTERVAL_S = 0.2  # 5 pings/s
RESTART_PING_INTERVAL_S = 0.1  # 10 pings/s: the gap is measured to 0.1 s
RESTART_BACK_WITHIN_S = 2.0  # traffic back this soon after the new agent is spawned
DEAD_NODE_TTL_S = 10  # --lease-ttl of the node that dies
SOAK_S = float(os.environ.get("WEFT_SOAK_SECONDS", "60"))
SOAK_WARMUP_S = min(20.0, SOAK_S / 3)
SOAK_RSS_SLACK_KB = 4096  # "flat": growth within 4 MiB of the warm RSS (see docs)
FLOOD_RSS_SLACK_KB = 4096
MULTI_LEASE_TTL_S = 10  # agents of the three-member etcd test renew every 5 s
STRANGER_IP = "192.168.77.99"  # on the underlay's range; no node has it
STRANGER_MAC = "02:00:00:00:00:99"


# -- measuring -------------------------------------------------------------------------


def report(what: str, **figures: Any) -> None:
    """One line of figures for docs/reliability.md (seen with ``pytest -n 0 -s``)."""
    print(f"\n[figures] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def agent_pid(cn: ClusterNode) -> int:
    assert cn.proc is not None and cn.proc.poll() is None, f"{cn.name}: agent not running"
    return cn.proc.pid


def udp_snmp(lab: Lab, ns: str | Node) -> dict[str, int]:
    """The namespace's /proc/net/snmp Udp: counters (RcvbufErrors: datagrams the
    kernel dropped because a socket's receive buffer was full)."""
    text = lab.run(ns, "cat", "/proc/net/snmp").stdout
    rows = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}


def drops(st: dict[str, Any]) -> dict[str, int]:
    return dict(st.get("counters", {}).get("drops", {}))


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    keys = set(after) | set(before)
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys)}


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


@dataclass
class PingResult:
    sent: int
    received: int
    replies: dict[int, float]  # icmp_seq → wall-clock time the reply arrived (ping -D)
    max_rtt_ms: float
    text: str

    @property
    def lost(self) -> int:
        return self.sent - self.received


@dataclass
class Pinger:
    """``ping -D -O`` at a fixed interval from a pod, in the background."""

    lab: Lab
    src: Pod
    dst: IPv4Address
    count: int
    interval: float
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> Pinger:
        argv = ["ping", "-D", "-O", "-n", "-i", str(self.interval), "-c", str(self.count),
                "-W", "1", str(self.dst)]  # fmt: skip
        self.proc = self.lab.spawn(self.src, argv, log=self.log)
        return self

    def result(self, timeout: float | None = None) -> PingResult:
        assert self.proc is not None
        if timeout is None:
            timeout = self.count * self.interval + 15
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.lab.stop(self.proc)
        text = self.log.read_text(errors="replace")
        replies = {
            int(m.group(2)): float(m.group(1))
            for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", text, re.M)
        }
        m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
        sent, received = (int(m.group(1)), int(m.group(2))) if m else (0, len(replies))
        rtt = re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", text)
        return PingResult(sent, received, replies, float(rtt.group(1)) if rtt else -1.0, text)


def pod_pairs(nodes: list[ClusterNode]) -> list[tuple[ClusterNode, ClusterNode]]:
    return [(a, b) for a in nodes for b in nodes if a is not b]


def all_pairs_ping(cluster: Cluster, nodes: list[ClusterNode]) -> None:
    results = cluster.ping_all(nodes)
    failed = sorted(f"{a}→{b}" for (a, b), ok in results.items() if not ok)
    assert not failed, f"pod pairs that did not ping: {failed}"


def weft_nodes(cluster: Cluster) -> list[ClusterNode]:
    return [cn for cn in cluster.nodes.values() if cn.kind == "weft"]


def peers_of(cluster: Cluster, cn: ClusterNode) -> set[str]:
    return {p["subnet"] for p in cluster.status(cn)["peers"]}


def expected_peers(cluster: Cluster, cn: ClusterNode) -> list[IPv4Network]:
    return [o.subnet for o in cluster.nodes.values() if o is not cn and o.subnet is not None]


def wait_all_peers(cluster: Cluster, timeout: float = 15.0) -> None:
    for cn in weft_nodes(cluster):
        cluster.wait_peers(cn, expected_peers(cluster, cn), timeout=timeout)


def log_size(cn: ClusterNode) -> int:
    return cn.log_path.stat().st_size


def log_since(cn: ClusterNode, offset: int) -> str:
    return cn.log_path.read_bytes()[offset:].decode(errors="replace")


def assert_no_traceback(cluster: Cluster) -> None:
    for cn in weft_nodes(cluster):
        text = cn.log_path.read_text(errors="replace")
        assert "Traceback" not in text, f"{cn.name}:\n{text[-3000:]}"


def kernel_state(lab: Lab, node: Node) -> dict[str, Any]:
    """What a node's kernel holds that an agent could add or leave behind: links,
    addresses, routes (every table, v4 and v6), permanent neighbours, FDB entries
    of weft/flannel devices. Normalised (no ifindex) so two snapshots compare."""

    def rows(items: list[dict], drop: tuple[str, ...] = ()) -> list[str]:
        return sorted(
            json.dumps({k: v for k, v in item.items() if k not in drop}, sort_keys=True)
            for item in items
        )

    # MACs of the pod-side veths and of the agent's own devices, except a random
    # one the agent makes anew each start (e.g. a helper TAP of the fast path).
    keep_mac = ("weft.1", "weft0", "flannel.1", "eth0", "cni0")
    links = [
        {"ifname": li["ifname"], "mtu": li.get("mtu"), "link_type": li.get("link_type"),
         "address": li.get("address") if li["ifname"] in keep_mac else None,
         "up": "UP" in li.get("flags", [])}
        for li in lab.ip_json(node, "link", "show")
    ]  # fmt: skip
    addrs = [
        {"ifname": li["ifname"], "addr": f"{a['local']}/{a['prefixlen']}"}
        for li in lab.ip_json(node, "addr", "show")
        for a in li.get("addr_info", [])
        if not a["local"].startswith("fe80:")
    ]
    neigh = [n for n in lab.ip_json(node, "neigh", "show") if "PERMANENT" in n.get("state", [])]
    fdb = [
        f
        for f in json.loads(lab.bridge(node, "-j", "fdb", "show") or "[]")
        if str(f.get("ifname", "")).startswith(("weft", "flannel"))
    ]
    return {
        "links": rows(links),
        "addrs": rows(addrs),
        "routes4": rows(lab.ip_json(node, "-4", "route", "show", "table", "all")),
        "routes6": rows(
            [
                r
                for r in lab.ip_json(node, "-6", "route", "show", "table", "all")
                if not str(r.get("dst", "")).startswith(("fe80", "ff00"))
            ],
            drop=("expires",),
        ),
        "neigh": rows(neigh),
        "fdb": rows(fdb),
    }


# -- the shared cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """n1, n2 (userspace TUN), n3 (userspace TAP), n4 (kernel mode), a pod each."""
    cluster = Cluster(tmp_path_factory.mktemp("rel"))
    try:
        cluster.set_config("10.244.0.0/16", "vxlan")
        shapes = {"n1": ("userspace", "tun"), "n2": ("userspace", "tun"),
                  "n3": ("userspace", "tap"), "n4": ("kernel", "tun")}  # fmt: skip
        started = [cluster.start_weft_node(n, dataplane=dp, device=dev)
                   for n, (dp, dev) in shapes.items()]  # fmt: skip
        for cn in started:
            cluster.wait_ready(cn)
            cluster.wire_pods(cn)
        wait_all_peers(cluster)
        yield cluster
    finally:
        cluster.close()


def four(rel: Cluster) -> list[ClusterNode]:
    return [rel.nodes[n] for n in ("n1", "n2", "n3", "n4")]


# -- agent SIGKILL and restart under traffic --------------------------------------------


@pytest.mark.parametrize("victim", ["n2", "n3"], ids=["tun", "tap"])
def test_sigkill_and_restart_under_traffic(rel: Cluster, tmp_path: Path, victim: str) -> None:
    """10 pings/s across the victim's restart: same subnet and VtepMAC, traffic back
    within 2 s of the new agent's spawn, the node's kernel state as before."""
    n1, cn = rel.nodes["n1"], rel.nodes[victim]
    wait_all_peers(rel)
    before = rel.status(cn)
    state_before = kernel_state(rel.lab, cn.node)
    pinger = Pinger(rel.lab, n1.pod, cn.pod.ip, 60, RESTART_PING_INTERVAL_S,
                    tmp_path / "ping.log").start()  # fmt: skip
    try:
        time.sleep(2.0)
        t_kill = time.time()
        assert rel.kill_agent(cn, signal.SIGKILL) == -signal.SIGKILL
        t_spawn = time.time()
        rel.restart_agent(cn, wait=False)
        rel.wait_api_ready(cn)
        t_ready = time.time()
        after = rel.wait_peers(cn, expected_peers(rel, cn))
    finally:
        res = pinger.result()
    assert after["subnet"] == before["subnet"] == str(cn.subnet)
    assert after["vtep_mac"] == before["vtep_mac"]
    last_before = max((t for t in res.replies.values() if t <= t_kill), default=None)
    first_after = min((t for t in res.replies.values() if t >= t_spawn), default=None)
    assert last_before is not None and first_after is not None, res.text
    back = first_after - t_spawn
    report(
        f"SIGKILL+restart ({cn.device})",
        lost=f"{res.lost}/{res.sent}",
        gap_s=round(first_after - last_before, 2),
        spawn_to_ready_s=round(t_ready - t_spawn, 2),
        spawn_to_first_reply_s=round(back, 2),
    )
    assert back <= RESTART_BACK_WITHIN_S, (
        f"first reply {back:.2f}s after the restart (ready after {t_ready - t_spawn:.2f}s)"
    )
    # Every reply after the first one: nothing lost once traffic is back.
    seq_back = min(k for k, t in res.replies.items() if t == first_after)
    lost_later = [s for s in range(seq_back, res.sent + 1) if s not in res.replies]
    assert not lost_later, f"lost after traffic came back: icmp_seq {lost_later}"
    # No duplicate or leftover device, address, route, neighbour or FDB entry.
    state_after = kernel_state(rel.lab, cn.node)
    for part in state_before:
        gone = sorted(set(state_before[part]) - set(state_after[part]))
        new = sorted(set(state_after[part]) - set(state_before[part]))
        assert state_after[part] == state_before[part], f"{part}: new {new}, gone {gone}"
    devices = [li["ifname"] for li in rel.lab.ip_json(cn.node, "link", "show")]
    ours = [d for d in devices if d.startswith(("weft", "flannel"))]
    assert "weft.1" in ours and len(ours) == len(set(ours)), ours
    all_pairs_ping(rel, four(rel))


# -- etcd unreachable for 30 s -----------------------------------------------------------


def cut_from_etcd(lab: Lab, node: Node, ip: str, port: int, cut: bool) -> None:
    """A silent partition between a node and etcd: iptables DROP both ways, in the
    node's own namespace (etcd itself keeps serving the test's etcdctl)."""
    action = "-I" if cut else "-D"
    lab.run(node, "iptables", "-w", action, "OUTPUT", "-p", "tcp", "-d", ip,
            "--dport", str(port), "-j", "DROP")  # fmt: skip
    lab.run(node, "iptables", "-w", action, "INPUT", "-p", "tcp", "-s", ip,
            "--sport", str(port), "-j", "DROP")  # fmt: skip


def log_time(line: str) -> float:
    """The wall-clock time of an agent log line (``2026-01-02 03:04:05,678 …``)."""
    stamp, ms = line[:19], line[20:23]
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def test_etcd_unreachable_for_30s_loses_no_ping_and_the_difference_is_applied(
    rel: Cluster, tmp_path: Path
) -> None:
    """Every agent cut from etcd for OUTAGE_S while all pod pairs ping at 5/s. Meanwhile
    a node joins (k1) and one leaves (k0's lease deleted). No ping is lost; each agent
    logs the outage once and its end once, re-lists, and applies both changes."""
    nodes = four(rel)
    k0 = rel.nodes.get("k0") or rel.add_kernel_node("k0")
    wait_all_peers(rel)
    rel.refresh_kernel_nodes()
    assert rel.etcd is not None
    etcd_ip, port = str(rel.etcd_node.underlay_ip), rel.etcd.client_port
    offsets = {cn.name: log_size(cn) for cn in nodes}
    resyncs = {cn.name: rel.status(cn)["control"]["watch_resyncs"] for cn in nodes}
    count = int((OUTAGE_S + 8) / OUTAGE_PING_INTERVAL_S)
    pingers = [
        Pinger(rel.lab, a.pod, b.pod.ip, count, OUTAGE_PING_INTERVAL_S,
               tmp_path / f"{a.name}-{b.name}.log").start()
        for a, b in pod_pairs(nodes)
    ]  # fmt: skip
    converged: dict[str, float] = {}
    try:
        time.sleep(1.0)
        t_cut = time.time()
        cut = []
        try:
            for cn in nodes:
                cut_from_etcd(rel.lab, cn.node, etcd_ip, port, True)
                cut.append(cn)
            time.sleep(2.0)
            # While the agents cannot see etcd: a node joins, another one leaves.
            k1 = rel.add_kernel_node("k1")
            rel.etcdctl("del", lease_key(rel.prefix, k0.subnet))
            del rel.nodes["k0"]
            time.sleep(max(0.0, t_cut + OUTAGE_S - time.time()))
            for cn in nodes:  # the cut was real: nothing of it was seen
                assert peers_of(rel, cn) == {str(s) for s in expected_peers(rel, cn)} - {
                    str(k1.subnet)
                } | {str(k0.subnet)}, cn.name
        finally:
            for cn in cut:
                cut_from_etcd(rel.lab, cn.node, etcd_ip, port, False)
        t_back = time.time()
        for cn in nodes:
            rel.wait_peers(cn, expected_peers(rel, cn), timeout=15)
            converged[cn.name] = round(time.time() - t_back, 1)
    finally:
        results = [(a.name, b.name, p.result()) for (a, b), p in
                   zip(pod_pairs(nodes), pingers, strict=True)]  # fmt: skip
    sent = sum(r.sent for _, _, r in results)
    lost = {f"{a}→{b}": r.lost for a, b, r in results if r.lost}
    worst_rtt = max(r.max_rtt_ms for _, _, r in results)
    noticed, back_after = {}, {}
    for cn in nodes:
        text = log_since(cn, offsets[cn.name])
        down = [ln for ln in text.splitlines() if "etcd unreachable" in ln]
        up = [ln for ln in text.splitlines() if "etcd is back after" in ln]
        assert len(down) == 1 and len(up) == 1, f"{cn.name}: outage logged {down} / {up}"
        noticed[cn.name] = round(log_time(down[0]) - t_cut, 1)
        back_after[cn.name] = round(log_time(up[0]) - t_back, 1)
        assert rel.status(cn)["control"]["watch_resyncs"] > resyncs[cn.name]
    report(
        f"etcd unreachable {OUTAGE_S:.0f}s",
        pings=sent,
        lost=sum(lost.values()),
        max_rtt_ms=worst_rtt,
        outage_logged_after_s=noticed,
        back_logged_after_uncut_s=back_after,
        peers_converged_after_uncut_s=converged,
    )
    assert not lost, f"pings lost during the outage: {lost}"
    # the joiner is reachable from every pod, the leaver from none
    rel.refresh_kernel_nodes()
    all_pairs_ping(rel, [*nodes, rel.nodes["k1"]])
    n1 = rel.nodes["n1"]
    no_route = drops(rel.status(n1)).get("no_route", 0)
    assert not rel.lab.ping(n1.pod, k0.pod.ip, count=2, timeout_s=2)
    assert drops(rel.status(n1)).get("no_route", 0) >= no_route + 2
    assert_no_traceback(rel)


# -- malformed and foreign leases ---------------------------------------------------------


def put_raw(cluster: Cluster, key: str, value: str) -> None:
    cluster.etcdctl("put", key, value)


def stranger_lease(public_ip: str = STRANGER_IP, mac: str = STRANGER_MAC) -> str:
    return flannel_lease_json(public_ip, "vxlan", 1, mac)


def kernel_routes_to(cluster: Cluster, cn: ClusterNode, subnet: str) -> list[dict]:
    return [r for r in cluster.lab.ip_json(cn.node, "-4", "route", "show")
            if r.get("dst") == subnet]  # fmt: skip


@contextlib.contextmanager
def leases_written(cluster: Cluster, entries: dict[str, str]) -> Iterator[None]:
    """Put raw ``key → value`` pairs under the prefix; delete them afterwards."""
    try:
        for key, value in entries.items():
            put_raw(cluster, key, value)
        yield
    finally:
        for key in entries:
            with contextlib.suppress(Exception):
                cluster.etcdctl("del", key)


def test_malformed_leases_and_config_are_skipped_with_a_clear_line(rel: Cluster) -> None:
    """Leases other tools wrote: bad JSON, not an object, bad fields, keys that are
    not lease keys. Each agent logs each key once, adds no peer, keeps routing; a
    garbage config written while they run changes nothing."""
    nodes = four(rel)
    wait_all_peers(rel)
    sub = f"{rel.prefix}/subnets"
    bad = {
        f"{sub}/10.244.201.0-24": '{"PublicIP":',
        f"{sub}/10.244.202.0-24": '["not", "an", "object"]',
        f"{sub}/10.244.203.0-24": '{"PublicIP":"not-an-ip","BackendType":"vxlan"}',
        f"{sub}/10.244.204.0-24": '{"PublicIP":"192.168.77.99","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"zz:zz"}}',
        f"{sub}/10.244.205.0-24": "\udcff\udcfe not UTF-8",
        f"{sub}/not-a-subnet": stranger_lease(),
        f"{sub}/10.244.206.7-24": stranger_lease(),  # host bits set
        f"{sub}/10.244.207.0-40": stranger_lease(),  # no such prefix length
    }
    offsets = {cn.name: log_size(cn) for cn in nodes}
    config = rel.etcdctl("get", f"{rel.prefix}/config", "--print-value-only").strip()
    try:
        with leases_written(rel, bad):
            put_raw(rel, f"{rel.prefix}/config", "{garbage")
            time.sleep(1.5)
            for cn in nodes:
                text = log_since(cn, offsets[cn.name])
                for key in bad:
                    shown = key.encode("utf-8", "surrogateescape").decode(errors="replace")
                    lines = [ln for ln in text.splitlines() if f"skipping {shown}:" in ln]
                    assert len(lines) == 1, f"{cn.name} about {key!r}: {lines}\n{text}"
                assert peers_of(rel, cn) == {str(s) for s in expected_peers(rel, cn)}
            all_pairs_ping(rel, nodes)
    finally:
        put_raw(rel, f"{rel.prefix}/config", config)
    for cn in nodes:
        assert cn.proc is not None and cn.proc.poll() is None, f"{cn.name} died"
    assert_no_traceback(rel)


# Leases that hijack routing. Each case gets a throwaway cluster (TUN, TAP and
# kernel-mode agents, a pod each): when it fails, the damage stays there.

HIJACKS = {
    "outside-network": "leases for 10.99.0.0/24 and for the underlay 192.168.77.0/24",
    "overlap": "a stranger's lease for the lower half of n1's subnet, and one for the network",
    "own-public-ip": "a lease for a free subnet claiming n1's public IP",
    "overlap-on-restart": "a stranger's lease for the /23 around n1's subnet, then n3 and n4 "
    "restart: their first listing holds it before n1's (etcd lists keys in byte order)",
}


@pytest.fixture
def hijack_cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "hijack")
    try:
        cluster.set_config("10.244.0.0/16", "vxlan")
        shapes = {"n1": ("userspace", "tun"), "n3": ("userspace", "tap"),
                  "n4": ("kernel", "tun")}  # fmt: skip
        started = [cluster.start_weft_node(n, dataplane=dp, device=dev)
                   for n, (dp, dev) in shapes.items()]  # fmt: skip
        for cn in started:
            cluster.wait_ready(cn)
            cluster.wire_pods(cn)
        wait_all_peers(cluster)
        yield cluster
    finally:
        cluster.close()


@pytest.mark.parametrize("case", HIJACKS)
def test_a_hijacking_lease_is_not_applied_and_routing_survives(
    hijack_cluster: Cluster, case: str
) -> None:
    """Well-formed leases that would break routing if applied (issue 7: "a lease that
    overlaps ours, a peer lease with our own public IP … nothing applied that would
    break routing"): no agent may route them, every pod pair keeps pinging, during
    and after their deletion, and n1 says why it ignores the ones aimed at it."""
    cluster = hijack_cluster
    nodes = weft_nodes(cluster)
    n1 = cluster.nodes["n1"]
    assert n1.subnet is not None
    sub = f"{cluster.prefix}/subnets"
    if case == "outside-network":
        entries = {f"{sub}/10.99.0.0-24": stranger_lease(),
                   f"{sub}/192.168.77.0-24": stranger_lease()}  # fmt: skip
        must_log: list[str] = []
    elif case == "overlap":
        half = IPv4Network(f"{n1.subnet.network_address}/25")
        entries = {f"{sub}/{half.network_address}-25": stranger_lease(),
                   f"{sub}/10.244.0.0-16": stranger_lease()}  # fmt: skip
        must_log = [f"ignoring lease {half}: it overlaps our own {n1.subnet}",
                    "ignoring lease 10.244.0.0/16: it overlaps our own"]  # fmt: skip
    elif case == "own-public-ip":
        entries = {f"{sub}/10.244.208.0-24": stranger_lease(str(n1.underlay_ip))}
        must_log = [f"ignoring lease 10.244.208.0/24: it claims our own public IP "
                    f"{n1.underlay_ip}"]  # fmt: skip
    else:
        wide = n1.subnet.supernet(new_prefix=23)
        key = f"{sub}/{wide.network_address}-23"
        assert key < lease_key(cluster.prefix, n1.subnet)  # listed first
        entries = {key: stranger_lease()}
        must_log = [f"ignoring lease {wide}: it overlaps our own {n1.subnet}"]
    bogus = {str(subnet) for key in entries if (subnet := subnet_of(key)) is not None}
    offset = log_size(n1)
    with leases_written(cluster, entries):
        time.sleep(1.5)
        if case == "overlap-on-restart":
            for name in ("n3", "n4"):
                cluster.restart_agent(cluster.nodes[name])
            time.sleep(1.0)
        text = log_since(n1, offset)
        for line in must_log:
            assert line in text, text
        for cn in nodes:
            assert cn.proc is not None and cn.proc.poll() is None, f"{cn.name} died"
        for cn in nodes:
            underlay = kernel_routes_to(cluster, cn, "192.168.77.0/24")
            assert [r.get("dev") for r in underlay] == ["eth0"], (cn.name, underlay)
        all_pairs_ping(cluster, nodes)
        for cn in nodes:
            if cn is n1 or case != "own-public-ip":
                assert not bogus & peers_of(cluster, cn), (cn.name, peers_of(cluster, cn))
    time.sleep(1.5)
    all_pairs_ping(cluster, nodes)
    assert_no_traceback(cluster)


def subnet_of(key: str) -> IPv4Network | None:
    addr, _, plen = key.rsplit("/", 1)[-1].partition("-")
    try:
        return IPv4Network(f"{addr}/{plen}")
    except ValueError:
        return None


# -- a hostile flood at the VXLAN port ----------------------------------------------------


def ip_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(src: str, dst: str, payload: bytes = b"weft-hostile", seq: int = 1) -> bytes:
    """An IPv4 ICMP echo request with correct checksums (built here, not with weft's codecs)."""
    icmp = bytearray(b"\x08\x00\0\0\x77\x77" + seq.to_bytes(2, "big") + payload)
    icmp[2:4] = ip_checksum(bytes(icmp)).to_bytes(2, "big")
    total = 20 + len(icmp)
    ip = bytearray(b"\x45\x00" + total.to_bytes(2, "big") + b"\x12\x34\x00\x00\x40\x01\0\0")
    ip += IPv4Address(src).packed + IPv4Address(dst).packed
    ip[10:12] = ip_checksum(bytes(ip)).to_bytes(2, "big")
    return bytes(ip + icmp)


def vxlan_frame(
    inner: bytes, dst_mac: str, *, vni: int = 1, flags: int = 0x08,
    src_mac: str = STRANGER_MAC, ethertype: int = 0x0800,
) -> bytes:  # fmt: skip
    header = bytes([flags, 0, 0, 0]) + (vni << 8).to_bytes(4, "big")
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    return header + eth + ethertype.to_bytes(2, "big") + inner


def hostile_datagrams(dst_mac: str, dst_ip: str, rng: random.Random) -> dict[str, list[bytes]]:
    """A few thousand datagrams by kind; the kinds are the issue's, plus every
    way a VXLAN frame can be wrong. Well-formed ones come from a stranger."""
    good = vxlan_frame(icmp_echo("10.244.250.5", dst_ip), dst_mac)
    big = vxlan_frame(icmp_echo("10.244.250.5", dst_ip, bytes(9000 - 22 - 28)), dst_mac)
    return {
        "random": [rng.randbytes(rng.randrange(0, 1500)) for _ in range(600)],
        "truncated": [good[: i % len(good)] for i in range(400)],
        "wrong_flags": [bytes([f]) + good[1:] for f in (0x00, 0x0C, 0x88, 0xFF) * 100],
        "reserved_bits": [good[:7] + b"\x01" + good[8:] for _ in range(100)],
        "wrong_vni": [vxlan_frame(good[22:], dst_mac, vni=v) for v in (2, 0xFFFFFF) * 150],
        "wrong_inner_mac": [vxlan_frame(good[22:], "02:00:00:00:00:01") for _ in range(300)],
        "wrong_ethertype": [vxlan_frame(good[22:], dst_mac, ethertype=0x0806)] * 300,
        "oversized_9000": [big] * 200,
        "oversized_random": [rng.randbytes(rng.randrange(1473, 30000)) for _ in range(100)],
        "well_formed_from_a_stranger": [good] * 500,
    }


SEND_PACED = r"""
import socket, sys, time
dst, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
data = sys.stdin.buffer.read()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
i, n, t0 = 0, 0, time.monotonic()
while i < len(data):
    size = int.from_bytes(data[i:i + 4], "big"); i += 4
    s.sendto(data[i:i + size], (dst, port)); i += size; n += 1
    ahead = n / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
print(n)
"""


def send_paced(lab: Lab, node: Node, dst: str, port: int, payloads: list[bytes],
               rate: float = 1500.0) -> int:  # fmt: skip
    """Send ``payloads`` from ``node`` at ``rate`` datagrams/s (bounded: they are a
    fixed list); returns the number sent."""
    blob = b"".join(len(p).to_bytes(4, "big") + p for p in payloads)
    cp = subprocess.run(
        ["ip", "netns", "exec", node.ns, "python3", "-c", SEND_PACED, dst, str(port), str(rate)],
        input=blob, capture_output=True, timeout=60 + len(payloads) / rate, check=True,
    )  # fmt: skip
    return int(cp.stdout)


def stranger_node(cluster: Cluster, name: str = "x1") -> Node:
    """A bare node on the underlay that runs no agent (made once per cluster)."""
    for node in cluster.lab.nodes:
        if node.name == name:
            return node
    return cluster.add_node(name)


def test_hostile_flood_every_datagram_counted_ping_passes_memory_flat(
    rel: Cluster, tmp_path: Path
) -> None:
    """Two floods of 3200 bad or unwanted datagrams at n1's VXLAN port from a stranger
    node while two pods ping n1's pod: no ping lost, the drop counters grow by exactly
    the number sent (none lost before counting: the socket's RcvbufErrors stay 0),
    and n1's RSS after the second flood equals the first's."""
    nodes = four(rel)
    wait_all_peers(rel)
    n1 = rel.nodes["n1"]
    stranger = stranger_node(rel)
    st = rel.status(n1)
    port = st["port"]
    flood = hostile_datagrams(st["vtep_mac"], str(n1.pod.ip), random.Random(7))
    payloads = [p for kind in flood.values() for p in kind]
    pid = agent_pid(n1)
    rss = [rss_kb(pid)]
    fds = [fd_count(pid)]
    figures: dict[str, Any] = {}
    for round_ in (1, 2):
        pingers = [Pinger(rel.lab, cn.pod, n1.pod.ip, 40, 0.2,
                          tmp_path / f"{cn.name}-{round_}.log").start()
                   for cn in (rel.nodes["n2"], rel.nodes["n3"])]  # fmt: skip
        time.sleep(1.0)
        before, snmp_before = drops(rel.status(n1)), udp_snmp(rel.lab, n1.node)
        sent = send_paced(rel.lab, stranger, str(n1.underlay_ip), port, payloads)
        time.sleep(1.0)
        after, snmp_after = drops(rel.status(n1)), udp_snmp(rel.lab, n1.node)
        results = [p.result() for p in pingers]
        rss.append(rss_kb(pid))
        fds.append(fd_count(pid))
        counted = delta(after, before)
        snmp = delta(snmp_after, snmp_before)
        figures[f"flood{round_}"] = {k: v for k, v in counted.items() if v}
        assert sent == len(payloads)
        assert snmp.get("RcvbufErrors", 0) == 0 and snmp.get("InErrors", 0) == 0, snmp
        assert sum(counted.values()) == sent, (sent, counted)
        for reason in ("truncated", "bad_flags", "wrong_vni", "unknown_mac", "bad_ethertype",
                       "unknown_source"):  # fmt: skip
            assert counted.get(reason, 0) > 0, (reason, counted)
        assert counted.get("unknown_source", 0) >= len(flood["well_formed_from_a_stranger"]) + len(
            flood["oversized_9000"]
        ), counted
        for r in results:
            assert r.lost == 0 and r.sent == 40, r.text
    report(
        "hostile flood at n1:8472",
        datagrams_per_flood=len(payloads),
        kinds={k: len(v) for k, v in flood.items()},
        counted=figures,
        rss_kb_before_after1_after2=rss,
        fds=fds,
    )
    assert rss[2] - rss[1] <= FLOOD_RSS_SLACK_KB, rss
    assert fds[0] == fds[1] == fds[2], fds
    all_pairs_ping(rel, nodes)


# -- a dead node ------------------------------------------------------------------------


def test_a_dead_nodes_lease_expires_and_every_peer_removes_its_route(rel: Cluster) -> None:
    """A node whose agent runs with --lease-ttl 10 is SIGKILLed: within the TTL its
    lease expires, every agent drops the peer (status, TAP and kernel-mode routes,
    neighbours and FDB entries), and traffic to its pods is counted as no_route."""
    nodes = four(rel)
    dn = rel.add_weft_node("dn", extra_args=["--lease-ttl", str(DEAD_NODE_TTL_S)])
    try:
        wait_all_peers(rel)
        rel.refresh_kernel_nodes()
        n1 = rel.nodes["n1"]
        assert rel.lab.wait_ping(n1.pod, dn.pod.ip, timeout_s=5)
        dn_mac = rel.status(dn)["vtep_mac"]
        assert dn.subnet is not None
        t0 = time.monotonic()
        rel.kill_agent(dn, signal.SIGKILL)
        removed: dict[str, float] = {}
        while len(removed) < len(nodes) and time.monotonic() - t0 < DEAD_NODE_TTL_S + 10:
            for cn in nodes:
                if cn.name not in removed and str(dn.subnet) not in peers_of(rel, cn):
                    removed[cn.name] = round(time.monotonic() - t0, 1)
            time.sleep(0.2)
        report(f"dead node, --lease-ttl {DEAD_NODE_TTL_S}", removed_after_kill_s=removed)
        assert len(removed) == len(nodes), f"peers that kept the dead node: {removed}"
        assert max(removed.values()) <= DEAD_NODE_TTL_S + 2, removed
        assert dn.subnet not in rel.leases()
        for cn in nodes:
            assert not kernel_routes_to(rel, cn, str(dn.subnet)), cn.name
            neigh = rel.lab.ip(cn.node, "neigh", "show")
            fdb = rel.lab.bridge(cn.node, "fdb", "show")
            assert dn_mac not in neigh and dn_mac not in fdb, cn.name
        no_route = drops(rel.status(n1)).get("no_route", 0)
        out = rel.lab.ping_output(n1.pod, dn.pod.ip, count=2, timeout_s=2)
        assert out.returncode != 0, out.stdout
        assert drops(rel.status(n1)).get("no_route", 0) >= no_route + 2
    finally:
        del rel.nodes["dn"]  # its namespace and pod stay until the cluster closes
    rel.refresh_kernel_nodes()
    all_pairs_ping(rel, nodes)


# -- soak -------------------------------------------------------------------------------


def member_in_use(cluster: Cluster, cn: ClusterNode) -> set[str]:
    """etcd endpoints the agent has an established TCP connection to (ss in its node)."""
    out = cluster.lab.run(cn.node, "ss", "-Htn", "state", "established").stdout
    # gRPC's sockets are dual-stack: [::ffff:192.168.77.10]:2379
    peers = {re.sub(r"^\[(?:::ffff:)?(.*)\]", r"\1", line.split()[-1])
             for line in out.splitlines() if line.strip()}  # fmt: skip
    return {m.endpoint for m in cluster.etcds if f"{m.host}:{m.client_port}" in peers}


class Churn:
    """Hand-written peer leases, one added and one removed every second (etcdctl put/del,
    as another tool would), bounded by ``max_s``; at most ``live`` at a time."""

    def __init__(self, cluster: Cluster, subnets: list[IPv4Network], max_s: float, live: int = 3):
        self.cluster, self.subnets, self.max_s, self.live = cluster, subnets, max_s, live
        self.puts = self.dels = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._live: list[IPv4Network] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for subnet in self._live:  # leave nothing behind
            with contextlib.suppress(Exception):
                self.cluster.etcdctl("del", lease_key(self.cluster.prefix, subnet))
                self.dels += 1
        self._live.clear()

    def _run(self) -> None:
        t0, i = time.monotonic(), 0
        while not self._stop.is_set() and time.monotonic() - t0 < self.max_s:
            subnet = self.subnets[i % len(self.subnets)]
            mac = f"02:00:00:00:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"
            ip = f"192.168.77.{150 + i % 50}"
            try:
                self.cluster.etcdctl("put", lease_key(self.cluster.prefix, subnet),
                                     flannel_lease_json(ip, "vxlan", 1, mac))  # fmt: skip
                self.puts += 1
                self._live.append(subnet)
                if len(self._live) > self.live:
                    old = self._live.pop(0)
                    self.cluster.etcdctl("del", lease_key(self.cluster.prefix, old))
                    self.dels += 1
            except Exception as exc:
                self.errors.append(str(exc))
            i += 1
            self._stop.wait(max(0.0, t0 + i - time.monotonic()))


def test_soak_iperf3_while_peers_come_and_go(rel: Cluster, tmp_path: Path) -> None:
    """iperf3 from n1's pod to n2's pod for WEFT_SOAK_SECONDS while a peer lease is
    added and another removed every second: no crash, RSS flat after warm-up, no
    leaked fd, every add and remove applied exactly once, and the packet counters
    of both ends agree."""
    nodes = four(rel)
    wait_all_peers(rel)
    n1, n2 = rel.nodes["n1"], rel.nodes["n2"]
    taken = set(rel.leases())
    free = [s for s in IPv4Network("10.244.0.0/16").subnets(new_prefix=24)
            if s not in taken and int(s.network_address.packed[2]) >= 100][:20]  # fmt: skip
    pids = {cn.name: agent_pid(cn) for cn in nodes}
    updates = {cn.name: rel.status(cn)["control"]["route_updates"] for cn in nodes}
    server = rel.lab.spawn(n2.pod, ["iperf3", "-s", "-1"], log=tmp_path / "iperf3-server.log")
    wait_for(lambda: ":5201" in rel.lab.run(n2.pod, "ss", "-Hltn").stdout, 10, "iperf3 -s")
    c1, c2 = rel.status(n1)["counters"], rel.status(n2)["counters"]
    snmp1, snmp2 = udp_snmp(rel.lab, n1.node), udp_snmp(rel.lab, n2.node)
    seconds = int(SOAK_S)
    client_log = tmp_path / "iperf3-client.json"
    t0 = time.monotonic()
    client = rel.lab.spawn(n1.pod, ["iperf3", "-c", str(n2.pod.ip), "-t", str(seconds), "-J"],
                           log=client_log)  # fmt: skip
    try:
        with Churn(rel, free, max_s=SOAK_S) as churn:
            time.sleep(SOAK_WARMUP_S)
            warm = {n: (rss_kb(pid), fd_count(pid)) for n, pid in pids.items()}
            client.wait(seconds + 30)
        wait_all_peers(rel)
        time.sleep(1.0)  # the last segments and acks, then nothing moves
        end = {n: (rss_kb(pid), fd_count(pid)) for n, pid in pids.items()}
    finally:
        rel.lab.stop(client)
        rel.lab.stop(server)
    elapsed = time.monotonic() - t0
    d1, d2 = rel.status(n1)["counters"], rel.status(n2)["counters"]
    dsnmp1, dsnmp2 = delta(udp_snmp(rel.lab, n1.node), snmp1), delta(udp_snmp(rel.lab, n2.node),
                                                                      snmp2)  # fmt: skip
    result = json.loads(client_log.read_text())
    summary = result.get("end", {}).get("sum_received", {})
    sent_end = result.get("end", {}).get("sum_sent", {})
    tx1, rx2 = d1["tx_packets"] - c1["tx_packets"], d2["rx_packets"] - c2["rx_packets"]
    tx2, rx1 = d2["tx_packets"] - c2["tx_packets"], d1["rx_packets"] - c1["rx_packets"]
    lost12 = sum(delta(drops({"counters": d2}), drops({"counters": c2})).values()) + dsnmp2.get(
        "RcvbufErrors", 0
    )
    lost21 = sum(delta(drops({"counters": d1}), drops({"counters": c1})).values()) + dsnmp1.get(
        "RcvbufErrors", 0
    )
    report(
        f"soak {seconds}s",
        elapsed_s=round(elapsed),
        iperf3_mbit_s=round(summary.get("bits_per_second", 0) / 1e6),
        retransmits=sent_end.get("retransmits"),
        churn_puts=churn.puts,
        churn_dels=churn.dels,
        rss_kb_warm_end={n: (warm[n][0], end[n][0]) for n in pids},
        fds_warm_end={n: (warm[n][1], end[n][1]) for n in pids},
        n1_tx=tx1, n2_rx=rx2, n2_drops_and_rcvbuf=lost12,
        n2_tx=tx2, n1_rx=rx1, n1_drops_and_rcvbuf=lost21,
    )  # fmt: skip
    assert not churn.errors, churn.errors[:3]
    assert churn.puts >= SOAK_S * 0.8 and churn.dels == churn.puts
    for cn in nodes:
        assert cn.proc is not None and cn.proc.poll() is None, f"{cn.name} died"
    assert_no_traceback(rel)
    assert summary.get("bytes", 0) > 0, result.get("error")
    for name in pids:
        grew = end[name][0] - warm[name][0]
        assert grew <= SOAK_RSS_SLACK_KB, f"{name}: RSS {warm[name][0]} → {end[name][0]} kB"
        assert end[name][1] == warm[name][1], f"{name}: fds {warm[name][1]} → {end[name][1]}"
        got = rel.status(rel.nodes[name])["control"]["route_updates"] - updates[name]
        assert got == churn.puts + churn.dels, (name, got, churn.puts, churn.dels)
    # every encapsulated packet one side sent was received or counted by the other
    assert tx1 == rx2 + lost12, (tx1, rx2, lost12)
    assert tx2 == rx1 + lost21, (tx2, rx1, lost21)
    all_pairs_ping(rel, nodes)


# -- a three-member etcd cluster ----------------------------------------------------------


def test_three_member_etcd_losing_the_member_in_use_and_leader(tmp_path: Path) -> None:
    """etcd members m1..m3 each in its own namespace; agents with all three endpoints
    and --lease-ttl 10 (renewing every 5 s). The member they use — made the leader
    first — is SIGKILLed: they move to another member, keep renewing (their leases
    outlive 1.2 TTLs after the kill), keep watching (a node that joins after the
    kill reaches them) and no ping between their pods is lost."""
    cluster = Cluster(tmp_path / "m3", etcd_members=3)
    try:
        cluster.set_config("10.244.0.0/16", "vxlan")
        ttl = ["--lease-ttl", str(MULTI_LEASE_TTL_S)]
        e1, e2 = (cluster.start_weft_node(n, extra_args=ttl) for n in ("e1", "e2"))
        for cn in (e1, e2):
            cluster.wait_ready(cn)
            cluster.wire_pods(cn)
        wait_all_peers(cluster)
        in_use = {cn.name: member_in_use(cluster, cn) for cn in (e1, e2)}
        victim = next(m for m in cluster.etcds if m.endpoint in in_use["e1"])
        assert all(victim.endpoint in used for used in in_use.values()), in_use
        status = json.loads(cluster.etcdctl("endpoint", "status", "-w", "json"))
        ids = {s["Endpoint"]: s["Status"]["header"]["member_id"] for s in status}
        leader_id = status[0]["Status"]["leader"]
        if ids[victim.endpoint] != leader_id:
            cluster.etcdctl("move-leader", format(ids[victim.endpoint], "x"))
        renewals = {cn.name: cluster.status(cn)["control"]["lease_renewals"] for cn in (e1, e2)}
        offsets = {cn.name: log_size(cn) for cn in (e1, e2)}
        hold = 1.2 * MULTI_LEASE_TTL_S
        pinger = Pinger(cluster.lab, e1.pod, e2.pod.ip, int((hold + 3) / 0.2), 0.2,
                        tmp_path / "ping.log").start()  # fmt: skip
        time.sleep(1.0)
        t0 = time.monotonic()
        victim.kill()
        e3 = cluster.add_weft_node("e3", extra_args=ttl)  # its first endpoint is dead
        t_join = time.monotonic()
        for cn in (e1, e2):
            cluster.wait_peers(cn, expected_peers(cluster, cn), timeout=15)
        seen = round(time.monotonic() - t_join, 1)
        time.sleep(max(0.0, t0 + hold - time.monotonic()))
        leases = cluster.leases()
        res = pinger.result()
        after = {cn.name: member_in_use(cluster, cn) for cn in (e1, e2, e3)}
        renewed = {cn.name: cluster.status(cn)["control"]["lease_renewals"] - renewals[cn.name]
                   for cn in (e1, e2)}  # fmt: skip
        report(
            "3-member etcd, member in use (and leader) SIGKILLed",
            renewals_in_1_2_ttl=renewed,
            new_node_seen_after_s=seen,
            members_in_use_after=after,
            pings_lost=f"{res.lost}/{res.sent}",
        )
        for cn in (e1, e2):
            text = log_since(cn, offsets[cn.name])
            assert "re-acquiring" not in text, text
            assert not re.search(r"peer \S+ \(\S+\) removed", text), text
            assert renewed[cn.name] >= 2, (cn.name, renewed, text)
            assert cn.subnet in leases, (cn.name, cn.subnet, list(leases))
            assert after[cn.name] and victim.endpoint not in after[cn.name], after
        assert res.lost == 0, res.text
        all_pairs_ping(cluster, [e1, e2, e3])
        assert_no_traceback(cluster)
    finally:
        cluster.close()
