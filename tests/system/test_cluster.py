"""Whole clusters in the lab: real etcd, real `weft agent` processes, kernel flannel nodes.

Each cluster lives in its own lab namespaces (underlay bridge, etcd node, nodes,
pods) and is always closed, also when a test fails. The 3-node vxlan cluster is
shared by the first tests of this module (setup once); each of them leaves it
as it found it (every node up, every pod pair pinging).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from weft_helpers import needs_paths, send_udp_datagrams, udp_datagram

from control.lab.cluster import (
    Cluster,
    ClusterError,
    ClusterNode,
    flannel_lease_json,
    lease_key,
    teardown_state,
)
from control.lab.netns import cleanup_stale, list_netns, pid_alive

WEFT = [sys.executable, "-m", "control.cli"]


def others(cluster: Cluster, cn: ClusterNode) -> list[IPv4Network]:
    return [o.subnet for o in cluster.nodes.values() if o is not cn and o.subnet is not None]


def wait_all_peers(cluster: Cluster, timeout: float = 15.0) -> None:
    for cn in cluster.nodes.values():
        if cn.kind == "weft":
            cluster.wait_peers(cn, others(cluster, cn), timeout=timeout)


def assert_all_ping(cluster: Cluster) -> None:
    results = cluster.ping_all()
    failed = sorted(f"{a}→{b}" for (a, b), ok in results.items() if not ok)
    assert not failed, f"pod pairs that did not ping: {failed}"


def log_since(cn: ClusterNode, offset: int) -> str:
    return cn.log_path.read_bytes()[offset:].decode(errors="replace")


def log_size(cn: ClusterNode) -> int:
    return cn.log_path.stat().st_size


def wait_for(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def new_cluster(tmp_path: Path) -> Iterator:
    """A factory of clusters that are all closed at the end of the test."""
    made: list[Cluster] = []

    def make(**kw: object) -> Cluster:
        cluster = Cluster(tmp_path / f"c{len(made)}", **kw)  # type: ignore[arg-type]
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


@pytest.fixture(scope="module")
def vx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three userspace weft agents (TUN, vxlan), one pod each; agents started together."""
    cluster = Cluster(tmp_path_factory.mktemp("vx"))
    try:
        cluster.set_config("10.244.0.0/16", "vxlan")
        nodes = [cluster.start_weft_node(name) for name in ("n1", "n2", "n3")]
        for cn in nodes:
            cluster.wait_ready(cn)
            cluster.wire_pods(cn)
        yield cluster
    finally:
        cluster.close()


# -- the shared 3-node vxlan cluster ---------------------------------------------------


def test_three_agents_discover_each_other_and_every_pod_pair_pings(vx: Cluster) -> None:
    nodes = [vx.nodes[n] for n in ("n1", "n2", "n3")]
    assert len({cn.subnet for cn in nodes}) == 3
    leases = vx.leases()
    for cn in nodes:
        assert cn.subnet in leases, (cn.name, cn.subnet, list(leases))
        assert cn.env["FLANNEL_NETWORK"] == "10.244.0.0/16"
        assert cn.env["FLANNEL_SUBNET"] == f"{cn.subnet.network_address + 1}/24"
        assert cn.env["FLANNEL_MTU"] == "1450"
    wait_all_peers(vx)
    for cn in nodes:
        st = vx.status(cn)
        assert st["ready"] and st["subnet"] == str(cn.subnet)
        assert st["public_ip"] == str(cn.underlay_ip)
        for peer in st["peers"]:
            owner = next(o for o in nodes if str(o.subnet) == peer["subnet"])
            assert peer["public_ip"] == str(owner.underlay_ip)
            assert peer["vtep_mac"] == vx.status(owner)["vtep_mac"]
    assert_all_ping(vx)


