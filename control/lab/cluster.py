"""A whole flannel-style cluster in the lab: etcd, weft agents, kernel nodes, pods.

``Cluster`` builds on ``Lab`` (control/lab/topology.py)::

    wlXXXX-hub     br0: the underlay segment (192.168.77.0/24)
    wlXXXX-etcd    eth0 192.168.77.10, etcd listening there (never on the host)
    wlXXXX-n1      eth0 192.168.77.11, `weft agent` → subnet.env → cni0 + pod n1-p0
    wlXXXX-k1      eth0 192.168.77.12, flannel.1 made with ip/bridge as flanneld would,
                   its lease written by hand with etcdctl

A weft node is wired exactly as the flannel CNI plugin with the bridge
delegate would wire it: it reads the agent's subnet.env, makes ``cni0`` with
FLANNEL_SUBNET (the gateway, isGateway) and FLANNEL_MTU, and gives each pod
the next address with a default route via cni0.

Every node's ``eth0`` has TX checksum offload turned off (``wire_like``): on a
veth the kernel leaves checksums unfilled, which a real NIC would fill; a
userspace receiver on the other side would see bad inner checksums.

Nothing routes out of the lab: the nodes have only the underlay's connected
route, and etcd listens on the etcd node's underlay address.  ``close()``
stops the agents, etcd and every namespace (by PID, also after a failure).

``Cluster(etcd_members=3)`` runs a three-member etcd instead, each member in
a namespace of its own (``etcd``, ``etcd2``, ``etcd3``: .10, .11, .12, port
2379); agents are given every member's URL, and ``etcdctl`` talks to whichever
members are running.

``detach()`` hands a running cluster over to ``weft lab up``: nothing is torn
down when this process exits; ``teardown_state(state)`` removes it later.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from control.lab.etcd import EtcdServer, EtcdServerError, etcdctl, start_etcd_cluster
from control.lab.netns import (
    STATE_DIR,
    LabError,
    RunState,
    kill_session_if_in,
    list_netns,
    netns_delete,
    netns_inode,
    pid_alive,
    pid_netns_inode,
    pid_starttime,
)
from control.lab.topology import (
    VXLAN_OVERHEAD,
    Lab,
    Node,
    Pod,
    add_kernel_hostgw_route,
    add_kernel_vxlan_peer,
    make_kernel_vxlan,
    remove_kernel_vxlan_peer,
    wire_like,
)

DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_UNDERLAY = "192.168.77.0/24"
READY_TIMEOUT_S = 30.0
WEFT = [sys.executable, "-m", "control.cli"]


class ClusterError(LabError):
    """The cluster could not be built or a node misbehaved; the message says why."""


@dataclass
class ClusterNode:
    """A node of the cluster: a weft agent's node, or a hand-made kernel flannel node."""

    name: str
    node: Node
    kind: str  # "weft" | "kernel"
    dir: Path
    dataplane: str = "userspace"  # weft: "userspace" | "kernel"; kernel nodes: "flannel"
    device: str = "tun"
    extra_args: tuple[str, ...] = ()
    prefix: str = DEFAULT_PREFIX
    proc: subprocess.Popen | None = None
    subnet: IPv4Network | None = None
    mtu: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # subnet.env as read
    pods: list[Pod] = field(default_factory=list)
    vtep_mac: str | None = None  # kernel nodes: flannel.1's MAC
    kernel_peers: dict[IPv4Network, tuple[str, str | None]] = field(default_factory=dict)

    @property
    def ns(self) -> str:
        return self.node.ns

    @property
    def underlay_ip(self) -> IPv4Address:
        return self.node.underlay_ip

    @property
    def pod(self) -> Pod:
        if not self.pods:
            raise ClusterError(f"node {self.name} has no pod")
        return self.pods[0]

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def api_socket(self) -> Path:
        return self.dir / "weft.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "agent.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines, as the CNI plugin reads subnet.env (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip().strip('"')
    return out


def flannel_lease_json(
    public_ip: IPv4Address | str, backend: str, vni: int, mac: str | None
) -> str:
    """A lease value byte for byte as flanneld writes it (facts §1.3), made by hand."""
    if backend == "vxlan":
        return (
            f'{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}}}}'
        )
    if backend == "host-gw":
        return f'{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
    return f'{{"PublicIP":"{public_ip}","PublicIPv6":null}}'


def lease_key(prefix: str, subnet: IPv4Network) -> str:
    return f"{prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def subnet_of_key(key: str) -> IPv4Network | None:
    tail = key.rsplit("/", 1)[-1].split("&", 1)[0]
    addr, _, plen = tail.partition("-")
    try:
        return IPv4Network(f"{addr}/{plen}")
    except ValueError:
        return None


class Cluster:
    """etcd in its own namespace on the underlay, weft agents and kernel nodes around it."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        tag: str | None = None,
        underlay: str = DEFAULT_UNDERLAY,
        prefix: str = DEFAULT_PREFIX,
        etcd_ready_timeout: float = 15.0,
        etcd_members: int = 1,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.nodes: dict[str, ClusterNode] = {}
        self.config: dict[str, Any] | None = None
        self._closed = False
        self._detached = False
        self.etcd: EtcdServer | None = None
        #: every etcd member (``[self.etcd]`` for a single one); ``etcd_nodes`` theirs
        self.etcds: list[EtcdServer] = []
        self.etcd_nodes: list[Node] = []
        self.lab = Lab(tag)
        try:
            self.lab.add_underlay(underlay)
            self.etcd_node = self.lab.add_node("etcd")
            self.etcd_nodes = [self.etcd_node]
            if etcd_members > 1:
                self._start_etcd_cluster(etcd_members, etcd_ready_timeout)
                return
            etcd = EtcdServer(
                str(self.etcd_node.underlay_ip),
                netns=self.etcd_node.ns,
                ready_timeout=etcd_ready_timeout,
            )
            etcd_dir = self.workdir / "etcd"
            etcd_dir.mkdir(exist_ok=True)
            etcd.tmpdir = etcd_dir  # keep data and log with the cluster's files
            self.etcd = etcd
            self.etcds = [etcd]
            etcd.start()
        except BaseException:
            self.close()
            raise

    def _start_etcd_cluster(self, count: int, ready_timeout: float) -> None:
        for i in range(2, count + 1):
            self.etcd_nodes.append(self.lab.add_node(f"etcd{i}"))
        members = [(str(n.underlay_ip), n.ns) for n in self.etcd_nodes]
        dirs = [self.workdir / f"etcd-m{i + 1}" for i in range(count)]
        self.etcds = start_etcd_cluster(members, tmpdirs=dirs, ready_timeout=ready_timeout)
        self.etcd = self.etcds[0]

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tag(self) -> str:
        return self.lab.tag

    @property
    def endpoint(self) -> str:
        assert self.etcd is not None
        return self.etcd.endpoint

    @property
    def endpoints(self) -> str:
        """Every member's client URL, comma-separated (``--etcd-endpoints``)."""
        return ",".join(m.endpoint for m in self.etcds) if self.etcds else self.endpoint

    def close(self) -> None:
        """Stop every agent, etcd, and delete every namespace. Never raises."""
        if self._closed:
            return
        self._closed = True
        if self._detached:
            return
        # SIGTERM every agent at once, then let the lab reap them (by PID) and its namespaces.
        for cn in self.nodes.values():
            proc = cn.proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for cn in self.nodes.values():
            if cn.proc is not None:
                with contextlib.suppress(Exception):
                    self.lab.stop(cn.proc, grace_s=3.0)
        for member in self.etcds or ([self.etcd] if self.etcd is not None else []):
            with contextlib.suppress(Exception):
                member.close()
        self.lab.close()

    # -- etcd --------------------------------------------------------------------

    def etcdctl(self, *args: str, timeout: float = 15.0) -> str:
        assert self.etcd is not None
        if len(self.etcds) <= 1:
            return self.etcd.etcdctl(*args, timeout=timeout)
        # A cluster: every running member, from the first member's namespace.
        running = [m.endpoint for m in self.etcds if m.running()] or [self.etcd.endpoint]
        return etcdctl(",".join(running), *args, netns=self.etcd_node.ns,
                       extra_args=self.etcd.etcdctl_args, timeout=timeout)  # fmt: skip

    def set_config(
        self,
        network: str = "10.244.0.0/16",
        backend: str = "vxlan",
        *,
        prefix: str | None = None,
        **options: Any,
    ) -> str:
        """Write ``<prefix>/config``. Extra keyword arguments go into the Backend object,
        except the top-level ones (SubnetLen, SubnetMin, SubnetMax, EnableIPv6…)."""
        top_level = {"SubnetLen", "SubnetMin", "SubnetMax", "EnableIPv4", "EnableIPv6",
                     "IPv6Network", "IPv6SubnetLen", "EnableNFTables"}  # fmt: skip
        doc: dict[str, Any] = {"Network": network}
        backend_obj: dict[str, Any] = {"Type": backend}
        for key, value in options.items():
            (doc if key in top_level else backend_obj)[key] = value
        doc["Backend"] = backend_obj
        text = json.dumps(doc, separators=(",", ":"))
        self.put_config_raw(text, prefix=prefix)
        if prefix is None or prefix == self.prefix:
            self.config = doc
        return text

    def put_config_raw(self, text: str, *, prefix: str | None = None) -> None:
        self.etcdctl("put", f"{prefix or self.prefix}/config", text)

    def leases(self, prefix: str | None = None) -> dict[IPv4Network, tuple[str, str]]:
        """subnet → (key, value) for every lease under ``<prefix>/subnets`` (etcdctl get)."""
        out = self.etcdctl("get", "--prefix", f"{prefix or self.prefix}/subnets/", "-w", "json")
        doc = json.loads(out) if out.strip() else {}
        leases: dict[IPv4Network, tuple[str, str]] = {}
        for kv in doc.get("kvs", []) or []:
            key = base64.b64decode(kv["key"]).decode()
            value = base64.b64decode(kv.get("value", "")).decode()
            subnet = subnet_of_key(key)
            if subnet is not None:
                leases[subnet] = (key, value)
        return leases

    def network_config(self) -> tuple[IPv4Network, int, str, dict[str, Any]]:
        """(Network, SubnetLen, backend type, Backend object) read back from etcd."""
        raw = self.etcdctl("get", f"{self.prefix}/config", "--print-value-only").strip()
        if not raw:
            raise ClusterError(f"no network config at {self.prefix}/config: set_config() first")
        doc = {k.lower(): v for k, v in json.loads(raw).items()}
        network = IPv4Network(doc["network"])
        subnet_len = int(doc.get("subnetlen") or 0)
        if not subnet_len:
            subnet_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
        backend = {k.lower(): v for k, v in (doc.get("backend") or {}).items()}
        return network, subnet_len, str(backend.get("type", "udp")), backend

    # -- weft nodes --------------------------------------------------------------

    def add_node(self, name: str) -> Node:
        """A bare lab node on the underlay (eth0 with checksums filled as on a wire)."""
        if name in self.nodes or name in ("etcd", "hub"):
            raise ClusterError(f"node name {name!r} is taken")
        node = self.lab.add_node(name)
        wire_like(self.lab, node)
        return node

    def agent_argv(
        self,
        cn: ClusterNode,
        *,
        prefix: str | None = None,
        endpoints: str | None = None,
        extra_args: Sequence[str] | None = None,
    ) -> list[str]:
        argv = [
            *WEFT, "agent",
            "--etcd-endpoints", endpoints or self.endpoints,
            "--etcd-prefix", prefix or cn.prefix,
            "--iface", cn.node.underlay_iface,
            "--subnet-file", str(cn.subnet_file),
            "--state-dir", str(cn.state_dir),
            "--api-socket", str(cn.api_socket),
            "--dataplane", cn.dataplane,
            "--device", cn.device,
        ]  # fmt: skip
        argv += list(cn.extra_args if extra_args is None else extra_args)
        return argv

    def start_weft_node(
        self,
        name: str,
        *,
        dataplane: str = "userspace",
        device: str = "tun",
        extra_args: Sequence[str] = (),
        prefix: str | None = None,
        endpoints: str | None = None,
        node: Node | None = None,
    ) -> ClusterNode:
        """Spawn an agent on a new node (or on ``node``, made with ``add_node``);
        does not wait (see ``wait_ready``)."""
        node = node or self.add_node(name)
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        cn = ClusterNode(name, node, "weft", d, dataplane, device, tuple(extra_args),
                         prefix or self.prefix)  # fmt: skip
        self.nodes[name] = cn
        cn.proc = self.lab.spawn(node, self.agent_argv(cn, endpoints=endpoints), log=cn.log_path)
        return cn

    def wait_ready(self, cn: ClusterNode, timeout: float = READY_TIMEOUT_S) -> ClusterNode:
        """Wait for the agent's subnet.env; a clear error, with its log tail, if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            proc = cn.proc
            if proc is not None and proc.poll() is not None:
                raise ClusterError(
                    f"weft agent on {cn.name} exited with status {proc.returncode} before "
                    f"writing {cn.subnet_file}; last lines of {cn.log_path}:\n{cn.log_tail()}"
                )
            if cn.subnet_file.exists():
                self._read_subnet_env(cn)
                return cn
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"weft agent on {cn.name} wrote no {cn.subnet_file} in {timeout:.0f}s; "
                    f"last lines of {cn.log_path}:\n{cn.log_tail()}"
                )
            time.sleep(0.05)

    def _read_subnet_env(self, cn: ClusterNode) -> None:
        env = parse_env_file(cn.subnet_file.read_text())
        try:
            cn.subnet = IPv4Network(env["FLANNEL_SUBNET"], strict=False)
            cn.mtu = int(env["FLANNEL_MTU"])
        except (KeyError, ValueError) as exc:
            raise ClusterError(f"{cn.subnet_file}: unusable ({exc}): {env}") from None
        cn.env = env

    def wire_pods(self, cn: ClusterNode, count: int = 1) -> list[Pod]:
        """cni0 and ``count`` pods from subnet.env, as the CNI bridge plugin makes them."""
        if cn.subnet is None or cn.mtu is None:
            raise ClusterError(f"{cn.name}: no subnet yet")
        if cn.name not in self.lab.cnis:
            self.lab.add_cni(cn.node, cn.subnet, mtu=cn.mtu)
        for _ in range(count):
            cn.pods.append(self.lab.add_pod(cn.node, mtu=cn.mtu))
        return cn.pods

    def add_weft_node(
        self,
        name: str,
        *,
        dataplane: str = "userspace",
        device: str = "tun",
        extra_args: Sequence[str] = (),
        pods: int = 1,
        timeout: float = READY_TIMEOUT_S,
    ) -> ClusterNode:
        """A node running ``weft agent``: spawned, ready (subnet.env), cni0 and pods wired."""
        cn = self.start_weft_node(name, dataplane=dataplane, device=device, extra_args=extra_args)
        self.wait_ready(cn, timeout)
        if pods:
            self.wire_pods(cn, pods)
        return cn

    def kill_agent(self, cn: ClusterNode, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``sig`` to the node's agent (by PID) and wait for it to exit."""
        proc = cn.proc
        if proc is None or proc.poll() is not None:
            raise ClusterError(f"no running agent on {cn.name}")
        os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"agent on {cn.name} did not exit on signal {sig}") from None

    def restart_agent(
        self, cn: ClusterNode, *, timeout: float = READY_TIMEOUT_S, wait: bool = True
    ) -> ClusterNode:
        """Stop the agent if it still runs, start it again with the same arguments,
        and wait until its API says it is ready."""
        if cn.kind != "weft":
            raise ClusterError(f"{cn.name} is not a weft node")
        if cn.proc is not None:
            self.lab.stop(cn.proc)
        cn.proc = self.lab.spawn(cn.node, self.agent_argv(cn), log=cn.log_path)
        if wait:
            self.wait_api_ready(cn, timeout)
            self._read_subnet_env(cn)
        return cn

    def wait_api_ready(self, cn: ClusterNode, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            if cn.proc is not None and cn.proc.poll() is not None:
                raise ClusterError(
                    f"weft agent on {cn.name} exited with status {cn.proc.returncode}; "
                    f"last lines of {cn.log_path}:\n{cn.log_tail()}"
                )
            with contextlib.suppress(ConnectionError, OSError, ValueError):
                st = self.status(cn, timeout=2)
                if st.get("ready"):
                    return st
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"weft agent on {cn.name} not ready after {timeout:.0f}s; "
                    f"last lines of {cn.log_path}:\n{cn.log_tail()}"
                )
            time.sleep(0.1)

    def status(self, cn: ClusterNode, timeout: float = 5.0) -> dict[str, Any]:
        """The agent's ``weft status --json`` (its API socket)."""
        from control.api import api_request

        return api_request(str(cn.api_socket), {"op": "status"}, timeout=timeout)

    def wait_peers(
        self, cn: ClusterNode, subnets: Iterable[IPv4Network | str], timeout: float = 15.0
    ) -> dict[str, Any]:
        """Wait until the agent's peers are exactly ``subnets``; returns its status."""
        want = sorted(str(IPv4Network(s)) for s in subnets)
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while True:
            with contextlib.suppress(ConnectionError, OSError, ValueError):
                st = self.status(cn)
                if sorted(p["subnet"] for p in st.get("peers", [])) == want:
                    return st
            if time.monotonic() > deadline:
                have = [p["subnet"] for p in st.get("peers", [])]
                raise ClusterError(f"{cn.name}: peers {have}, expected {want} after {timeout}s")
            time.sleep(0.1)

    # -- hand-made kernel flannel nodes -------------------------------------------

    def add_kernel_node(self, name: str, *, pods: int = 1, vni: int | None = None) -> ClusterNode:
        """A node set up as flanneld would set it up, without flanneld: a free subnet
        picked from etcd, the lease written with ``etcdctl put`` in flannel's exact JSON,
        flannel.<VNI> (vxlan) or nothing (host-gw), and the entries for existing peers."""
        network, subnet_len, backend, bopts = self.network_config()
        if backend not in ("vxlan", "host-gw"):
            raise ClusterError(f"a hand-made kernel node speaks vxlan or host-gw, not {backend}")
        node = self.add_node(name)
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        cn = ClusterNode(name, node, "kernel", d, "flannel", "kernel")
        self.nodes[name] = cn
        taken = set(self.leases())
        candidates = list(network.subnets(new_prefix=subnet_len))[1:]  # flannel skips the first
        free = [s for s in candidates if not any(s.overlaps(t) for t in taken)]
        if not free:
            raise ClusterError(f"no free subnet in {network} for kernel node {name}")
        subnet = free[0]
        vni = int(bopts.get("vni") or 1) if vni is None else vni
        if backend == "vxlan":
            mtu = node.mtu - VXLAN_OVERHEAD
            port = int(bopts.get("port") or 8472)
            cn.vtep_mac = make_kernel_vxlan(self.lab, node, subnet, vni=vni, port=port, mtu=mtu)
        else:
            mtu = node.mtu
        cn.subnet, cn.mtu = subnet, mtu
        value = flannel_lease_json(node.underlay_ip, backend, vni, cn.vtep_mac)
        grant = self.etcdctl("lease", "grant", "86400").split()
        lease_id = grant[1] if len(grant) > 1 and grant[0] == "lease" else None
        put = ["put", lease_key(self.prefix, subnet), value]
        if lease_id:
            put.insert(1, f"--lease={lease_id}")
        self.etcdctl(*put)
        cn.env = {"FLANNEL_NETWORK": str(network),
                  "FLANNEL_SUBNET": f"{subnet.network_address + 1}/{subnet.prefixlen}",
                  "FLANNEL_MTU": str(mtu), "FLANNEL_IPMASQ": "false"}  # fmt: skip
        cn.subnet_file.write_text("".join(f"{k}={v}\n" for k, v in cn.env.items()))
        self.refresh_kernel_node(cn)
        if pods:
            self.wire_pods(cn, pods)
        return cn

    def refresh_kernel_node(self, cn: ClusterNode) -> None:
        """What flanneld does on lease events: read the leases with etcdctl and add,
        replace or remove the kernel entries for every peer of the same backend."""
        if cn.kind != "kernel":
            raise ClusterError(f"{cn.name} is not a hand-made kernel node")
        _, _, backend, bopts = self.network_config()
        vni = int(bopts.get("vni") or 1)
        want: dict[IPv4Network, tuple[str, str | None]] = {}
        for subnet, (_, value) in self.leases().items():
            if subnet == cn.subnet:
                continue
            try:
                attrs = json.loads(value)
            except ValueError:
                continue
            if attrs.get("BackendType") != backend:
                continue  # flannel's vxlan and host-gw ignore other backends' leases
            mac = (attrs.get("BackendData") or {}).get("VtepMAC")
            if backend == "vxlan" and not mac:
                continue
            want[subnet] = (str(attrs.get("PublicIP")), mac)
        for subnet, (ip, mac) in list(cn.kernel_peers.items()):
            if want.get(subnet) != (ip, mac):
                if backend == "vxlan":
                    remove_kernel_vxlan_peer(self.lab, cn.node, vni=vni, peer_subnet=subnet,
                                             peer_mac=mac or "", peer_public_ip=ip)  # fmt: skip
                else:
                    self.lab.ip(cn.node, "route", "del", str(subnet), check=False)
                del cn.kernel_peers[subnet]
        for subnet, (ip, mac) in want.items():
            if subnet in cn.kernel_peers:
                continue
            if backend == "vxlan":
                assert mac is not None
                add_kernel_vxlan_peer(self.lab, cn.node, vni=vni, peer_subnet=subnet,
                                      peer_mac=mac, peer_public_ip=ip)  # fmt: skip
            else:
                add_kernel_hostgw_route(self.lab, cn.node, subnet, ip)
            cn.kernel_peers[subnet] = (ip, mac)

    def refresh_kernel_nodes(self) -> None:
        for cn in self.nodes.values():
            if cn.kind == "kernel":
                self.refresh_kernel_node(cn)

    # -- probes ------------------------------------------------------------------

    def pod_nodes(self) -> list[ClusterNode]:
        return [cn for cn in self.nodes.values() if cn.pods]

    def ping_all(
        self,
        nodes: Sequence[ClusterNode] | None = None,
        *,
        timeout_s: float = 5.0,
        workers: int = 8,
    ) -> dict[tuple[str, str], bool]:
        """(a, b) → did a's first pod get an echo reply from b's first pod within
        ``timeout_s`` (pings every 0.2 s until one answers). Run in parallel."""
        nodes = list(nodes) if nodes is not None else self.pod_nodes()
        pairs = [(a, b) for a in nodes for b in nodes if a is not b]

        def one(pair: tuple[ClusterNode, ClusterNode]) -> bool:
            a, b = pair
            return self.lab.ping(a.pod, b.pod.ip, count=1, timeout_s=timeout_s)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(one, pairs))
        return {(a.name, b.name): ok for (a, b), ok in zip(pairs, results, strict=True)}

    # -- handing over to `weft lab up` -------------------------------------------

    def detach(self) -> dict[str, Any]:
        """Leave everything running after this process exits; return the state that
        ``teardown_state`` needs (tag, namespaces, PIDs, paths).

        A keeper process (``sleep infinity`` in the hub) becomes the lab's owner in
        /run/weft-lab/<tag>.json, so other runs' stale-lab cleanup leaves it alone."""
        keeper = self.lab.spawn(self.lab.hub or self.etcd_node.ns, ["sleep", "infinity"])
        pids = [p.pid for p in self.lab.processes]
        pids += [m.pid for m in self.etcds if m.pid is not None]
        run = RunState(self.tag)
        run.data = {
            "owner_pid": keeper.pid,
            "owner_start": pid_starttime(keeper.pid),
            "netns": self.lab.namespaces,
            "pids": pids,
        }
        run.save()
        self._detached = True
        self._closed = True
        return {
            "tag": self.tag,
            "workdir": str(self.workdir),
            "namespaces": self.lab.namespaces,
            "pids": pids,
            "keeper_pid": keeper.pid,
            "etcd": {
                "endpoint": self.endpoint,
                "pid": self.etcd.pid if self.etcd else None,
                "ns": self.etcd_node.ns,
                "prefix": self.prefix,
            },
            "nodes": {
                name: {
                    "kind": cn.kind,
                    "ns": cn.ns,
                    "underlay_ip": str(cn.underlay_ip),
                    "dataplane": cn.dataplane,
                    "device": cn.device,
                    "subnet": str(cn.subnet) if cn.subnet else None,
                    "pid": cn.proc.pid if cn.proc else None,
                    "api_socket": str(cn.api_socket),
                    "subnet_file": str(cn.subnet_file),
                    "log": str(cn.log_path),
                    "pods": {p.name: {"ns": p.ns, "ip": str(p.ip)} for p in cn.pods},
                }
                for name, cn in self.nodes.items()
            },
        }


