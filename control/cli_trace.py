"""`weft trace explain` and `weft trace live`: see every packet."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from control.cli import DEFAULT_API_SOCKET, CliError


def cmd_explain(args: argparse.Namespace) -> int:
    from control.api import api_request

    try:
        result = api_request(args.api_socket, {"op": "explain", "dst": args.dst, "src": args.src})
    except ConnectionError as exc:
        raise CliError(str(exc)) from None
    if "error" in result:
        raise CliError(result["error"])
    if args.svg:
        from control.explain_svg import render_svg

        with open(args.svg, "w") as f:
            f.write(render_svg(result))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from control.explain import render_text

        sys.stdout.write(render_text(result))
        if args.svg:
            print(f"(drawn in {args.svg})")
    return 0


def format_event(ev: dict[str, Any]) -> str:
    t = time.strftime("%H:%M:%S", time.localtime(ev["t"])) + f".{int(ev['t'] % 1 * 1e6):06d}"
    if "src" not in ev:
        # A datagram dropped before its inner packet was looked at.
        verdict = ev["verdict"] + (f" ({ev['reason']})" if "reason" in ev else "")
        return (
            f"{t} {ev['dir']} {ev['backend']} datagram {ev.get('len', '?')}B "
            f"peer {ev.get('peer', '?')} {verdict}"
        )
    where = f"{ev['src']}"
    if "sport" in ev:
        where += f":{ev['sport']}"
    where += f" > {ev.get('dst', '?')}"
    if "dport" in ev:
        where += f":{ev['dport']}"
    proto = ev.get("proto", "?")
    if "icmp_type" in ev:
        proto += f" type {ev['icmp_type']}"
    verdict = ev["verdict"] + (f" ({ev['reason']})" if "reason" in ev else "")
    peer = f" peer {ev['peer']}" if "peer" in ev else ""
    return f"{t} {ev['dir']} {ev['backend']} {where} {proto} {ev.get('len', '?')}B{peer} {verdict}"


def cmd_live(args: argparse.Namespace) -> int:
    from control.api import api_stream
    from dataplane.trace import TraceFilter, write_pcap_header, write_pcap_record

    try:
        TraceFilter.parse(args.filter)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    request = {
        "op": "trace",
        "filter": args.filter,
        "count": args.count,
        "sample": args.sample,
        "rate": args.rate,
    }
    pcap = open(args.pcap, "wb") if args.pcap else None  # noqa: SIM115
    if pcap is not None:
        write_pcap_header(pcap)
    dissect = None
    if args.dissect:
        from scapy.layers.inet import UDP
        from scapy.layers.l2 import Ether
        from scapy.layers.vxlan import VXLAN
        from scapy.packet import bind_layers

        bind_layers(UDP, VXLAN, dport=8472)
        dissect = Ether
    seen = 0
    try:
        for ev in api_stream(args.api_socket, request):
            if "error" in ev:
                raise CliError(ev["error"])
            if "heartbeat" in ev:
                continue
            seen += 1
            print(format_event(ev), flush=True)
            frame = bytes.fromhex(ev.get("frame", ""))
            if pcap is not None and frame:
                write_pcap_record(pcap, ev["t"], frame)
                pcap.flush()
            if dissect is not None and frame:
                print(dissect(frame).show(dump=True), flush=True)
            if args.count and seen >= args.count:
                break
    except ConnectionError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        pass
    finally:
        if pcap is not None:
            pcap.close()
    return 0


def register(sub: Any) -> None:
    tr = sub.add_parser("trace", help="see packets: explain a route, or trace live")
    tr_sub = tr.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")
    ex = tr_sub.add_parser("explain", help="how the node would send a packet to DST")
    ex.add_argument("dst")
    ex.add_argument("--src")
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--svg", metavar="FILE", help="also draw the journey as an SVG picture")
    ex.add_argument("--api-socket", default=DEFAULT_API_SOCKET)
    ex.set_defaults(func=cmd_explain)
    live = tr_sub.add_parser("live", help="stream per-packet events from the running agent")
    live.add_argument("--filter", default="", help="e.g. 'icmp and host 10.244.2.5', 'drop'")
    live.add_argument("--count", type=int, default=0, help="stop after N events")
    live.add_argument("--sample", type=int, default=1, help="keep one packet in N")
    live.add_argument("--rate", type=float, default=1000, help="events per second at most")
    live.add_argument("--dissect", action="store_true", help="scapy's layered view")
    live.add_argument("--pcap", metavar="FILE", help="write the traced frames to a pcap")
    live.add_argument("--api-socket", default=DEFAULT_API_SOCKET)
    live.set_defaults(func=cmd_live)