def test_a_hand_made_kernel_vxlan_node_joins_and_our_leases_are_flannel_json(
    vx: Cluster,
) -> None:
    k1 = vx.nodes.get("k1") or vx.add_kernel_node("k1")
    weft_nodes = [cn for cn in vx.nodes.values() if cn.kind == "weft"]
    # the hand-written lease is picked up by every agent, with its VtepMAC and public IP
    for cn in weft_nodes:
        st = vx.wait_peers(cn, others(vx, cn))
        row = next(p for p in st["peers"] if p["subnet"] == str(k1.subnet))
        assert row == {
            "subnet": str(k1.subnet),
            "public_ip": str(k1.underlay_ip),
            "vtep_mac": k1.vtep_mac,
        }
    # the kernel node has flanneld's three entries for every agent
    vx.refresh_kernel_node(k1)
    assert set(k1.kernel_peers) == {cn.subnet for cn in weft_nodes}
    routes = {r["dst"] for r in vx.lab.ip_json(k1.node, "route", "show", "dev", "flannel.1")}
    assert routes == {str(cn.subnet) for cn in weft_nodes}
    # traffic flows both ways between the kernel node's pod and every weft pod
    results = vx.ping_all()
    for cn in weft_nodes:
        assert results[("k1", cn.name)], f"k1 → {cn.name}"
        assert results[(cn.name, "k1")], f"{cn.name} → k1"
    assert all(results.values()), results
    # our leases, as etcdctl prints them, are flannel's JSON byte for byte
    out = vx.etcdctl("get", "--prefix", f"{vx.prefix}/subnets/")
    lines = out.splitlines()
    printed = dict(zip(lines[0::2], lines[1::2], strict=True))
    for cn in weft_nodes:
        value = printed[lease_key(vx.prefix, cn.subnet)]
        doc = json.loads(value)
        assert list(doc) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData"]
        assert doc["PublicIPv6"] is None and doc["BackendType"] == "vxlan"
        assert list(doc["BackendData"]) == ["VNI", "VtepMAC"]
        mac = vx.status(cn)["vtep_mac"]
        assert doc["BackendData"] == {"VNI": 1, "VtepMAC": mac}
        assert value == flannel_lease_json(cn.underlay_ip, "vxlan", 1, mac)


def test_sigkilled_agent_comes_back_with_the_same_subnet_and_vtep_mac(vx: Cluster) -> None:
    n2 = vx.nodes["n2"]
    watchers = [cn for cn in vx.nodes.values() if cn.kind == "weft" and cn is not n2]
    wait_all_peers(vx)
    before = vx.status(n2)
    views = {cn.name: vx.status(cn)["peers"] for cn in watchers}
    offsets = {cn.name: log_size(cn) for cn in watchers}
    assert vx.kill_agent(n2, signal.SIGKILL) == -signal.SIGKILL
    # the TUN device goes with the process; the lease stays in etcd
    assert n2.subnet in vx.leases()
    vx.restart_agent(n2)
    after = vx.wait_peers(n2, others(vx, n2))
    assert after["subnet"] == before["subnet"] == str(n2.subnet)
    assert after["vtep_mac"] == before["vtep_mac"]
    assert "lease" in n2.log_tail(200)
    for cn in watchers:
        assert vx.status(cn)["peers"] == views[cn.name], f"{cn.name}'s view changed"
        assert f"peer {n2.subnet} (" not in log_since(cn, offsets[cn.name]), (
            f"{cn.name} removed {n2.name} while it restarted"
        )
    links = [link["ifname"] for link in vx.lab.ip_json(n2.node, "link", "show")]
    # One device, plus at most the send fast path's companion TAP (weft.1-gso).
    ours = [name for name in links if name.startswith(("weft", "flannel"))]
    assert ours.count("weft.1") == 1 and set(ours) <= {"weft.1", "weft.1-gso"}, ours
    routes = vx.lab.ip_json(n2.node, "route", "show", "10.244.0.0/16")
    assert len(routes) == 1 and routes[0]["dev"] == "weft.1", routes
    assert_all_ping(vx)


