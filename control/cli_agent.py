"""`weft agent`: flanneld's flags (and FLANNELD_* environment), weft's own, and the wiring."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from ipaddress import IPv4Address, IPv4Interface, ip_address
from typing import Any

from control.cli import (
    CPUS_HELP,
    EGRESS_THREAD_HELP,
    KEEP_WARM_HELP,
    CliError,
    cpu_placement,
    egress_thread_argument,
    parse_busy_poll,
    parse_cpus,
    parse_flush_us,
    parse_ipv4,
    parse_keep_warm,
    parse_queues,
    parse_source_ports,
    run_until_signal,
)
from control.podgro import FLUSH_TIMEOUT_US
from dataplane.io.sockets import SOURCE_PORTS

log = logging.getLogger("weft.agent")


def env_default(flag: str, default: Any = None) -> Any:
    """flanneld reads every flag from FLANNELD_<UPPER_SNAKE> too; so does weft."""
    return os.environ.get("FLANNELD_" + flag.lstrip("-").upper().replace("-", "_"), default)


def env_flag(flag: str) -> bool:
    return str(env_default(flag, "false")).lower() in ("1", "true", "yes", "on")


def add_etcd_flags(p: argparse.ArgumentParser) -> None:
    """The etcd flags the agent and the operator commands share."""
    p.add_argument(
        "--etcd-endpoints",
        default=env_default("--etcd-endpoints", "http://127.0.0.1:4001,http://127.0.0.1:2379"),
        help="comma-separated etcd endpoints",
    )
    p.add_argument("--etcd-prefix", default=env_default("--etcd-prefix", "/coreos.com/network"))
    for name in ("certfile", "keyfile", "cafile", "username", "password"):
        p.add_argument(f"--etcd-{name}", default=env_default(f"--etcd-{name}"))


def make_store(args: argparse.Namespace) -> Any:
    from control.etcd_store import EtcdStore

    endpoints = [e.strip() for e in args.etcd_endpoints.split(",") if e.strip()]
    try:
        return EtcdStore(
            endpoints,
            cert=args.etcd_certfile,
            key=args.etcd_keyfile,
            ca=args.etcd_cafile,
            username=args.etcd_username,
            password=args.etcd_password,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def resolve_underlay(iface: str | None, public_ip: IPv4Address | None) -> Any:
    """flannel's interface choice: --iface (name or address), else the default route's."""
    from control.agent import Underlay
    from dataplane.io import netlink

    if iface:
        try:
            wanted: IPv4Address | None = ip_address(iface)  # type: ignore[assignment]
        except ValueError:
            wanted = None
        if wanted is not None:
            for name, addr in netlink.all_ipv4():
                if addr.ip == wanted:
                    iface = name
                    break
            else:
                raise CliError(f"--iface {wanted}: no interface has that address")
    else:
        iface = netlink.default_route_interface()
        if iface is None:
            raise CliError("no --iface given and no default route to choose an interface by")
    addrs = netlink.interface_ipv4(iface)
    if not addrs:
        raise CliError(f"interface {iface} has no IPv4 address")
    address: IPv4Interface = addrs[0]
    return Underlay(iface, address, netlink.link_mtu(iface), public_ip or address.ip)


def cmd_agent(args: argparse.Namespace) -> int:
    from control.agent import Agent, AgentError, AgentOptions
    from control.api import ApiServer, api_handlers
    from control.config import ConfigError
    from control.health import HealthServer
    from control.lease import validate_renew_margin
    from control.metrics import render_metrics
    from control.store import StoreError

    try:
        validate_renew_margin(args.subnet_lease_renew_margin)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    opts = AgentOptions(
        etcd_endpoints=args.etcd_endpoints.split(","),
        etcd_prefix=args.etcd_prefix,
        etcd_certfile=args.etcd_certfile,
        etcd_keyfile=args.etcd_keyfile,
        etcd_cafile=args.etcd_cafile,
        etcd_username=args.etcd_username,
        etcd_password=args.etcd_password,
        iface=args.iface,
        public_ip=args.public_ip,
        subnet_file=args.subnet_file,
        subnet_lease_renew_margin=args.subnet_lease_renew_margin,
        ip_masq=args.ip_masq,
        healthz_ip=args.healthz_ip,
        healthz_port=args.healthz_port,
        dataplane=args.dataplane,
        device=args.device,
        state_dir=args.state_dir,
        api_socket=args.api_socket,
        accept_any_source=args.accept_any_source,
        lease_ttl=args.lease_ttl,
    )
    underlay = resolve_underlay(args.iface, args.public_ip)
    store = make_store(args)

    # The pods' veths matter only to weft's own engine (uso_read).
    pod_gro_bridge = args.pod_udp_gro if args.dataplane == "userspace" else ""

    async def main(stop: asyncio.Event) -> int:
        engine = {
            "offload": args.offload,
            "busy_poll_us": args.busy_poll,
            "keep_warm_us": args.keep_warm,
            "queues": args.queues,
            "source_ports": args.source_ports,
            "egress_thread": args.egress_thread,
            **cpu_placement(args.cpus),
        }

        def dataplane_factory(agent: Any) -> Any:
            return make_dataplane(agent, **engine)

        agent = Agent(opts, store, dataplane_factory, underlay=underlay)
        api = ApiServer(opts.api_socket, api_handlers(agent.status, agent.trace, agent.refresh))

        async def metrics() -> str:
            await agent.refresh()
            return render_metrics(agent.status())

        health = None
        pod_gro: asyncio.Task[None] | None = None
        try:
            await api.start()
            if opts.healthz_port:
                health = HealthServer(
                    opts.healthz_ip,
                    opts.healthz_port,
                    lambda: agent.ready,
                    metrics,
                )
                await health.start()
            if pod_gro_bridge:
                from control.podgro import run_pod_gro

                pod_gro = asyncio.get_running_loop().create_task(
                    run_pod_gro(pod_gro_bridge, stop, args.pod_udp_gro_flush_us * 1000),
                    name="pod-gro",
                )
            return await agent.run(stop)
        except (AgentError, ConfigError, StoreError) as exc:
            raise CliError(str(exc)) from None
        finally:
            if pod_gro is not None:
                pod_gro.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pod_gro
            if health is not None:
                await health.close()
            await api.close()
            with contextlib.suppress(Exception):
                await store.close()

    return run_until_signal(main)


def make_dataplane(agent: Any, **engine: Any) -> Any:
    """The userspace engine or the kernel, for the agent's config and lease;
    wrapped for vxlan DirectRouting (on-link peers get plain kernel routes).
    `engine`: the userspace engine's NodeSpec options (offload, busy_poll_us, keep_warm_us,
    queues, source_ports, egress_thread, cpus)."""
    dataplane = _make_dataplane(agent, engine)
    backend = agent.config.backend
    if backend.type == "vxlan" and backend.direct_routing:
        from control.kernel import DirectRouting

        return DirectRouting(dataplane)
    return dataplane


def _make_dataplane(agent: Any, engine: dict[str, Any]) -> Any:
    cfg = agent.config
    lease = agent.lease
    underlay = agent.underlay
    opts = agent.opts
    if opts.dataplane == "kernel":
        from control.kernel import KernelDataplane, KernelSpec

        return KernelDataplane(
            KernelSpec(
                backend=cfg.backend_type,
                network=cfg.network,
                subnet=lease.subnet,
                local_ip=underlay.address.ip,
                underlay_iface=underlay.iface,
                device_mtu=agent.device_mtu(),
                vni=cfg.backend.vni,
                port=cfg.backend.effective_port or 0,
                vtep_mac=agent.vtep_mac,
            )
        )
    from dataplane import gc_pauses
    from dataplane.io.node import NodeSpec, UserspaceDataplane

    # The userspace engine's imports done: frozen out of the collector's reach, so
    # that no full collection walks them while packets wait (dataplane/gc_pauses.py).
    gc_pauses.watch()
    if cfg.backend_type == "vxlan" and cfg.backend.mtu:
        underlay_mtu = cfg.backend.mtu
    else:
        underlay_mtu = underlay.mtu
    return UserspaceDataplane(
        NodeSpec(
            backend=cfg.backend_type,
            network=cfg.network,
            subnet=lease.subnet,
            public_ip=underlay.address.ip,
            underlay_iface=underlay.iface,
            underlay_mtu=underlay_mtu,
            device=opts.device,
            vni=cfg.backend.vni,
            port=cfg.backend.effective_port or 0,
            vtep_mac=agent.vtep_mac,
            accept_any_source=opts.accept_any_source,
            **engine,
        )
    )


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the node agent (flanneld's job)")
    add_etcd_flags(p)
    p.add_argument("--iface", default=env_default("--iface"), help="interface name or address")
    p.add_argument("--public-ip", type=parse_ipv4, default=env_default("--public-ip"))
    p.add_argument("--subnet-file", default=env_default("--subnet-file", "/run/flannel/subnet.env"))
    p.add_argument(
        "--subnet-lease-renew-margin",
        type=int,
        default=env_default("--subnet-lease-renew-margin", "60"),
        help="minutes before expiry to renew (1..1439)",
    )
    p.add_argument("--ip-masq", action="store_true", default=env_flag("--ip-masq"))
    p.add_argument("--healthz-ip", default=env_default("--healthz-ip", "0.0.0.0"))
    p.add_argument("--healthz-port", type=int, default=env_default("--healthz-port", "0"))
    p.add_argument(
        "--dataplane",
        choices=["userspace", "kernel"],
        default=env_default("--dataplane", "userspace"),
    )
    p.add_argument("--device", choices=["tun", "tap"], default=env_default("--device", "tun"))
    p.add_argument("--state-dir", default=env_default("--state-dir", "/var/lib/weft"))
    p.add_argument("--api-socket", default=env_default("--api-socket", "/run/weft/weft.sock"))
    p.add_argument(
        "--accept-any-source",
        action="store_true",
        default=env_flag("--accept-any-source"),
        help="accept encapsulated packets from anyone, as flannel does",
    )
    p.add_argument(
        "--offload",
        choices=["auto", "on", "off"],
        default=env_default("--offload", "auto"),
        help="userspace fast paths (TSO/GSO through TAP, UDP GRO, recvmmsg): "
        "auto uses what the kernel accepts, on fails when it refuses one",
    )
    p.add_argument(
        "--busy-poll",
        type=parse_busy_poll,
        default=env_default("--busy-poll", "0"),
        metavar="USEC",
        help="userspace dataplane: keep polling for USEC after the last packet instead of "
        "sleeping (lower latency, a CPU busy while traffic flows; default 0: off)",
    )
    p.add_argument(
        "--keep-warm",
        type=parse_keep_warm,
        default=env_default("--keep-warm", "0"),
        metavar="USEC",
        help="userspace dataplane: " + KEEP_WARM_HELP,
    )
    p.add_argument(
        "--queues",
        type=parse_queues,
        default=env_default("--queues", "1"),
        metavar="N",
        help="userspace dataplane: N device queues, one process each (more cores for more "
        "flows; each flow stays on one queue). vxlan and udp backends; default 1",
    )
    p.add_argument(
        "--cpus",
        type=parse_cpus,
        default=env_default("--cpus", ""),
        metavar="LIST",
        help="userspace dataplane: " + CPUS_HELP,
    )
    egress_thread_argument(
        p, env_default("--egress-thread", "auto"), "userspace dataplane: " + EGRESS_THREAD_HELP
    )
    p.add_argument(
        "--source-ports",
        type=parse_source_ports,
        default=env_default("--source-ports", str(SOURCE_PORTS)),
        metavar="N",
        help="userspace vxlan: spread flows over N outer UDP source ports, one per flow by "
        f"a hash of the inner flow, as the kernel's VXLAN does (default {SOURCE_PORTS}; 0: "
        "all from the listening port)",
    )
    p.add_argument(
        "--pod-udp-gro",
        nargs="?",
        const="cni0",
        default=env_default("--pod-udp-gro", ""),
        metavar="BRIDGE",
        help="userspace dataplane: turn on UDP GRO forwarding on the veths plugged into "
        "BRIDGE (default cni0), so that a pod's small UDP datagrams reach weft merged "
        "(ethtool gro, rx-udp-gro-forwarding, gro_flush_timeout). Off by default",
    )
    p.add_argument(
        "--pod-udp-gro-flush-us",
        type=parse_flush_us,
        default=env_default("--pod-udp-gro-flush-us", str(FLUSH_TIMEOUT_US)),
        metavar="USEC",
        help="with --pod-udp-gro: the veths' gro_flush_timeout, how long a merged packet "
        f"waits for more (default {FLUSH_TIMEOUT_US}). Longer merges more and costs "
        "weft less per datagram; a lone datagram waits up to it at each pod's veth "
        "(docs/decisions.md §10)",
    )
    p.add_argument(
        "--lease-ttl",
        type=int,
        default=env_default("--lease-ttl", "86400"),
        help="etcd lease TTL in seconds (flannel: 86400; shorter only for tests)",
    )
    p.set_defaults(func=cmd_agent)
