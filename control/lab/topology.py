"""The multi-node lab: an underlay bridge, nodes, CNI bridges, pods and kernel
flannel peers, all in network namespaces, built with ``ip``/``bridge``.

Layout (tag ``wl1a2b``)::

    wl1a2b-hub        br0 (the underlay L2 segment)  vn0, vn1, ... (veth ends)
    wl1a2b-n1         eth0 192.168.77.10/24 ── vn0    cni0 10.244.1.1/24   vp0 ...
    wl1a2b-n1-p0      eth0 10.244.1.2/24, default via 10.244.1.1 ── n1's vp0

Every veth is created directly inside its namespaces (``ip -n HUB link add ...
peer ... netns NODE``), so nothing ever appears in the root namespace and
nothing has a route out of the lab.  ``Lab.close()`` kills the processes it
spawned (by PID / own process group) and deletes its namespaces, which takes
every link, address, route and vxlan socket in them along.

MAC addresses are ``"aa:bb:cc:dd:ee:ff"`` strings here; functions that take a
MAC also accept 6 raw bytes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from control.lab.netns import (
    TAG_PREFIX,
    LabError,
    RunState,
    cleanup_stale,
    list_netns,
    netns_add,
    netns_delete,
    netns_exists,
    new_tag,
    ns_argv,
    sh,
    stop_process,
)
from control.podgro import FLUSH_TIMEOUT_NS

VXLAN_OVERHEAD = 50
#: br_netfilter's per-namespace switches, set to 0 in the hub (add_underlay).
HUB_BRIDGE_NETFILTER = tuple(
    f"net.bridge.bridge-nf-call-{t}" for t in ("iptables", "ip6tables", "arptables")
)


@dataclass(frozen=True)
class Node:
    """A lab node: a namespace with ``eth0`` on the underlay bridge."""

    name: str
    ns: str
    underlay_ip: IPv4Address
    underlay_iface: str = "eth0"
    mac: str = ""
    underlay_net: IPv4Network = field(default=IPv4Network("0.0.0.0/32"))
    mtu: int = 1500
    index: int = 0


@dataclass(frozen=True)
class Cni:
    """The node's ``cni0`` bridge (CNI bridge plugin, isGateway)."""

    node: Node
    subnet: IPv4Network
    gateway: IPv4Address
    mtu: int
    name: str = "cni0"


@dataclass(frozen=True)
class Pod:
    name: str
    ns: str
    ip: IPv4Address
    node: Node
    prefixlen: int = 24
    mtu: int = 1500
    node_end: str = ""  # the veth's end in the node (a cni0 port)


def mac_str(mac: str | bytes) -> str:
    if isinstance(mac, bytes | bytearray):
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        return ":".join(f"{b:02x}" for b in mac)
    return mac.lower()


def _ns_of(target: str | Node | Pod) -> str:
    return target if isinstance(target, str) else target.ns


