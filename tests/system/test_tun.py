"""TUN/TAP through dataplane.io.tun, created inside a lab namespace from the
test process (control.lab.netns.in_netns), answering the kernel's ping."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import uvloop

from control.lab.netns import LabError, in_netns
from control.lab.topology import Lab
from dataplane.io import netlink
from dataplane.io.tun import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_TUN,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TunDevice,
    TunError,
    features,
    open_tun,
    set_offload,
    set_queue,
)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun")

PEER_MAC = bytes.fromhex("02000000aa02")


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def echo_reply(pkt: bytes) -> bytes | None:
    """The ICMP echo reply to an IPv4 echo request, else None (struct only)."""
    if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 1:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    if pkt[ihl] != 8:
        return None
    src, dst = pkt[12:16], pkt[16:20]
    icmp = bytearray(pkt[ihl:])
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", csum(bytes(icmp)))
    hdr = bytearray(pkt[:ihl])
    hdr[8] = 64
    hdr[12:16], hdr[16:20] = dst, src
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", csum(bytes(hdr)))
    return bytes(hdr) + bytes(icmp)


def arp_reply(frame: bytes, my_mac: bytes) -> bytes | None:
    """Answer an ARP who-has in an Ethernet frame as ``my_mac``."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if (htype, ptype, hlen, plen, op) != (1, 0x0800, 6, 4, 1):
        return None
    sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, my_mac, tpa, sha, spa)
    return sha + my_mac + b"\x08\x06" + arp


def serve(tun: TunDevice, handler, stop, deadline_s: float = 10.0) -> list[bytes]:
    """Read packets until ``stop()``; write back whatever ``handler`` returns."""
    seen: list[bytes] = []
    deadline = time.monotonic() + deadline_s
    while not stop() and time.monotonic() < deadline:
        r, _, _ = select.select([tun], [], [], 0.05)
        if not r:
            continue
        while True:
            try:
                pkt = tun.read()
            except BlockingIOError:
                break
            seen.append(pkt)
            out = handler(pkt)
            if out is not None:
                tun.write(out)
    return seen


def ping_proc(lab: Lab, ns: str, dst: str, log: Path, count: int = 3):
    return lab.spawn(ns, ["ping", "-n", "-c", str(count), "-i", "0.2", "-w", "8", dst], log=log)


def test_tun_answers_kernel_ping(lab: Lab, tmp_path: Path) -> None:
    ns = lab.add_netns("tun")
    with in_netns(ns):
        tun = open_tun("weft0")
        netlink.add_address("weft0", "10.99.0.1/24")
        netlink.set_link("weft0", up=True, mtu=1400)
    with tun:
        assert tun.name == "weft0" and not tun.tap
        assert os.get_blocking(tun.fileno()) is False
        link = lab.ip_json(ns, "link", "show", "weft0")[0]
        assert link["mtu"] == 1400 and "UP" in link["flags"]
        log = tmp_path / "ping.log"
        ping = ping_proc(lab, ns, "10.99.0.2", log)
        seen = serve(tun, echo_reply, lambda: ping.poll() is not None)
        assert lab.stop(ping) == 0, log.read_text()
    assert "3 received" in log.read_text()
    requests = [p for p in seen if echo_reply(p) is not None]
    assert len(requests) == 3
    assert len(requests[0]) == 84  # IFF_NO_PI: the IPv4 header comes first
    assert requests[0][12:20] == socket.inet_aton("10.99.0.1") + socket.inet_aton("10.99.0.2")
    tun.close()  # idempotent
    with pytest.raises(ValueError):
        tun.fileno()
    # the kernel removed the device with the last fd
    assert lab.ip(ns, "link", "show", "weft0", check=False) == ""


def test_tap_reads_ethernet_frames_and_answers_arp_and_ping(lab: Lab, tmp_path: Path) -> None:
    ns = lab.add_netns("tap")
    with in_netns(ns):
        tap = open_tun("weft%d", tap=True)
        netlink.add_address(tap.name, "10.98.0.1/24")
        netlink.set_link(tap.name, up=True)
        tap_mac = netlink.link_mac(tap.name)
    assert tap.name == "weft0" and tap.tap

    def handler(frame: bytes) -> bytes | None:
        reply = arp_reply(frame, PEER_MAC)
        if reply is not None:
            return reply
        if frame[:6] == PEER_MAC and frame[12:14] == b"\x08\x00":
            ip = echo_reply(frame[14:])
            if ip is not None:
                return frame[6:12] + PEER_MAC + b"\x08\x00" + ip
        return None

    with tap:
        log = tmp_path / "ping.log"
        ping = ping_proc(lab, ns, "10.98.0.2", log)
        seen = serve(tap, handler, lambda: ping.poll() is not None)
        assert lab.stop(ping) == 0, log.read_text()
        neigh = lab.ip_json(ns, "neigh", "show", "10.98.0.2")
        assert neigh and neigh[0]["lladdr"] == "02:00:00:00:aa:02"
    arps = [f for f in seen if f[12:14] == b"\x08\x06"]
    assert arps, "the kernel never asked for 10.98.0.2"
    assert arps[0][:6] == b"\xff" * 6 and arps[0][6:12] == tap_mac
    assert arps[0][38:42] == socket.inet_aton("10.98.0.2")
    echoes = [f for f in seen if f[12:14] == b"\x08\x00" and echo_reply(f[14:])]
    assert len(echoes) == 3 and echoes[0][:6] == PEER_MAC


async def test_uvloop_reader_then_remove_before_close(lab: Lab, tmp_path: Path) -> None:
    """The runner's pattern: add_reader, drain until BlockingIOError,
    remove_reader *before* close (uvloop aborts otherwise)."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop)
    ns = lab.add_netns("uv")
    with in_netns(ns):
        tun = open_tun("weft0")
        netlink.add_address("weft0", "10.97.0.1/24")
        netlink.set_link("weft0", up=True)
    replies = 0

    def on_readable() -> None:
        nonlocal replies
        while True:
            try:
                pkt = tun.read()
            except BlockingIOError:
                return
            out = echo_reply(pkt)
            if out is not None:
                tun.write(out)
                replies += 1

    loop.add_reader(tun.fileno(), on_readable)
    try:
        log = tmp_path / "ping.log"
        ping = ping_proc(lab, ns, "10.97.0.2", log, count=5)
        while ping.poll() is None:
            await asyncio.sleep(0.05)
        assert ping.returncode == 0, log.read_text()
    finally:
        loop.remove_reader(tun.fileno())
        tun.close()
    assert replies == 5
    await asyncio.sleep(0.01)  # the loop runs on after close: no abort


def test_multi_queue_vnet_hdr_offload_and_features(lab: Lab) -> None:
    feats = features()
    for flag in (IFF_TUN, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE):
        assert feats & flag, hex(feats)
    ns = lab.add_netns("mq")
    with in_netns(ns):
        q0 = open_tun("wmq0", multi_queue=True, vnet_hdr=True)
        q1 = open_tun("wmq0", multi_queue=True, vnet_hdr=True)
    with q0, q1:
        assert q0.name == q1.name == "wmq0" and q0.fd != q1.fd
        set_offload(q0, TUN_F_CSUM | TUN_F_TSO4)
        set_queue(q1, attach=False)
        set_queue(q1, attach=True)
        link = lab.ip_json(ns, "-d", "link", "show", "wmq0")[0]
        assert link["num_tx_queues"] > 1
        # a second open with other flags (no multi_queue) is refused, one line
        with in_netns(ns), pytest.raises(TunError) as exc:
            open_tun("wmq0")
        assert "\n" not in str(exc.value) and exc.value.errno is not None


def test_tun_errors_are_one_line_oserrors() -> None:
    with pytest.raises(TunError) as exc:
        open_tun("x" * 16)
    assert isinstance(exc.value, OSError) and "\n" not in str(exc.value)
    with pytest.raises(TunError):
        open_tun("")


def test_device_lives_only_in_its_namespace(lab: Lab) -> None:
    ns = lab.add_netns("iso")
    root_before = os.stat("/proc/thread-self/ns/net").st_ino
    with in_netns(ns):
        assert os.stat("/proc/thread-self/ns/net").st_ino != root_before
        tun = open_tun("weftiso0")
    with tun:
        assert os.stat("/proc/thread-self/ns/net").st_ino == root_before
        assert "weftiso0" in lab.ip(ns, "-br", "link")
        assert "weftiso0" not in Path("/proc/thread-self/net/dev").read_text()


def test_in_netns_restores_on_error_and_threads_inherit(lab: Lab) -> None:
    ns = lab.add_netns("ctx")
    here = os.stat("/proc/thread-self/ns/net").st_ino
    target = os.stat(f"/run/netns/{ns}").st_ino
    with pytest.raises(RuntimeError), in_netns(ns):
        assert os.stat("/proc/thread-self/ns/net").st_ino == target
        raise RuntimeError("boom")
    assert os.stat("/proc/thread-self/ns/net").st_ino == here
    seen: list[int] = []
    with in_netns(ns):
        t = threading.Thread(target=lambda: seen.append(os.stat("/proc/thread-self/ns/net").st_ino))
        t.start()
        t.join()
    assert seen == [target]
    with pytest.raises(LabError), in_netns(f"{lab.tag}-does-not-exist"):
        pass
    assert os.stat("/proc/thread-self/ns/net").st_ino == here
