"""`weft lab …`: a whole flannel cluster in network namespaces on this machine.

    weft lab up --nodes 3 --backend vxlan [--dataplane userspace,kernel,userspace]
    weft lab exec n1-p0 -- ping -c 3 10.244.7.2     (a node, a pod, "etcd" or "hub")
    weft lab status
    weft lab down
    weft lab demo                                    (build, explain, ping, iperf3, tear down)

`up` leaves the lab running after it exits: etcd and the agents run in their
own sessions, and what `down` needs (tag, namespaces, PIDs, paths) is saved as
JSON in /run/weft/lab/NAME.json (WEFT_LAB_DIR overrides the directory).
Everything stays inside the lab's namespaces; nothing routes out of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from control.cli import CliError, egress_thread_argument, parse_keep_warm, parse_queues

DEFAULT_LAB_DIR = "/run/weft/lab"
BACKENDS = ("vxlan", "udp", "host-gw")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,31}$")


def lab_dir() -> Path:
    return Path(os.environ.get("WEFT_LAB_DIR") or DEFAULT_LAB_DIR)


def state_path(name: str) -> Path:
    return lab_dir() / f"{name}.json"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise CliError(f"--name {name!r}: use letters, digits, '_' and '.' (at most 32)")
    return name


def preflight() -> None:
    """The one-line reasons a lab cannot be built here."""
    if os.geteuid() != 0:
        raise CliError("weft lab needs root (it makes network namespaces); run it with sudo")
    from control.lab.etcd import ETCD_BIN, ETCDCTL_BIN

    for binary, package in ((ETCD_BIN, "etcd-server"), (ETCDCTL_BIN, "etcd-client")):
        if not os.access(binary, os.X_OK):
            raise CliError(f"{binary} is missing: apt-get install {package} (or run scripts/setup)")
    for tool in ("ip", "bridge", "ethtool", "ping"):
        if shutil.which(tool) is None:
            raise CliError(f"`{tool}` is missing: run scripts/setup")


def load_state(name: str) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(name).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CliError(f"{state_path(name)}: unreadable lab state ({exc})") from None


def save_state(name: str, state: dict[str, Any]) -> None:
    path = state_path(name)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def require_state(name: str) -> dict[str, Any]:
    state = load_state(name)
    if state is None:
        raise CliError(f"no lab named {name!r} (start one with: weft lab up --name {name})")
    return state


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so a half-built lab is still torn down."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def per_node(value: str, count: int, allowed: tuple[str, ...], flag: str) -> list[str]:
    """``a`` or ``a,b,c`` (one per node) → a list of ``count`` values."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise CliError(f"{flag}: empty")
    for item in items:
        if item not in allowed:
            raise CliError(f"{flag} {item!r}: expected one of {', '.join(allowed)}")
    if len(items) == 1:
        return items * count
    if len(items) != count:
        raise CliError(f"{flag} {value}: give one value, or one per node ({count})")
    return items


# -- building ---------------------------------------------------------------------


def build(
    cluster: Any,
    *,
    nodes: int,
    backend: str,
    network: str,
    dataplanes: list[str],
    devices: list[str],
    pods: int,
    say: Callable[[str], None] = lambda _s: None,
    pod_udp_gro: bool = False,
    queues: int = 1,
    egress_thread: str = "auto",
    keep_warm: int = 0,
) -> list[Any]:
    """Config, agents (started together), subnet.env → cni0 + pods, peers all seen.
    `pod_udp_gro`: userspace agents get --pod-udp-gro (their pods' veths merge UDP);
    `queues`: and --queues (one weft process per device queue); `egress_thread`: and
    --egress-thread with that value (auto, their default, passes nothing); `keep_warm`:
    and --keep-warm USEC when not 0."""
    from dataplane.io.queues import queues_error

    problem = queues_error(backend, queues)
    if problem:
        raise CliError(problem)
    userspace_args = ["--pod-udp-gro"] if pod_udp_gro else []
    if queues > 1:
        userspace_args += ["--queues", str(queues)]
    if egress_thread != "auto":
        userspace_args += ["--egress-thread", egress_thread]
    if keep_warm:
        userspace_args += ["--keep-warm", str(keep_warm)]
    for dp, dev in zip(dataplanes, devices, strict=True):
        if dp == "kernel" and backend == "udp":
            raise CliError("--dataplane kernel has no udp backend (flannel's udp is userspace)")
        if dev == "tap" and backend != "vxlan":
            raise CliError("--device tap is only for the vxlan backend")
    config = cluster.set_config(network, backend)
    say(f"network config at {cluster.prefix}/config: {config}")
    started = [
        cluster.start_weft_node(
            f"n{i + 1}",
            dataplane=dataplanes[i],
            device=devices[i],
            extra_args=userspace_args if dataplanes[i] == "userspace" else [],
        )
        for i in range(nodes)
    ]
    for cn in started:
        cluster.wait_ready(cn)
        cluster.wire_pods(cn, pods)
        say(f"{cn.name}: agent ready, subnet {cn.subnet}, mtu {cn.mtu}")
    for cn in started:
        cluster.wait_peers(cn, [o.subnet for o in started if o is not cn])
    return started