def teardown_state(state: dict[str, Any]) -> list[str]:
    """Remove a detached cluster: kill its processes (only those still inside its
    namespaces, so a recycled PID is never touched), delete its namespaces and its
    /run/weft-lab record. Idempotent; works after a crash. Returns what it deleted."""
    tag = str(state.get("tag", ""))
    if not tag:
        return []
    names = [n for n in state.get("namespaces", []) if isinstance(n, str)]
    names += [n for n in list_netns() if n.startswith(tag + "-") and n not in names]
    run = RunState.load(tag) or {}
    names += [n for n in run.get("netns", []) if isinstance(n, str) and n not in names]
    names = [n for n in names if n.startswith(tag + "-")]
    inodes = {i for i in (netns_inode(n) for n in names) if i is not None}
    pids = {p for p in [*state.get("pids", []), *run.get("pids", [])] if isinstance(p, int)}
    if inodes:
        for pid in sorted(pids):
            kill_session_if_in(pid, inodes)
        # anything else still inside the lab's namespaces (e.g. `weft lab exec` shells)
        for pid in _pids_in(inodes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    removed = []
    for name in reversed(names):
        with contextlib.suppress(LabError):
            if name in list_netns():
                netns_delete(name)
                removed.append(name)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{tag}.json").unlink()
    return removed


def _pids_in(inodes: set[int]) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            pid = int(entry.name)
            if pid != os.getpid() and pid_alive(pid) and pid_netns_inode(pid) in inodes:
                out.append(pid)
    return out


__all__ = [
    "Cluster",
    "ClusterError",
    "ClusterNode",
    "EtcdServerError",
    "flannel_lease_json",
    "lease_key",
    "parse_env_file",
    "teardown_state",
    "wire_like",
]
