"""The benchmark's lab environments: one two-node lab (a pod on each node) per mode.

Every mode gets its own ``Lab`` (its own namespaces), built with the lab's
``ip``/``bridge`` helpers; traffic runs pod1 (on n1) → pod2 (on n2), so n1's
``eth0`` transmit counters see the data direction on the underlay.

Underlay settings (the ethtool knobs on the nodes' underlay veth ``eth0``; the
hub bridge's veth ends keep GRO off, so the hub forwards frames as they come):

* ``wire`` — ``ethtool -K eth0 tx off tso off gso off gro on`` on both nodes, in
  every mode: the sender's stack segments and checksums every frame (MTU-sized
  frames with real checksums, as a NIC puts on a wire) and the receiving node
  coalesces with GRO, as it would behind a NIC. The hub's veth ends get ``tso
  off`` (a switch port does not do TSO): a veth runs its peer's GRO only for
  frames from a sender without TSO (veth_skb_is_eligible_for_gro), so with the
  default the receiving node's GRO never ran, for UDP GRO and the kernel's
  VXLAN GRO alike.
* ``offload`` — veth defaults (TSO/GSO on: 64 KB super-packets cross the
  underlay unsegmented, checksums left partial), except that modes with a weft
  node that decapsulates in userspace get ``ethtool -K eth0 tx off`` on both
  nodes: a userspace receiver reads inner packets whose checksums a veth never
  filled in. ``tx off`` also drops TSO (it depends on checksum offload); GSO
  stays on and GRO stays off. (weft-kernel gets ``tx on tso on``: the lab
  Cluster it runs in turns tx off on every node, and the kernel receiver does
  not need it.)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.parse import proc_net_snmp
from control.lab.topology import (
    Lab,
    Node,
    Pod,
    add_kernel_hostgw_route,
    add_kernel_vxlan_peer,
    make_kernel_vxlan,
)
from control.podgro import FLUSH_TIMEOUT_NS

NETWORK = "10.244.0.0/16"
SUBNET1 = "10.244.1.0/24"
SUBNET2 = "10.244.2.0/24"
WEFT_MAC1 = "02:77:00:00:00:01"
WEFT_MAC2 = "02:77:00:00:00:02"
WEFT_START_TIMEOUT_S = 20.0
PING_READY_TIMEOUT_S = 15.0
IPERF_READY_TIMEOUT_S = 5.0

SETTINGS = ("wire", "offload")
WIRE_KNOBS = ("tx", "off", "tso", "off", "gso", "off", "gro", "on")
#: The hub's veth ends in the wire setting: see the module docstring.
WIRE_HUB_KNOBS = ("tso", "off")
WEFT_OFFLOAD_KNOBS = ("tx", "off")
KERNEL_AGENT_OFFLOAD_KNOBS = ("tx", "on", "tso", "on")


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    encap: str  # key into bench.overhead.OVERHEAD
    n1: str  # what n1 runs: "kernel" (routes or flannel.1) or a weft backend
    n2: str
    note: str = ""

    @property
    def weft_nodes(self) -> tuple[str, ...]:
        return tuple(n for n, what in (("n1", self.n1), ("n2", self.n2)) if what != "kernel")

    @property
    def has_weft(self) -> bool:
        return bool(self.weft_nodes)

    @property
    def userspace_receiver(self) -> bool:
        """A node decapsulates in userspace (so senders must fill checksums)."""
        return any(what in ("vxlan", "udp", "host-gw", "naive") for what in (self.n1, self.n2))


MODES: dict[str, Mode] = {
    m.key: m
    for m in (
        Mode(
            "plain",
            "plain routing",
            "none",
            "kernel",
            "kernel",
            "kernel routes <peer subnet> via <peer node ip> (flannel host-gw's dataplane)",
        ),
        Mode(
            "kernel-vxlan",
            "kernel VXLAN",
            "vxlan",
            "kernel",
            "kernel",
            "flannel.1 on both nodes as flanneld makes it (also weft --dataplane kernel)",
        ),
        Mode(
            "weft-vxlan",
            "weft vxlan",
            "vxlan",
            "vxlan",
            "vxlan",
            "weft dataplane run --backend vxlan (TUN) on both nodes",
        ),
        Mode(
            "weft-udp",
            "weft udp",
            "udp",
            "udp",
            "udp",
            "weft dataplane run --backend udp on both nodes",
        ),
        Mode(
            "weft-hostgw",
            "weft host-gw",
            "host-gw",
            "host-gw",
            "host-gw",
            "weft dataplane run --backend host-gw on both nodes",
        ),
        Mode(
            "naive-udp",
            "naive Python udp (reference)",
            "udp",
            "naive",
            "naive",
            "bench/naive.py on both nodes: the simplest Python TUN↔UDP loop, no lookup or "
            "checks (opt-in reference)",
        ),
        Mode(
            "weft-kernel",
            "weft kernel mode",
            "vxlan",
            "agent-kernel",
            "agent-kernel",
            "weft agent --dataplane kernel on both nodes, leases in a real etcd in the lab "
            "(weft programs flannel.1, the kernel carries the packets)",
        ),
        Mode(
            "weft-vxlan-kernel",
            "weft vxlan → kernel",
            "vxlan",
            "vxlan",
            "kernel",
            "weft vxlan on the sending node, kernel flannel.1 on the receiver",
        ),
        Mode(
            "kernel-weft-vxlan",
            "kernel VXLAN → weft vxlan",
            "vxlan",
            "kernel",
            "vxlan",
            "kernel flannel.1 on the sending node, weft vxlan on the receiver (weft's receive "
            "path alone)",
        ),
    )
}
#: Opt-in: naive-udp is a reference point (the simplest Python forwarder), not weft.
OPT_IN_MODES = ("naive-udp",)
DEFAULT_MODES = tuple(m for m in MODES if m not in OPT_IN_MODES)
QUICK_MODES = ("plain", "kernel-vxlan", "weft-vxlan")


def node_knobs(setting: str, mode: Mode) -> tuple[str, ...]:
    """The ``ethtool -K eth0`` arguments each node gets (empty: veth defaults)."""
    if setting == "wire":
        return WIRE_KNOBS
    if setting == "offload":
        if mode.userspace_receiver:
            return WEFT_OFFLOAD_KNOBS
        # weft-kernel: the lab Cluster turns tx off on every node; undo it (veth defaults).
        return KERNEL_AGENT_OFFLOAD_KNOBS if mode.has_weft else ()
    raise ValueError(f"unknown underlay setting {setting!r} (have: {', '.join(SETTINGS)})")


def _set_knobs(lab: Lab, node: Node, setting: str, knobs: tuple[str, ...]) -> None:
    if knobs:
        lab.run(node, "ethtool", "-K", "eth0", *knobs)
    if setting == "wire" and lab.hub is not None:
        lab.run(lab.hub, "ethtool", "-K", f"vn{node.index}", *WIRE_HUB_KNOBS)


def pod_mtu(underlay_mtu: int, mode: Mode) -> int:
    from bench.overhead import OVERHEAD

    return underlay_mtu - OVERHEAD[mode.encap]


@dataclass
class Env:
    """One built lab for (setting, MTU, mode), with what we started in it."""

    mode: Mode
    setting: str
    underlay_mtu: int
    lab: Lab
    n1: Node
    n2: Node
    pod1: Pod
    pod2: Pod
    knobs: tuple[str, ...]
    pod_mtu: int
    weft: dict[str, subprocess.Popen] = field(default_factory=dict)  # node name → process
    weft_sockets: dict[str, Path] = field(default_factory=dict)
    iperf_server: subprocess.Popen | None = None
    cluster: Any = None  # weft-kernel: the control.lab.cluster.Cluster that owns ``lab``

    @property
    def weft_pids(self) -> list[int]:
        return [p.pid for p in self.weft.values()]

    def wire_counters(self) -> tuple[int, int]:
        """n1's eth0 transmit (bytes, packets): the data direction on the underlay."""
        tx = self.lab.link_stats(self.n1, "eth0")["eth0"]["tx"]
        return int(tx["bytes"]), int(tx["packets"])

    def loss_counters(self) -> dict[str, int]:
        """Where datagrams can be lost on their way pod1 → pod2, as counters to take
        before and after a test: ``pod_socket``, the receiving pod's UDP receive
        buffer full (the application behind); ``node_socket``, the same on the
        receiving node (weft's socket there); ``devices``, packets the nodes' links
        dropped (a TUN's queue full: weft behind reading it); ``weft``, the weft
        processes' own counted drops."""
        udp = proc_net_snmp(self.lab.run(self.pod2, "cat", "/proc/net/snmp").stdout)
        node = proc_net_snmp(self.lab.run(self.n2, "cat", "/proc/net/snmp").stdout)
        devices = 0
        for where in (self.n1, self.n2):
            for stats in self.lab.link_stats(where).values():
                devices += sum(int((stats.get(d) or {}).get("dropped", 0)) for d in ("rx", "tx"))
        weft = 0
        for st in self.weft_status().values():
            drops = (st.get("counters") or {}).get("drops") or {}
            weft += sum(n for n in drops.values() if isinstance(n, int))
        return {
            "pod_socket": udp.get("Udp.RcvbufErrors", 0),
            "node_socket": node.get("Udp.RcvbufErrors", 0),
            "devices": devices,
            "weft": weft,
        }

    def weft_status(self) -> dict[str, dict]:
        from control.api import api_request

        out: dict[str, dict] = {}
        for name, sock in self.weft_sockets.items():
            with contextlib.suppress(ConnectionError, OSError, ValueError):
                out[name] = api_request(str(sock), {"op": "status"}, timeout=2)
        return out

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()  # agents, etcd, then the lab
        self.lab.close()


