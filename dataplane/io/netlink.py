"""Thin pyroute2 adapter: links, addresses, routes, neighbours, FDB, sysctl.

Everything acts on the network namespace of the *calling thread* (enter a lab
namespace with ``control.lab.netns.in_netns``), and any thread may call, with
or without a running event loop; the caller blocks until the call is done.

Two paths, both per calling thread's namespace:

- The writes kernel mode makes per peer (``replace/delete_neigh``,
  ``replace/append/delete_fdb``, ``replace/delete_route``) and ``route_get``
  are rtnetlink requests encoded here and sent on a socket opened for the call
  in the calling thread (about 15 us): nothing is kept open.
- Everything else goes through pyroute2, whose sync ``IPRoute`` refuses to run
  in a thread with a running loop: the call is handed to the namespace's worker
  thread, which reuses one ``IPRoute`` (a fresh one after a socket-level error).
  A worker idle for ``IDLE_S`` closes its socket and exits, so it never keeps a
  deleted namespace (and its devices) alive longer than that.

Interface names are resolved with ``if_nametoindex`` in the calling thread's
namespace.  From async code prefer ``await loop.run_in_executor(None, fn, ...)``
to avoid blocking the loop, but note that executor threads keep the namespace
they were created in.

MACs are 6 raw bytes (``str`` "aa:bb:..." is accepted as input too).
Every failure raises ``NetlinkError`` (an ``OSError`` with ``errno``) whose
message is one line naming the operation.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address, ip_network
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as _PyrNetlinkError

T = TypeVar("T")

AF_BRIDGE = 7
NTF_SELF = 0x02
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT
RTNH_F_ONLINK = 0x04
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254


class NetlinkError(OSError):
    """A netlink operation failed; ``errno`` is set, the message is one line."""


# -- plumbing -------------------------------------------------------------------
#
# One worker thread per network namespace owns one IPRoute and runs every call
# made from that namespace; callers hand it the call and wait.  Why a thread:
# pyroute2's sync IPRoute refuses to run in a thread with a running event loop,
# and its state is thread-local.  Why per namespace: a thread and the sockets it
# opens belong to the namespace it was created in, so the worker is started by
# the first caller from that namespace and inherits it.  Why it retires: an open
# netlink socket (and the thread itself) keeps its namespace alive after
# ``ip netns del``, with all its devices, so after IDLE_S without work the
# worker closes its socket and exits; the next call starts a new one.

IDLE_S = 1.0
# pyroute2 0.9.7 leaves the kernel's ack to every ``link("get")`` in the socket's
# root queue, never read (~1.6 KB of RSS per call, for as long as the socket
# lives); a socket serves this many calls and is then replaced (~0.5 ms).
CALLS_PER_SOCKET = 100


class _Job:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[IPRoute], object]) -> None:
        self.fn = fn
        self.done = threading.Lock()  # held until the worker has run fn
        self.done.acquire()
        self.result: object = None
        self.error: BaseException | None = None


class _Worker:
    def __init__(self, netns: int) -> None:
        self.netns = netns
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.ipr: IPRoute | None = None
        self.calls_on_socket = 0
        self.thread = threading.Thread(
            target=self._serve, name=f"weft-netlink-{netns}", daemon=True
        )

    def _serve(self) -> None:
        try:
            while True:
                try:
                    job = self.jobs.get(timeout=IDLE_S)
                except queue.Empty:
                    with _lock:  # callers enqueue under _lock: nothing can slip in
                        if self.jobs.empty():
                            if _workers.get(self.netns) is self:
                                del _workers[self.netns]
                            return
                    continue
                self._do(job)
        finally:
            self._close()

    def _do(self, job: _Job) -> None:
        try:
            if self.ipr is None:
                self.ipr = IPRoute()
                self.calls_on_socket = 0
            self.calls_on_socket += 1
            job.result = job.fn(self.ipr)
        except BaseException as e:
            job.error = e
            if _socket_broken(e):
                self._close()  # a fresh socket for the next call
        finally:
            job.done.release()
        if self.calls_on_socket >= CALLS_PER_SOCKET:
            self._close()

    def _close(self) -> None:
        ipr, self.ipr = self.ipr, None
        if ipr is not None:
            with contextlib.suppress(Exception):  # a broken socket may fail to close
                ipr.close()


_lock = threading.Lock()
_workers: dict[int, _Worker] = {}  # netns inode -> its worker (the worker pins the netns)


def _forget_workers_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _workers.clear()  # their threads do not exist in the child


os.register_at_fork(after_in_child=_forget_workers_after_fork)


def _socket_broken(e: BaseException) -> bool:
    """An OSError that is not the kernel's answer to a request: the socket
    itself failed (ENOBUFS, EBADF...), so it is not reused."""
    return isinstance(e, OSError) and not isinstance(e, NetlinkError)


def _run(fn: Callable[[IPRoute], T]) -> T:
    """``fn(ipr)`` on the worker of the calling thread's network namespace."""
    netns = os.stat("/proc/thread-self/ns/net").st_ino
    worker = _workers.get(netns)
    if worker is not None and worker.thread is threading.current_thread():
        assert worker.ipr is not None  # called from inside a job: run it here
        return fn(worker.ipr)
    job = _Job(fn)
    with _lock:
        worker = _workers.get(netns)
        if worker is None:
            worker = _Worker(netns)
            try:
                worker.thread.start()  # from this thread, so it is in this namespace
            except RuntimeError as e:  # can't start new thread
                raise NetlinkError(errno.EAGAIN, f"netlink worker: {e}") from None
            _workers[netns] = worker
        worker.jobs.put(job)
    job.done.acquire()
    if job.error is not None:
        raise job.error
    return job.result  # type: ignore[return-value]