def new_cluster(workdir: Path, tag: str | None = None) -> Any:
    from control.lab.cluster import Cluster
    from control.lab.etcd import EtcdServerError
    from control.lab.netns import LabError

    try:
        return Cluster(workdir, tag=tag)
    except (LabError, EtcdServerError) as exc:
        raise CliError(f"could not start the lab: {exc}") from None


def cmd_up(args: argparse.Namespace) -> int:
    preflight()
    name = check_name(args.name)
    if args.nodes < 1 or args.nodes > 200:
        raise CliError("--nodes: 1..200")
    dataplanes = per_node(args.dataplane, args.nodes, ("userspace", "kernel"), "--dataplane")
    devices = per_node(args.device, args.nodes, ("tun", "tap"), "--device")
    if load_state(name) is not None:
        raise CliError(
            f"a lab named {name!r} already exists ({state_path(name)}); "
            f"remove it with: weft lab down --name {name}"
        )
    from control.lab.cluster import ClusterError
    from control.lab.netns import new_tag

    tag = new_tag()
    workdir = lab_dir() / name
    shutil.rmtree(workdir, ignore_errors=True)
    # recorded first, so `weft lab down` finds the tag even if this process is killed
    save_state(name, {"name": name, "tag": tag, "state": "building", "workdir": str(workdir)})
    cluster = None
    try:
        with sigterm_as_interrupt():
            cluster = new_cluster(workdir, tag)
            try:
                nodes = build(
                    cluster,
                    nodes=args.nodes,
                    backend=args.backend,
                    network=args.network,
                    dataplanes=dataplanes,
                    devices=devices,
                    pods=args.pods,
                    pod_udp_gro=args.pod_udp_gro,
                    queues=args.queues,
                    egress_thread=args.egress_thread,
                    keep_warm=args.keep_warm,
                )
            except ClusterError as exc:
                raise CliError(str(exc)) from None
            state = {"name": name, "state": "up", "backend": args.backend,
                     "network": args.network, "created": time.time(),
                     **cluster.detach()}  # fmt: skip
            save_state(name, state)
    except BaseException:
        if cluster is not None:
            cluster.close()
        from control.lab.cluster import teardown_state

        teardown_state({"tag": tag})
        state_path(name).unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    print(
        f"lab {name} is up: tag {tag}, backend {args.backend}, "
        f"etcd {state['etcd']['endpoint']} (namespace {state['etcd']['ns']})"
    )
    print_nodes(state)
    first = nodes[0]
    suffix = "" if name == "weft" else f" --name {name}"
    print(f"\nagent logs: {workdir}/<node>/agent.log\ntry:")
    if len(nodes) > 1 and first.pods and nodes[1].pods:
        print(f"  weft lab exec{suffix} {first.pod.name} -- ping -c 3 {nodes[1].pod.ip}")
    print(f"  weft lab exec{suffix} etcd -- etcdctl get --prefix {cluster.prefix}")
    print(f"  weft lab exec{suffix} {first.name} -- weft status --api-socket {first.api_socket}")
    print(f"  weft lab status{suffix}")
    print(f"  weft lab down{suffix}")
    return 0


def dataplane_label(dataplane: str, device: str | None) -> str:
    """userspace/tun, userspace/tap, or kernel (which has no TUN/TAP to name)."""
    return "kernel" if dataplane == "kernel" else f"{dataplane}/{device}"


def print_nodes(state: dict[str, Any]) -> None:
    print(f"{'NODE':<6} {'NAMESPACE':<16} {'UNDERLAY':<15} {'SUBNET':<18} "
          f"{'DATAPLANE':<15} PODS")  # fmt: skip
    for name, n in state.get("nodes", {}).items():
        pods = ", ".join(f"{p} {v['ip']}" for p, v in n.get("pods", {}).items()) or "-"
        print(
            f"{name:<6} {n['ns']:<16} {n['underlay_ip']:<15} {n.get('subnet') or '-':<18} "
            f"{dataplane_label(n['dataplane'], n['device']):<15} {pods}"
        )