#: The Python the weft processes run with, when not the bench's own (bench.ab
#: --a-python / --b-python: the same code under two interpreters, in the same labs).
WEFT_PYTHON_ENV = "WEFT_BENCH_PYTHON"


def weft_python() -> str:
    return os.environ.get(WEFT_PYTHON_ENV) or sys.executable


def _weft_argv(
    mode_backend: str,
    node: Node,
    subnet: str,
    peer: Node,
    peer_subnet: str,
    peer_mac: str | None,
    own_mac: str,
    mtu: int,
    sock: Path,
) -> list[str]:
    argv = [
        weft_python(),
        "-m",
        "control.cli",
        "dataplane",
        "run",
        "--backend",
        mode_backend,
        "--network",
        NETWORK,
        "--subnet",
        subnet,
        "--public-ip",
        str(node.underlay_ip),
        "--underlay-mtu",
        str(mtu),
        "--api-socket",
        str(sock),
    ]
    if mode_backend == "vxlan":
        argv += ["--vtep-mac", own_mac, "--peer", f"{peer_subnet},{peer.underlay_ip},{peer_mac}"]
    else:
        argv += ["--peer", f"{peer_subnet},{peer.underlay_ip}"]
    return argv


def _start_weft(env: Env, node: Node, argv: list[str], log: Path, sock: Path) -> None:
    from control.api import api_request

    proc = env.lab.spawn(node, argv, log=log)
    env.weft[node.name] = proc
    env.weft_sockets[node.name] = sock
    deadline = time.monotonic() + WEFT_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"weft on {node.name} exited {proc.returncode}: "
                f"{log.read_text(errors='replace')[-1500:]}"
            )
        if sock.exists():
            try:
                api_request(str(sock), {"op": "status"}, timeout=2)
                return
            except (ConnectionError, OSError, json.JSONDecodeError):
                pass
        time.sleep(0.1)
    raise RuntimeError(f"weft on {node.name} did not come up within {WEFT_START_TIMEOUT_S}s")


