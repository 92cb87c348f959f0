"""`weft agent`: acquire a lease → start the dataplane → renew and watch → feed peers.

The agent is the composition of the pure control core (config, model,
allocator, watcher, lease schedule, subnet.env) with its edges (the etcd
store, the dataplane, the local API and the health listener). It follows
flanneld's etcd mode, with three deliberate differences: a lost CAS race is
retried, a deleted own lease is re-acquired instead of exiting, and peers'
encapsulated packets are accepted only from their own public IPs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, Literal, Protocol

from control.allocator import AcquireAction, plan_acquire, subnet_from_env_hint
from control.config import NetworkConfig, parse_network_config
from control.lease import LEASE_TTL_S, RENEW_RETRY_S, RenewSchedule
from control.model import (
    DEFAULT_PREFIX,
    Lease,
    LeaseAttrs,
    LeaseDecodeError,
    config_key,
    decode_lease_attrs,
    encode_lease_attrs,
    parse_subnet_key,
    subnets_prefix,
    vtep_mac,
)
from control.store import KeyValue, LeaseStore, StoreError, WatchBroken
from control.subnet_env import parse_subnet_env, render_subnet_env
from control.watcher import EventKind, LeaseWatcher
from dataplane.packet.ethernet import mac_from_str, mac_to_str, random_vtep_mac
from dataplane.peers import Peer

log = logging.getLogger("weft.agent")

WATCH_BACKOFF_MIN_S = 0.1  # flannel's reconnect backoff: 100 ms doubling to 5 s
WATCH_BACKOFF_MAX_S = 5.0
CONFIG_POLL_S = 2.0
RACE_RETRIES = 10


class AgentError(Exception):
    """A fatal, user-facing error: one line, exit status 1."""


class Dataplane(Protocol):
    """What the agent drives: the userspace engine or the kernel (control/kernel.py)."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def add_peer(self, peer: Peer) -> None: ...
    def remove_peer(self, subnet: IPv4Network) -> Peer | None: ...
    def stop(self) -> None: ...


@dataclass
class AgentOptions:
    etcd_endpoints: list[str] = field(
        default_factory=lambda: ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
    )
    etcd_prefix: str = DEFAULT_PREFIX
    etcd_certfile: str | None = None
    etcd_keyfile: str | None = None
    etcd_cafile: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    iface: str | None = None  # name or address
    public_ip: IPv4Address | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    subnet_lease_renew_margin: int = 60  # minutes
    ip_masq: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    dataplane: Literal["userspace", "kernel"] = "userspace"
    device: Literal["tun", "tap"] = "tun"
    state_dir: str = "/var/lib/weft"
    api_socket: str = "/run/weft/weft.sock"
    accept_any_source: bool = False
    lease_ttl: int = LEASE_TTL_S  # flannel's 24 h; shorter only for tests


@dataclass(frozen=True)
class Underlay:
    iface: str
    address: IPv4Interface
    mtu: int
    public_ip: IPv4Address


def peer_from_lease(lease: Lease, backend_type: str, port: int) -> Peer | None:
    """The dataplane's view of a peer lease, or None when this backend ignores it.

    As flannel: vxlan and host-gw take only leases of their own BackendType;
    udp does not look (its leases carry no BackendType at all).
    """
    attrs = lease.attrs
    if backend_type == "vxlan":
        if attrs.backend_type != "vxlan":
            return None
        mac = vtep_mac(attrs)
        if mac is None:
            return None
        return Peer(lease.subnet, attrs.public_ip, mac, port)
    if backend_type == "host-gw":
        if attrs.backend_type != "host-gw":
            return None
        return Peer(lease.subnet, attrs.public_ip)
    return Peer(lease.subnet, attrs.public_ip, None, port)


def write_file_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """Write via a temp file and rename, so readers never see half a file (as renameio)."""
    target = Path(path)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, target)


def load_or_create_vtep_mac(state_dir: str, rng: random.Random) -> bytes:
    """The VtepMAC survives restarts, so peers' neighbour and FDB entries stay right."""
    path = Path(state_dir) / "vtep_mac"
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text().strip()
        try:
            return mac_from_str(text)
        except ValueError:
            log.warning("ignoring unreadable VtepMAC %r in %s; making a new one", text, path)
    mac = random_vtep_mac(rng)
    Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomically(str(path), mac_to_str(mac) + "\n", mode=0o600)
    return mac