def _call(what: str, fn: Callable[[IPRoute], T], *, ignore: tuple[int, ...] = ()) -> T | None:
    """Run ``fn(ipr)`` with this namespace's IPRoute; errnos in ``ignore`` return None."""
    try:
        return _run(fn)
    except _PyrNetlinkError as e:
        if e.code in ignore:
            return None
        raise NetlinkError(e.code, f"{what}: {os.strerror(e.code)}") from None
    except NetlinkError:
        raise
    except OSError as e:
        if e.errno in ignore:
            return None
        raise NetlinkError(e.errno or errno.EIO, f"{what}: {e.strerror or e}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise NetlinkError(errno.EINVAL, f"{what}: {e}") from None


def _index_or_none(name: str) -> int | None:
    """``if_nametoindex`` (an ioctl on a socket of this thread's namespace):
    far cheaper than a netlink link request, and never stale."""
    try:
        return socket.if_nametoindex(name)
    except (OSError, ValueError):  # no such device; ValueError: NUL in the name
        return None


def _index(name: str) -> int:
    idx = _index_or_none(name)
    if idx is None:
        raise NetlinkError(errno.ENODEV, f"no such device {name!r}")
    return idx


# -- raw requests for the per-peer writes --------------------------------------------
#
# Neighbour, FDB and route writes are what kernel mode does per peer, thousands of
# times at start-up.  Through pyroute2 each costs ~0.4 ms of CPU (its request
# machinery and event loop); encoded here by hand (fixed layouts, the attributes
# pyroute2 sent) each is one sendto + one recv on a socket opened for the call in
# the calling thread (~15 us in all): no worker, nothing kept open.

NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLMSG_ERROR = 2
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RTPROT_BOOT = 3
RTN_UNICAST = 1
RT_SCOPE_NOWHERE = 255  # in a delete: match any scope, as `ip route del` does

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_NLA = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")


def _nla(kind: int, data: bytes) -> bytes:
    size = _NLA.size + len(data)
    return _NLA.pack(size, kind) + data + bytes(-size % 4)


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _ip4(ip: str | IPv4Address, what: str) -> bytes:
    """The 4 bytes of a dotted IPv4 address; anything else is a NetlinkError for `what`."""
    try:
        return IPv4Address(str(ip)).packed
    except ValueError as e:
        raise NetlinkError(errno.EINVAL, f"{what}: {e}") from None


def _request(
    what: str, msg_type: int, flags: int, body: bytes, *, ignore: tuple[int, ...] = ()
) -> bytes | None:
    """Send one rtnetlink request from the calling thread's namespace and
    return the kernel's answer: None for an ack, else the reply message (a
    request without NLM_F_ACK in ``flags`` gets one).  A kernel error becomes
    ``NetlinkError`` unless in ``ignore`` (then None)."""
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags | NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        ) as sock:
            sock.sendto(header + body, (0, 0))
            reply = sock.recv(65536)
    except OSError as e:
        raise NetlinkError(e.errno or errno.EIO, f"{what}: {e.strerror or e}") from None
    if len(reply) < _NLMSGHDR.size + _ERRNO.size:
        raise NetlinkError(errno.EIO, f"{what}: short netlink reply")
    size, kind = _NLMSGHDR.unpack_from(reply)[:2]
    if kind != NLMSG_ERROR:
        return reply[:size]
    code = -_ERRNO.unpack_from(reply, _NLMSGHDR.size)[0]
    if code and code not in ignore:
        raise NetlinkError(code, f"{what}: {os.strerror(code)}")
    return None