def build(
    mode: Mode,
    setting: str,
    underlay_mtu: int,
    workdir: Path,
    sockdir: Path,
    weft_extra: tuple[str, ...] = (),
    *,
    pod_gro: bool = True,
    pod_gro_flush_ns: int = FLUSH_TIMEOUT_NS,
) -> Env:
    """A fresh lab for ``mode``; closed again if anything in the setup fails.
    ``weft_extra`` is appended to every ``weft dataplane run`` (e.g. ``--offload off``);
    ``pod_gro``: UDP GRO forwarding on the pods' node-side veths (Lab.udp_gro_forwarding),
    with ``pod_gro_flush_ns`` as their gro_flush_timeout."""
    flush_ns = pod_gro_flush_ns if pod_gro else None
    if mode.key == "weft-kernel":
        return _build_cluster(mode, setting, underlay_mtu, workdir, sockdir, flush_ns)
    lab = Lab()
    try:
        lab.add_underlay(mtu=underlay_mtu)
        n1, n2 = lab.add_node("n1"), lab.add_node("n2")
        knobs = node_knobs(setting, mode)
        for node in (n1, n2):
            _set_knobs(lab, node, setting, knobs)
        mtu = pod_mtu(underlay_mtu, mode)
        lab.add_cni(n1, SUBNET1, mtu=mtu)
        lab.add_cni(n2, SUBNET2, mtu=mtu)
        pod1, pod2 = lab.add_pod(n1), lab.add_pod(n2)
        if flush_ns is not None:
            lab.udp_gro_forwarding(pod1, flush_ns)
            lab.udp_gro_forwarding(pod2, flush_ns)
        env = Env(mode, setting, underlay_mtu, lab, n1, n2, pod1, pod2, knobs, mtu)
        _program(env, workdir, sockdir, weft_extra)
        _finish(env, workdir)
        return env
    except BaseException:
        lab.close()
        raise