def test_a_deleted_lease_is_removed_everywhere_then_reacquired(vx: Cluster) -> None:
    n1, n2, n3 = (vx.nodes[n] for n in ("n1", "n2", "n3"))
    wait_all_peers(vx)
    subnet = n3.subnet
    env_before = n3.subnet_file.read_text()
    offset1, offset3 = log_size(n1), log_size(n3)
    no_route_before = vx.status(n1)["counters"]["drops"].get("no_route", 0)
    # n3's agent re-acquires its lease as soon as it sees the delete; hold it still
    # (SIGSTOP) so that the others' reaction can be observed before it does.
    assert n3.proc is not None
    os.kill(n3.proc.pid, signal.SIGSTOP)
    try:
        assert vx.etcdctl("del", lease_key(vx.prefix, subnet)).strip() == "1"
        for cn in (n1, n2):
            vx.wait_peers(cn, [s for s in others(vx, cn) if s != subnet])
        assert re.search(rf"peer {re.escape(str(subnet))} \(\S+\) removed", log_since(n1, offset1))
        assert not vx.lab.ping(n1.pod, n3.pod.ip, count=2, timeout_s=2)
        drops = vx.status(n1)["counters"]["drops"]
        assert drops.get("no_route", 0) > no_route_before, drops
    finally:
        os.kill(n3.proc.pid, signal.SIGCONT)
    wait_for(lambda: subnet in vx.leases(), 15, f"{n3.name} to re-acquire {subnet}")
    assert "re-acquiring" in log_since(n3, offset3)
    assert vx.status(n3)["subnet"] == str(subnet)
    assert n3.subnet_file.read_text() == env_before
    assert n3.proc.poll() is None, "the agent re-acquires instead of exiting"
    wait_all_peers(vx)
    vx.refresh_kernel_nodes()
    assert_all_ping(vx)


def test_agents_ride_out_an_etcd_restart_and_see_a_node_that_joins_after(vx: Cluster) -> None:
    assert vx.etcd is not None
    wait_all_peers(vx)
    vx.etcd.stop()
    try:
        time.sleep(1.5)
        # the routes stay while etcd is away
        assert_all_ping(vx)
    finally:
        vx.etcd.restart()
    late = vx.add_weft_node("n4")
    wait_all_peers(vx, timeout=30)
    vx.refresh_kernel_nodes()
    results = vx.ping_all()
    assert all(results.values()), sorted(k for k, ok in results.items() if not ok)
    assert vx.status(vx.nodes["n1"])["control"]["watch_resyncs"] >= 1
    assert late.subnet not in {cn.subnet for cn in vx.nodes.values() if cn is not late}


# -- other shapes of cluster -------------------------------------------------------------