class Lab:
    """A set of network namespaces owned by this process.

    ``with Lab() as lab: ...`` or call ``close()``; teardown never raises and
    works after a partial setup.  ``tag`` (``wl`` + 4 hex) prefixes every
    namespace name.
    """

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or new_tag()
        if not self.tag.startswith(TAG_PREFIX) or "-" in self.tag:
            raise LabError(f"lab tag must start with {TAG_PREFIX!r} and contain no '-'")
        self._state = RunState(self.tag)
        self._state.save()
        self._netns: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        self.hub: str | None = None
        self.underlay: IPv4Network | None = None
        self.underlay_mtu = 1500
        self.nodes: list[Node] = []
        self.cnis: dict[str, Cni] = {}
        self.pods: list[Pod] = []
        self._pod_count: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill spawned processes, delete namespaces (reverse order). Never raises."""
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        for name in reversed(self._netns):
            with contextlib.suppress(Exception):  # keep going; cleanup_stale gets it later
                netns_delete(name)
        # anything named with our tag that we did not record (e.g. half-made)
        with contextlib.suppress(Exception):
            for name in list_netns():
                if name.startswith(self.tag + "-"):
                    with contextlib.suppress(Exception):
                        netns_delete(name)
        self._netns.clear()
        self._state.remove()

    @staticmethod
    def cleanup_stale(tag_prefix: str = TAG_PREFIX) -> list[str]:
        """Remove namespaces of crashed lab runs (owner process gone)."""
        return cleanup_stale(tag_prefix)

    @property
    def namespaces(self) -> list[str]:
        return list(self._netns)

    @property
    def processes(self) -> list[subprocess.Popen]:
        return list(self._procs)

    def ns_name(self, short: str) -> str:
        return f"{self.tag}-{short}"

    def add_netns(self, short: str) -> str:
        """Create namespace ``<tag>-<short>`` with ``lo`` up; recorded for teardown."""
        self._check_open()
        name = self.ns_name(short)
        if netns_exists(name):
            raise LabError(f"namespace {name} already exists")
        self._state.add("netns", name)
        netns_add(name)
        self._netns.append(name)
        self.ip(name, "link", "set", "lo", "up")
        return name

    def _check_open(self) -> None:
        if self._closed:
            raise LabError("lab is closed")

    # -- commands ---------------------------------------------------------

    def run(
        self,
        ns: str | Node | Pod,
        *argv: str,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``ns`` (``ip netns exec``), capturing text output."""
        return sh(*ns_argv(_ns_of(ns), argv), check=check, timeout=timeout, input=input)

    def ip(self, ns: str | Node | Pod, *args: str, check: bool = True) -> str:
        """``ip -n NS args...`` → stdout."""
        return sh("ip", "-n", _ns_of(ns), *args, check=check).stdout

    def bridge(self, ns: str | Node | Pod, *args: str, check: bool = True) -> str:
        return sh("bridge", "-n", _ns_of(ns), *args, check=check).stdout

    def ip_json(self, ns: str | Node | Pod, *args: str) -> list[dict]:
        out = sh("ip", "-j", "-n", _ns_of(ns), *args).stdout.strip()
        return json.loads(out) if out else []

    def link_stats(self, ns: str | Node | Pod, dev: str | None = None) -> dict[str, dict]:
        """Each link's counters in a namespace (`ip -s link`: "rx" and "tx", each
        bytes, packets, dropped, …), by link name; only `dev` when given."""
        args = ("-s", "link", "show", *(("dev", dev) if dev else ()))
        return {link["ifname"]: link.get("stats64") or {} for link in self.ip_json(ns, *args)}

    def sysctl(self, ns: str | Node | Pod, key: str, value: str | int) -> None:
        self.run(ns, "sysctl", "-q", "-w", f"{key}={value}")

    def spawn(
        self,
        ns: str | Node | Pod,
        argv: Sequence[str],
        *,
        log: str | Path | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen:
        """Start ``argv`` inside ``ns`` in its own session; stdout+stderr go to
        ``log`` (or are discarded).  Tracked: killed by PID at ``close``."""
        self._check_open()
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                ns_argv(_ns_of(ns), list(argv)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        finally:
            if log:
                out.close()
        self._procs.append(proc)
        self._state.add("pids", proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float = 3.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns the exit code."""
        stop_process(proc, grace_s)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    # -- underlay and nodes -----------------------------------------------

    def add_underlay(self, cidr: str | IPv4Network = "192.168.77.0/24", mtu: int = 1500) -> str:
        """The hub namespace with bridge ``br0`` (the nodes' shared L2)."""
        if self.hub is not None:
            raise LabError("underlay already exists")
        self.underlay = IPv4Network(cidr)
        self.underlay_mtu = mtu
        hub = self.add_netns("hub")
        self.hub = hub
        self.ip(hub, "link", "add", "br0", "mtu", str(mtu), "type", "bridge",
                "forward_delay", "0", "stp_state", "0")  # fmt: skip
        self.ip(hub, "link", "set", "br0", "up")
        # The hub stands for a switch. Where the host has br_netfilter (built in, or
        # loaded for Docker or Kubernetes), a new namespace's bridges pass every
        # frame through iptables: CPU a switch does not take from the nodes, and
        # that only some hosts spend (decisions §22). The nodes' own bridges keep it.
        self.run(hub, "sysctl", "-q", "-w", *(f"{k}=0" for k in HUB_BRIDGE_NETFILTER), check=False)
        return hub

    def hub_bridge_netfilter(self) -> dict[str, int]:
        """The hub's bridge-netfilter switches (empty without br_netfilter)."""
        if self.hub is None:
            raise LabError("add_underlay() first")
        out = self.run(self.hub, "sysctl", *HUB_BRIDGE_NETFILTER, check=False).stdout
        pairs = (line.split("=", 1) for line in out.splitlines() if "=" in line)
        return {k.strip(): int(v) for k, v in pairs}

    def add_node(self, name: str, *, mtu: int | None = None) -> Node:
        """A namespace with ``eth0`` (veth) on the hub bridge at ``.10+i``."""
        if self.hub is None or self.underlay is None:
            raise LabError("add_underlay() first")
        if any(n.name == name for n in self.nodes) or "-" in name:
            raise LabError(f"bad or duplicate node name {name!r}")
        i = len(self.nodes)
        mtu = mtu or self.underlay_mtu
        addr = self.underlay.network_address + 10 + i
        if addr not in self.underlay or addr == self.underlay.broadcast_address:
            raise LabError(f"no room for node {i} in {self.underlay}")
        ns = self.add_netns(name)
        for key in ("all", "default"):
            self.sysctl(ns, f"net.ipv4.conf.{key}.rp_filter", 0)
        self.sysctl(ns, "net.ipv4.ip_forward", 1)
        hub_end = f"vn{i}"
        self.ip(self.hub, "link", "add", hub_end, "mtu", str(mtu), "type", "veth",
                "peer", "name", "eth0", "netns", ns, "mtu", str(mtu))  # fmt: skip
        self.ip(self.hub, "link", "set", hub_end, "master", "br0", "up")
        self.sysctl(ns, "net.ipv4.conf.eth0.rp_filter", 0)
        self.ip(ns, "addr", "add", f"{addr}/{self.underlay.prefixlen}", "dev", "eth0")
        self.ip(ns, "link", "set", "eth0", "up")
        mac = self.link_mac(ns, "eth0")
        node = Node(name, ns, addr, "eth0", mac, self.underlay, mtu, i)
        self.nodes.append(node)
        return node

    def link_mac(self, ns: str | Node | Pod, dev: str) -> str:
        return self.ip_json(ns, "link", "show", "dev", dev)[0]["address"]

    # -- CNI and pods -------------------------------------------------------

    def add_cni(self, node: Node, subnet: str | IPv4Network, mtu: int | None = None) -> Cni:
        """``cni0`` bridge with ``subnet.1/len``, up (CNI bridge plugin, isGateway)."""
        subnet = IPv4Network(subnet)
        if node.name in self.cnis:
            raise LabError(f"{node.name} already has cni0")
        mtu = mtu or node.mtu
        gw = subnet.network_address + 1
        self.ip(node, "link", "add", "cni0", "mtu", str(mtu), "type", "bridge",
                "forward_delay", "0", "stp_state", "0")  # fmt: skip
        self.ip(node, "addr", "add", f"{gw}/{subnet.prefixlen}", "dev", "cni0")
        self.ip(node, "link", "set", "cni0", "up")
        cni = Cni(node, subnet, gw, mtu)
        self.cnis[node.name] = cni
        return cni

    def add_pod(
        self,
        node: Node,
        ip: str | IPv4Address | None = None,
        *,
        mtu: int | None = None,
        gateway: str | IPv4Address | None = None,
    ) -> Pod:
        """A pod namespace with ``eth0`` veth into the node's ``cni0``,
        ``ip/len`` and a default route via the cni0 address (inside the lab)."""
        cni = self.cnis.get(node.name)
        if cni is None:
            raise LabError(f"add_cni({node.name}) first")
        j = self._pod_count.get(node.name, 0)
        self._pod_count[node.name] = j + 1
        addr = IPv4Address(ip) if ip is not None else cni.subnet.network_address + 2 + j
        if addr not in cni.subnet:
            raise LabError(f"{addr} is not in {node.name}'s pod subnet {cni.subnet}")
        gw = IPv4Address(gateway) if gateway is not None else cni.gateway
        mtu = mtu or cni.mtu
        short = f"{node.name}-p{j}"
        ns = self.add_netns(short)
        node_end = f"vp{j}"
        self.ip(node, "link", "add", node_end, "mtu", str(mtu), "type", "veth",
                "peer", "name", "eth0", "netns", ns, "mtu", str(mtu))  # fmt: skip
        self.ip(node, "link", "set", node_end, "master", cni.name, "up")
        self.ip(ns, "addr", "add", f"{addr}/{cni.subnet.prefixlen}", "dev", "eth0")
        self.ip(ns, "link", "set", "eth0", "up")
        self.ip(ns, "route", "add", "default", "via", str(gw), "dev", "eth0")
        pod = Pod(short, ns, addr, node, cni.subnet.prefixlen, mtu, node_end)
        self.pods.append(pod)
        return pod

    def udp_gro_forwarding(self, pod: Pod, flush_timeout_ns: int = FLUSH_TIMEOUT_NS) -> None:
        """GRO for the pod's UDP datagrams on their way through the node (the knob
        Tailscale gives for userspace TUN forwarders): `gro on` gives the node's veth
        end a NAPI, rx-udp-gro-forwarding lets it merge datagrams of one flow that
        no local socket takes, and gro_flush_timeout keeps a merged packet open
        across polls (a veth polls as each datagram is sent, so without it nothing
        merges). A lone datagram may wait up to the timeout. The same knob as
        `weft agent --pod-udp-gro` (control.podgro), set here with ethtool and sysfs
        through `ip netns exec`, whose /sys is the node's."""
        dev = pod.node_end
        self.run(pod.node, "ethtool", "-K", dev, "gro", "on", "rx-udp-gro-forwarding", "on")
        timeout = f"/sys/class/net/{dev}/gro_flush_timeout"
        self.run(pod.node, "sh", "-c", f"echo {int(flush_timeout_ns)} > {timeout}")

    # -- probes ---------------------------------------------------------------

    def ping_output(
        self,
        src: str | Node | Pod,
        dst_ip: str | IPv4Address,
        count: int = 3,
        timeout_s: float = 5.0,
        *,
        size: int | None = None,
        interval_s: float = 0.2,
        dont_fragment: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ping`` in ``src``'s namespace; never raises on loss."""
        argv = ["ping", "-n", "-c", str(count), "-i", str(interval_s),
                "-W", "1", "-w", str(max(1, int(timeout_s + 0.999)))]  # fmt: skip
        if size is not None:
            argv += ["-s", str(size)]
        if dont_fragment:
            argv += ["-M", "do"]
        argv.append(str(dst_ip))
        return self.run(src, *argv, check=False, timeout=timeout_s + 10)

    def ping(
        self,
        src: str | Node | Pod,
        dst_ip: str | IPv4Address,
        count: int = 3,
        timeout_s: float = 5.0,
        **kw: object,
    ) -> bool:
        """True if all ``count`` echo replies came back within ``timeout_s``."""
        return self.ping_output(src, dst_ip, count, timeout_s, **kw).returncode == 0  # type: ignore[arg-type]

    def wait_ping(
        self, src: str | Node | Pod, dst_ip: str | IPv4Address, timeout_s: float = 10.0
    ) -> bool:
        """Ping once a second until one reply arrives or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.ping(src, dst_ip, count=1, timeout_s=1):
                return True
            if time.monotonic() >= deadline:
                return False

    def capture(
        self,
        ns: str | Node | Pod,
        iface: str,
        path: str | Path,
        filter: str = "",
        *,
        snaplen: int = 0,
        ready_timeout_s: float = 5.0,
    ) -> subprocess.Popen:
        """Start ``tcpdump`` on ``iface`` in ``ns`` writing a pcap to ``path``;
        returns once tcpdump is listening.  ``lab.stop(proc)`` flushes the file."""
        path = Path(path)
        log = path.with_suffix(path.suffix + ".log")
        log.unlink(missing_ok=True)
        # -B: a 32 MiB capture buffer. With the default (2 MiB) tcpdump dropped a third
        # of a 3 MB transfer's frames when the machine was busy.
        argv = ["tcpdump", "-n", "-U", "-Z", "root", "-B", "32768", "-i", iface, "-w", str(path)]
        if snaplen:
            argv += ["-s", str(snaplen)]
        if filter:
            argv.append(filter)
        proc = self.spawn(ns, argv, log=log)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"tcpdump exited: {log.read_text(errors='replace').strip()}")
            if log.exists() and "listening on" in log.read_text(errors="replace"):
                return proc
            time.sleep(0.05)
        self.stop(proc)
        raise LabError(f"tcpdump on {iface} in {_ns_of(ns)} did not start")

    def stop_capture(
        self, proc: subprocess.Popen, path: str | Path, *, timeout_s: float = 5.0
    ) -> None:
        """Stop a ``capture`` once its pcap holds at least one packet (or after
        ``timeout_s``): tcpdump loses what is still queued in the kernel when it
        is stopped, so stopping right after the traffic can leave the file empty."""
        path = Path(path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_size > 24:  # more than the pcap header
                break
            time.sleep(0.05)
        time.sleep(0.3)  # the rest of the burst
        self.stop(proc)


def wire_like(lab: Lab, node: Node) -> None:
    """Checksums filled on the node, as a NIC fills them on a real wire.

    A veth carries CHECKSUM_PARTIAL packets with the checksum still unfilled;
    the kernel's own VXLAN receiver trusts that, a userspace receiver can't.
    """
    lab.run(node, "ethtool", "-K", node.underlay_iface, "tx", "off")


# -- kernel peers made as flanneld makes them (flannel-facts §3b, §3c) ----------


def _subnet_gw(subnet: IPv4Network) -> IPv4Address:
    return subnet.network_address  # flannel's VTEP address: the lease's .0


def make_kernel_vxlan(
    lab: Lab,
    node: Node,
    subnet: str | IPv4Network,
    *,
    vni: int = 1,
    port: int = 8472,
    mac: str | bytes | None = None,
    mtu: int | None = None,
) -> str:
    """``flannel.<VNI>`` as flanneld makes it: vxlan id VNI dstport PORT local
    <underlay ip> dev eth0 nolearning udpcsum, address ``subnet.0/32``, MTU
    underlay−50, up.  Returns its MAC (the lease's VtepMAC)."""
    subnet = IPv4Network(subnet)
    dev = f"flannel.{vni}"
    mtu = mtu or node.mtu - VXLAN_OVERHEAD
    argv = ["link", "add", dev]
    if mac is not None:
        argv += ["address", mac_str(mac)]
    argv += ["mtu", str(mtu), "type", "vxlan", "id", str(vni), "dstport", str(port),
             "local", str(node.underlay_ip), "dev", node.underlay_iface,
             "nolearning", "udpcsum"]  # fmt: skip
    lab.ip(node, *argv)
    lab.ip(node, "addr", "add", f"{_subnet_gw(subnet)}/32", "dev", dev)
    lab.ip(node, "link", "set", dev, "up")
    return lab.link_mac(node, dev)


def add_kernel_vxlan_peer(
    lab: Lab,
    node: Node,
    *,
    vni: int = 1,
    peer_subnet: str | IPv4Network,
    peer_mac: str | bytes,
    peer_public_ip: str | IPv4Address,
) -> None:
    """flanneld's three entries for a remote lease: neigh, fdb, onlink route."""
    subnet = IPv4Network(peer_subnet)
    dev = f"flannel.{vni}"
    gw = str(_subnet_gw(subnet))
    mac = mac_str(peer_mac)
    lab.ip(node, "neigh", "replace", gw, "lladdr", mac, "dev", dev, "nud", "permanent")
    lab.bridge(node, "fdb", "replace", mac, "dev", dev, "dst", str(peer_public_ip),
               "self", "permanent")  # fmt: skip
    lab.ip(node, "route", "replace", str(subnet), "via", gw, "dev", dev, "onlink")


def remove_kernel_vxlan_peer(
    lab: Lab,
    node: Node,
    *,
    vni: int = 1,
    peer_subnet: str | IPv4Network,
    peer_mac: str | bytes,
    peer_public_ip: str | IPv4Address,
) -> None:
    """EventRemoved: delete route, neigh and fdb entry; missing ones are ignored."""
    subnet = IPv4Network(peer_subnet)
    dev = f"flannel.{vni}"
    gw = str(_subnet_gw(subnet))
    lab.ip(node, "route", "del", str(subnet), "via", gw, "dev", dev, "onlink", check=False)
    lab.ip(node, "neigh", "del", gw, "dev", dev, check=False)
    lab.bridge(node, "fdb", "del", mac_str(peer_mac), "dev", dev, "dst", str(peer_public_ip),
               "self", check=False)  # fmt: skip


def add_kernel_hostgw_route(
    lab: Lab, node: Node, peer_subnet: str | IPv4Network, peer_public_ip: str | IPv4Address
) -> None:
    """host-gw: ``ip route replace <subnet> via <PublicIP> dev eth0``."""
    lab.ip(node, "route", "replace", str(IPv4Network(peer_subnet)), "via", str(peer_public_ip),
           "dev", node.underlay_iface)  # fmt: skip


def node_interface(lab: Lab, node: Node, dev: str) -> list[IPv4Interface]:
    """IPv4 addresses on ``dev`` in ``node`` (from ``ip -j addr``)."""
    out: list[IPv4Interface] = []
    for link in lab.ip_json(node, "-4", "addr", "show", "dev", dev):
        for a in link.get("addr_info", []):
            out.append(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}"))
    return out
