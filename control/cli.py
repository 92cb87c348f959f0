"""`weft` — the command line. Each sub-command is a small function; errors are one line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from typing import Any

DEFAULT_API_SOCKET = "/run/weft/weft.sock"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# -- shared argument parsing -----------------------------------------------------


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a MAC address like aa:bb:cc:dd:ee:ff")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a MAC address") from None


def _bounded_int(text: str, low: int, high: int, what: str, unit: str) -> int:
    """An int option in low..high, or argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value}: expected {low}..{high} {unit}")
    return value


def parse_busy_poll(text: str) -> int:
    """--busy-poll USEC: 0 (off) to one second."""
    return _bounded_int(text, 0, 1_000_000, "microseconds", "µs")


def parse_keep_warm(text: str) -> int:
    """--keep-warm USEC: 0 (off) or KEEP_WARM_MIN_US..KEEP_WARM_MAX_US."""
    from dataplane.io.idle import KEEP_WARM_MAX_US, KEEP_WARM_MIN_US

    value = _bounded_int(text, 0, KEEP_WARM_MAX_US, "microseconds", "µs")
    if 0 < value < KEEP_WARM_MIN_US:
        raise argparse.ArgumentTypeError(
            f"{value}: expected 0 (off) or {KEEP_WARM_MIN_US}..{KEEP_WARM_MAX_US} µs"
        )
    return value


KEEP_WARM_HELP = (
    "while traffic is sporadic (a packet within the last second), run weft's packet path "
    "over nothing every USEC without a packet, so that a lone packet finds weft awake "
    "and warm: ~0.1 ms less a round trip for up to a tenth of a CPU while traffic is "
    "sporadic, nothing when idle or busy (default 0: off; e.g. 2000; docs/running.md)"
)


def parse_flush_us(text: str) -> int:
    """--pod-udp-gro-flush-us USEC: how long a merged packet stays open, 1..10000 µs."""
    return _bounded_int(text, 1, 10_000, "microseconds", "µs")


def parse_queues(text: str) -> int:
    """--queues N: 1 (one process) to MAX_QUEUES (dataplane/io/queues.py)."""
    from dataplane.io.queues import MAX_QUEUES

    return _bounded_int(text, 1, MAX_QUEUES, "a number of queues", "queues")


def parse_source_ports(text: str) -> int:
    """--source-ports N: 0 (all from the listening port) to MAX_SOURCE_PORTS."""
    from dataplane.io.sockets import MAX_SOURCE_PORTS

    return _bounded_int(text, 0, MAX_SOURCE_PORTS, "a number of ports", "ports")