class Agent:
    def __init__(
        self,
        opts: AgentOptions,
        store: LeaseStore,
        make_dataplane: Callable[[Agent], Dataplane],
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        underlay: Underlay,
    ) -> None:
        self.opts = opts
        self.store = store
        self.make_dataplane = make_dataplane
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self.underlay = underlay
        self.config: NetworkConfig | None = None
        self.lease: Lease | None = None
        self.vtep_mac: bytes | None = None
        self.dataplane: Dataplane | None = None
        self.watcher = LeaseWatcher()
        self.schedule = RenewSchedule.from_minutes(opts.subnet_lease_renew_margin)
        if self.schedule.margin_s >= opts.lease_ttl:
            # A test-sized TTL under the margin would make every renewal due at once:
            # renew at half the TTL instead.
            self.schedule = RenewSchedule(margin_s=opts.lease_ttl / 2)
        self.ready = False
        self.stats: dict[str, int] = {
            "watch_resyncs": 0,
            "route_updates": 0,
            "lease_renewals": 0,
            "foreign_values_skipped": 0,
        }
        self._peers: dict[IPv4Network, Peer] = {}
        self._warned: set[tuple[str, int]] = set()
        self._reacquire = asyncio.Event()

    # -- configuration -------------------------------------------------------------

    async def wait_for_config(self, stop: asyncio.Event) -> NetworkConfig | None:
        """Read <prefix>/config; keep waiting (with a clear message) while it is missing."""
        key = config_key(self.opts.etcd_prefix)
        said = False
        while not stop.is_set():
            try:
                kv = await self.store.get(key)
            except StoreError as exc:
                log.warning("%s; retrying", exc)
                kv = None
            else:
                if kv is not None:
                    return parse_network_config(kv.value)  # ConfigError → exit 1
                if not said:
                    log.warning(
                        "waiting for the network config at %s: write it with the etcd v3 API, "
                        "e.g. ETCDCTL_API=3 etcdctl put %s "
                        '\'{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}\' '
                        "(or: weft config set)",
                        key,
                        key,
                    )
                    said = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CONFIG_POLL_S)
        return None

    # -- leases --------------------------------------------------------------------

    def my_attrs(self) -> LeaseAttrs:
        assert self.config is not None
        backend = self.config.backend_type
        if backend == "vxlan":
            assert self.vtep_mac is not None
            return LeaseAttrs(
                self.underlay.public_ip,
                None,
                "vxlan",
                {"VNI": self.config.backend.vni, "VtepMAC": mac_to_str(self.vtep_mac)},
            )
        if backend == "host-gw":
            return LeaseAttrs(self.underlay.public_ip, None, "host-gw", None)
        return LeaseAttrs(self.underlay.public_ip)  # udp: no BackendType, as flannel

    def _decode(self, kv: KeyValue) -> Lease | None:
        """A lease from etcd, or None (logged once per key and revision) if it is foreign."""
        parsed = parse_subnet_key(kv.key, self.opts.etcd_prefix)
        try:
            if parsed is None:
                raise LeaseDecodeError("key is not <prefix>/subnets/<a.b.c.d>-<len>")
            attrs = decode_lease_attrs(kv.value)
        except LeaseDecodeError as exc:
            mark = (kv.key, kv.mod_revision)
            if mark not in self._warned:
                self._warned.add(mark)
                self.stats["foreign_values_skipped"] += 1
                log.warning("skipping %s: %s", kv.key, exc)
            return None
        return Lease(parsed[0], parsed[1], attrs, None, kv.lease_id)

    async def list_leases(self) -> tuple[int, list[Lease]]:
        revision, kvs = await self.store.list_prefix(subnets_prefix(self.opts.etcd_prefix))
        leases = [lease for kv in kvs if (lease := self._decode(kv)) is not None]
        return revision, leases

    def _env_hint(self) -> IPv4Network | None:
        try:
            text = Path(self.opts.subnet_file).read_text()
        except OSError:
            return None
        return subnet_from_env_hint(parse_subnet_env(text).get("FLANNEL_SUBNET"))

    async def acquire(self) -> Lease:
        """flannel's tryAcquireLease, retried when another node wins the CAS race."""
        assert self.config is not None
        attrs = self.my_attrs()
        value = encode_lease_attrs(attrs)
        ttl = self.opts.lease_ttl
        for attempt in range(RACE_RETRIES):
            _, existing = await self.list_leases()
            plan = plan_acquire(
                self.config, existing, self.underlay.public_ip, self._env_hint(), self.rng
            )
            for stale in plan.delete:
                await self.store.delete(stale.key(self.opts.etcd_prefix))
            if plan.action is AcquireAction.EXHAUSTED:
                raise AgentError(plan.error or "no free subnet")
            assert plan.subnet is not None
            key = Lease(plan.subnet, plan.subnet_v6, attrs).key(self.opts.etcd_prefix)
            if plan.action is AcquireAction.REUSE:
                lease_id = await self.store.put_with_lease(key, value, ttl)
            else:
                if not await self.store.create_with_lease(key, value, ttl):
                    log.info("lost the race for %s (attempt %d); trying again", key, attempt + 1)
                    await asyncio.sleep(self.rng.uniform(0.01, 0.1))
                    continue
                lease_id = 0  # learnt below; the key exists with our value now
                kv = await self.store.get(key)
                lease_id = kv.lease_id if kv is not None else 0
            log.info("%s; lease %s acquired", plan.reason, plan.subnet)
            expiration = self.clock() + ttl
            self.schedule = self.schedule.on_lease(expiration, self.clock())
            return Lease(plan.subnet, plan.subnet_v6, attrs, expiration, lease_id)
        raise AgentError(f"lost the race for a subnet {RACE_RETRIES} times in a row")

    async def renew(self) -> None:
        assert self.lease is not None
        key = self.lease.key(self.opts.etcd_prefix)
        lease_id = await self.store.put_with_lease(
            key, encode_lease_attrs(self.lease.attrs), self.opts.lease_ttl
        )
        expiration = self.clock() + self.opts.lease_ttl
        self.lease = Lease(
            self.lease.subnet, self.lease.subnet_v6, self.lease.attrs, expiration, lease_id
        )
        self.schedule = self.schedule.on_lease(expiration, self.clock())
        self.stats["lease_renewals"] += 1
        log.info("renewed lease %s until %s", self.lease.subnet, time.ctime(expiration))

    async def renew_loop(self) -> None:
        while True:
            delay = self.schedule.delay(self.clock())
            await asyncio.sleep(max(delay if delay is not None else RENEW_RETRY_S, 0.0))
            try:
                await self.renew()
            except StoreError as exc:
                log.warning("renewing lease failed: %s; retrying in %ds", exc, RENEW_RETRY_S)
                self.schedule = self.schedule.on_error(self.clock())

    def apply_masq(self) -> None:
        if self.opts.ip_masq:
            from control.masq import MasqError, apply_masq

            assert self.config is not None and self.lease is not None
            try:
                apply_masq(self.config.network, self.lease.subnet)
            except MasqError as exc:
                raise AgentError(str(exc)) from None

    # -- subnet.env ----------------------------------------------------------------

    def device_mtu(self) -> int:
        assert self.config is not None
        return self.config.mtu(self.underlay.mtu)

    def write_subnet_env(self) -> None:
        assert self.config is not None and self.lease is not None
        text = render_subnet_env(
            self.config.network, self.lease.subnet, self.device_mtu(), self.opts.ip_masq
        )
        write_file_atomically(self.opts.subnet_file, text)

    # -- peers ---------------------------------------------------------------------

    def _apply(self, kind: EventKind, lease: Lease) -> None:
        assert self.config is not None and self.dataplane is not None
        subnet = lease.subnet
        if kind is EventKind.REMOVED:
            if self._peers.pop(subnet, None) is not None:
                self.dataplane.remove_peer(subnet)
                self.stats["route_updates"] += 1
                log.info("peer %s (%s) removed", subnet, lease.attrs.public_ip)
                # A lease ignored because it overlapped this one may fit now.
                for other in self.watcher.peers():
                    if other.subnet not in self._peers and other.subnet.overlaps(subnet):
                        self._apply(EventKind.ADDED, other)
            return
        port = self.config.backend.effective_port or 0
        peer = peer_from_lease(lease, self.config.backend_type, port)
        if peer is None:
            log.info(
                "ignoring lease %s: backend %s, not %s",
                subnet,
                lease.attrs.backend_type or "udp",
                self.config.backend_type,
            )
            return
        if not subnet.subnet_of(self.config.network):
            # Applying it would route (part of) the underlay into the overlay.
            log.error(
                "ignoring lease %s: it is outside the cluster network %s",
                subnet,
                self.config.network,
            )
            return
        own = self.lease.subnet if self.lease is not None else None
        if own is not None and subnet.overlaps(own):
            log.error("ignoring lease %s: it overlaps our own %s", subnet, own)
            return
        if subnet.prefixlen != self.config.subnet_len:
            # Every node leases SubnetLen-sized subnets (flannel's allocator does too), so
            # leases can only coincide, never nest: a /23 over peers' /24s is foreign.
            log.error(
                "ignoring lease %s: the network's subnets are /%d",
                subnet,
                self.config.subnet_len,
            )
            return
        # No scan of the other peers for overlaps: every peer passed the size check
        # above, and aligned subnets of one size overlap only when they are equal —
        # the same dict key. (A scan here made loading N leases O(N²): 2-8 ms a
        # lease at 1,000-5,000.)
        if peer.public_ip == self.underlay.public_ip:
            if lease.attrs != self.my_attrs():
                log.error(
                    "ignoring lease %s: it claims our own public IP %s", subnet, peer.public_ip
                )
            # else: our own lease (a new one, seen before we recorded it): not a peer.
            return
        if self._peers.get(subnet) == peer:
            return  # a renewal: nothing changed
        self._peers[subnet] = peer
        self.dataplane.add_peer(peer)
        self.stats["route_updates"] += 1
        log.info(
            "peer %s at %s%s",
            subnet,
            peer.public_ip,
            f" VtepMAC {mac_to_str(peer.vtep_mac)}" if peer.vtep_mac else "",
        )

    async def watch_loop(self) -> None:
        """List, then watch from revision+1; on any break, back off, re-list, apply the diff.

        An etcd outage is logged once when it starts and once when it ends; the
        dataplane keeps its routes meanwhile.
        """
        prefix = subnets_prefix(self.opts.etcd_prefix)
        backoff = WATCH_BACKOFF_MIN_S
        first = True
        outage_since: float | None = None
        while True:
            try:
                revision, leases = await self.list_leases()
                if outage_since is not None:
                    log.warning(
                        "etcd is back after %.1fs; re-listed %d leases",
                        self.clock() - outage_since,
                        len(leases),
                    )
                    outage_since = None
                if not first:
                    self.stats["watch_resyncs"] += 1
                first = False
                self._check_own(leases)
                for event in self.watcher.reset(leases):
                    self._apply(event.kind, event.lease)
                backoff = WATCH_BACKOFF_MIN_S
                async for batch in self.store.watch_prefix(prefix, revision + 1):
                    for ev in batch:
                        kv = KeyValue(ev.key, ev.value, ev.lease_id, ev.revision)
                        self._on_watch_event(ev.kind, kv)
            except WatchBroken as exc:
                log.warning("watch on %s ended: %s; re-listing", prefix, exc)
            except StoreError as exc:
                if outage_since is None:
                    outage_since = self.clock()
                    log.warning(
                        "etcd unreachable: %s; keeping the %d routes we have and retrying "
                        "with backoff (up to %.0fs)",
                        exc,
                        len(self._peers),
                        WATCH_BACKOFF_MAX_S,
                    )
                else:
                    log.debug("etcd still unreachable: %s", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, WATCH_BACKOFF_MAX_S)

    def _check_own(self, leases: list[Lease]) -> None:
        if self.lease is not None and all(le.subnet != self.lease.subnet for le in leases):
            log.error("our lease %s is gone from etcd; re-acquiring", self.lease.subnet)
            self._reacquire.set()

    def _on_watch_event(self, kind: str, kv: KeyValue) -> None:
        parsed = parse_subnet_key(kv.key, self.opts.etcd_prefix)
        if self.lease is not None and parsed is not None and parsed[0] == self.lease.subnet:
            if kind == "delete":
                log.error(
                    "our lease %s was deleted from etcd (by an operator, or it expired); "
                    "re-acquiring",
                    self.lease.subnet,
                )
                self._reacquire.set()
            return
        if kind == "delete":
            if parsed is None:
                return
            events = self.watcher.apply_delete(parsed[0], parsed[1])
        else:
            lease = self._decode(kv)
            if lease is None:
                return
            events = self.watcher.apply_put(lease)
        for event in events:
            self._apply(event.kind, event.lease)

    async def reacquire_loop(self, restart_dataplane: Callable[[], None]) -> None:
        while True:
            await self._reacquire.wait()
            self._reacquire.clear()
            old = self.lease
            while True:
                try:
                    self.lease = await self.acquire()
                    break
                except StoreError as exc:
                    log.warning("re-acquiring failed: %s; retrying", exc)
                    await asyncio.sleep(1.0)
            assert old is not None and self.lease is not None
            if self.lease.subnet != old.subnet:
                log.error("our subnet changed from %s to %s", old.subnet, self.lease.subnet)
                for event in self.watcher.set_own_subnet(self.lease.subnet):
                    self._apply(event.kind, event.lease)
                restart_dataplane()
                self.apply_masq()
                self.write_subnet_env()

    # -- status --------------------------------------------------------------------

    async def refresh(self) -> None:
        """The dataplane's counters up to now (its queue workers report each second)."""
        refresh = getattr(self.dataplane, "refresh", None)
        if refresh is not None:
            await refresh()

    def status(self) -> dict[str, Any]:
        lease = self.lease
        out: dict[str, Any] = {
            "ready": self.ready,
            "dataplane": self.opts.dataplane,
            "public_ip": str(self.underlay.public_ip),
            "iface": self.underlay.iface,
            "backend": self.config.backend_type if self.config else None,
            "subnet": str(lease.subnet) if lease else None,
            "network": str(self.config.network) if self.config else None,
            "lease_expires_in": (
                round(lease.expiration - self.clock()) if lease and lease.expiration else None
            ),
            "vtep_mac": mac_to_str(self.vtep_mac) if self.vtep_mac else None,
            "vni": self.config.backend.vni if self.config else None,
            "port": self.config.backend.effective_port if self.config else None,
            "peers": [
                {
                    "subnet": str(p.subnet),
                    "public_ip": str(p.public_ip),
                    "vtep_mac": mac_to_str(p.vtep_mac) if p.vtep_mac else None,
                }
                for p in sorted(self._peers.values(), key=lambda p: p.subnet)
            ],
            "control": dict(self.stats),
        }
        extra = getattr(self.dataplane, "status", None)
        if callable(extra):
            dp = extra()
            keys = (
                "device", "device_kind", "device_mtu", "counters", "direct_routes", "offload",
                "busy_poll_us", "keep_warm_us", "queues", "source_ports", "placement", "gc",
            )  # fmt: skip
            for key in keys:
                if key in dp:
                    out[key] = dp[key]
        return out

    def trace(self, request: dict[str, Any]) -> Any:
        """The trace stream of the userspace dataplane (an async iterator), or an error."""
        stream = getattr(self.dataplane, "trace_stream", None)
        if stream is None:
            inner = getattr(self.dataplane, "inner", None)  # DirectRouting wraps it
            stream = getattr(inner, "trace_stream", None)
        if stream is None:
            return {"error": "live tracing needs the userspace dataplane (--dataplane userspace)"}
        return stream(request)

    # -- the whole life ------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        config = await self.wait_for_config(stop)
        if config is None:
            return 0
        self.config = config
        log.info(
            "network %s, subnet length %d, backend %s",
            config.network,
            config.subnet_len,
            config.backend_type,
        )
        if config.backend_type == "vxlan":
            self.vtep_mac = load_or_create_vtep_mac(self.opts.state_dir, self.rng)
        self.lease = await self.acquire()
        self.watcher.set_own_subnet(self.lease.subnet)
        self.apply_masq()
        loop = asyncio.get_running_loop()
        self.dataplane = self.make_dataplane(self)
        self.dataplane.start(loop)

        def restart_dataplane() -> None:
            assert self.dataplane is not None
            self.dataplane.stop()
            self.dataplane = self.make_dataplane(self)
            self.dataplane.start(loop)
            for peer in self._peers.values():
                self.dataplane.add_peer(peer)

        tasks = [
            loop.create_task(self.watch_loop(), name="watch"),
            loop.create_task(self.renew_loop(), name="renew"),
            loop.create_task(self.reacquire_loop(restart_dataplane), name="reacquire"),
        ]
        self.write_subnet_env()
        self.ready = True
        log.info("ready: subnet %s, wrote %s", self.lease.subnet, self.opts.subnet_file)
        stopper = loop.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.dataplane is not None:
                self.dataplane.stop()
        # The lease stays: flannel keeps it on shutdown so a restart reuses it.
        log.info("stopped; lease %s kept until it expires", self.lease.subnet)
        return 0