def test_mixed_cluster_tun_tap_kernel_mode_and_hand_made_kernel_node(new_cluster) -> None:
    cluster: Cluster = new_cluster()
    cluster.set_config("10.244.0.0/16", "vxlan")
    kinds = {"tun": ("userspace", "tun"), "tap": ("userspace", "tap"), "kmode": ("kernel", "tun")}
    started = [
        cluster.start_weft_node(name, dataplane=dp, device=dev) for name, (dp, dev) in kinds.items()
    ]
    for cn in started:
        cluster.wait_ready(cn)
        cluster.wire_pods(cn)
    cluster.add_kernel_node("hand")
    wait_all_peers(cluster)
    assert cluster.status(cluster.nodes["tap"])["device_kind"] == "tap"
    assert cluster.status(cluster.nodes["kmode"])["device"] == "flannel.1"
    vx_link = cluster.lab.ip_json(cluster.nodes["kmode"].node, "-d", "link", "show", "flannel.1")
    info = vx_link[0]["linkinfo"]["info_data"]
    assert info["id"] == 1 and info["port"] == 8472 and info["learning"] is False
    assert_all_ping(cluster)
    # kernel mode: the kernel carries the traffic while the agent is dead (as flanneld),
    # and the restarted agent reuses flannel.1 (one device, same VtepMAC)
    kmode, tun = cluster.nodes["kmode"], cluster.nodes["tun"]
    mac = cluster.status(kmode)["vtep_mac"]
    cluster.kill_agent(kmode, signal.SIGKILL)
    assert cluster.lab.ping(kmode.pod, tun.pod.ip, count=2, timeout_s=3)
    assert cluster.lab.ping(tun.pod, kmode.pod.ip, count=2, timeout_s=3)
    cluster.restart_agent(kmode)
    st = cluster.wait_peers(kmode, others(cluster, kmode))
    assert st["vtep_mac"] == mac and st["subnet"] == str(kmode.subnet)
    links = [link["ifname"] for link in cluster.lab.ip_json(kmode.node, "link", "show")]
    assert [n for n in links if n.startswith(("weft", "flannel"))] == ["flannel.1"]
    assert cluster.lab.ip_json(kmode.node, "link", "show", "flannel.1")[0]["address"] == mac
    assert_all_ping(cluster)


@pytest.mark.parametrize("backend", ["udp", "host-gw"])
def test_udp_and_host_gw_clusters(new_cluster, backend: str) -> None:
    cluster: Cluster = new_cluster()
    cluster.set_config("10.244.0.0/16", backend)
    started = [cluster.start_weft_node(name) for name in ("n1", "n2")]
    for cn in started:
        cluster.wait_ready(cn)
        cluster.wire_pods(cn)
    assert {cn.env["FLANNEL_MTU"] for cn in started} == {"1472" if backend == "udp" else "1500"}
    if backend == "host-gw":
        cluster.add_kernel_node("k1")  # flanneld's host-gw: one route per peer, by hand
    wait_all_peers(cluster)
    leases = cluster.leases()
    for cn in started:
        value = leases[cn.subnet][1]
        assert value == flannel_lease_json(cn.underlay_ip, backend, 1, None), value
    assert_all_ping(cluster)


@needs_paths("uso_read")  # its subject: the merged burst read whole
def test_pod_udp_gro_tunes_the_pods_veths_and_small_udp_leaves_merged(new_cluster) -> None:
    """`weft agent --pod-udp-gro`: the veths the CNI plugs into cni0 get GRO, UDP GRO
    forwarding and the flush timeout asked for (pods made after the agent started,
    within a scan or two), so a pod's UDP burst reaches weft merged (uso_read); an
    agent without the flag leaves its pods' veths as they are. (The default timeout
    is checked in test_weft_lab_up_exec_status_down.)"""
    cluster: Cluster = new_cluster()
    cluster.set_config("10.244.0.0/16", "vxlan")
    on = cluster.start_weft_node("n1", extra_args=["--pod-udp-gro", "--pod-udp-gro-flush-us", "50"])
    off = cluster.start_weft_node("n2")
    for cn in (on, off):
        cluster.wait_ready(cn)
        cluster.wire_pods(cn)
    wait_all_peers(cluster)

    def knob(cn: ClusterNode) -> tuple[str, str]:
        pod = cn.pods[0]
        features = cluster.lab.run(cn.node, "ethtool", "-k", pod.node_end).stdout
        fwd = next(ln for ln in features.splitlines() if "rx-udp-gro-forwarding" in ln)
        timeout = cluster.lab.run(
            cn.node, "cat", f"/sys/class/net/{pod.node_end}/gro_flush_timeout"
        ).stdout.strip()
        return fwd.split(":")[1].strip(), timeout

    wait_for(lambda: knob(on) == ("on", "50000"), 10, "n1's pod veth tuned")
    assert knob(off) == ("off", "0")
    assert f"pod veth {on.pods[0].node_end}: UDP GRO forwarding on" in on.log_path.read_text()
    count = 2000
    got = send_udp_datagrams(on.pods[0], off.pods[0], count, 64)
    assert got == [udp_datagram(i, 64) for i in range(count)]
    offload = cluster.status(on)["offload"]
    assert "uso_read" in offload["on"] and offload["counters"]["uso_sends"] > 0