def parse_cpus(text: str) -> tuple[int, ...]:
    """--cpus LIST: the dataplane's CPUs ("0", "0,2", "0-3"); empty: the scheduler's."""
    from dataplane.io.cpus import CpuListError, parse_cpu_list

    if not text.strip():
        return ()
    try:
        return parse_cpu_list(text)
    except CpuListError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cpu_placement(pinned: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """NodeSpec's cpus and steer_cpus for --cpus, checked against the CPUs this
    process may run on (dataplane/io/cpus.py)."""
    import os

    from dataplane.io.cpus import CpuListError, plan

    if not pinned:
        return {"cpus": (), "steer_cpus": ()}
    try:
        placement = plan(pinned, os.sched_getaffinity(0))
    except CpuListError as exc:
        raise CliError(str(exc)) from None
    return {"cpus": placement.pinned, "steer_cpus": placement.steer}


CPUS_HELP = (
    "run the dataplane on these CPUs (0, 0,2 or 0-3; with --queues, queue q on the q-th) "
    "and let the kernel segment and forward what it sends on the others (RPS on the "
    "egress TAP); default: the scheduler decides"
)
EGRESS_THREAD_HELP = (
    "a kernel thread segments and sends the super-packets weft writes to its egress TAP "
    "(threaded NAPI), while weft reads on: faster where a core is free, dearer where "
    "every core is busy. auto (the default): on while weft is busy all the time and the "
    "machine has idle CPU, off otherwise (with --queues, queue 0 decides from every "
    "queue's CPU); on (the flag alone): always; "
    "off: never"
)


def egress_thread_argument(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    """--egress-thread [{auto,on,off}] (the flag alone: on), for `weft dataplane run`,
    `weft agent` and `weft lab`."""
    parser.add_argument(
        "--egress-thread", nargs="?", type=parse_egress_thread, const="on", default=default,
        metavar="{auto,on,off}", help=help,
    )  # fmt: skip


def parse_egress_thread(text: str) -> str:
    """--egress-thread's value: auto, on or off (1/true/yes and 0/false/no too, as
    FLANNELD_EGRESS_THREAD was a plain flag)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return "on"
    if value in ("0", "false", "no"):
        return "off"
    if value not in ("auto", "on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, on or off")
    return value


def parse_ipv4_network(text: str) -> IPv4Network:
    try:
        net = ip_network(text, strict=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(net, IPv4Network):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 network")
    return net


def parse_ipv4(text: str) -> IPv4Address:
    try:
        addr = ip_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(addr, IPv4Address):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address")
    return addr


def parse_static_peer(text: str) -> tuple[IPv4Network, IPv4Address, bytes | None]:
    """SUBNET,PUBLIC_IP[,VTEPMAC] as given to `weft dataplane run --peer`."""
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--peer {text!r}: expected SUBNET,PUBLIC_IP[,VTEPMAC]")
    mac = parse_mac(parts[2]) if len(parts) == 3 else None
    return parse_ipv4_network(parts[0]), parse_ipv4(parts[1]), mac


def setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_until_signal(main: Callable[[asyncio.Event], Any]) -> Any:
    """Run an async main on uvloop until it returns or SIGTERM/SIGINT sets the event."""
    import uvloop

    async def runner() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    return uvloop.run(runner())


# -- weft dataplane run ----------------------------------------------------------


def cmd_dataplane_run(args: argparse.Namespace) -> int:
    from dataplane import gc_pauses
    from dataplane.io import netlink
    from dataplane.io.node import NodeSpec, UserspaceDataplane, underlay_interface_for
    from dataplane.peers import Peer

    iface, _ = underlay_interface_for(args.public_ip)
    if args.iface and args.iface != iface:
        raise CliError(f"--public-ip {args.public_ip} is on {iface}, not on --iface {args.iface}")
    if args.subnet.subnet_of(args.network) is False:
        raise CliError(f"--subnet {args.subnet} is not inside --network {args.network}")
    spec = NodeSpec(
        backend=args.backend,
        network=args.network,
        subnet=args.subnet,
        public_ip=args.public_ip,
        underlay_iface=iface,
        underlay_mtu=args.underlay_mtu or netlink.link_mtu(iface),
        device=args.device,
        vni=args.vni,
        port=args.port,
        vtep_mac=args.vtep_mac,
        accept_any_source=args.accept_any_source,
        offload=args.offload,
        busy_poll_us=args.busy_poll,
        keep_warm_us=args.keep_warm,
        queues=args.queues,
        source_ports=args.source_ports,
        egress_thread=args.egress_thread,
        **cpu_placement(args.cpus),
    )
    if spec.backend == "vxlan" and spec.vtep_mac is None:
        raise CliError("the vxlan backend needs --vtep-mac (the agent keeps one in its state dir)")

    async def main(stop: asyncio.Event) -> int:
        from control.api import ApiServer, api_handlers

        gc_pauses.watch()
        node = UserspaceDataplane(spec)
        node.start(asyncio.get_running_loop())
        port = getattr(node.backend, "port", 0)
        for subnet, public_ip, mac in args.peer:
            node.add_peer(Peer(subnet, public_ip, mac, port))
        api = ApiServer(args.api_socket, api_handlers(node.status, node.trace_stream, node.refresh))
        await api.start()
        try:
            await stop.wait()
        finally:
            await api.close()
            node.stop()
        return 0

    return run_until_signal(main)


# -- weft status -----------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from control.api import api_request

    try:
        status = api_request(args.api_socket, {"op": "status"})
    except ConnectionError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(render_status(status), end="")
    return 0


def render_status(status: dict[str, Any]) -> str:
    """`weft status` as text: node, peers, counters, drops, fast paths."""
    lines: list[str] = []
    out = lines.append
    out(
        f"node {status.get('public_ip')}  subnet {status.get('subnet')}  "
        f"backend {status.get('backend')}  device {status.get('device')} "
        f"({status.get('device_kind')}, mtu {status.get('device_mtu')})"
    )
    if status.get("vtep_mac"):
        out(f"VtepMAC {status['vtep_mac']}")
    source_ports = status.get("source_ports")
    if source_ports:
        listed = ", ".join(str(p) for p in sorted(source_ports))
        out(f"outer source ports (one per inner flow): {listed}")
    peers = status.get("peers", [])
    out(f"\n{'PEER SUBNET':<20} {'PUBLIC IP':<16} VTEP MAC")
    for p in peers:
        out(f"{p['subnet']:<20} {p['public_ip']:<16} {p.get('vtep_mac') or '-'}")
    c = status.get("counters", {})
    out(
        f"\ntx {c.get('tx_packets', 0)} packets / {c.get('tx_bytes', 0)} bytes   "
        f"rx {c.get('rx_packets', 0)} packets / {c.get('rx_bytes', 0)} bytes   "
        f"icmp sent {c.get('icmp_sent', 0)}"
    )
    drops = c.get("drops", {})
    if drops:
        out("drops: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    else:
        out("drops: none")
    offload = status.get("offload")
    if isinstance(offload, dict):
        on = offload.get("on") or []
        out(f"fast paths ({offload.get('mode')}): " + (", ".join(on) if on else "none"))
        # One line per reason: host-gw has eight paths off for the same one.
        reasons: dict[str, list[str]] = {}
        for path, why in sorted((offload.get("off") or {}).items()):
            reasons.setdefault(str(why), []).append(path)
        for why, paths in reasons.items():
            out(f"  {', '.join(paths)} off: {why}")
        mode = offload.get("egress_thread_mode")
        now = "runs" if offload.get("egress_thread") else "does not run"
        if mode == "auto":
            switches = (offload.get("counters") or {}).get("egress_thread_switches", 0)
            out(f"  egress: the TAP's NAPI {now} in a kernel thread now "
                f"(--egress-thread auto, {switches} switches)")  # fmt: skip
        elif offload.get("egress_thread"):
            out("  egress: the TAP's NAPI runs in a kernel thread (--egress-thread)")
    if status.get("busy_poll_us"):
        out(f"busy polling: {status['busy_poll_us']} µs after the last packet")
    if status.get("keep_warm_us"):
        passes = (status.get("counters") or {}).get("warm_passes", 0)
        out(f"keeping warm: a pass every {status['keep_warm_us']} µs without a packet while "
            f"traffic is sporadic ({passes} passes)")  # fmt: skip
    if status.get("placement"):
        out(f"cpus: {status['placement']}")
    gc = status.get("gc")
    if isinstance(gc, dict) and gc.get("frozen"):
        n = "/".join(map(str, gc.get("collections") or []))
        longest = "/".join(f"{ms:g}" for ms in gc.get("longest_ms") or [])
        out(f"gc: {gc['frozen']} objects frozen at start-up; collections since "
            f"(generation 0/1/2) {n}, longest {longest} ms")  # fmt: skip
    queues = status.get("queues")
    if isinstance(queues, dict):
        workers = queues.get("workers") or []
        ready = sum(1 for w in workers if w.get("ready"))
        out(
            f"queues: {queues.get('count')} (queue 0 here, {ready} of {len(workers)} "
            f"workers up, {queues.get('restarts', 0)} restarts); counters are all queues'"
        )
    return "".join(line + "\n" for line in lines)


# -- the parser ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from dataplane.io.sockets import SOURCE_PORTS

    parser = argparse.ArgumentParser(
        prog="weft", description="A userspace, flannel-compatible overlay dataplane."
    )
    parser.add_argument("-v", "--verbose", action="count", default=1)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dp = sub.add_parser("dataplane", help="run the userspace dataplane with static peers")
    dp_sub = dp.add_subparsers(dest="dp_command", required=True, metavar="SUBCOMMAND")
    run = dp_sub.add_parser("run", help="run the engine in this network namespace")
    run.add_argument("--backend", choices=["vxlan", "udp", "host-gw"], required=True)
    run.add_argument("--network", type=parse_ipv4_network, required=True)
    run.add_argument("--subnet", type=parse_ipv4_network, required=True)
    run.add_argument("--public-ip", type=parse_ipv4, required=True)
    run.add_argument("--iface", help="underlay interface (default: the one holding --public-ip)")
    run.add_argument("--underlay-mtu", type=int, default=0)
    run.add_argument("--device", choices=["tun", "tap"], default="tun")
    run.add_argument("--vni", type=int, default=1)
    run.add_argument("--port", type=int, default=0)
    run.add_argument("--vtep-mac", type=parse_mac)
    run.add_argument(
        "--peer",
        type=parse_static_peer,
        action="append",
        default=[],
        metavar="SUBNET,PUBLIC_IP[,VTEPMAC]",
    )
    run.add_argument("--accept-any-source", action="store_true")
    run.add_argument(
        "--offload", choices=["auto", "on", "off"], default="auto",
        help="fast paths (TSO/GSO through a TAP or AF_PACKET, UDP GRO, recvmmsg): auto uses "
        "what the kernel accepts, on fails when it refuses one, off runs the plain engine",
    )  # fmt: skip
    run.add_argument(
        "--busy-poll", type=parse_busy_poll, default=0, metavar="USEC",
        help="keep polling for USEC after the last packet instead of sleeping: lower "
        "latency for a CPU while traffic flows (default 0: off)",
    )  # fmt: skip
    run.add_argument(
        "--keep-warm", type=parse_keep_warm, default=0, metavar="USEC", help=KEEP_WARM_HELP
    )
    run.add_argument(
        "--queues", type=parse_queues, default=1, metavar="N",
        help="multi-queue device and SO_REUSEPORT sockets, one process per queue: more "
        "cores for more flows, each flow on one queue (vxlan, udp; default 1)",
    )  # fmt: skip
    run.add_argument(
        "--source-ports", type=parse_source_ports, default=SOURCE_PORTS, metavar="N",
        help="vxlan: spread flows over N outer UDP source ports, one per flow by a hash of "
        f"the inner flow, as the kernel's VXLAN does (default {SOURCE_PORTS}; 0: all from "
        "the listening port)",
    )  # fmt: skip
    run.add_argument("--cpus", type=parse_cpus, default=(), metavar="LIST", help=CPUS_HELP)
    egress_thread_argument(run, "auto", EGRESS_THREAD_HELP)
    run.add_argument("--api-socket", default=DEFAULT_API_SOCKET)
    run.set_defaults(func=cmd_dataplane_run)

    st = sub.add_parser("status", help="show a running node: peers, counters, drops")
    st.add_argument("--api-socket", default=DEFAULT_API_SOCKET)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


#: Other modules add their sub-commands here (agent, config, leases, lab, bench).
EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def _register_all() -> None:
    if EXTRA_COMMANDS:
        return
    from control import cli_agent, cli_etcd, cli_lab, cli_trace

    EXTRA_COMMANDS.append(cli_agent.register)
    EXTRA_COMMANDS.append(cli_etcd.register)
    EXTRA_COMMANDS.append(cli_trace.register)
    EXTRA_COMMANDS.append(cli_lab.register)
    EXTRA_COMMANDS.append(__import__("bench.cli", fromlist=["register"]).register)


def main(argv: Sequence[str] | None = None) -> int:
    _register_all()
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one line, the traceback only with -vv
        logging.getLogger("weft").debug("unexpected error", exc_info=True)
        print(f"weft: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: the sub-command modules
    # import control.cli, and there must be one CliError class, not two.
    from control.cli import main as _main

    with contextlib.suppress(BrokenPipeError):
        sys.exit(_main())
