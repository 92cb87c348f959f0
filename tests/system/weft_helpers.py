"""Helpers for system tests that run weft processes inside lab namespaces."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from control.api import api_request
from control.lab.netns import in_netns
from control.lab.topology import Lab, Node, Pod
from dataplane.flows import flow_hash

WEFT = [sys.executable, "-m", "control.cli"]
TCP_PORT = 7000  # send_over_tcp's server port, in the receiving pod
UDP_PORT = 7001  # send_udp_datagrams' port
SO_RCVBUFFORCE = 33  # asm-generic/socket.h (root: above rmem_max)
#: How many times slower than a real machine this one is: start-up deadlines, socket
#: timeouts and the pacing of bursts are stretched by it (scripts/oldkernel sets 4
#: for an emulated guest).
SLOWDOWN = float(os.environ.get("WEFT_TEST_SLOWDOWN", "1"))


def kernel_release() -> tuple[int, int]:
    """This kernel's (major, minor), from uname: what some fast paths depend on."""
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m[1]), int(m[2])) if m else (0, 0)


KERNEL = kernel_release()
#: Linux < 6.11 refuses a UDP_SEGMENT send through a device without checksum offload
#: (udp_send_skb: EIO), and the lab's wire-like underlay has none (`ethtool -K eth0
#: tx off`): there weft turns udp_segment off and sends one datagram per sendto.
UDP_SEGMENT_NEEDS_TX_CSUM = KERNEL < (6, 11)
#: The fast paths that need a newer kernel, and from which Linux on: UDP-tunnel GSO
#: through a TAP (6.17), UDP GSO on a TUN (TUN_F_USO4/6, 6.2).
PATH_SINCE = {"tunnel_gso": (6, 17), "uso_read": (6, 2), "uso_write": (6, 2)}
MISSING_PATHS = frozenset(p for p, since in PATH_SINCE.items() if since > KERNEL)
#: `--offload on` wants every path and refuses to start without one, so tests of the
#: fast paths in general run `auto` on older kernels, and expect what is left.
OFFLOAD_ON = "auto" if MISSING_PATHS else "on"
#: What weft turns off when a UDP_SEGMENT send is refused and there is no egress TAP
#: (fastpath_send.SendPath._udp_segment_refused).
UDP_SEGMENT_REFUSAL_OFF = frozenset({"udp_segment", "tx_batch", "tso_read", "uso_read"})


def assert_udp_segment_refused(offload: dict[str, Any]) -> None:
    """A status's offload after Linux < 6.11 refused the first UDP_SEGMENT send on an
    underlay without checksum offload: udp_segment and tx_batch off with the EIO and,
    without the egress TAP, tso_read too (weft stopped asking the pod device for
    super-packets: decisions §17)."""
    assert not {"udp_segment", "tx_batch", "tso_read"} & set(offload["on"]), offload["on"]
    assert "EIO" in offload["off"]["udp_segment"], offload["off"]
    assert "no tunnel_gso" in offload["off"]["tso_read"], offload["off"]


def assert_super_packets_sent(offload: dict[str, Any]) -> None:
    """A status's offload: the pods' TCP super-packets left whole through the egress
    TAP, or were cut here; or — Linux < 6.11, wire-like underlay, no TAP — a refused
    UDP_SEGMENT send turned tso_read off (if before the first super-packet, the
    kernel cut them all before weft read them)."""
    fc = offload["counters"]
    if "tunnel_gso" in offload["on"]:
        assert fc["gso_sends"] > 0, fc
    elif UDP_SEGMENT_NEEDS_TX_CSUM:
        assert_udp_segment_refused(offload)
    else:
        assert fc["split_packets"] > 0, fc


def needs_paths(*paths: str) -> pytest.MarkDecorator:
    """Skip a test whose subject is a fast path this kernel does not have."""
    missing = [p for p in paths if p in MISSING_PATHS]
    since = ", ".join(f"{p} Linux {'.'.join(map(str, PATH_SINCE[p]))}+" for p in missing)
    return pytest.mark.skipif(bool(missing), reason=f"needs {since}; this is {platform.release()}")


def assert_paths_on(on: list[str], wanted: list[str]) -> None:
    """The fast paths `on` (a status's offload.on) are `wanted` less those this kernel
    lacks; where UDP_SEGMENT is refused on the wire-like underlay (Linux < 6.11, no
    egress TAP then) the refusal may also have turned off what it takes along."""
    expect = [p for p in wanted if p not in MISSING_PATHS]
    if UDP_SEGMENT_NEEDS_TX_CSUM and "tunnel_gso" in MISSING_PATHS:
        assert on == [p for p in expect if p in on], (on, expect)
        assert set(expect) - set(on) <= UDP_SEGMENT_REFUSAL_OFF, (on, expect)
    else:
        assert on == expect