def _attrs(message: bytes, offset: int) -> dict[int, bytes]:
    """The top-level attributes from ``offset`` to the end of ``message``."""
    out: dict[int, bytes] = {}
    while offset + _NLA.size <= len(message):
        size, kind = _NLA.unpack_from(message, offset)
        if size < _NLA.size:
            break
        out[kind & 0x3FFF] = message[offset + _NLA.size : offset + size]  # no NESTED flag
        offset += (size + 3) & ~3
    return out


def _neigh_body(family: int, ifindex: int, state: int, flags: int, *attrs: bytes) -> bytes:
    return _NDMSG.pack(family, ifindex, state, flags, 0) + b"".join(attrs)


def _route_body(
    dst: IPv4Network, *, table: int, proto: int, scope: int, kind: int, flags: int = 0
) -> bytes:
    header = _RTMSG.pack(
        socket.AF_INET, dst.prefixlen, 0, 0, table if table < 256 else 0, proto, scope, kind, flags
    )
    return header + _nla(RTA_DST, dst.network_address.packed) + _nla(RTA_TABLE, _u32(table))


def _mac_raw(mac: bytes | str) -> bytes:
    try:
        b = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) else bytes(mac)
    except ValueError:
        b = b""
    if len(b) != 6:
        raise NetlinkError(errno.EINVAL, f"bad MAC {mac!r}")
    return b


def _mac_text(mac: bytes | str) -> str:
    return ":".join(f"{x:02x}" for x in _mac_raw(mac))


def _mac_bytes(text: str | None) -> bytes | None:
    return bytes.fromhex(text.replace(":", "")) if text else None


def _net(cidr: str | IPv4Network) -> IPv4Network:
    return ip_network(str(cidr), strict=False)  # type: ignore[return-value]


def _name_of(index: int | None) -> str | None:
    if not index:
        return None
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


# -- links ------------------------------------------------------------------------


def link_index(name: str) -> int:
    """The interface index of ``name``; ``NetlinkError`` (ENODEV) if missing."""
    return _index(name)  # no netlink: an ioctl in the calling thread's namespace


def link_exists(name: str) -> bool:
    return _index_or_none(name) is not None


def link_mac(name: str) -> bytes:
    """The link-layer address of ``name`` (6 bytes for Ethernet-like links)."""

    def fn(ipr: IPRoute) -> bytes:
        link = ipr.link("get", index=_index(name))[0]
        mac = _mac_bytes(link.get("address"))
        if mac is None:
            raise NetlinkError(errno.EINVAL, f"{name} has no link-layer address")
        return mac

    return _call(f"link_mac {name}", fn)  # type: ignore[return-value]


def link_mtu(name: str) -> int:
    return _call(  # type: ignore[return-value]
        f"link_mtu {name}", lambda ipr: ipr.link("get", index=_index(name))[0].get("mtu")
    )


def set_link(
    name: str,
    *,
    up: bool | None = None,
    mtu: int | None = None,
    mac: bytes | str | None = None,
    txqlen: int | None = None,
) -> None:
    """Set any of MTU, MAC, queue length and admin state (MAC before up)."""

    def fn(ipr: IPRoute) -> None:
        idx = _index(name)
        kw: dict[str, object] = {}
        if mtu is not None:
            kw["mtu"] = mtu
        if txqlen is not None:
            kw["txqlen"] = txqlen
        if mac is not None:
            kw["address"] = _mac_text(mac)
        if kw:
            ipr.link("set", index=idx, **kw)
        if up is not None:
            ipr.link("set", index=idx, state="up" if up else "down")

    _call(f"set_link {name}", fn)


def delete_link(name: str) -> None:
    """Delete ``name``; a missing link is not an error."""

    def fn(ipr: IPRoute) -> None:
        idx = _index_or_none(name)
        if idx is not None:
            ipr.link("del", index=idx)

    _call(f"delete_link {name}", fn, ignore=(errno.ENODEV,))


def create_vxlan(
    name: str,
    vni: int,
    local_ip: str | IPv4Address,
    dev: str,
    port: int = 8472,
    mac: bytes | str | None = None,
    mtu: int | None = None,
    learning: bool = False,
    *,
    udp_csum: bool = True,
) -> bytes:
    """flannel's VXLAN device: ``ip link add NAME [address MAC] [mtu MTU] type
    vxlan id VNI local LOCAL dev DEV dstport PORT nolearning udpcsum``.
    Left down and without address.  Returns its MAC (the VtepMAC).
    An existing link of that name → ``NetlinkError`` (EEXIST)."""

    def fn(ipr: IPRoute) -> bytes:
        kw: dict[str, object] = {
            "ifname": name,
            "kind": "vxlan",
            "vxlan_id": vni,
            "vxlan_local": str(local_ip),
            "vxlan_link": _index(dev),
            "vxlan_port": port,
            "vxlan_learning": 1 if learning else 0,
            "vxlan_udp_csum": 1 if udp_csum else 0,
        }
        if mac is not None:
            kw["address"] = _mac_text(mac)
        if mtu is not None:
            kw["mtu"] = mtu
        ipr.link("add", **kw)
        return _mac_bytes(ipr.link("get", index=_index(name))[0].get("address"))  # type: ignore[return-value]

    return _call(f"create_vxlan {name} vni {vni}", fn)  # type: ignore[return-value]


def vxlan_info(name: str) -> dict[str, object] | None:
    """The vxlan attributes of ``name`` (``id``, ``local``, ``link``, ``port``,
    ``learning``, ``udp_csum`` ...) or ``None`` if it is not a vxlan link —
    enough to decide whether an existing flannel.N device is compatible."""

    def fn(ipr: IPRoute) -> dict[str, object] | None:
        link = ipr.link("get", index=_index(name))[0]
        info = link.get("IFLA_LINKINFO")
        if not info or info.get("IFLA_INFO_KIND") != "vxlan":
            return None
        data = info.get("IFLA_INFO_DATA")
        out: dict[str, object] = {}
        for key, value in data["attrs"]:
            out[key.removeprefix("IFLA_VXLAN_").lower()] = value
        return out

    return _call(f"vxlan_info {name}", fn)


def bridge_ports(bridge: str) -> list[tuple[int, str, str]]:
    """(index, name, kind) of every link plugged into ``bridge``; [] without it."""

    def fn(ipr: IPRoute) -> list[tuple[int, str, str]]:
        master = _index_or_none(bridge)
        if master is None:
            return []
        out = []
        for link in ipr.get_links():
            if link.get("IFLA_MASTER") != master:
                continue
            info = link.get("IFLA_LINKINFO")
            kind = info.get("IFLA_INFO_KIND") if info else None
            out.append((int(link["index"]), str(link.get("IFLA_IFNAME")), str(kind or "")))
        return out

    return _call(f"bridge_ports {bridge}", fn) or []


def enable_udp_gro_forwarding(name: str, flush_timeout_ns: int) -> None:
    """GRO and rx-udp-gro-forwarding on ``name`` (ethtool features, as `ethtool -K
    NAME gro on rx-udp-gro-forwarding on`, in the calling thread's network
    namespace), then its gro_flush_timeout through /sys, which shows the devices
    of the namespace /sys was mounted in: right for a process started in its
    namespace (`ip netns exec`, a hostNetwork pod), not for a thread that only
    entered one. Not from a thread with a running event loop (pyroute2's Ethtool
    is synchronous)."""
    from pyroute2.ethtool import Ethtool

    try:
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(name)
            for key in ("rx-gro", "rx-udp-gro-forwarding"):
                features.features[key].enable = True
            ethtool.set_features(name, features)
        finally:
            ethtool.close()
    except KeyError as e:
        raise NetlinkError(errno.EOPNOTSUPP, f"ethtool {name}: no feature {e}") from None
    except OSError as e:
        raise NetlinkError(e.errno or errno.EIO, f"ethtool {name}: {e.strerror or e}") from None
    path = f"/sys/class/net/{name}/gro_flush_timeout"
    try:
        with open(path, "w") as f:
            f.write(f"{int(flush_timeout_ns)}\n")
    except OSError as e:
        raise NetlinkError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None