def test_twenty_agents_started_at_once_get_twenty_distinct_subnets(new_cluster) -> None:
    cluster: Cluster = new_cluster()
    cluster.set_config("10.244.0.0/16", "vxlan")
    names = [f"m{i}" for i in range(1, 21)]
    bare = [cluster.add_node(name) for name in names]
    t0 = time.monotonic()
    started = [
        cluster.start_weft_node(name, node=node) for name, node in zip(names, bare, strict=True)
    ]
    for cn in started:
        cluster.wait_ready(cn, timeout=60)
    elapsed = time.monotonic() - t0
    subnets = [cn.subnet for cn in started]
    assert len(set(subnets)) == 20, sorted(map(str, subnets))
    leases = cluster.leases()
    assert set(leases) == set(subnets)
    public_ips = {json.loads(value)["PublicIP"] for _, value in leases.values()}
    assert public_ips == {str(cn.underlay_ip) for cn in started}
    for cn in started:
        cluster.wait_peers(cn, others(cluster, cn), timeout=30)
    assert elapsed < 60, f"20 agents took {elapsed:.1f}s to write subnet.env"


# -- a subnet taken while its agent was away ---------------------------------------------

STRANGER_IP = "192.168.77.99"  # on the underlay's range, but no node has it
STRANGER_MAC = "02:00:00:00:00:99"


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A kernel-mode and a userspace agent whose leases are deleted while they are
    stopped (SIGSTOP) and taken by a stranger's hand-written lease: on SIGCONT each
    one must move to a new subnet. Observed once, examined by the tests below."""
    cluster = Cluster(tmp_path_factory.mktemp("moved"))
    try:
        cluster.set_config("10.244.0.0/16", "vxlan")
        nodes = [
            cluster.start_weft_node("obs"),
            cluster.start_weft_node("kmode", dataplane="kernel"),
            cluster.start_weft_node("user"),
        ]
        for cn in nodes:
            cluster.wait_ready(cn)
        wait_all_peers(cluster)
        out: dict = {"cluster": cluster}
        for cn in nodes[1:]:
            old = cn.subnet
            offset = log_size(cn)
            assert cn.proc is not None
            os.kill(cn.proc.pid, signal.SIGSTOP)
            try:
                cluster.etcdctl("del", lease_key(cluster.prefix, old))
                value = flannel_lease_json(STRANGER_IP, "vxlan", 1, STRANGER_MAC)
                cluster.etcdctl("put", lease_key(cluster.prefix, old), value)
            finally:
                os.kill(cn.proc.pid, signal.SIGCONT)
            new = wait_for(
                lambda cn=cn, old=old: (s := cluster.status(cn)["subnet"]) != str(old) and s,
                15,
                f"{cn.name} to move off {old}",
            )
            time.sleep(0.5)  # let the dataplane restart settle
            out[cn.name] = {"old": old, "new": IPv4Network(new), "log": log_since(cn, offset)}
        yield out
    finally:
        cluster.close()


def test_an_agent_whose_subnet_was_taken_moves_and_its_peers_follow(moved: dict) -> None:
    cluster: Cluster = moved["cluster"]
    obs = cluster.nodes["obs"]
    for name in ("kmode", "user"):
        cn, seen = cluster.nodes[name], moved[name]
        assert seen["new"] != seen["old"]
        assert "our subnet changed" in seen["log"]
        env = cn.subnet_file.read_text()
        assert f"FLANNEL_SUBNET={seen['new'].network_address + 1}/24" in env, env
        assert cluster.leases()[seen["new"]][1].startswith(f'{{"PublicIP":"{cn.underlay_ip}"')
    st = cluster.wait_peers(
        obs, [moved["kmode"]["new"], moved["user"]["new"], moved["user"]["old"],
              moved["kmode"]["old"]],
    )  # fmt: skip
    by_subnet = {p["subnet"]: p["public_ip"] for p in st["peers"]}
    assert by_subnet[str(moved["kmode"]["old"])] == STRANGER_IP
    assert by_subnet[str(moved["kmode"]["new"])] == str(cluster.nodes["kmode"].underlay_ip)


def test_kernel_mode_subnet_change_leaves_only_the_new_address_on_flannel_1(
    moved: dict,
) -> None:
    cluster: Cluster = moved["cluster"]
    addrs = [
        f"{a['local']}/{a['prefixlen']}"
        for link in cluster.lab.ip_json(cluster.nodes["kmode"].node, "-4", "addr", "show",
                                        "dev", "flannel.1")
        for a in link.get("addr_info", [])
    ]  # fmt: skip
    assert addrs == [f"{moved['kmode']['new'].network_address}/32"], addrs


def test_a_subnet_change_logs_no_error_about_our_own_new_lease(moved: dict) -> None:
    for name in ("kmode", "user"):
        seen = moved[name]
        assert f"ignoring lease {seen['new']}" not in seen["log"], seen["log"]


# -- configuration errors and an unreachable etcd -----------------------------------------


@pytest.fixture(scope="module")
def errors_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("errors"))
    try:
        yield cluster
    finally:
        cluster.close()


def assert_one_line_exit(cn: ClusterNode, *needles: str) -> str:
    assert cn.proc is not None
    rc = cn.proc.wait(30)
    log = cn.log_path.read_text()
    assert rc == 1, log
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("weft: ")]
    assert len(errors) == 1 and errors[0].startswith("weft: error: "), log
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


BAD_CONFIGS = {
    "cidr33": ('{"Network":"10.244.0.0/33"}', ["Network"]),
    "vni": ('{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":"x"}}', ["VNI"]),
    "subnetlen": ('{"Network":"10.244.0.0/16","SubnetLen":40}', ["SubnetLen"]),
    "notjson": ("Network: 10.244.0.0/16", ["JSON"]),
    "backend": ('{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan2"}}', ["Backend.Type"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_1_with_one_line_naming_the_field(
    errors_cluster: Cluster, case: str
) -> None:
    text, needles = BAD_CONFIGS[case]
    prefix = f"/bad-{case}/network"
    errors_cluster.put_config_raw(text, prefix=prefix)
    cn = errors_cluster.start_weft_node(f"bad{len(errors_cluster.nodes)}", prefix=prefix)
    assert_one_line_exit(cn, *needles)
    assert not cn.subnet_file.exists()


def test_unreachable_etcd_is_a_clear_waiting_log_not_a_traceback(errors_cluster: Cluster) -> None:
    # an endpoint on the node's own loopback, where nothing listens: refused at once
    cn = errors_cluster.start_weft_node("noetcd", endpoints="http://127.0.0.1:9")
    time.sleep(4)
    log = cn.log_path.read_text()
    assert "Traceback" not in log, log
    if cn.proc is not None and cn.proc.poll() is not None:
        assert_one_line_exit(cn, "etcd")
    else:
        assert re.search(r"WARNING .*etcd.*127\.0\.0\.1:9.*retrying", log), log
        assert not cn.subnet_file.exists()
        errors_cluster.kill_agent(cn, signal.SIGTERM)


def test_exhausted_network_second_agent_exits_with_no_free_subnet(
    errors_cluster: Cluster,
) -> None:
    # flannel requires SubnetLen ≥ Network prefix + 2, so one free subnet is made with
    # SubnetMin = SubnetMax rather than with Network /23 and SubnetLen 24 (invalid).
    prefix = "/exhausted/network"
    errors_cluster.set_config(
        "10.244.0.0/16", "vxlan", prefix=prefix,
        SubnetLen=24, SubnetMin="10.244.5.0", SubnetMax="10.244.5.0",
    )  # fmt: skip
    first = errors_cluster.start_weft_node("full1", prefix=prefix)
    errors_cluster.wait_ready(first)
    assert first.subnet == IPv4Network("10.244.5.0/24")
    second = errors_cluster.start_weft_node("full2", prefix=prefix)
    assert_one_line_exit(second, "no free subnet")
    assert first.proc is not None and first.proc.poll() is None


def test_a_short_lease_ttl_does_not_renew_in_a_hot_loop(errors_cluster: Cluster) -> None:
    prefix = "/short-ttl/network"
    errors_cluster.set_config("10.244.0.0/16", "vxlan", prefix=prefix)
    cn = errors_cluster.start_weft_node("ttl", prefix=prefix, extra_args=["--lease-ttl", "30"])
    try:
        errors_cluster.wait_ready(cn)
    except ClusterError:
        # refusing the combination with one clear line is a fine answer too
        assert_one_line_exit(cn, "lease-ttl")
        return
    try:
        time.sleep(3)
        renewals = errors_cluster.status(cn)["control"]["lease_renewals"]
    finally:
        errors_cluster.kill_agent(cn, signal.SIGTERM)
    assert renewals <= 2, f"{renewals} renewals in 3 s with --lease-ttl 30"


# -- weft lab ---------------------------------------------------------------------------


def weft(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*WEFT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_weft_lab_up_exec_status_down(tmp_path: Path) -> None:
    env = {**os.environ, "WEFT_LAB_DIR": str(tmp_path / "labs")}
    name = f"t{os.getpid()}"
    state_file = tmp_path / "labs" / f"{name}.json"
    try:
        up = weft("lab", "up", "--nodes", "2", "--dataplane", "userspace,kernel", "--name", name,
                  "--pod-udp-gro", "--queues", "2", "--egress-thread", "--keep-warm", "3000",
                  env=env)  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads(state_file.read_text())
        tag, nodes = state["tag"], state["nodes"]
        assert set(nodes) == {"n1", "n2"}
        assert [n["dataplane"] for n in nodes.values()] == ["userspace", "kernel"]
        # the lab outlives `weft lab up`, and other runs' stale-lab cleanup leaves it alone
        cleanup_stale()
        assert {n for n in list_netns() if n.startswith(tag + "-")} == set(state["namespaces"])
        assert all(pid_alive(p) for p in state["pids"])
        # up again with the same name: one line, exit 1, nothing changed
        again = weft("lab", "up", "--nodes", "2", "--name", name, env=env)
        assert again.returncode == 1
        assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
        # exec: in a pod, in a node, in etcd's namespace; exit codes pass through
        pod2_ip = nodes["n2"]["pods"]["n2-p0"]["ip"]
        ping = weft("lab", "exec", "--name", name, "n1-p0", "--", "ping", "-c", "2", "-w", "5",
                    pod2_ip, env=env)  # fmt: skip
        assert ping.returncode == 0, ping.stdout + ping.stderr
        rc = weft("lab", "exec", "--name", name, "n1", "--", "sh", "-c", "exit 7", env=env)
        assert rc.returncode == 7
        # --pod-udp-gro reached the userspace agent (n1) only: its pod's veth merges UDP
        flush = "cat /sys/class/net/vp0/gro_flush_timeout"
        for node, want in (("n1", "20000"), ("n2", "0")):
            deadline = time.monotonic() + 10
            while True:
                got = weft("lab", "exec", "--name", name, node, "--", "sh", "-c", flush, env=env)
                if got.stdout.strip() == want or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert got.stdout.strip() == want, (node, got.stdout, got.stderr)
        keys = weft("lab", "exec", "--name", name, "etcd", "--", "etcdctl", "get", "--prefix",
                    "--keys-only", "/coreos.com/network/subnets/", env=env)  # fmt: skip
        assert keys.returncode == 0, keys.stderr
        for n in nodes.values():
            assert lease_key("/coreos.com/network", IPv4Network(n["subnet"])) in keys.stdout
        missing = weft("lab", "exec", "--name", name, "n9", "--", "true", env=env)
        assert missing.returncode == 1 and "no node or pod 'n9'" in missing.stderr
        status = weft("lab", "status", "--name", name, env=env)
        assert status.returncode == 0, status.stderr
        for n in nodes.values():
            assert n["subnet"] in status.stdout
        assert "NOT RUNNING" not in status.stdout
        st_json = json.loads(weft("lab", "status", "--name", name, "--json", env=env).stdout)
        assert all(len(st["peers"]) == 1 for st in st_json["nodes"].values())
        # --queues 2 reached the userspace agent only
        assert st_json["nodes"]["n1"]["queues"]["count"] == 2
        assert st_json["nodes"]["n1"]["queues"]["workers"][0]["running"]
        assert "queues" not in st_json["nodes"]["n2"]
        # and --egress-thread too (where weft has an egress TAP: Linux 6.17+)
        offload = st_json["nodes"]["n1"]["offload"]
        assert offload["egress_thread"] is ("tunnel_gso" in offload["on"])
        assert "offload" not in st_json["nodes"]["n2"]
        # and --keep-warm
        assert st_json["nodes"]["n1"]["keep_warm_us"] == 3000
        assert "keep_warm_us" not in st_json["nodes"]["n2"]
        # down: every recorded process and namespace gone; a second down is a no-op
        down = weft("lab", "down", "--name", name, env=env)
        assert down.returncode == 0, down.stderr
        assert not state_file.exists()
        assert not [n for n in list_netns() if n.startswith(tag + "-")]
        time.sleep(0.2)
        assert not [p for p in state["pids"] if pid_alive(p)]
        down2 = weft("lab", "down", "--name", name, env=env)
        assert down2.returncode == 0 and "nothing to do" in down2.stdout
    finally:
        if state_file.exists():
            teardown_state(json.loads(state_file.read_text()))


def test_weft_lab_demo_exits_0_and_leaves_nothing_behind(tmp_path: Path) -> None:
    env = {**os.environ, "WEFT_LAB_DIR": str(tmp_path / "labs")}
    before = set(list_netns())
    demo = weft("lab", "demo", env=env, timeout=180)
    out = demo.stdout
    assert demo.returncode == 0, out + demo.stderr
    for text in (
        "etcdctl get --prefix /coreos.com/network",
        '"BackendData":{"VNI":1,"VtepMAC":',
        "FLANNEL_SUBNET=",
        "weft status --api-socket",
        "VtepMAC",
        "all 6 pod pairs pinged",
        "Mbit/s",
    ):
        assert text in out, (text, out)
    tag = re.search(r"namespace (wl[0-9a-f]{4})-hub", out)
    assert tag, out
    assert not [n for n in set(list_netns()) - before if n.startswith(tag.group(1))]


def test_weft_lab_refuses_clearly_without_root_or_etcd(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from control import cli
    from control.lab import etcd

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["lab", "up"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs root" in err
    monkeypatch.undo()
    monkeypatch.setattr(etcd, "ETCD_BIN", "/nonexistent/etcd")
    assert cli.main(["lab", "demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install etcd-server" in err
    assert "scripts/setup" in err


def test_cluster_errors_carry_the_agent_log(new_cluster) -> None:
    cluster: Cluster = new_cluster()
    cluster.put_config_raw('{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec"}}')
    cn = cluster.start_weft_node("n1")
    with pytest.raises(ClusterError, match=r"exited with status 1 .*\n.*weft: error: "):
        cluster.wait_ready(cn)
