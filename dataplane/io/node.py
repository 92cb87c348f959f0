"""A userspace dataplane node: device + sockets + forwarder + engine, set up and torn down.

This is what the control plane drives (add_peer / remove_peer), and what
`weft dataplane run` drives from static peers. It owns the kernel state it
creates: the TUN/TAP device (which disappears, with its routes and
neighbours, when its fd closes) and, in TAP mode, the per-peer neighbour and
route entries that mirror flannel.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Literal

from dataplane import egress_thread, gc_pauses
from dataplane.backends.base import Backend
from dataplane.backends.hostgw import HostGwBackend
from dataplane.backends.udp import UdpBackend
from dataplane.backends.vxlan import VxlanBackend
from dataplane.egress_thread import EgressThreadPolicy
from dataplane.forwarder import Forwarder
from dataplane.io import cpus, egress_tap, fastpath, netlink, offloads, packet_gso
from dataplane.io.idle import KEEP_WARM_MAX_US, KEEP_WARM_MIN_US
from dataplane.io.offloads import FastPaths
from dataplane.io.queues import (
    QueueWorkers,
    add_counts,
    attach_steering,
    attach_tun_steering,
    queues_error,
)
from dataplane.io.runner import Engine
from dataplane.io.sockets import (
    ETH_P_ARP,
    MAX_SOURCE_PORTS,
    SOURCE_PORTS,
    SourcePorts,
    open_packet_socket,
    open_udp_socket,
)
from dataplane.io.tun import TunDevice, open_tun
from dataplane.packet.arp import ArpOp, build_arp, parse_arp
from dataplane.packet.errors import DecodeError
from dataplane.packet.ethernet import mac_to_str
from dataplane.peers import Peer
from dataplane.trace import Subscription, Tracer

log = logging.getLogger("weft.dataplane")

BackendName = Literal["vxlan", "udp", "host-gw"]


DEVICE_QUEUE = 1000  # packets (tx_queue_len)


@dataclass
class NodeSpec:
    """Everything the dataplane needs to know about this node."""

    backend: BackendName
    network: IPv4Network  # the whole cluster network (routed into the device)
    subnet: IPv4Network  # this node's lease
    public_ip: IPv4Address  # address peers send to; the UDP socket binds it
    underlay_iface: str
    underlay_mtu: int = 1500
    device: Literal["tun", "tap"] = "tun"
    vni: int = 1
    port: int = 0  # 0: the backend's default (vxlan 8472, udp 8285)
    vtep_mac: bytes | None = None
    accept_any_source: bool = False
    device_name: str = field(default="")
    #: Fast paths (dataplane/io/fastpath.py): auto uses what the kernel accepts,
    #: on fails start-up when it refuses one, off runs the plain engine.
    offload: Literal["auto", "on", "off"] = "auto"
    #: Busy polling (dataplane/io/runner.py): keep polling this many µs after the
    #: last packet instead of sleeping; 0 sleeps in epoll at once.
    busy_poll_us: int = 0
    #: Keeping warm (dataplane/io/runner.py, idle.KeepWarm): while traffic is sporadic,
    #: a pass over the packet path every this many µs without a packet; 0: off.
    keep_warm_us: int = 0
    #: Queues (dataplane/io/queues.py): the device and the socket get this many
    #: queues, each served by its own process; a flow stays on one of them.
    queues: int = 1
    #: vxlan: how many outer UDP source ports flows are spread over, one per flow by
    #: a hash of the inner flow, as the kernel's VXLAN device does (sockets.SourcePorts);
    #: 0 sends everything from the listening port. flannel's udp backend always does.
    source_ports: int = SOURCE_PORTS
    #: CPUs (dataplane/io/cpus.py): queue q's process runs on cpus[q % len(cpus)] and
    #: the kernel's work behind its egress writes goes to steer_cpus (RPS); () leaves
    #: both to the scheduler. The CLI fills steer_cpus with the CPUs left over.
    cpus: tuple[int, ...] = ()
    steer_cpus: tuple[int, ...] = ()
    #: --egress-thread: the egress TAP's NAPI in a kernel thread, so that the kernel
    #: segments and sends super-packets beside weft, not inside its writes (§20):
    #: "on", "off", or "auto" (on while weft is the limit and a CPU is idle: §23)
    egress_thread: str = "auto"

    def __post_init__(self) -> None:
        self.cpus, self.steer_cpus = tuple(self.cpus), tuple(self.steer_cpus)  # from JSON
        if self.device == "tap" and self.backend != "vxlan":
            raise ValueError("--device tap is only for the vxlan backend")
        if not self.device_name:
            self.device_name = f"weft.{self.vni}" if self.backend == "vxlan" else "weft0"
        if self.offload not in ("auto", "on", "off"):
            raise ValueError(f"--offload {self.offload!r}: expected auto, on or off")
        if not 0 <= self.busy_poll_us <= 1_000_000:
            raise ValueError(f"--busy-poll {self.busy_poll_us}: expected 0..1000000 µs")
        if self.keep_warm_us and not KEEP_WARM_MIN_US <= self.keep_warm_us <= KEEP_WARM_MAX_US:
            raise ValueError(
                f"--keep-warm {self.keep_warm_us}: expected 0 (off) or "
                f"{KEEP_WARM_MIN_US}..{KEEP_WARM_MAX_US} µs"
            )
        if not 0 <= self.source_ports <= MAX_SOURCE_PORTS:
            raise ValueError(f"--source-ports {self.source_ports}: expected 0..{MAX_SOURCE_PORTS}")
        problem = queues_error(self.backend, self.queues)
        if problem:
            raise ValueError(problem)
        if isinstance(self.egress_thread, bool):  # (a spec from before "auto")
            self.egress_thread = "on" if self.egress_thread else "off"
        if self.egress_thread not in ("auto", "on", "off"):
            raise ValueError(f"--egress-thread {self.egress_thread!r}: expected auto, on or off")


#: The auto policy's thresholds instead of its defaults (for tests and experiments):
#: on_busy,on_idle,off_idle,off_busy[,bulk_bytes,gain,keep,drop]
#: (dataplane/egress_thread.py).
EGRESS_POLICY_ENV = "WEFT_EGRESS_POLICY"


def egress_policy() -> EgressThreadPolicy:
    text = os.environ.get(EGRESS_POLICY_ENV)
    if not text:
        return EgressThreadPolicy()
    try:
        return EgressThreadPolicy.parse(text)
    except ValueError as exc:
        raise ValueError(f"{EGRESS_POLICY_ENV}: {exc}") from None


def make_backend(spec: NodeSpec, underlay_mac: bytes) -> Backend:
    if spec.backend == "vxlan":
        if spec.vtep_mac is None:
            raise ValueError("the vxlan backend needs a VtepMAC")
        return VxlanBackend(spec.vni, spec.vtep_mac, port=spec.port, l2=spec.device == "tap")
    if spec.backend == "udp":
        return UdpBackend(port=spec.port)
    if spec.backend == "host-gw":
        return HostGwBackend(underlay_mac, netlink.interface_ipv4(spec.underlay_iface))
    raise ValueError(f"unknown backend {spec.backend!r} (weft has vxlan, udp, host-gw)")


class UserspaceDataplane:
    """Runs the engine for one node in the current network namespace.

    Queue 0 (the default) makes and configures the devices, and with
    `spec.queues` > 1 starts a worker process for every other queue
    (dataplane/io/queues.py), each of which builds one of these with its own
    `queue` index: it attaches to the devices queue 0 made and only moves packets.
    """

    def __init__(self, spec: NodeSpec, queue: int = 0) -> None:
        self.spec = spec
        self.queue = queue
        self.workers: QueueWorkers | None = None
        self.tun: TunDevice | None = None
        self.sock: socket.socket | None = None
        self.packet_sock: socket.socket | None = None
        self.arp_sock: socket.socket | None = None
        self.source_ports: SourcePorts | None = None
        self.engine: Engine | None = None
        self.tracer: Tracer | None = None
        self.forwarder: Forwarder | None = None
        self.backend: Backend | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resolver: asyncio.Task[None] | None = None
        self._want_resolve = asyncio.Event()
        self.fast: FastPaths | None = None
        self._egress_policy: asyncio.Task[None] | None = None
        self._rps: cpus.RpsSetting | None = None
        self.placement = ""  # where this process and the kernel's egress work run

    @property
    def device_mtu(self) -> int:
        return self.spec.underlay_mtu - (self.backend.overhead if self.backend else 0)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        spec = self.spec
        policy = egress_policy()
        underlay_mac = netlink.link_mac(spec.underlay_iface)
        self.backend = backend = make_backend(spec, underlay_mac)
        self.forwarder = Forwarder(
            backend,
            underlay_mtu=spec.underlay_mtu,
            local_ip=spec.subnet.network_address,
            accept_any_source=spec.accept_any_source,
        )
        tap = spec.device == "tap"
        owner = self.queue == 0
        multi_queue = spec.queues > 1
        try:
            if backend.transport == "packet":
                # host-gw: whether the device may hand out super-packets depends on
                # the AF_PACKET socket taking vnet headers, so the socket comes first.
                self.packet_sock = open_packet_socket(spec.underlay_iface)
            if spec.offload == "off":
                self.tun = open_tun(spec.device_name, tap=tap, multi_queue=multi_queue)
            elif self.packet_sock is not None:
                self.tun, self.fast = packet_gso.open_hostgw_device(
                    spec.device_name, self.packet_sock, mode=spec.offload
                )
            else:
                self.tun, self.fast = offloads.open_pod_device(
                    spec.device_name, tap=tap, mode=spec.offload, multi_queue=multi_queue
                )
            if owner:
                self._configure_device(tap)
                if multi_queue:
                    self._steer_device(tap)
            if backend.transport == "udp":
                port = backend.port  # type: ignore[attr-defined]
                self.sock = open_udp_socket(str(spec.public_ip), port, reuse_port=multi_queue)
                if owner and multi_queue:
                    self._steer(self.sock)
                if self.fast is not None:
                    self.engine = self._fast_engine(underlay_mac, port)
                else:
                    self.engine = Engine(self.forwarder, self.tun.fileno(), self.sock)
                if backend.name == "vxlan" and spec.source_ports:
                    self.source_ports = SourcePorts(str(spec.public_ip), spec.source_ports)
                    self.engine.use_source_ports(self.source_ports)
            else:
                assert self.packet_sock is not None
                self.arp_sock = open_packet_socket(spec.underlay_iface, ETH_P_ARP)
                if self.fast is not None:
                    self.fast.log_summary()
                if self.fast is not None and self.fast.on["packet_gso"]:
                    self.engine = packet_gso.PacketGsoEngine(
                        self.forwarder, self.tun.fileno(), self.packet_sock, self.fast
                    )
                else:
                    self.engine = Engine(
                        self.forwarder, self.tun.fileno(), None, send_socket=self.packet_sock
                    )
                self.engine.after_batch = self._check_unresolved
                loop.add_reader(self.arp_sock.fileno(), self._on_arp)
                self._resolver = loop.create_task(self._resolve_loop())
            if owner:
                netlink.sysctl_set("net/ipv4/ip_forward", "1")
            self.tracer = Tracer(
                backend.name,
                local_ip=spec.public_ip,
                local_mac=underlay_mac,
                port=getattr(backend, "port", 0),
                l2_device=tap,
                clock=time.time,
            )
            if multi_queue:
                self.tracer.queue = self.queue
            if self.source_ports is not None:
                self.tracer.source_ports = self.source_ports
            self.engine.tracer = self.tracer
            self.engine.busy_poll_ns = spec.busy_poll_us * 1000
            self.engine.keep_warm_ns = spec.keep_warm_us * 1000
            if (
                spec.egress_thread == "on"
                and owner
                and (self.fast is None or self.fast.egress is None)
            ):
                why = self.fast.why_off.get("tunnel_gso") if self.fast else "--offload off"
                log.warning(
                    "--egress-thread does nothing here: weft writes to no egress TAP (%s)",
                    why or "host-gw sends on the underlay",
                )
            if spec.cpus:
                self._place()
            self.engine.start(loop)
            self._loop = loop
            if owner and multi_queue:
                self.workers = QueueWorkers(spec, loop)
                self.workers.start()
            if self.fast is not None and self.fast.egress_thread_mode == "auto" and owner:
                self._egress_policy = loop.create_task(self._egress_policy_loop(policy))
            gc_pauses.settle_soon(loop)
        except BaseException:
            self.stop()
            raise
        log.info(
            "dataplane up: %s on %s (%s, mtu %d%s), underlay %s %s%s",
            backend.name,
            spec.device_name,
            spec.device,
            self.device_mtu,
            f", queue {self.queue} of {spec.queues}" if multi_queue else "",
            spec.underlay_iface,
            spec.public_ip,
            f", {self.placement}" if self.placement else "",
        )

    async def _egress_policy_loop(self, policy: EgressThreadPolicy) -> None:
        """--egress-thread auto: each window, the CPU of this process (and of every
        queue's: the busiest counts), the bytes sent and the machine's idle CPU decide
        whether the kernel thread sends (dataplane/egress_thread.py)."""
        fast, fwd, workers = self.fast, self.forwarder, self.workers
        assert fast is not None and fwd is not None
        sent = fwd.counters
        totals = egress_thread.QueueTotals()

        async def sample() -> dict[int, egress_thread.QueueSample]:
            now = time.monotonic(), time.process_time(), sent.tx_bytes, sent.tx_packets
            out = {0: egress_thread.QueueSample(*now)}
            if workers is not None:
                out.update(await workers.sample())
            return out

        try:
            meter = cpus.CpuMeter()
            totals.step(await sample())
            while True:
                await asyncio.sleep(egress_thread.WINDOW_S)
                busy, rate, datagram = totals.step(await sample())
                idle, machine = meter.sample()
                window = egress_thread.Window(busy, idle, rate, datagram, machine)
                want = policy.observe(window)
                log.debug("egress thread %s: %s", policy.state, window)
                if want is not None and not await self._switch_egress_thread(want, window):
                    return
        except (OSError, ValueError) as exc:
            log.warning("--egress-thread auto: cannot measure CPU time (%s): the thread "
                        "stays %s", exc, "on" if fast.egress_thread else "off")  # fmt: skip
            fast.egress_thread_mode = "on" if fast.egress_thread else "off"

    async def _switch_egress_thread(self, on: bool, window: egress_thread.Window) -> bool:
        """The TAP's NAPI into its kernel thread or out of it, and every queue told:
        the workers before the thread comes on (they order their flows from then
        on), after it has gone off (until then they still order). False: the kernel
        refused, and auto is given up (said once)."""
        fast, workers = self.fast, self.workers
        assert fast is not None
        began = time.monotonic()
        late = await workers.egress_thread_switched(True) if on and workers else 0
        # (the switch blocks this loop: the kernel may wait for its thread)
        name = egress_tap.egress_name(self.spec.device_name)
        if not egress_tap.switch_egress_thread(fast, name, on):
            if on and workers:
                await workers.egress_thread_switched(False)
            return False
        self.egress_thread_switched(on)
        if not on and workers:
            late = await workers.egress_thread_switched(False)
        log.info(
            "--egress-thread auto: the kernel thread %s (weft %.0f %% of a CPU%s, "
            "%.1f CPUs idle, %.2f Gbit/s; switched in %.1f ms)%s",
            "tried" if on else "off",
            100 * window.busy,
            " in its busiest queue" if workers else "",
            window.idle,
            window.rate * 8e-9,
            1e3 * (time.monotonic() - began),
            f"; {late} queue worker(s) did not answer in time" if late else "",
        )
        return True

    def egress_thread_switched(self, on: bool) -> None:
        """The TAP's NAPI goes into (`on`) or has left its kernel thread: this
        queue's engine orders its flows' packets accordingly (FastEngine)."""
        if self.fast is not None:
            self.fast.egress_thread = on
        if isinstance(self.engine, fastpath.FastEngine):
            self.engine.egress_thread_switched(on)

    def _place(self) -> None:
        """This process on its CPU; with the egress TAP (tunnel GSO), RPS on its queue
        so that the kernel segments and forwards what weft writes on the other CPUs."""
        spec = self.spec
        cpu = cpus.Placement(spec.cpus, spec.steer_cpus).cpu_of(self.queue)
        try:
            cpus.pin(cpu)
        except OSError as exc:  # offline since start-up, or outside this cgroup's cpuset
            raise ValueError(f"--cpus: cannot run on CPU {cpu}: {exc.strerror}") from None
        self.placement = f"CPU {cpu}"
        if self.fast is None or self.fast.egress is None:
            return  # nothing written to a TAP: no kernel work to steer
        if not spec.steer_cpus:
            self.placement += "; egress work stays on it (no other CPU left for RPS)"
            return
        rps = cpus.RpsSetting(egress_tap.egress_name(spec.device_name), self.queue)
        try:
            rps.apply(spec.steer_cpus)
        except OSError as exc:
            self.placement += "; egress work stays on it"
            log.warning("RPS on %s refused (%s): the kernel's work behind egress writes "
                        "stays on CPU %d", rps.path, exc, cpu)  # fmt: skip
            return
        self._rps = rps
        self.placement += f"; egress work on CPU {cpus.format_cpu_list(spec.steer_cpus)} (RPS)"

    def _steer(self, sock: socket.socket) -> None:
        """Datagrams to the queue of their inner flow (queues.steering_program)."""
        ip_off = 22 if self.spec.backend == "vxlan" else 0
        try:
            attach_steering(sock, ip_off, self.spec.queues)
        except OSError as exc:
            log.warning(
                "SO_ATTACH_REUSEPORT_CBPF refused (%s): datagrams go to queues by their "
                "outer addresses and ports, so a sender with one source port uses one queue",
                exc,
            )

    def _steer_device(self, tap: bool) -> None:
        """Packets to the device queue of their flow (queues.tun_steering_program)."""
        assert self.tun is not None
        try:
            attach_tun_steering(self.tun.fileno(), 14 if tap else 0)
        except OSError as exc:
            log.warning(
                "TUNSETSTEERINGEBPF refused (%s): the device picks each flow's queue "
                "itself (the queue that last wrote the flow's other direction)",
                exc,
            )

    def _fast_engine(self, underlay_mac: bytes, port: int) -> Engine:
        """The probes that need the device up and the socket open, then the engine."""
        fast, spec = self.fast, self.spec
        assert fast is not None and self.tun is not None and self.sock is not None
        assert self.forwarder is not None
        if fast.on["tso_read"]:
            # Super-packets leave through the egress TAP (the kernel cuts them), or,
            # without it, are cut in userspace and sent with UDP_SEGMENT (or one
            # datagram per call): either way weft asks the device for them.
            owner = self.queue == 0
            egress_tap.open_egress_tap(
                fast,
                spec.device_name,
                multi_queue=spec.queues > 1,
                attach=not owner,
                thread=spec.egress_thread,
            )
            offloads.probe_uso_read(self.tun, fast)
            if fast.egress is not None and owner:
                try:
                    offloads.limit_gso_size(spec.device_name)
                except OSError as exc:
                    log.debug("gso_max_size on %s: %s", spec.device_name, exc)
        else:
            fast.why_off.setdefault("tunnel_gso", "used only with tso_read")
            fast.why_off.setdefault("uso_read", "needs tso_read")
        offloads.setup_socket(fast, self.sock)
        engine = fastpath.FastEngine(
            self.forwarder,
            self.tun.fileno(),
            self.sock,
            fast,
            public_ip=str(spec.public_ip),
            underlay_mac=underlay_mac,
            port=port,
        )
        engine.on_first_error = lambda what: log.warning("fast path: %s", what)
        if self.queue == 0:
            fast.log_summary()
        return engine

    def _configure_device(self, tap: bool) -> None:
        spec = self.spec
        name = spec.device_name
        # weft's overlay is IPv4: without this the kernel's IPv6 link-local chatter
        # (router solicitations, MLD) reaches the engine and shows up as drops.
        with contextlib.suppress(netlink.NetlinkError):
            netlink.sysctl_set(f"net/ipv6/conf/{name}/disable_ipv6", 1)
        if tap:
            netlink.set_link(name, mac=spec.vtep_mac)
        # A TUN's queue (what the kernel holds for weft to read) defaults to 500
        # packets; flannel's proxy dropped under TCP bursts until it had 1000.
        netlink.set_link(name, mtu=self.device_mtu, txqlen=DEVICE_QUEUE, up=True)
        # As flannel: the lease's .0 address as a /32, so the device owns an
        # address in the network without a connected route for the whole subnet.
        netlink.add_address(name, f"{spec.subnet.network_address}/32")
        # ICMP errors weft writes back come from the device's own address: the
        # kernel calls that a martian unless the device accepts local sources.
        netlink.sysctl_set(f"net/ipv4/conf/{name}/accept_local", 1)
        if not tap:
            # Everything in the cluster network that is not local goes to weft;
            # the node's own subnet stays on cni0 (a longer prefix).
            netlink.replace_route(str(spec.network), dev=name)

    def add_peer(self, peer: Peer) -> None:
        assert self.forwarder is not None
        if self.spec.device == "tap" and peer.vtep_mac is not None and self.queue == 0:
            # flannel.1's chain: route → permanent neighbour (the peer's .0 → VtepMAC);
            # weft's forwarder holds the FDB (VtepMAC → public IP).
            gw = str(peer.subnet.network_address)
            netlink.replace_neigh(gw, peer.vtep_mac, self.spec.device_name)
            netlink.replace_route(str(peer.subnet), dev=self.spec.device_name, via=gw, onlink=True)
        if isinstance(self.backend, HostGwBackend) and not self.backend.is_onlink(peer.public_ip):
            log.error(
                "host-gw peer %s (subnet %s) is not on a connected network of %s: "
                "host-gw needs shared L2; its traffic is dropped (not_onlink)",
                peer.public_ip,
                peer.subnet,
                self.spec.underlay_iface,
            )
        self.forwarder.add_peer(peer)
        if self.workers is not None:
            self.workers.add_peer(peer)

    def remove_peer(self, subnet: IPv4Network) -> Peer | None:
        assert self.forwarder is not None
        peer = self.forwarder.remove_peer(subnet)
        if self.workers is not None:
            self.workers.remove_peer(subnet)
        if peer is not None and self.spec.device == "tap" and self.queue == 0:
            netlink.delete_route(str(subnet), dev=self.spec.device_name)
            netlink.delete_neigh(str(subnet.network_address), self.spec.device_name)
        return peer

    # -- host-gw gateway resolution (kernel neighbour table first, then ARP) --------

    def _check_unresolved(self) -> None:
        backend = self.backend
        if isinstance(backend, HostGwBackend) and backend.unresolved:
            self._want_resolve.set()

    async def _resolve_loop(self) -> None:
        backend = self.backend
        assert isinstance(backend, HostGwBackend)
        while True:
            await self._want_resolve.wait()
            self._want_resolve.clear()
            for gateway in list(backend.unresolved):
                if not backend.is_onlink(gateway):
                    backend.unresolved.discard(gateway)
                    continue
                mac = netlink.lookup_neigh(str(gateway), self.spec.underlay_iface)
                if mac is not None:
                    backend.learn(gateway, mac)
                else:
                    self._send_arp_request(gateway)
            await asyncio.sleep(0.2)  # at most five ARP rounds a second
            if backend.unresolved:
                self._want_resolve.set()

    def _send_arp_request(self, gateway: IPv4Address) -> None:
        # The ARP socket sends it: the data socket may expect a vnet header (packet_gso).
        assert self.arp_sock is not None and isinstance(self.backend, HostGwBackend)
        arp = build_arp(
            ArpOp.REQUEST,
            self.backend.underlay_mac,
            self.spec.public_ip.packed,
            b"\x00" * 6,
            gateway.packed,
        )
        frame = b"\xff" * 6 + self.backend.underlay_mac + b"\x08\x06" + arp
        try:
            self.arp_sock.send(frame)
        except OSError as exc:
            log.warning("ARP request for %s failed: %s", gateway, exc)

    def _on_arp(self) -> None:
        assert self.arp_sock is not None and isinstance(self.backend, HostGwBackend)
        for _ in range(64):
            try:
                frame = self.arp_sock.recv(2048)
            except BlockingIOError:
                return
            try:
                arp = parse_arp(memoryview(frame)[14:])
            except DecodeError:
                continue
            sender = IPv4Address(arp.sender_ip)
            # Learn replies for gateways we asked for, and refresh known ones.
            if sender in self.backend.unresolved or sender in self.backend.neighbours:
                self.backend.learn(sender, arp.sender_mac)

    async def refresh(self) -> None:
        """Bring the other queues' counters up to now before a status is read."""
        if self.workers is not None:
            await self.workers.refresh()

    def status(self) -> dict[str, object]:
        """What `weft status` shows of this dataplane."""
        spec = self.spec
        fwd = self.forwarder
        out: dict[str, object] = {
            "backend": spec.backend,
            "device": spec.device_name,
            "device_kind": spec.device,
            "device_mtu": self.device_mtu,
            "subnet": str(spec.subnet),
            "network": str(spec.network),
            "public_ip": str(spec.public_ip),
            "vtep_mac": mac_to_str(spec.vtep_mac) if spec.vtep_mac else None,
            "vni": spec.vni,
            "port": getattr(self.backend, "port", None),
            "source_ports": self.source_ports.ports if self.source_ports else [],
            "peers": [
                {
                    "subnet": str(p.subnet),
                    "public_ip": str(p.public_ip),
                    "vtep_mac": mac_to_str(p.vtep_mac) if p.vtep_mac else None,
                }
                for p in (fwd.peers() if fwd else [])
            ],
            "counters": fwd.counters.as_dict() if fwd else {},
            "offload": self._offload_status(),
            "busy_poll_us": self.spec.busy_poll_us,
            "keep_warm_us": self.spec.keep_warm_us,
            "placement": self.placement,
        }
        pauses = gc_pauses.watched()
        if pauses is not None:
            out["gc"] = pauses.as_dict()  # this process's (queue 0's with --queues)
        if self.workers is not None:
            # Counters are the whole node's: queue 0's plus every worker's last report.
            counters, fast = self.workers.counters()
            out["counters"] = add_counts(out["counters"], counters)  # type: ignore[arg-type]
            offload = out["offload"]
            if isinstance(offload, dict) and "counters" in offload:
                offload["counters"] = add_counts(offload["counters"], fast)
            out["queues"] = self.workers.status()
        return out

    def _offload_status(self) -> dict[str, object]:
        """Which fast paths are on (dataplane/io/offloads.py), and why the others are off."""
        if self.fast is not None:
            return self.fast.status()
        off = dict.fromkeys(offloads.PATHS, "--offload off")
        return {"mode": self.spec.offload, "on": [], "off": off}

    async def trace_stream(self, request: dict[str, object]) -> AsyncIterator[dict[str, object]]:
        """`weft trace live`: events as they come, a heartbeat each second meanwhile."""
        if self.tracer is None:
            yield {"error": "the dataplane is not running"}
            return
        sub = Subscription.from_request(request)
        ready = asyncio.Event()
        sub.wakeup = ready.set
        self.tracer.subscribe(sub)
        # The other queues' processes trace too; their events join this stream.
        tracer = self.tracer
        remote = (
            self.workers.trace(request, lambda events: tracer.take(sub, events))
            if self.workers is not None
            else None
        )
        try:
            while True:
                while sub.events:
                    yield sub.events.popleft()
                if sub.done:
                    return
                ready.clear()
                try:
                    await asyncio.wait_for(ready.wait(), 1.0)
                except TimeoutError:
                    yield {"heartbeat": time.time(), "lost": sub.lost}
        finally:
            self.tracer.unsubscribe(sub)
            if remote is not None and self.workers is not None:
                self.workers.untrace(remote)

    # -- teardown ------------------------------------------------------------------

    def stop(self) -> None:
        loop = self._loop
        if self.workers is not None:
            self.workers.stop()  # their queues detach as they exit
            self.workers = None
        if self.engine is not None:
            self.engine.stop()
            self.engine = None
        if self._resolver is not None:
            self._resolver.cancel()
            self._resolver = None
        if self._egress_policy is not None:
            self._egress_policy.cancel()
            self._egress_policy = None
        if self.arp_sock is not None:
            if loop is not None:
                loop.remove_reader(self.arp_sock.fileno())
            self.arp_sock.close()
            self.arp_sock = None
        for sock in (self.sock, self.packet_sock):
            if sock is not None:
                sock.close()
        self.sock = self.packet_sock = None
        if self.source_ports is not None:
            self.source_ports.close()
            self.source_ports = None
        if self._rps is not None:
            self._rps.restore()
            self._rps = None
        if self.fast is not None:
            self.fast.close()  # the egress TAP (its reader is gone with the engine)
        if self.tun is not None:
            self.tun.close()  # the kernel removes the device with its routes
            self.tun = None
        self._loop = None


def underlay_interface_for(public_ip: IPv4Address) -> tuple[str, IPv4Interface]:
    """The interface that holds public_ip (flannel's --iface by address)."""
    for name, iface in netlink.all_ipv4():
        if iface.ip == public_ip:
            return name, iface
    raise ValueError(f"no interface has the address {public_ip}")