# -- addresses --------------------------------------------------------------------


def interface_ipv4(name: str) -> list[IPv4Interface]:
    """The IPv4 addresses on ``name`` as ``IPv4Interface`` (address/prefix)."""

    def fn(ipr: IPRoute) -> list[IPv4Interface]:
        idx = _index(name)
        return [
            IPv4Interface(f"{a.get('IFA_LOCAL') or a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.addr("dump", family=socket.AF_INET, index=idx)
            if a["index"] == idx
        ]

    return _call(f"interface_ipv4 {name}", fn)  # type: ignore[return-value]


def all_ipv4() -> list[tuple[str, IPv4Interface]]:
    """Every IPv4 address in the namespace as (interface name, address/prefix)."""

    def fn(ipr: IPRoute) -> list[tuple[str, IPv4Interface]]:
        names = {link["index"]: link.get("ifname") for link in ipr.link("dump")}
        return [
            (
                names.get(a["index"], ""),
                IPv4Interface(f"{a.get('IFA_LOCAL') or a.get('IFA_ADDRESS')}/{a['prefixlen']}"),
            )
            for a in ipr.addr("dump", family=socket.AF_INET)
        ]

    return _call("all_ipv4", fn)  # type: ignore[return-value]


def add_address(name: str, cidr: str | IPv4Interface) -> None:
    """``ip addr add CIDR dev NAME``; already present is not an error."""
    iface = IPv4Interface(str(cidr))

    def fn(ipr: IPRoute) -> None:
        idx = _index(name)
        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)

    _call(f"add_address {cidr} dev {name}", fn, ignore=(errno.EEXIST,))


def delete_address(name: str, cidr: str | IPv4Interface) -> None:
    iface = IPv4Interface(str(cidr))

    def fn(ipr: IPRoute) -> None:
        idx = _index(name)
        ipr.addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)

    _call(f"delete_address {cidr} dev {name}", fn, ignore=(errno.EADDRNOTAVAIL, errno.ENOENT))


def flush_addresses_in(
    name: str, network: str | IPv4Network, *, keep: str | IPv4Interface | None = None
) -> list[IPv4Interface]:
    """Remove every IPv4 address on ``name`` that lies inside ``network``
    (except ``keep``), as flanneld does on flannel.N.  Returns what it removed."""
    net = _net(network)
    keep_if = IPv4Interface(str(keep)) if keep is not None else None
    removed = [a for a in interface_ipv4(name) if a.ip in net and a != keep_if]
    for a in removed:
        delete_address(name, a)
    return removed


# -- routes -------------------------------------------------------------------------


def replace_route(
    dst_cidr: str | IPv4Network,
    *,
    dev: str,
    via: str | IPv4Address | None = None,
    onlink: bool = False,
    scope: int | None = None,
    table: int = RT_TABLE_MAIN,
) -> None:
    """``ip route replace DST [via VIA] dev DEV [onlink]``.  Scope defaults as
    in iproute2: universe with a gateway, link without one."""
    dst = _net(dst_cidr)
    what = f"replace_route {dst} dev {dev}" + (f" via {via}" if via else "")
    if scope is None:
        scope = RT_SCOPE_UNIVERSE if via is not None else RT_SCOPE_LINK
    gateway = _nla(RTA_GATEWAY, _ip4(via, what)) if via is not None else b""
    body = (
        _route_body(
            dst,
            table=table,
            proto=RTPROT_BOOT,  # what `ip route` uses
            scope=scope,
            kind=RTN_UNICAST,
            flags=RTNH_F_ONLINK if onlink else 0,
        )
        + _nla(RTA_OIF, _u32(_index(dev)))
        + gateway
    )
    _request(what, RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body)


def delete_route(dst_cidr: str | IPv4Network, dev: str | None = None) -> None:
    """``ip route del DST [dev DEV]`` in the main table, any scope; a missing
    route (or device) is not an error."""
    dst = _net(dst_cidr)
    body = _route_body(dst, table=RT_TABLE_MAIN, proto=0, scope=RT_SCOPE_NOWHERE, kind=0)
    if dev is not None:
        idx = _index_or_none(dev)
        if idx is None:
            return
        body += _nla(RTA_OIF, _u32(idx))
    _request(
        f"delete_route {dst}", RTM_DELROUTE, NLM_F_ACK, body, ignore=(errno.ESRCH, errno.ENOENT)
    )


def routes_to(dst_cidr: str | IPv4Network) -> list[tuple[str | None, IPv4Address | None]]:
    """Exact-prefix routes for ``dst_cidr`` in the main table as (dev, gateway)."""
    dst = _net(dst_cidr)

    def fn(ipr: IPRoute) -> list[tuple[str | None, IPv4Address | None]]:
        out = []
        for r in ipr.route("dump", family=socket.AF_INET):
            if r.get("table") != RT_TABLE_MAIN or r["dst_len"] != dst.prefixlen:
                continue
            if IPv4Address(r.get("dst") or "0.0.0.0") != dst.network_address:
                continue
            gw = r.get("gateway")
            out.append((_name_of(r.get("oif")), IPv4Address(gw) if gw else None))
        return out

    return _call(f"routes_to {dst}", fn)  # type: ignore[return-value]


def route_get(ip: str | IPv4Address) -> tuple[str, IPv4Address | None]:
    """``ip route get IP`` → (output device, gateway or None)."""
    what = f"route_get {ip}"
    try:
        dst = IPv4Network(str(ip))  # a /32
    except ValueError as e:
        raise NetlinkError(errno.EINVAL, f"{what}: {e}") from None
    body = _RTMSG.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, 0) + _nla(
        RTA_DST, dst.network_address.packed
    )
    reply = _request(what, RTM_GETROUTE, 0, body)
    attrs = _attrs(reply or b"", _NLMSGHDR.size + _RTMSG.size)
    oif = attrs.get(RTA_OIF)
    dev = _name_of(struct.unpack("=I", oif)[0]) if oif and len(oif) == 4 else None
    if dev is None:
        raise NetlinkError(errno.ENETUNREACH, f"no output device for {ip}")
    gateway = attrs.get(RTA_GATEWAY)
    return dev, (IPv4Address(gateway) if gateway and len(gateway) == 4 else None)


def default_route_interface() -> str | None:
    """The device of the best IPv4 default route in the main table, or None."""

    def fn(ipr: IPRoute) -> str | None:
        best: tuple[int, int] | None = None
        for r in ipr.route("dump", family=socket.AF_INET):
            if r["dst_len"] != 0 or r.get("table") != RT_TABLE_MAIN or r["type"] != 1:
                continue
            oif = r.get("oif")
            if oif is None:
                mp = r.get("multipath")
                oif = mp[0]["oif"] if mp else None
            if oif is None:
                continue
            prio = r.get("priority") or 0
            if best is None or prio < best[0]:
                best = (prio, oif)
        return _name_of(best[1]) if best else None

    return _call("default_route_interface", fn)


# -- neighbours and FDB ---------------------------------------------------------------


def replace_neigh(ip: str | IPv4Address, mac: bytes | str, dev: str) -> None:
    """``ip neigh replace IP lladdr MAC dev DEV nud permanent``."""
    what = f"replace_neigh {ip} dev {dev}"
    dst = _ip4(ip, what)
    body = _neigh_body(
        socket.AF_INET,
        _index(dev),
        NUD_PERMANENT,
        0,
        _nla(NDA_DST, dst),
        _nla(NDA_LLADDR, _mac_raw(mac)),
    )
    _request(what, RTM_NEWNEIGH, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body)


def delete_neigh(ip: str | IPv4Address, dev: str) -> None:
    """``ip neigh del IP dev DEV``; missing entry or device is not an error."""
    what = f"delete_neigh {ip} dev {dev}"
    dst = _ip4(ip, what)
    idx = _index_or_none(dev)
    if idx is None:
        return
    body = _neigh_body(socket.AF_INET, idx, NUD_PERMANENT, 0, _nla(NDA_DST, dst))
    _request(what, RTM_DELNEIGH, NLM_F_ACK, body, ignore=(errno.ENOENT, errno.ESRCH))


def lookup_neigh(ip: str | IPv4Address, dev: str) -> bytes | None:
    """The lladdr of a usable (REACHABLE/STALE/DELAY/PROBE/PERMANENT) neighbour
    entry for ``ip`` on ``dev``, else None."""
    want = ip_address(str(ip))

    def fn(ipr: IPRoute) -> bytes | None:
        idx = _index(dev)
        for n in ipr.neigh("dump", family=socket.AF_INET, ifindex=idx):
            if n["ifindex"] != idx or n.get("dst") is None:
                continue
            if ip_address(n.get("dst")) != want or not n["state"] & NUD_USABLE:
                continue
            return _mac_bytes(n.get("lladdr"))
        return None

    return _call(f"lookup_neigh {ip} dev {dev}", fn)


def _fdb_body(mac: bytes | str, ifindex: int, dst_ip: str | IPv4Address | None, what: str) -> bytes:
    dst = _nla(NDA_DST, _ip4(dst_ip, what)) if dst_ip is not None else b""
    return _neigh_body(
        AF_BRIDGE,
        ifindex,
        NUD_PERMANENT | NUD_NOARP,
        NTF_SELF,
        _nla(NDA_LLADDR, _mac_raw(mac)),
        dst,
    )


def replace_fdb(mac: bytes | str, dev: str, dst_ip: str | IPv4Address) -> None:
    """``bridge fdb replace MAC dev DEV dst DST self permanent``
    (AF_BRIDGE, NTF_SELF, NUD_PERMANENT)."""
    what = f"replace_fdb {_mac_text(mac)} dev {dev} dst {dst_ip}"
    body = _fdb_body(mac, _index(dev), dst_ip, what)
    _request(what, RTM_NEWNEIGH, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body)


def append_fdb(mac: bytes | str, dev: str, dst_ip: str | IPv4Address) -> None:
    """``bridge fdb append MAC dev DEV dst DST self permanent`` (one MAC, many dsts)."""
    what = f"append_fdb {_mac_text(mac)} dev {dev} dst {dst_ip}"
    body = _fdb_body(mac, _index(dev), dst_ip, what)
    _request(
        what, RTM_NEWNEIGH, NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND, body, ignore=(errno.EEXIST,)
    )


def delete_fdb(mac: bytes | str, dev: str, dst_ip: str | IPv4Address | None = None) -> None:
    """``bridge fdb del MAC dev DEV [dst DST] self``; missing is not an error."""
    what = f"delete_fdb {_mac_text(mac)} dev {dev}"
    idx = _index_or_none(dev)
    if idx is None:
        return
    body = _fdb_body(mac, idx, dst_ip, what)
    _request(what, RTM_DELNEIGH, NLM_F_ACK, body, ignore=(errno.ENOENT, errno.ESRCH))


def fdb_entries(dev: str) -> list[tuple[bytes, IPv4Address | None]]:
    """(MAC, dst) pairs of ``dev``'s self FDB (vxlan remote entries)."""

    def fn(ipr: IPRoute) -> list[tuple[bytes, IPv4Address | None]]:
        idx = _index(dev)
        out = []
        for n in ipr.neigh("dump", family=AF_BRIDGE, ifindex=idx):
            if n["ifindex"] != idx or not n.get("lladdr"):
                continue
            dst = n.get("dst")
            out.append((_mac_bytes(n.get("lladdr")), IPv4Address(dst) if dst else None))
        return out

    return _call(f"fdb_entries {dev}", fn)  # type: ignore[return-value]


# -- sysctl ---------------------------------------------------------------------------


def _sysctl_path(path: str) -> str:
    if path.startswith("/"):
        return path
    if "/" not in path:
        path = path.replace(".", "/")
    return "/proc/sys/" + path


def sysctl_set(path: str, value: str | int) -> None:
    """Write a sysctl of the calling thread's namespace.  ``path`` is dotted
    (``net.ipv4.ip_forward``), slashed (``net/ipv4/conf/flannel.1/rp_filter``
    — use this form when a name contains a dot) or absolute under /proc/sys."""
    p = _sysctl_path(path)
    try:
        with open(p, "w") as f:
            f.write(f"{value}\n")
    except OSError as e:
        raise NetlinkError(e.errno or errno.EIO, f"sysctl {p}={value}: {e.strerror}") from None


def sysctl_get(path: str) -> str:
    p = _sysctl_path(path)
    try:
        with open(p) as f:
            return f.read().strip()
    except OSError as e:
        raise NetlinkError(e.errno or errno.EIO, f"sysctl {p}: {e.strerror}") from None
