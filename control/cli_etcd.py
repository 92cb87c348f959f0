"""Operator commands on the etcd store: `weft config set|show` and `weft leases`.

They take the same etcd flags as `weft agent` (and FLANNELD_* environment).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from control.cli import CliError
from control.cli_agent import add_etcd_flags, make_store


def _run(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


def build_config_json(args: argparse.Namespace) -> str:
    """flannel's net-conf JSON from `weft config set` flags, validated by the same parser."""
    from control.config import ConfigError, parse_network_config

    backend: dict[str, Any] = {"Type": args.backend}
    if args.vni is not None:
        backend["VNI"] = args.vni
    if args.port is not None:
        backend["Port"] = args.port
    if args.mtu is not None:
        backend["MTU"] = args.mtu
    if args.direct_routing:
        backend["DirectRouting"] = True
    conf: dict[str, Any] = {"Network": args.network}
    if args.subnet_len is not None:
        conf["SubnetLen"] = args.subnet_len
    if args.subnet_min:
        conf["SubnetMin"] = args.subnet_min
    if args.subnet_max:
        conf["SubnetMax"] = args.subnet_max
    conf["Backend"] = backend
    text = json.dumps(conf, separators=(",", ":"))
    try:
        parse_network_config(text)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    return text


def cmd_config_set(args: argparse.Namespace) -> int:
    from control.model import config_key
    from control.store import StoreError

    text = build_config_json(args)
    key = config_key(args.etcd_prefix)

    async def main() -> None:
        store = make_store(args)
        try:
            await store.put(key, text.encode())
        finally:
            await store.close()

    try:
        _run(main())
    except StoreError as exc:
        raise CliError(str(exc)) from None
    print(f"{key} = {text}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from control.config import ConfigError, parse_network_config
    from control.model import config_key
    from control.store import StoreError

    key = config_key(args.etcd_prefix)

    async def main() -> Any:
        store = make_store(args)
        try:
            return await store.get(key)
        finally:
            await store.close()

    try:
        kv = _run(main())
    except StoreError as exc:
        raise CliError(str(exc)) from None
    if kv is None:
        raise CliError(f"no network config at {key} (write one with: weft config set --network …)")
    raw = kv.value.decode(errors="replace")
    print(f"{key}\n{raw}")
    try:
        cfg = parse_network_config(kv.value)
    except ConfigError as exc:
        raise CliError(f"the stored config is invalid: {exc}") from None
    port = cfg.backend.effective_port
    print(
        f"\nnetwork {cfg.network}, subnets /{cfg.subnet_len} from {cfg.subnet_min} to "
        f"{cfg.subnet_max}, backend {cfg.backend_type}"
        + (f" (VNI {cfg.backend.vni}, port {port})" if cfg.backend_type == "vxlan" else "")
        + (f" (port {port})" if cfg.backend_type == "udp" else "")
        + f", MTU on a 1500 underlay: {cfg.mtu(1500)}"
    )
    return 0


def format_expiry(seconds: float | None) -> str:
    if seconds is None:
        return "never (reservation)"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s"


def cmd_leases(args: argparse.Namespace) -> int:
    from control.model import (
        LeaseDecodeError,
        decode_lease_attrs,
        parse_subnet_key,
        subnets_prefix,
        vtep_mac,
    )
    from control.store import StoreError
    from dataplane.packet.ethernet import mac_to_str

    async def main() -> list[dict[str, Any]]:
        store = make_store(args)
        rows: list[dict[str, Any]] = []
        try:
            _, kvs = await store.list_prefix(subnets_prefix(args.etcd_prefix))
            for kv in kvs:
                parsed = parse_subnet_key(kv.key, args.etcd_prefix)
                try:
                    if parsed is None:
                        raise LeaseDecodeError("not a flannel subnet key")
                    attrs = decode_lease_attrs(kv.value)
                except LeaseDecodeError as exc:
                    rows.append({"key": kv.key, "error": str(exc)})
                    continue
                ttl = await store.time_to_live(kv.lease_id) if kv.lease_id else None
                mac = vtep_mac(attrs)
                rows.append(
                    {
                        "subnet": str(parsed[0]),
                        "public_ip": str(attrs.public_ip),
                        "backend": attrs.backend_type or "udp",
                        "vtep_mac": mac_to_str(mac) if mac else None,
                        "expires_in": ttl,
                    }
                )
        finally:
            await store.close()
        return rows

    try:
        rows = _run(main())
    except StoreError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'SUBNET':<20} {'PUBLIC IP':<16} {'BACKEND':<8} {'VTEP MAC':<18} EXPIRES IN")
    for row in rows:
        if "error" in row:
            print(f"{row['key']}: unreadable: {row['error']}")
            continue
        print(
            f"{row['subnet']:<20} {row['public_ip']:<16} {row['backend']:<8} "
            f"{row['vtep_mac'] or '-':<18} {format_expiry(row['expires_in'])}"
        )
    print(f"({len(rows)} leases, {time.strftime('%H:%M:%S')})")
    return 0


def register(sub: Any) -> None:
    cfg = sub.add_parser("config", help="the network config in etcd (flannel's net-conf)")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    s = cfg_sub.add_parser("set", help="write <prefix>/config")
    add_etcd_flags(s)
    s.add_argument("--network", required=True, help="cluster network, e.g. 10.244.0.0/16")
    s.add_argument("--backend", choices=["vxlan", "udp", "host-gw"], default="vxlan")
    s.add_argument("--vni", type=int)
    s.add_argument("--port", type=int)
    s.add_argument("--mtu", type=int, help="vxlan: the underlay MTU to assume")
    s.add_argument("--subnet-len", type=int)
    s.add_argument("--subnet-min")
    s.add_argument("--subnet-max")
    s.add_argument("--direct-routing", action="store_true")
    s.set_defaults(func=cmd_config_set)
    sh = cfg_sub.add_parser("show", help="print <prefix>/config and what it means")
    add_etcd_flags(sh)
    sh.set_defaults(func=cmd_config_show)
    le = sub.add_parser("leases", help="list the subnet leases in etcd")
    add_etcd_flags(le)
    le.add_argument("--json", action="store_true")
    le.set_defaults(func=cmd_leases)