def _finish(env: Env, workdir: Path) -> None:
    """Both pods reach each other; an iperf3 server waits in pod2."""
    lab, mode, pod1, pod2 = env.lab, env.mode, env.pod1, env.pod2
    for src, dst in ((pod1, pod2), (pod2, pod1)):
        if not lab.wait_ping(src, dst.ip, timeout_s=PING_READY_TIMEOUT_S):
            raise RuntimeError(f"{mode.key}: {src.name} cannot ping {dst.ip}")
    env.iperf_server = lab.spawn(
        pod2, ["iperf3", "-s", "-B", str(pod2.ip)], log=workdir / f"{lab.tag}-iperf3-server.log"
    )
    # A probe right after setup found it not yet listening ("connection refused").
    deadline = time.monotonic() + IPERF_READY_TIMEOUT_S
    while not lab.run(pod2, "ss", "-Hltn", "sport = :5201", check=False).stdout.strip():
        if time.monotonic() > deadline or env.iperf_server.poll() is not None:
            raise RuntimeError(f"{mode.key}: iperf3 -s in {pod2.name} is not listening")
        time.sleep(0.05)


def _build_cluster(
    mode: Mode,
    setting: str,
    underlay_mtu: int,
    workdir: Path,
    sockdir: Path,
    pod_gro_flush_ns: int | None,
) -> Env:
    """weft-kernel: two ``weft agent --dataplane kernel`` nodes and etcd, via the lab's
    Cluster (which also turns tx checksum offload off on every node's eth0)."""
    from control.lab.cluster import Cluster

    if underlay_mtu != 1500:
        raise RuntimeError("weft-kernel runs on the lab cluster's 1500-byte underlay only")
    # Under the short temp dir: the agents' API sockets live in it (108-byte path limit).
    cluster = Cluster(sockdir / f"cluster-{setting}-{underlay_mtu}")
    try:
        cluster.set_config(NETWORK, "vxlan")
        knobs = node_knobs(setting, mode)
        cns = []
        for name in ("n1", "n2"):
            node = cluster.add_node(name)
            _set_knobs(cluster.lab, node, setting, knobs)
            cns.append(cluster.start_weft_node(name, dataplane="kernel", node=node))
        for cn in cns:
            cluster.wait_ready(cn)
            for pod in cluster.wire_pods(cn, 1):
                if pod_gro_flush_ns is not None:
                    cluster.lab.udp_gro_forwarding(pod, pod_gro_flush_ns)
        for cn, other in ((cns[0], cns[1]), (cns[1], cns[0])):
            assert other.subnet is not None
            cluster.wait_peers(cn, [other.subnet])
        env = Env(
            mode,
            setting,
            underlay_mtu,
            cluster.lab,
            cns[0].node,
            cns[1].node,
            cns[0].pods[0],
            cns[1].pods[0],
            knobs,
            cns[0].mtu or 0,
            cluster=cluster,
        )
        for cn in cns:
            assert cn.proc is not None
            env.weft[cn.name] = cn.proc
            env.weft_sockets[cn.name] = cn.api_socket
        _finish(env, workdir)
        return env
    except BaseException:
        cluster.close()
        raise