# -- down, exec, status -------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CliError("weft lab needs root (it deletes network namespaces); run it with sudo")
    name = check_name(args.name)
    state = load_state(name)
    if state is None:
        print(f"no lab named {name!r}; nothing to do")
        return 0
    from control.lab.cluster import teardown_state

    removed = teardown_state(state)
    workdir = Path(state.get("workdir") or lab_dir() / name)
    if workdir.parent == lab_dir() and workdir.name == name:
        shutil.rmtree(workdir, ignore_errors=True)
    state_path(name).unlink(missing_ok=True)
    print(f"lab {name} ({state.get('tag')}) is down: {len(removed)} namespaces removed")
    return 0


def namespace_of(state: dict[str, Any], target: str) -> str:
    nodes = state.get("nodes", {})
    if target in nodes:
        return nodes[target]["ns"]
    for n in nodes.values():
        if target in n.get("pods", {}):
            return n["pods"][target]["ns"]
    if target == "etcd" and state.get("etcd"):
        return state["etcd"]["ns"]
    if target == "hub":
        return f"{state['tag']}-hub"
    names = [*nodes, *(p for n in nodes.values() for p in n.get("pods", {})), "etcd", "hub"]
    raise CliError(f"no node or pod {target!r} in lab {state.get('name')}: {', '.join(names)}")


def cmd_exec(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CliError("weft lab exec needs root (ip netns exec); run it with sudo")
    state = require_state(check_name(args.name))
    ns = namespace_of(state, args.node)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("nothing to run: weft lab exec NODE -- COMMAND [ARGS...]")
    from control.lab.netns import netns_exists

    if not netns_exists(ns):
        raise CliError(
            f"namespace {ns} is gone; the lab is broken: weft lab down --name {args.name}"
        )
    env = dict(os.environ)
    if state.get("etcd"):  # etcdctl inside the lab talks to the lab's etcd by default
        env.setdefault("ETCDCTL_API", "3")
        env["ETCDCTL_ENDPOINTS"] = state["etcd"]["endpoint"]
    if cmd[0] == "weft":  # the weft of this installation, not whatever is on PATH
        cmd = [sys.executable, "-m", "control.cli", *cmd[1:]]
    try:
        rc = subprocess.call(["ip", "netns", "exec", ns, *cmd], env=env)
    except KeyboardInterrupt:
        return 130
    return rc if rc >= 0 else 128 - rc


def node_status(n: dict[str, Any]) -> dict[str, Any]:
    from control.api import api_request

    try:
        return api_request(n["api_socket"], {"op": "status"}, timeout=3)
    except (ConnectionError, OSError, ValueError) as exc:
        return {"error": str(exc)}


def cmd_status(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CliError("weft lab status needs root (the agents' sockets are 0600)")
    state = require_state(check_name(args.name))
    from control.lab.netns import pid_alive

    statuses = {name: node_status(n) for name, n in state.get("nodes", {}).items()}
    if args.json:
        print(json.dumps({"lab": state, "nodes": statuses}, indent=2))
        return 0
    etcd = state.get("etcd") or {}
    etcd_pid = etcd.get("pid")
    etcd_ok = isinstance(etcd_pid, int) and pid_alive(etcd_pid)
    print(
        f"lab {state.get('name')} (tag {state.get('tag')}, backend {state.get('backend')}): "
        f"etcd {etcd.get('endpoint')} {'running' if etcd_ok else 'NOT RUNNING'}"
    )
    print(f"\n{'NODE':<6} {'SUBNET':<18} {'BACKEND':<8} {'DATAPLANE':<15} {'PEERS':<6} "
          f"{'TX PKTS':>9} {'RX PKTS':>9}  DROPS")  # fmt: skip
    for name, st in statuses.items():
        n = state["nodes"][name]
        if "error" in st:
            pid = n.get("pid")
            alive = isinstance(pid, int) and pid_alive(pid)
            print(f"{name:<6} agent {'running' if alive else 'NOT RUNNING'}, "
                  f"API: {st['error']}")  # fmt: skip
            continue
        c = st.get("counters", {}) or {}
        drops = ", ".join(f"{k} {v}" for k, v in sorted((c.get("drops") or {}).items()))
        dp = dataplane_label(str(st.get("dataplane")), st.get("device_kind") or n.get("device"))
        print(
            f"{name:<6} {st.get('subnet') or '-':<18} {st.get('backend') or '-':<8} {dp:<15} "
            f"{len(st.get('peers', [])):<6} {c.get('tx_packets', '-'):>9} "
            f"{c.get('rx_packets', '-'):>9}  {drops or 'none'}"
        )
        for p in st.get("peers", []):
            mac = f" VtepMAC {p['vtep_mac']}" if p.get("vtep_mac") else ""
            print(f"{'':<6} ↳ peer {p['subnet']:<18} at {p['public_ip']}{mac}")
    return 0


# -- demo -----------------------------------------------------------------------------


def _section(title: str) -> None:
    print(f"\n== {title} ==")


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.rstrip("\n").splitlines())


def iperf3_mbits(cluster: Any, client: Any, server: Any, seconds: int = 2) -> float:
    """One TCP iperf3 run between two pods; megabits per second received."""
    srv = cluster.lab.spawn(server, ["iperf3", "-s", "-1"])
    try:
        last = ""
        for _ in range(50):
            cp = cluster.lab.run(client, "iperf3", "-c", str(server.ip), "-t", str(seconds),
                                 "-J", check=False, timeout=seconds + 30)  # fmt: skip
            doc = json.loads(cp.stdout) if cp.stdout.startswith("{") else {}
            summary = doc.get("end", {}).get("sum_received")
            if cp.returncode == 0 and summary:
                return float(summary["bits_per_second"]) / 1e6
            last = str(doc.get("error") or (cp.stdout + cp.stderr)).strip()
            if "refused" not in last and "busy" not in last:
                break
            time.sleep(0.1)
        raise RuntimeError(last[-300:] or "no output")
    finally:
        cluster.lab.stop(srv)


def explain_path(cluster: Any, a: Any, b: Any, backend: str) -> None:
    """The chain a packet from a's pod to b's pod follows, read from the live lab."""
    lab = cluster.lab
    dst = b.pod.ip
    step = iter(range(1, 10))
    print(f"a packet from {a.pod.name} ({a.pod.ip}) to {b.pod.name} ({dst}):")
    gateway = a.subnet.network_address + 1
    print(f"  {next(step)}. the pod's default route sends it to cni0 on {a.name} ({gateway})")
    route = lab.run(a.node, "ip", "route", "get", str(dst), check=False).stdout.strip()
    print(f"  {next(step)}. {a.name}'s kernel routing table:\n       $ ip route get {dst}\n"
          f"{_indent(route, '       ')}")  # fmt: skip
    key, value = cluster.leases().get(b.subnet, ("?", "?"))
    lease = json.loads(value) if value.startswith("{") else {}
    mac = (lease.get("BackendData") or {}).get("VtepMAC")
    public_ip = lease.get("PublicIP")
    if a.dataplane == "kernel" and backend == "vxlan":
        gw = str(b.subnet.network_address)
        neigh = lab.ip(a.node, "neigh", "show", gw, "dev", "flannel.1").strip()
        fdb = [ln for ln in lab.bridge(a.node, "fdb", "show", "dev", "flannel.1").splitlines()
               if mac and mac in ln]  # fmt: skip
        print(
            f"  {next(step)}. flannel.1's neighbour entry turns the gateway {gw} into the "
            "VtepMAC:\n"
            f"       $ ip neigh show {gw} dev flannel.1\n{_indent(neigh, '       ')}"
        )
        print(
            f"  {next(step)}. the FDB entry turns the VtepMAC into the peer's public IP:\n"
            f"       $ bridge fdb show dev flannel.1 | grep {mac}\n"
            f"{_indent(chr(10).join(fdb), '       ')}"
        )
    else:
        st = cluster.status(a)
        row = next((p for p in st.get("peers", []) if p["subnet"] == str(b.subnet)), None)
        if row is None:
            print(f"  {next(step)}. weft on {a.name} has no peer for {b.subnet} (!)")
        else:
            via = f"VtepMAC {row['vtep_mac']} → " if row.get("vtep_mac") else ""
            print(
                f"  {next(step)}. the device hands it to weft, whose peer table says "
                "(weft status):\n"
                f"       {row['subnet']} → {via}public IP {row['public_ip']}"
            )
    print(f"  {next(step)}. where that comes from: {b.name}'s lease in etcd")
    print(f"       {key}\n       {value}")
    if backend == "vxlan":
        print(
            f"  {next(step)}. on the wire: UDP {a.underlay_ip} → {public_ip}:8472, VXLAN VNI "
            f"{(lease.get('BackendData') or {}).get('VNI', 1)}, inner Ethernet to {mac}"
        )
    elif backend == "udp":
        print(
            f"  {next(step)}. on the wire: UDP {a.underlay_ip} → {public_ip}:8285, "
            "the payload is the pod's IP packet as is"
        )
    else:
        print(
            f"  {next(step)}. on the wire: the pod's packet itself, in an Ethernet frame to "
            f"{public_ip}'s "
            "MAC (host-gw: no encapsulation; the peer's kernel routes it to the pod)"
        )
    print(f"  {next(step)}. {b.name} delivers it through cni0 to {b.pod.name}")


def print_matrix(names: list[str], results: dict[tuple[str, str], bool]) -> None:
    width = max(11, *(len(n) + 6 for n in names))
    corner = "from \\ to"
    print(f"{corner:<{width}}" + "".join(f"{n + '-p0':<{width}}" for n in names))
    for a in names:
        cells = ["-" if a == b else ("ok" if results[(a, b)] else "FAIL") for b in names]
        print(f"{a + '-p0':<{width}}" + "".join(f"{c:<{width}}" for c in cells))


def cmd_demo(args: argparse.Namespace) -> int:
    preflight()
    if args.nodes < 2 or args.nodes > 20:
        raise CliError("--nodes: 2..20 for the demo")
    name = check_name(args.name)
    if args.keep and load_state(name) is not None:
        raise CliError(
            f"a lab named {name!r} already exists; remove it with: weft lab down --name {name}"
        )
    dataplanes = per_node(args.dataplane, args.nodes, ("userspace", "kernel"), "--dataplane")
    devices = per_node(args.device, args.nodes, ("tun", "tap"), "--device")
    import tempfile

    from control.lab.cluster import ClusterError
    from control.lab.netns import new_tag

    tag = new_tag()
    workdir = lab_dir() / name if args.keep else Path(tempfile.mkdtemp(prefix="weft-demo-"))
    if args.keep:
        save_state(name, {"name": name, "tag": tag, "state": "building", "workdir": str(workdir)})
    cluster = None
    kept = False
    try:
        with sigterm_as_interrupt():
            _section(f"weft lab demo: {args.nodes} nodes, backend {args.backend}")
            print("Every node, every pod and etcd live in network namespaces on this machine,\n"
                  "joined by one bridge (the underlay); nothing routes out of them.")  # fmt: skip
            cluster = new_cluster(workdir, tag)
            print(f"underlay 192.168.77.0/24 on bridge br0 (namespace {tag}-hub); etcd listens "
                  f"on {cluster.endpoint} in namespace {tag}-etcd")  # fmt: skip
            try:
                nodes = build(
                    cluster, nodes=args.nodes, backend=args.backend, network=args.network,
                    dataplanes=dataplanes, devices=devices, pods=1,
                    say=lambda s: print("  " + s), pod_udp_gro=args.pod_udp_gro,
                    queues=args.queues, egress_thread=args.egress_thread,
                    keep_warm=args.keep_warm,
                )  # fmt: skip
            except ClusterError as exc:
                raise CliError(str(exc)) from None
            _section("1. the leases in etcd: each agent picked a free subnet and wrote this")
            print(f"  $ etcdctl get --prefix {cluster.prefix}")
            print(_indent(cluster.etcdctl("get", "--prefix", cluster.prefix)))
            _section("2. each agent wrote subnet.env; the CNI bridge plugin made cni0 and a pod "
                     "from it")  # fmt: skip
            for cn in nodes:
                print(f"  {cn.name}: {cn.subnet_file}")
                print(_indent(cn.subnet_file.read_text(), "    | "))
                print(f"    → cni0 {cn.subnet.network_address + 1}/{cn.subnet.prefixlen} "
                      f"mtu {cn.mtu}; pod {cn.pod.name} {cn.pod.ip}")  # fmt: skip
            first = nodes[0]
            _section(f"3. {first.name}'s own view")
            print(f"  $ weft status --api-socket {first.api_socket}")
            cp = subprocess.run([sys.executable, "-m", "control.cli", "status", "--api-socket",
                                 str(first.api_socket)], capture_output=True, text=True,
                                timeout=30)  # fmt: skip
            print(_indent(cp.stdout or cp.stderr))
            _section(f"4. the path from {first.name} to {nodes[1].name}")
            explain_path(cluster, first, nodes[1], args.backend)
            _section("5. every pod pings every other pod")
            results = cluster.ping_all(timeout_s=5.0)
            print_matrix([cn.name for cn in nodes], results)
            ok = all(results.values())
            _section(f"6. iperf3 (TCP, 2 s) from {first.pod.name} to {nodes[1].pod.name}")
            try:
                mbits = iperf3_mbits(cluster, first.pod, nodes[1].pod)
                print(f"  {mbits:.0f} Mbit/s")
            except Exception as exc:
                print(f"  iperf3 failed: {exc}")
            failed = sorted(f"{a}→{b}" for (a, b), good in results.items() if not good)
            if args.keep:
                state = {"name": name, "state": "up", "backend": args.backend,
                         "network": args.network, "created": time.time(),
                         **cluster.detach()}  # fmt: skip
                save_state(name, state)
                kept = True
                suffix = "" if name == "weft" else f" --name {name}"
                print(f"\nthe lab stays up: weft lab status{suffix}; weft lab down{suffix}")
            if ok:
                print(f"\nall {len(results)} pod pairs pinged")
                return 0
            print(f"\n{len(failed)} of {len(results)} pod pairs did not ping: {', '.join(failed)}")
            return 1
    finally:
        if not kept:
            if cluster is not None:
                print("\ntearing the lab down")
                cluster.close()
            from control.lab.cluster import teardown_state

            teardown_state({"tag": tag})
            if args.keep:
                state_path(name).unlink(missing_ok=True)
            shutil.rmtree(workdir, ignore_errors=True)


# -- the parser -------------------------------------------------------------------------


def register(sub: Any) -> None:
    p = sub.add_parser("lab", help="a flannel cluster in network namespaces on this machine")
    lsub = p.add_subparsers(dest="lab_command", required=True, metavar="SUBCOMMAND")

    def name_flag(q: argparse.ArgumentParser, default: str = "weft") -> None:
        q.add_argument("--name", default=default, help=f"the lab's name (default {default})")

    def build_flags(q: argparse.ArgumentParser, nodes: int) -> None:
        q.add_argument("--nodes", type=int, default=nodes)
        q.add_argument("--backend", choices=BACKENDS, default="vxlan")
        q.add_argument(
            "--dataplane",
            default="userspace",
            help="userspace or kernel, or one per node: userspace,kernel,userspace",
        )
        q.add_argument("--device", default="tun",
                       help="tun or tap (vxlan only), or one per node")  # fmt: skip
        q.add_argument("--network", default="10.244.0.0/16", type=_network)
        q.add_argument(
            "--pod-udp-gro",
            action="store_true",
            help="userspace agents run with --pod-udp-gro: the pods' veths merge small UDP "
            "for weft (see docs/running.md)",
        )
        q.add_argument(
            "--queues",
            type=parse_queues,
            default=1,
            metavar="N",
            help="userspace agents run with --queues N: one weft process per device queue",
        )
        q.add_argument(
            "--keep-warm",
            type=parse_keep_warm,
            default=0,
            metavar="USEC",
            help="userspace agents run with --keep-warm USEC: a pass over the packet path "
            "every USEC while traffic is sporadic (see docs/running.md; default 0: off)",
        )
        egress_thread_argument(
            q,
            "auto",
            "userspace agents run with --egress-thread VALUE: whether a kernel thread sends "
            "what weft writes to its egress TAP (see docs/running.md; default auto)",
        )

    up = lsub.add_parser("up", help="build a lab and leave it running")
    build_flags(up, 3)
    up.add_argument("--pods", type=int, default=1, help="pods per node")
    name_flag(up)
    up.set_defaults(func=cmd_up)

    down = lsub.add_parser("down", help="stop a lab's processes and delete its namespaces")
    name_flag(down)
    down.set_defaults(func=cmd_down)

    ex = lsub.add_parser("exec", help="run a command in a node's, pod's or etcd's namespace")
    name_flag(ex)
    ex.add_argument("node", help="n1, n1-p0, etcd or hub")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    ex.set_defaults(func=cmd_exec)

    st = lsub.add_parser("status", help="each node's subnet, peers and counters")
    name_flag(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    demo = lsub.add_parser("demo", help="build a lab, show how it works, ping, iperf3, tear down")
    build_flags(demo, 3)
    demo.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    name_flag(demo, "demo")
    demo.set_defaults(func=cmd_demo)


def _network(text: str) -> str:
    try:
        return str(IPv4Network(text, strict=True))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