def start_weft(
    lab: Lab,
    node: Node,
    args: list[str],
    tmp: Path,
    name: str,
    env: dict[str, str] | None = None,
) -> tuple[Any, Path]:
    """Run `weft <args> --api-socket …` in node's namespace (with extra environment
    variables `env`); wait until its API answers."""
    sock = tmp / f"{name}.sock"
    log = tmp / f"{name}.log"
    proc = lab.spawn(
        node,
        [*WEFT, *args, "--api-socket", str(sock)],
        log=log,
        env={**os.environ, **env} if env else None,
    )
    deadline = time.monotonic() + 20 * SLOWDOWN
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"weft {name} exited {proc.returncode}:\n{log.read_text()}")
        if sock.exists():
            try:
                api_request(str(sock), {"op": "status"}, timeout=2)
                return proc, sock
            except (ConnectionError, OSError, json.JSONDecodeError):
                pass
        time.sleep(0.1)
    raise AssertionError(f"weft {name} did not come up:\n{log.read_text()}")


def status(sock: Path) -> dict[str, Any]:
    return api_request(str(sock), {"op": "status"})


def kill_queue_worker(sock: Path) -> tuple[int, dict[str, Any]]:
    """SIGKILL queue 1's worker of the weft behind `sock` and wait until queue 0 has
    started it again and it is ready — not just running: a restarted worker is a
    live process for the seconds its imports take (15 s in an emulated guest)
    before its queue and socket open. (The killed PID, the queues' status then.)"""
    [worker] = status(sock)["queues"]["workers"]
    os.kill(worker["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10 * SLOWDOWN
    while time.monotonic() < deadline:
        queues = status(sock)["queues"]
        if queues["restarts"] == 1 and queues["workers"][0]["ready"]:
            return worker["pid"], queues
        time.sleep(0.1)
    raise AssertionError(f"the worker was not started again: {queues}")


def port_on_queue(src: Pod, dst: Pod, dport: int, queue: int, queues: int, first: int) -> int:
    """A source port from `first` on whose flow src → dst:dport weft steers to `queue`
    of `queues` (dataplane/io/queues.py: both programs hash the inner flow this way)."""
    addresses = int(src.ip) ^ int(dst.ip)
    return next(p for p in range(first, 65536) if flow_hash(addresses, p ^ dport) % queues == queue)


def iperf3_run(
    lab: Lab, client: Pod, server: Pod, args: list[str], *, want: str, timeout: float
) -> dict[str, Any]:
    """`iperf3 -c <server> ARGS -J` against a one-shot server in `server`; retried while
    the server is not listening yet. Returns iperf3's JSON end summary, which must
    hold `want` (e.g. "sum_received" for TCP, "sum" for UDP)."""
    srv = lab.spawn(server, ["iperf3", "-s", "-1"])
    try:
        last = ""
        for _ in range(50):
            cp = lab.run(
                client, "iperf3", "-c", str(server.ip), *args, "-J", check=False, timeout=timeout
            )
            result = json.loads(cp.stdout) if cp.stdout.startswith("{") else {}
            if cp.returncode == 0 and want in result.get("end", {}):
                return result["end"]
            last = result.get("error") or (cp.stdout + cp.stderr)
            if "refused" not in last and "busy" not in last:
                break
            time.sleep(0.1)
        raise AssertionError(f"iperf3 failed: {last[-2000:]}")
    finally:
        lab.stop(srv)


def one_backlog(lab: Lab, end: Pod | Node) -> None:
    """Steer what one lab link delivers into one CPU's backlog (RPS): a pod's veth
    (at its node end), or a node's underlay link (at both ends).

    A pod's TCP transmits from two contexts: its application's send, and the ACK
    processing wherever an ACK is delivered (inside weft's TUN write, say). A veth
    hands each packet to the backlog of the CPU it was sent on, and when one CPU's
    backlog waits (softirq deferred to ksoftirqd) the other's overtakes it: the
    flow reaches weft reordered, the receiver sees holes, the sender retransmits.
    Counted in the lab (a 4 MB transfer weft → kernel VXLAN, 300 times, the sender
    pinned away from weft): 10 transfers with retransmits, every one with D-SACKs
    (the originals arrived) and no drop counter moved; with this, none. Tests that
    assert a flow's order through weft use it, so they measure weft's order alone.

    The same holds for a node's underlay when weft sends one flow from two contexts
    (--egress-thread: its own thread, and the TAP's kernel thread), and at both of the
    underlay's veth hops: the hub's end of the sending node's link (its `vnN`, where
    the hub takes what the node sends) and the receiving node's `eth0`. So for a
    node both are steered: its own underlay end and its end at the hub (decisions
    §27 steered only the receiving node's eth0, and three CI runs still saw one
    segment out of order; §37)."""
    cpu = min(os.sched_getaffinity(0))
    if isinstance(end, Pod):
        links = [(end.node, end.node_end)]
    else:
        assert lab.hub is not None
        links = [(end.ns, end.underlay_iface), (lab.hub, f"vn{end.index}")]
    for ns, iface in links:
        path = f"/sys/class/net/{iface}/queues/rx-0/rps_cpus"
        lab.run(ns, "sh", "-c", f"echo {1 << cpu:x} > {path}")


def nstat_all(lab: Lab, ns: str | Node | Pod) -> dict[str, int]:
    """Every SNMP counter of a namespace (`nstat -a -z -j`), by name."""
    counters = json.loads(lab.run(ns, "nstat", "-a", "-z", "-j").stdout)
    return {name: int(value) for name, value in next(iter(counters.values())).items()}


def nstat(lab: Lab, ns: str | Node | Pod, *names: str) -> dict[str, int]:
    """The named SNMP counters of a namespace (0 for one the kernel does not show)."""
    counters = nstat_all(lab, ns)
    return {n: counters.get(n, 0) for n in names}


def drop_counters(lab: Lab) -> dict[str, int]:
    """Every place a lab packet can be dropped without an error reaching anyone: the
    machine's softnet backlog (/proc/net/softnet_stat, all CPUs), each link's rx/tx
    drops in each of the lab's namespaces, and the UDP/IP drop counters there. Read
    before and after a transfer, `drop_delta` names where a lost burst went."""
    out: dict[str, int] = {}
    # A line a CPU, hex columns: [1] dropped (backlog full), [2] time_squeeze.
    cpus = [line.split() for line in Path("/proc/net/softnet_stat").read_text().splitlines()]
    out["softnet.dropped"] = sum(int(c[1], 16) for c in cpus)
    out["softnet.time_squeeze"] = sum(int(c[2], 16) for c in cpus)
    for ns in lab.namespaces:
        for name, stats in lab.link_stats(ns).items():
            for way in ("rx", "tx"):
                out[f"{ns}/{name}.{way}_dropped"] = stats.get(way, {}).get("dropped", 0)
        for name, value in nstat_all(lab, ns).items():
            if name.endswith(("RcvbufErrors", "SndbufErrors", "InErrors", "InDiscards")):
                out[f"{ns}/{name}"] = value
    return out


def drop_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that moved between two `drop_counters` readings."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def iperf3_transfer(lab: Lab, client: Pod, server: Pod, seconds: int = 2) -> dict[str, Any]:
    """One TCP iperf3 run from client to server; returns iperf3's JSON end summary."""
    return iperf3_run(
        lab, client, server, ["-t", str(seconds)], want="sum_received", timeout=seconds + 30
    )


def send_datagrams(lab: Lab, ns: str, dst: str, port: int, payloads: list[bytes]) -> None:
    """Send raw UDP datagrams from inside a lab namespace (a hostile node)."""
    code = (
        "import socket,sys,json\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for h in json.load(sys.stdin):\n"
        f"    s.sendto(bytes.fromhex(h),({dst!r},{port}))\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        input=json.dumps([p.hex() for p in payloads]),
        text=True,
        check=True,
        timeout=60,
    )


def start_agent(
    lab: Lab, node: Node, endpoint: str, tmp: Path, extra: list[str] | None = None
) -> tuple[Any, Path]:
    """`weft agent` in node's namespace with its files under tmp/<node>; waits until ready."""
    d = tmp / node.name
    d.mkdir(exist_ok=True)
    argv = [
        *WEFT, "agent", "--etcd-endpoints", endpoint, "--iface", "eth0",
        "--subnet-file", str(d / "subnet.env"), "--state-dir", str(d / "state"),
        "--api-socket", str(d / "weft.sock"), *(extra or []),
    ]  # fmt: skip
    proc = lab.spawn(node, argv, log=d / "agent.log")
    deadline = time.monotonic() + 20 * SLOWDOWN
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"agent on {node.name} exited {proc.returncode}:\n"
                                 f"{(d / 'agent.log').read_text()}")  # fmt: skip
        try:
            if api_request(str(d / "weft.sock"), {"op": "status"}, timeout=2).get("ready"):
                return proc, d
        except (ConnectionError, OSError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"agent on {node.name} never wrote subnet.env:\n"
                         f"{(d / 'agent.log').read_text()}")  # fmt: skip


def add_pod_from_subnet_env(lab: Lab, node: Node, d: Path) -> Pod:
    """cni0 and one pod, from subnet.env, as the flannel CNI plugin + bridge would."""
    from ipaddress import ip_interface

    env = dict(line.split("=", 1) for line in (d / "subnet.env").read_text().split())
    subnet = ip_interface(env["FLANNEL_SUBNET"]).network
    lab.add_cni(node, subnet, mtu=int(env["FLANNEL_MTU"]))
    return lab.add_pod(node)


def udp_datagram(seq: int, size: int) -> bytes:
    """Datagram `seq` of send_udp_datagrams: its number, then bytes that depend on it."""
    head = seq.to_bytes(4, "big")
    return head + bytes((seq * 7 + i) & 0xFF for i in range(size - 4))


# The sender of send_udp_datagrams, a process of its own that sends each burst with
# one sendmmsg: GRO merges datagrams that come within its 20 µs flush timeout, and a
# Python sendto loop (slower still as a thread beside the receiving loop) spaced them
# wider than that on a slow machine, so merging depended on the machine's speed. It
# reads the datagrams (udp_datagram's, `size` bytes each) from stdin and uses the
# engine's own struct layouts (dataplane.io.batch).
UDP_SENDER = """
import ctypes, socket, sys, time
from dataplane.io.batch import _Iovec, _Mmsghdr
dst, port, count, size, burst = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
data = ctypes.create_string_buffer(sys.stdin.buffer.read(count * size), count * size)
base = ctypes.addressof(data)
iovs = (_Iovec * count)(*[_Iovec(base + i * size, size) for i in range(count)])
msgs = (_Mmsghdr * count)()
for i in range(count):
    msgs[i].msg_hdr.msg_iov = ctypes.pointer(iovs[i])
    msgs[i].msg_hdr.msg_iovlen = 1
libc = ctypes.CDLL(None, use_errno=True)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.connect((dst, port))
at = ctypes.addressof(msgs)
for first in range(0, count, burst):
    n = min(burst, count - first)
    while n > 0:
        sent = libc.sendmmsg(tx.fileno(), ctypes.c_void_p(at + first * ctypes.sizeof(_Mmsghdr)),
                             n, 0)
        if sent < 0:
            sys.exit(f"sendmmsg: errno {ctypes.get_errno()}")
        first, n = first + sent, n - sent
    time.sleep(0.001)
"""


def send_udp_datagrams(
    sender: Pod, receiver: Pod, count: int, size: int, *, burst: int = 64
) -> list[bytes]:
    """`count` datagrams of `size` bytes (udp_datagram) from a process in `sender` to
    a socket in `receiver`, in bursts of `burst` back to back (so that GRO on the way
    can merge them) with a millisecond between bursts; what arrived, in order."""
    with in_netns(receiver.ns):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got: list[bytes] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        rx.bind((str(receiver.ip), UDP_PORT))
        rx.settimeout(2 * SLOWDOWN)
        argv = [str(receiver.ip), str(UDP_PORT), str(count), str(size), str(burst)]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", sender.ns, sys.executable, "-c", UDP_SENDER, *argv],
            stdin=subprocess.PIPE,
        )
        assert proc.stdin is not None
        with proc.stdin:  # read whole before the first send: it never waits on us
            proc.stdin.write(b"".join(udp_datagram(i, size) for i in range(count)))
        # Until all arrived, or the sender is done and nothing came for 2 s: a sender
        # slow to start (a busy machine) is waited for, a lost datagram is not.
        deadline = time.monotonic() + 30 * SLOWDOWN
        while len(got) < count:
            try:
                got.append(rx.recv(65536))
            except TimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
        proc.wait(timeout=30 * SLOWDOWN)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        rx.close()
    return got


def send_over_tcp(sender: Pod, receiver: Pod, data: bytes, *, mss: int | None = None) -> bytes:
    """`data` from a socket in `sender` to one in `receiver`; what arrived. `mss`:
    the sender's segment size (TCP_MAXSEG), else the path's."""
    with in_netns(receiver.ns):
        server = socket.create_server(("0.0.0.0", TCP_PORT))
    with in_netns(sender.ns):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mss is not None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    got = bytearray()
    try:
        server.settimeout(10 * SLOWDOWN)
        client.settimeout(10 * SLOWDOWN)
        client.connect((str(receiver.ip), TCP_PORT))
        conn, _ = server.accept()
        conn.settimeout(10 * SLOWDOWN)
        done = threading.Thread(target=client.sendall, args=(data,))
        done.start()
        while len(got) < len(data):
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        done.join(10)
        conn.close()
    finally:
        client.close()
        server.close()
    return bytes(got)