def _program(env: Env, workdir: Path, sockdir: Path, weft_extra: tuple[str, ...] = ()) -> None:
    lab, n1, n2, mode = env.lab, env.n1, env.n2, env.mode
    kernel_macs: dict[str, str] = {}
    nodes = {"n1": (n1, SUBNET1, WEFT_MAC1), "n2": (n2, SUBNET2, WEFT_MAC2)}
    # Kernel side first: a weft vxlan node needs the kernel peer's VtepMAC.
    if mode.key == "plain":
        add_kernel_hostgw_route(lab, n1, SUBNET2, n2.underlay_ip)
        add_kernel_hostgw_route(lab, n2, SUBNET1, n1.underlay_ip)
        return
    for name, what in (("n1", mode.n1), ("n2", mode.n2)):
        if what == "kernel":
            node, subnet, _ = nodes[name]
            kernel_macs[name] = make_kernel_vxlan(lab, node, subnet)

    def mac_of(name: str) -> str:
        return kernel_macs.get(name) or nodes[name][2]

    for name, what in (("n1", mode.n1), ("n2", mode.n2)):
        other = "n2" if name == "n1" else "n1"
        node, subnet, own_mac = nodes[name]
        peer, peer_subnet, _ = nodes[other]
        if what == "kernel":
            add_kernel_vxlan_peer(
                lab,
                node,
                peer_subnet=peer_subnet,
                peer_mac=mac_of(other),
                peer_public_ip=peer.underlay_ip,
            )
            continue
        if what == "naive":
            _start_naive(env, node, subnet, peer, workdir / f"{lab.tag}-{name}-naive.log")
            continue
        sock = sockdir / f"{lab.tag}-{name}.sock"
        argv = _weft_argv(
            what, node, subnet, peer, peer_subnet, mac_of(other), own_mac, env.underlay_mtu, sock
        ) + list(weft_extra)
        _start_weft(env, node, argv, workdir / f"{lab.tag}-{name}-weft.log", sock)


def _start_naive(env: Env, node: Node, subnet: str, peer: Node, log: Path) -> None:
    script = Path(__file__).with_name("naive.py")
    argv = [
        sys.executable,
        str(script),
        str(node.underlay_ip),
        str(peer.underlay_ip),
        subnet,
        NETWORK,
        str(env.pod_mtu),
    ]
    proc = env.lab.spawn(node, argv, log=log)
    env.weft[node.name] = proc
    deadline = time.monotonic() + WEFT_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"naive.py on {node.name} exited: {log.read_text()[-800:]}")
        if log.exists() and "up" in log.read_text():
            return
        time.sleep(0.05)
    raise RuntimeError(f"naive.py on {node.name} did not come up")


def check_tools() -> list[str]:
    """What is missing to run the dataplane benchmark here (empty: all good)."""
    import os
    import shutil

    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, TUN, ethtool)")
    for tool in ("ip", "bridge", "ethtool", "iperf3", "ping"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing
