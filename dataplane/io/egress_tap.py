"""The egress TAP: where the send path writes super-packets for the kernel to cut.

A TAP opened with the 24-byte tunnel vnet header and TUN_F_UDP_TUNNEL_GSO(_CSUM)
(Linux 6.17+) takes a whole VXLAN super-packet — outer Ethernet / IPv4 / UDP in
front once — as if it came in from a NIC; the kernel routes it to the peer
(ip_forward, accept_local, rp_filter 0 on the TAP, an iptables FORWARD ACCEPT
rule) and cuts it into standard datagrams on the way out. With --egress-thread
the TAP's NAPI runs in a kernel thread (decisions §20, §23).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from typing import TYPE_CHECKING

from dataplane.io import netlink
from dataplane.io.tun import (
    TSO_OFFLOADS,
    TunDevice,
    TunError,
    errno_text,
    get_sndbuf,
    open_tun,
    set_offload,
    set_sndbuf,
    set_vnet_hdr_size,
)
from dataplane.packet.vnet import VNET_HDR_TUNNEL_LEN

if TYPE_CHECKING:
    from dataplane.io.offloads import FastPaths

log = logging.getLogger("weft.fastpath")

# Linux ≥ 6.17 (include/uapi/linux/if_tun.h); Debian 12's headers predate them.
TUN_F_UDP_TUNNEL_GSO = 0x080
TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100
#: The kernel takes the tunnel bits only with TSO (or USO) bits beside them.
EGRESS_OFFLOADS = TSO_OFFLOADS | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM

#: --egress-thread: the TAP queue in front of the kernel thread holds two 64 KB
#: super-packets (TUNSETSNDBUF; a TAP has no bound of its own). The thread takes
#: up to 64 packets a poll and passes them all on before the CPU's backlog runs:
#: with 4 MiB queued, one poll put ~60 super-packets, 2,600 frames once cut, into
#: the next hop, and on the lab's veth underlay (a 1,000-packet backlog a CPU)
#: thousands a second were dropped there (decisions §20).
EGRESS_QUEUE_BYTES = 128 << 10


def egress_name(device_name: str) -> str:
    """The egress TAP's name: gso-weft.1 beside weft.1 (IFNAMSIZ allows 15 bytes)."""
    return f"gso-{device_name}"[:15]


def open_egress_tap(
    paths: FastPaths,
    device_name: str,
    *,
    multi_queue: bool = False,
    attach: bool = False,
    thread: str = "off",
) -> None:
    """The TAP weft writes tunnel-GSO frames into; on success paths.egress is set.

    With `attach` (a queue worker, dataplane/io/queues.py) the TAP exists already,
    made and configured by queue 0: this opens one more of its queues and leaves
    its sysctls, link state and FORWARD rule to their owner.

    With `thread` "on" (--egress-thread) the TAP is opened with IFF_NAPI and made
    `threaded`: a write only queues the frame, and a kernel thread segments and
    forwards it while weft reads on (decisions §20); paths.egress_thread says
    whether that took. With "auto" it is opened with IFF_NAPI and left unthreaded,
    for the owner to switch (switch_egress_thread, §23; with queues, queue 0 switches
    and tells the workers, §31); until then the kernel's NAPI poll runs inside each
    write, as without IFF_NAPI."""
    name = egress_name(device_name)
    if not paths.wanted("tunnel_gso"):
        return
    if attach and not os.path.exists(f"/sys/class/net/{name}"):
        paths.refuse("tunnel_gso", f"queue 0 has no egress TAP {name}")
        return
    rp_filter = _sysctl_int("net/ipv4/conf/all/rp_filter")
    if rp_filter and not attach:
        # A device's effective rp_filter is max(all, device), and in either mode the
        # kernel drops frames from our own address coming in on a TAP that has no
        # IPv4 address (fib_validate_source: no_addr → last_resort → e_rpf).
        paths.refuse(
            "tunnel_gso",
            f"net.ipv4.conf.all.rp_filter={rp_filter} would drop the TAP's frames "
            "(the send fast path needs 0)",
        )
        return
    tap = _open_egress_queue(paths, name, multi_queue or attach, napi=thread != "off")
    if tap is None:
        return
    try:
        if not attach:
            _configure_egress_tap(name)
        paths.egress_mac = netlink.link_mac(name)
        if thread == "on":
            paths.egress_thread = _napi_threaded(name) if attach else _thread_napi(name)
            paths.egress_thread_mode = "on" if paths.egress_thread else "off"
        elif thread == "auto":
            paths.egress_thread_mode = "auto"
            # (a worker started again while queue 0 has the thread on: ordered at once)
            paths.egress_thread = attach and _napi_threaded(name)
    except OSError as exc:
        tap.close()
        paths.refuse("tunnel_gso", f"cannot configure TAP {name}: {errno_text(exc)}")
        return
    paths.egress = tap
    paths.enable("tunnel_gso")
    if attach:
        return
    err = allow_forwarding(name)
    if err is None:
        paths.forward_rule = name
    elif err:
        log.warning(
            "could not add `iptables -I FORWARD -i %s -j ACCEPT` (%s): a FORWARD policy of "
            "DROP would drop the fast path's datagrams",
            name,
            err,
        )


def _configure_egress_tap(name: str) -> None:
    for key, value in (("disable_ipv6", 1),):
        with contextlib.suppress(OSError):  # IPv6 may be off altogether
            netlink.sysctl_set(f"net/ipv6/conf/{name}/{key}", value)
    for key, value in (("accept_local", 1), ("rp_filter", 0), ("forwarding", 1)):
        netlink.sysctl_set(f"net/ipv4/conf/{name}/{key}", value)
    netlink.set_link(name, up=True)


def _write_threaded(name: str, on: bool) -> None:
    """The TAP's NAPI polled by a kernel thread (`napi/<name>-N`; on) or inside
    weft's writes: sysfs `threaded`, Linux 5.12+. OSError when refused."""
    with open(f"/sys/class/net/{name}/threaded", "w") as f:
        f.write("1" if on else "0")


def _thread_napi(name: str) -> bool:
    """Have a kernel thread poll the TAP's NAPI, not weft's writes. False, said once,
    when the kernel refuses."""
    try:
        _write_threaded(name, True)
    except OSError as exc:
        log.warning(
            "--egress-thread: cannot write 1 to /sys/class/net/%s/threaded (%s): the "
            "kernel's work behind egress writes stays inside them",
            name,
            errno_text(exc),
        )
        return False
    return True


def switch_egress_thread(paths: FastPaths, name: str, on: bool) -> bool:
    """--egress-thread auto: the TAP's NAPI into its kernel thread (on) or back into
    weft's writes. False, said once and auto given up, when the kernel refuses."""
    try:
        _write_threaded(name, on)
    except OSError as exc:
        log.warning(
            "--egress-thread auto: cannot write %d to /sys/class/net/%s/threaded (%s): "
            "the thread stays %s",
            on,
            name,
            errno_text(exc),
            "on" if paths.egress_thread else "off",
        )
        paths.egress_thread_mode = "on" if paths.egress_thread else "off"
        return False
    paths.egress_thread = on
    paths.counters.egress_thread_switches += 1
    return True


def _napi_threaded(name: str) -> bool:
    """Queue 0 made the TAP's NAPI threaded (a worker attaching to its queue)?"""
    try:
        with open(f"/sys/class/net/{name}/threaded") as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


def _open_egress_queue(
    paths: FastPaths, name: str, multi_queue: bool, *, napi: bool = False
) -> TunDevice | None:
    try:
        tap = open_tun(name, tap=True, vnet_hdr=True, multi_queue=multi_queue, napi=napi)
    except TunError as exc:
        paths.refuse("tunnel_gso", f"cannot open TAP {name}: {errno_text(exc)}")
        return None
    try:
        set_vnet_hdr_size(tap, VNET_HDR_TUNNEL_LEN)
        set_offload(tap, EGRESS_OFFLOADS)
        if napi:
            # What weft writes now waits in a queue for the kernel thread, and a TAP
            # queue has no limit of its own: bound it (EGRESS_QUEUE_BYTES; a full
            # queue refuses the write, EAGAIN, and weft waits for room).
            set_sndbuf(tap, EGRESS_QUEUE_BYTES)
            paths.egress_queue_bytes = get_sndbuf(tap)
    except TunError as exc:
        tap.close()
        paths.refuse(
            "tunnel_gso",
            f"TAP refused TUN_F_UDP_TUNNEL_GSO (Linux 6.17+): {errno_text(exc)}",
        )
        return None
    return tap


def _iptables(*args: str) -> subprocess.CompletedProcess[str] | None:
    binary = shutil.which("iptables")
    if binary is None:
        return None
    return subprocess.run([binary, "-w", "5", *args], capture_output=True, text=True, timeout=30)


def allow_forwarding(tap: str) -> str | None:
    """Accept what the egress TAP forwards, ahead of the FORWARD chain's rules.

    The kernel *forwards* the GSO frames (they come in on the TAP), so a FORWARD
    policy of DROP — Docker sets one — would drop them, as it would drop pod
    traffic if flanneld did not add its own ACCEPT rules. Only weft writes to the
    TAP. Returns None when the rule is in place, "" when there is no iptables,
    else the error."""
    rule = ("FORWARD", "-i", tap, "-j", "ACCEPT")
    check = _iptables("-C", *rule)
    if check is None:
        return ""
    if check.returncode == 0:
        return None
    insert = _iptables("-I", *rule)
    if insert is not None and insert.returncode == 0:
        return None
    return (insert.stderr if insert is not None else "").strip() or "iptables failed"


def remove_forwarding(tap: str) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        _iptables("-D", "FORWARD", "-i", tap, "-j", "ACCEPT")


def _sysctl_int(path: str) -> int | None:
    try:
        return int(netlink.sysctl_get(path))
    except (OSError, ValueError):
        return None
