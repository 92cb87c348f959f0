"""Queue workers: one process per device queue, so more cores move more flows.

With `--queues N` the pod device and the egress TAP are multi-queue
(IFF_MULTI_QUEUE) and every queue's UDP socket binds the same address with
SO_REUSEPORT. Queue 0 is the main process (it made the devices and runs the
control plane); queues 1…N-1 are worker processes started here, each running
its own engine with its own GIL. A flow stays on one queue each way, and both
ways meet on the same queue number: queue 0 puts two programs on the node that
compute one hash of the inner flow (`inner_flow_hash` of source ^ destination
address and, for TCP, UDP, SCTP and UDP-Lite outside fragments, source ^ destination
port, dataplane/flows.py), an eBPF one on the device (TUNSETSTEERINGEBPF:
which queue's reader gets a packet the kernel routes into it) and a classic BPF
one on the sockets (SO_ATTACH_REUSEPORT_CBPF: which socket gets a datagram,
looking past the outer headers, so it does not matter which outer source port a
sender picked: flannel's udp proxy sends every flow from one). So no flow is reordered.

Each worker has a SOCK_SEQPACKET pair to queue 0 carrying JSON messages:

    queue 0 → worker   {"op": "add", "peer": {...}}  {"op": "remove", "subnet": "…"}
                       {"op": "sample", "id": n}  {"op": "egress-thread", "id": n, "on": b}
                       {"op": "counters", "id": n}
    worker → queue 0   {"op": "ready"}  {"op": "error", "message": "…"}
                       {"op": "counters", "counters": {...}, "fast": {...}, "peers": n}
                                                                      (each second)
                       {"op": "reply", "id": n, ...}  (to "sample", "egress-thread",
                                                       "counters": the same fields)

`weft status` asks every worker for its counters ("counters") and waits up to
REPLY_TIMEOUT_S, so the node's totals are the workers' as of now; a worker that does
not answer in time counts with its last report of each second.

`--egress-thread auto` with queues (dataplane/egress_thread.py): every window queue 0
asks each worker for its CPU time and bytes sent ("sample"), and before it switches
the TAP's NAPI into its kernel thread it tells every worker and waits for their
replies ("egress-thread"): a worker answers between two of its batches, so from then
on it sends a flow's lone packets behind the flow's super-packets. After switching
the thread off it tells them likewise (until then they still order, which is safe).

Routes reach a worker in the order queue 0 learnt them; what the pipe has no room
for waits in an outbox (thousands of leases at start) and goes as it drains. A
worker that dies takes its queue with it (the kernel moves its flows to the other queues when
its fd and socket close); queue 0 says so, starts it again (at most
RESTARTS_PER_MINUTE times a minute) and keeps its counters so that totals never
go back. Workers die with queue 0 (PR_SET_PDEATHSIG) and end on SIGTERM (a
worker ended by SIGTERM is being stopped, and is not started again).

`weft trace live` sees every queue: queue 0 forwards the request, the workers
send their events back every 50 ms, and each event says its `queue`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import logging
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import fields
from ipaddress import IPv4Address, IPv4Network, ip_network
from typing import TYPE_CHECKING, Any

from dataplane import gc_pauses
from dataplane.egress_thread import QueueSample
from dataplane.flows import FRAGMENT, GOLDEN, PORT_PROTOCOLS, inner_flow_hash
from dataplane.io.sockets import attach_classic_bpf
from dataplane.peers import Peer
from dataplane.trace import Subscription

if TYPE_CHECKING:
    from dataplane.io.node import NodeSpec

log = logging.getLogger("weft.dataplane")

MAX_QUEUES = 64
READY_TIMEOUT_S = 20.0
#: How long queue 0 waits for the workers' replies (QueueWorkers.ask): a busy worker
#: answers after its current batch, a stuck one not at all.
REPLY_TIMEOUT_S = 0.2
REPORT_INTERVAL_S = 1.0
TRACE_FLUSH_S = 0.05  # how often a worker sends its trace events while someone traces
RESTARTS_PER_MINUTE = 5
REAP_GRACE_S = 3.0  # how long an ended worker may take to exit before SIGKILL
REAP_POLL_S = 0.02  # how often queue 0 looks meanwhile (the event loop keeps running)
#: Largest message read: a traced 64 KB super-packet is ~130 KB of JSON hex.
MESSAGE_MAX = 1 << 18
PIPE_BUFFER = 1 << 20
PR_SET_PDEATHSIG = 1


# -- the messages (pure) ------------------------------------------------------------


def queues_error(backend: str, queues: int) -> str | None:
    """Why `queues` cannot serve `backend` (None: they can). host-gw's AF_PACKET sender
    and ARP resolver are not split into queues."""
    if not 1 <= queues <= MAX_QUEUES:
        return f"--queues {queues}: expected 1..{MAX_QUEUES}"
    if queues > 1 and backend == "host-gw":
        return "--queues above 1 is for the vxlan and udp backends"
    return None


def spec_to_json(spec: NodeSpec) -> str:
    out: dict[str, Any] = {}
    for f in fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, IPv4Address | IPv4Network):
            value = str(value)
        out[f.name] = value
    return json.dumps(out)


def spec_from_json(text: str) -> NodeSpec:
    from dataplane.io.node import NodeSpec

    raw = json.loads(text)
    raw["network"] = IPv4Network(raw["network"])
    raw["subnet"] = IPv4Network(raw["subnet"])
    raw["public_ip"] = IPv4Address(raw["public_ip"])
    if raw.get("vtep_mac") is not None:
        raw["vtep_mac"] = bytes.fromhex(raw["vtep_mac"])
    return NodeSpec(**raw)


def encode_peer(peer: Peer) -> dict[str, Any]:
    return {
        "subnet": str(peer.subnet),
        "public_ip": str(peer.public_ip),
        "vtep_mac": peer.vtep_mac.hex() if peer.vtep_mac is not None else None,
        "port": peer.port,
    }


def decode_peer(raw: dict[str, Any]) -> Peer:
    mac = raw.get("vtep_mac")
    return Peer(
        ip_network(raw["subnet"]),
        IPv4Address(raw["public_ip"]),
        bytes.fromhex(mac) if mac is not None else None,
        int(raw.get("port", 0)),
    )


def add_counts(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """`total` plus `more`, key by key, into nested dicts of ints (counters as_dict)."""
    out = dict(total)
    for key, value in more.items():
        have = out.get(key)
        if isinstance(value, dict):
            out[key] = add_counts(have if isinstance(have, dict) else {}, value)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = (have if isinstance(have, int) else 0) + value
    return out


# -- steering: which queue's socket gets a datagram (pure, plus one setsockopt) --------

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h


def _resolve(program: list[Any]) -> list[tuple[int, ...]]:
    """A BPF program written with labels: a str item marks where it stands; a str
    field of an instruction (a jump's offset) becomes that label's distance from the
    instruction after it, as classic and extended BPF both count jumps."""
    at: dict[str, int] = {}
    insns: list[tuple[Any, ...]] = []
    for item in program:
        if isinstance(item, str):
            at[item] = len(insns)
        else:
            insns.append(item)
    return [
        tuple(at[f] - (i + 1) if isinstance(f, str) else f for f in insn)
        for i, insn in enumerate(insns)
    ]


def steering_program(ip_off: int, queues: int) -> list[tuple[int, int, int, int]]:
    """A classic BPF program for SO_ATTACH_REUSEPORT_CBPF: the index of the socket
    that gets a datagram, from the inner flow (flows.inner_flow_hash: the addresses,
    and for TCP, UDP, SCTP and UDP-Lite outside fragments the ports after the inner
    IP header's own length), so a flow stays on one queue whatever outer source port
    its sender picked, an ICMP echo's packets too (their checksum sits where ports
    would), and every piece of a fragmented datagram with them. The kernel runs it on
    the UDP payload: `ip_off` is where the inner IPv4 header starts there (vxlan 22,
    udp 0). A datagram too short to hold the fields it reads, or not IPv4, goes to
    the first socket."""
    ld_abs, ld_abs_h, ld_abs_b, ld_ind, ld_mem, ldx_msh = 0x20, 0x28, 0x30, 0x40, 0x60, 0xB1
    st, tax, xor_x, rsh_k, mul_k, mod_k, ret_a = 0x02, 0x07, 0xAC, 0x74, 0x24, 0x94, 0x16
    and_k, ld_imm, jeq_k, jset_k, ja, ret_k = 0x54, 0x00, 0x15, 0x45, 0x05, 0x06
    program: list[Any] = [
        (ld_abs_b, 0, 0, ip_off),
        (and_k, 0, 0, 0xF0),
        (jeq_k, 0, "drop", 0x40),  # IPv4 only
        (ld_abs, 0, 0, ip_off + 12),  # A = inner source address
        (tax, 0, 0, 0),
        (ld_abs, 0, 0, ip_off + 16),  # A = inner destination address
        (xor_x, 0, 0, 0),
        (st, 0, 0, 0),  # M[0] = source ^ destination
        (ld_abs_b, 0, 0, ip_off + 9),  # A = protocol
        *[(jeq_k, "ports", 0, proto) for proto in sorted(PORT_PROTOCOLS)],
        (ja, 0, 0, "no ports"),
        "ports",
        (ld_abs_h, 0, 0, ip_off + 6),
        (jset_k, "no ports", 0, FRAGMENT),  # a fragment: no ports, or not in every piece
        (ldx_msh, 0, 0, ip_off),  # X = inner IP header length
        (ld_ind, 0, 0, ip_off),  # A = source port << 16 | destination port
        (tax, 0, 0, 0),
        (rsh_k, 0, 0, 16),
        (xor_x, 0, 0, 0),
        (and_k, 0, 0, 0xFFFF),  # A = source port ^ destination port: both directions alike
        (ja, 0, 0, "mix"),
        "no ports",
        (ld_imm, 0, 0, 0),
        "mix",
        (tax, 0, 0, 0),
        (ld_mem, 0, 0, 0),
        (xor_x, 0, 0, 0),
        # Mix: connect() hands out ports of one parity (Linux 4.x+), so the low bits
        # alone would put every client flow on one queue of two; and a multiply
        # carries differences up only. So: fold the ports down, multiply, fold again.
        (tax, 0, 0, 0),
        (rsh_k, 0, 0, 16),
        (xor_x, 0, 0, 0),
        (mul_k, 0, 0, GOLDEN),
        (tax, 0, 0, 0),
        (rsh_k, 0, 0, 16),
        (xor_x, 0, 0, 0),
        (mod_k, 0, 0, queues),
        (ret_a, 0, 0, 0),
        "drop",
        (ret_k, 0, 0, 0),
    ]
    return _resolve(program)  # type: ignore[return-value]


def steering_queue(datagram: bytes, ip_off: int, queues: int) -> int:
    """What steering_program returns for `datagram` (the same arithmetic, for tests
    and for explaining where a flow goes): flows.inner_flow_hash modulo `queues`,
    and the first queue where the program's loads fall off the end."""
    end = len(datagram)
    if end < ip_off + 20:
        return 0
    (frag,) = struct.unpack_from("!H", datagram, ip_off + 6)
    ports_at = ip_off + (datagram[ip_off] & 0x0F) * 4
    if datagram[ip_off + 9] in PORT_PROTOCOLS and not frag & FRAGMENT and end < ports_at + 4:
        return 0
    return inner_flow_hash(datagram, ip_off, end) % queues


def tun_steering_program(ip_off: int) -> list[tuple[int, int, int, int, int]]:
    """An eBPF socket-filter program for TUNSETSTEERINGEBPF: the flow_hash of a packet
    the kernel is about to hand to the TUN's readers (flows.inner_flow_hash, as
    steering_program; the kernel takes it modulo the number of queues). `ip_off`: 0
    on a TUN, 14 on a TAP. It replaces the TUN's own choice, which follows the queue
    that last wrote the flow's other direction — and that can be one queue for many
    flows (decisions §11). Instructions are (code, dst, src, off, imm)."""
    ld_abs_w, ld_abs_h, ld_abs_b, ld_ind_w, exit_ = 0x20, 0x28, 0x30, 0x40, 0x95
    mov64_x, mov64_k, xor64_x, and64_k, lsh64_k, rsh64_k = 0xBF, 0xB7, 0xAF, 0x57, 0x67, 0x77
    mov32_x, rsh32_k, xor32_x, mul32_k = 0xBC, 0x74, 0xAC, 0x24
    jeq_k, jne_k, jset_k, ja = 0x15, 0x55, 0x45, 0x05
    r0, r1, r6, r7, r8, r9 = 0, 1, 6, 7, 8, 9
    golden = GOLDEN - (1 << 32)  # the immediate is a signed 32-bit field
    program: list[Any] = [
        (mov64_x, r6, r1, 0, 0),  # LD_ABS reads the packet through r6
        (ld_abs_b, 0, 0, 0, ip_off),
        (mov64_x, r8, r0, 0, 0),  # r8 = version and header length
        (and64_k, r0, 0, 0, 0xF0),
        (jne_k, r0, 0, "other", 0x40),  # IPv4 only
        (ld_abs_w, 0, 0, 0, ip_off + 12),
        (mov64_x, r7, r0, 0, 0),
        (ld_abs_w, 0, 0, 0, ip_off + 16),
        (xor64_x, r7, r0, 0, 0),  # r7 = source ^ destination
        (mov64_k, r9, 0, 0, 0),  # r9 = no ports …
        (ld_abs_b, 0, 0, 0, ip_off + 9),
        *[(jeq_k, r0, 0, "ports", proto) for proto in sorted(PORT_PROTOCOLS)],
        (ja, 0, 0, "mix", 0),
        "ports",  # … or source port ^ destination port, outside fragments
        (ld_abs_h, 0, 0, 0, ip_off + 6),
        (jset_k, r0, 0, "mix", FRAGMENT),
        (and64_k, r8, 0, 0, 0x0F),
        (lsh64_k, r8, 0, 0, 2),  # r8 = IP header length
        (ld_ind_w, 0, r8, 0, ip_off),  # r0 = ports
        (mov64_x, r9, r0, 0, 0),
        (rsh64_k, r9, 0, 0, 16),
        (and64_k, r0, 0, 0, 0xFFFF),
        (xor64_x, r9, r0, 0, 0),
        "mix",
        (mov64_x, r0, r9, 0, 0),
        (xor64_x, r0, r7, 0, 0),
        (mov32_x, r1, r0, 0, 0),
        (rsh32_k, r1, 0, 0, 16),
        (xor32_x, r0, r1, 0, 0),
        (mul32_k, r0, 0, 0, golden),
        (mov32_x, r1, r0, 0, 0),
        (rsh32_k, r1, 0, 0, 16),
        (xor32_x, r0, r1, 0, 0),
        (exit_, 0, 0, 0, 0),
        "other",
        (mov64_k, r0, 0, 0, 0),
        (exit_, 0, 0, 0, 0),
    ]
    return _resolve(program)  # type: ignore[return-value]


_BPF_INSN = struct.Struct("=BBhi")
#: bpf(2)'s system call number (asm/unistd.h); elsewhere the TUN steers by itself.
SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
           "riscv64": 280}.get(platform.machine())  # fmt: skip
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1
TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)


def load_socket_filter(prog: list[tuple[int, int, int, int, int]]) -> int:
    """bpf(BPF_PROG_LOAD) through libc: the program's fd (OSError with the verifier's
    first lines on refusal)."""
    code = b"".join(_BPF_INSN.pack(c, d | s << 4, o, i) for c, d, s, o, i in prog)
    insns = ctypes.create_string_buffer(code)
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)  # union bpf_attr, the PROG_LOAD fields
    struct.pack_into(
        "=IIQQIIQ", attr, 0, BPF_PROG_TYPE_SOCKET_FILTER, len(prog),
        ctypes.addressof(insns), ctypes.addressof(license_), 1, len(log), ctypes.addressof(log),
    )  # fmt: skip
    if SYS_BPF is None:
        raise OSError(errno.ENOSYS, f"no bpf(2) number known for {platform.machine()}")
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(BPF_PROG_LOAD), attr, ctypes.c_uint(128))
    if fd < 0:
        err = ctypes.get_errno()
        why = log.value.decode(errors="replace").strip().splitlines()[-1:] or [os.strerror(err)]
        raise OSError(err, f"BPF_PROG_LOAD: {why[0]}")
    return int(fd)


def attach_tun_steering(device_fd: int, ip_off: int) -> None:
    """Put tun_steering_program on the multi-queue TUN/TAP `device_fd` belongs to."""
    prog_fd = load_socket_filter(tun_steering_program(ip_off))
    try:
        fcntl.ioctl(device_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog_fd))
    finally:
        os.close(prog_fd)  # the device holds its own reference


def attach_steering(sock: socket.socket, ip_off: int, queues: int) -> None:
    """Put steering_program on the SO_REUSEPORT group `sock` belongs to."""
    attach_classic_bpf(sock, SO_ATTACH_REUSEPORT_CBPF, steering_program(ip_off, queues))


# -- queue 0's side -------------------------------------------------------------------


class _Worker:
    __slots__ = (
        "conn", "error", "index", "last", "outbox", "peers", "proc", "ready", "started", "waiting",
    )  # fmt: skip

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: socket.socket | None = None  # non-blocking
        self.last: dict[str, Any] = {}  # its latest counters report
        self.peers = 0  # routes it has, as of that report
        self.started: list[float] = []  # monotonic start times (restart budget)
        # Its dataplane is up (it said "ready": queue and socket open, so the kernel
        # steers its flows to it); a live process that is still importing is not.
        self.ready = False
        self.error: str | None = None  # why a restarted worker could not start
        # Messages the pipe had no room for yet (a worker busy starting, or given
        # thousands of leases at once), sent as it drains; `waiting`: a writer is set.
        self.outbox: deque[bytes] = deque()
        self.waiting = False


class QueueWorkers:
    """Queue 0's handle on the worker processes of queues 1…N-1."""

    def __init__(self, spec: NodeSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.loop = loop
        self.workers = [_Worker(i) for i in range(1, spec.queues)]
        self.peers: dict[str, dict[str, Any]] = {}  # what a (re)started worker is told
        self.retired: dict[str, Any] = {}  # counters of worker processes that ended
        self.restarts = 0
        self._closing = False
        # `weft trace live` streams open on queue 0: id → (request, where events go)
        self._traces: dict[int, tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]] = {}
        self._trace_ids = itertools.count(1)
        # ask(): id → (the workers yet to reply, their replies so far, set when all have)
        self._asked: dict[int, tuple[set[int], dict[int, dict[str, Any]], asyncio.Event]] = {}
        self._ask_ids = itertools.count(1)

    def start(self) -> None:
        """Start every worker and wait until each has its queue open (or fail)."""
        for worker in self.workers:
            self._spawn(worker)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for worker in self.workers:
            assert worker.conn is not None
            self._await_ready(worker, deadline)
            self.loop.add_reader(worker.conn.fileno(), self._on_message, worker)

    def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (ours, theirs):  # room for a message that big, and a burst of them
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER)
        try:
            argv = [sys.executable, "-m", "dataplane.io.queues"]
            argv += [str(worker.index), str(theirs.fileno()), str(os.getpid())]
            worker.proc = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "WEFT_QUEUE_SPEC": spec_to_json(self.spec)},
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        worker.conn = ours
        worker.started.append(time.monotonic())
        worker.last, worker.peers, worker.waiting = {}, 0, False
        worker.ready, worker.error = False, None
        worker.outbox.clear()
        for peer in self.peers.values():  # the worker reads them once it is up
            self._send(worker, {"op": "add", "peer": peer})
        for tid, (request, _sink) in self._traces.items():
            self._send(worker, {"op": "trace", "id": tid, "request": request})

    def _await_ready(self, worker: _Worker, deadline: float) -> None:
        assert worker.conn is not None
        msg = None
        if select.select([worker.conn], [], [], max(0.1, deadline - time.monotonic()))[0]:
            with contextlib.suppress(OSError, ValueError):
                msg = json.loads(worker.conn.recv(MESSAGE_MAX) or b"null")
        if not isinstance(msg, dict) or msg.get("op") != "ready":
            why = msg.get("message") if isinstance(msg, dict) else None
            self.stop()
            raise RuntimeError(f"queue {worker.index} did not start: {why or 'no answer'}")
        worker.ready = True

    def _send(self, worker: _Worker, msg: dict[str, Any]) -> None:
        if worker.conn is None:
            return
        worker.outbox.append(json.dumps(msg).encode())
        if not worker.waiting:
            self._flush(worker)

    def _flush(self, worker: _Worker) -> None:
        """Send what the pipe takes now; wait for room (add_writer) for the rest."""
        conn = worker.conn
        if conn is None:
            return
        outbox = worker.outbox
        while outbox:
            try:
                conn.send(outbox[0])
            except BlockingIOError:
                if not worker.waiting:
                    self.loop.add_writer(conn.fileno(), self._flush, worker)
                    worker.waiting = True
                return
            except OSError:
                return  # the pipe is gone: _on_message sees it and restarts the worker
            outbox.popleft()
        if worker.waiting:
            self.loop.remove_writer(conn.fileno())
            worker.waiting = False

    def add_peer(self, peer: Peer) -> None:
        raw = encode_peer(peer)
        self.peers[raw["subnet"]] = raw
        for worker in self.workers:
            self._send(worker, {"op": "add", "peer": raw})

    def remove_peer(self, subnet: Any) -> None:
        self.peers.pop(str(subnet), None)
        for worker in self.workers:
            self._send(worker, {"op": "remove", "subnet": str(subnet)})

    def trace(self, request: dict[str, Any], sink: Callable[[list[dict[str, Any]]], None]) -> int:
        """Every worker traces `request` too and sends its events to `sink`."""
        tid = next(self._trace_ids)
        keep = {k: request.get(k) for k in ("filter", "sample", "rate", "count")}
        self._traces[tid] = (keep, sink)
        for worker in self.workers:
            self._send(worker, {"op": "trace", "id": tid, "request": keep})
        return tid

    def untrace(self, tid: int) -> None:
        if self._traces.pop(tid, None) is not None:
            for worker in self.workers:
                self._send(worker, {"op": "untrace", "id": tid})

    async def ask(self, msg: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Send `msg` to every ready worker and wait up to REPLY_TIMEOUT_S for their
        replies: worker index → reply (a worker that did not answer in time is
        missing; its late reply is ignored)."""
        rid = next(self._ask_ids)
        asked = self._askable()
        replies: dict[int, dict[str, Any]] = {}
        done = asyncio.Event()
        if not asked:
            return replies
        self._asked[rid] = (asked, replies, done)
        for worker in self.workers:
            if worker.index in asked:
                self._send(worker, {**msg, "id": rid})
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), REPLY_TIMEOUT_S)
        finally:
            del self._asked[rid]
        return replies

    def _askable(self) -> set[int]:
        """The workers ask() sends to: up, with their pipe open."""
        return {w.index for w in self.workers if w.ready and w.conn is not None}

    def _on_reply(self, worker: _Worker, msg: dict[str, Any]) -> None:
        entry = self._asked.get(msg.get("id"))  # type: ignore[arg-type]
        if entry is None:
            return  # too late
        waiting, replies, done = entry
        if worker.index in waiting:
            waiting.discard(worker.index)
            replies[worker.index] = msg
            if not waiting:
                done.set()

    async def sample(self) -> dict[int, QueueSample]:
        """Every worker's running totals (--egress-thread auto decides from them)."""
        out = {}
        for index, reply in (await self.ask({"op": "sample"})).items():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out[index] = QueueSample(
                    float(reply["at"]), float(reply["cpu"]), int(reply["tx_bytes"]),
                    int(reply["tx_packets"]),
                )  # fmt: skip
        return out

    async def refresh(self) -> None:
        """Every worker's counters as of now (`weft status`), not as of its last
        report (up to REPORT_INTERVAL_S old); a worker that does not answer in
        REPLY_TIMEOUT_S keeps its last report."""
        replies = await self.ask({"op": "counters"})
        for worker in self.workers:
            if worker.index in replies:
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    self._take_report(worker, replies[worker.index])

    @staticmethod
    def _take_report(worker: _Worker, msg: dict[str, Any]) -> None:
        worker.last = {
            "counters": dict(msg["counters"]),
            "fast": dict(msg.get("fast") or {}),
            "gc": msg.get("gc"),
        }
        worker.peers = int(msg.get("peers", 0))

    async def egress_thread_switched(self, on: bool) -> int:
        """Tell every worker that the TAP's NAPI goes into (`on`) or has left its
        kernel thread; how many did not answer in time."""
        asked = len(self._askable())
        return asked - len(await self.ask({"op": "egress-thread", "on": on}))

    def _on_message(self, worker: _Worker) -> None:
        if worker.conn is None:
            return
        messages, closed = read_messages(worker.conn)
        for data in messages:
            with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
                msg = json.loads(data)
                if msg.get("op") == "counters":
                    self._take_report(worker, msg)
                elif msg.get("op") == "reply":
                    self._on_reply(worker, msg)
                elif msg.get("op") == "events" and msg.get("id") in self._traces:
                    self._traces[msg["id"]][1](list(msg["events"]))
                elif msg.get("op") == "ready":  # a restarted worker (start() reads the first)
                    worker.ready = True
                    pid = worker.proc.pid if worker.proc is not None else None
                    log.info("queue %d: worker up again (pid %s)", worker.index, pid)
                elif msg.get("op") == "error":
                    worker.error = str(msg.get("message"))
                    log.error("queue %d: the restarted worker could not start: %s",
                              worker.index, worker.error)  # fmt: skip
        if closed:
            self._ended(worker)

    def _ended(self, worker: _Worker) -> None:
        """The worker's pipe closed: wait for it to exit without blocking the loop
        (it normally has by now), then reap it."""
        self._close_pipe(worker)
        self._await_exit(worker, time.monotonic() + REAP_GRACE_S)

    def _await_exit(self, worker: _Worker, deadline: float) -> None:
        proc = worker.proc
        code = proc.poll() if proc is not None else None
        if proc is not None and code is None:
            if time.monotonic() < deadline and not self._closing:
                self.loop.call_later(REAP_POLL_S, self._await_exit, worker, deadline)
                return
            code = _reap(proc, 0)  # stuck after closing its pipe (or we are stopping)
        self._exited(worker, code)

    def _exited(self, worker: _Worker, code: int | None) -> None:
        """Keep the ended worker's counters; start it again unless it was stopped."""
        self.retired = add_counts(self.retired, worker.last)
        worker.last, worker.ready = {}, False
        if self._closing:
            return
        if code in (0, -signal.SIGTERM) and worker.error is None:
            # It was stopped (a worker exits 0 on SIGTERM; a process-group SIGTERM
            # reaches the workers before queue 0 gets to stop them): not a crash.
            log.info("queue %d: worker stopped (exit %s); not restarted", worker.index, code)
            return
        now = time.monotonic()
        worker.started = [t for t in worker.started if now - t < 60]
        if len(worker.started) >= RESTARTS_PER_MINUTE:
            log.error(
                "queue %d: worker exited (%s) %d times in a minute; not restarted, "
                "its flows stay on the other queues",
                worker.index, code, len(worker.started),
            )  # fmt: skip
            return
        log.error(
            "queue %d: worker exited (%s); its flows moved to the other queues, restarting it",
            worker.index, code,
        )  # fmt: skip
        self.restarts += 1
        try:
            self._spawn(worker)
        except OSError as exc:
            log.error("queue %d: cannot restart the worker: %s", worker.index, exc)
            return
        assert worker.conn is not None
        self.loop.add_reader(worker.conn.fileno(), self._on_message, worker)

    def _close_pipe(self, worker: _Worker) -> None:
        if worker.conn is None:
            return
        with contextlib.suppress(ValueError, RuntimeError):
            self.loop.remove_reader(worker.conn.fileno())
            if worker.waiting:
                self.loop.remove_writer(worker.conn.fileno())
        worker.conn.close()
        worker.conn, worker.waiting = None, False
        worker.outbox.clear()

    def counters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(forwarder counters, fast-path counters) of queues 1…N-1, ended ones included."""
        total = dict(self.retired)
        for worker in self.workers:
            total = add_counts(total, worker.last)
        return total.get("counters", {}), total.get("fast", {})

    def status(self) -> dict[str, Any]:
        return {
            "count": self.spec.queues,
            "restarts": self.restarts,
            "workers": [
                {
                    "queue": w.index,
                    "pid": w.proc.pid if w.proc is not None else None,
                    **self._liveness(w),
                    # what this process moved (since it last started)
                    "tx_packets": w.last.get("counters", {}).get("tx_packets", 0),
                    "rx_packets": w.last.get("counters", {}).get("rx_packets", 0),
                    "peers": w.peers,
                    "unsent": len(w.outbox),  # route updates waiting for the pipe
                    "gc": w.last.get("gc"),  # its process's collector (gc_pauses)
                }
                for w in self.workers
            ],
        }

    @staticmethod
    def _liveness(w: _Worker) -> dict[str, bool]:
        """`running`: the process exists; `ready`: it is running and has said its
        queue and socket are open, so it carries flows (a dead one whose pipe has not
        been read yet is not)."""
        running = w.proc is not None and w.proc.poll() is None
        return {"running": running, "ready": running and w.ready}

    def stop(self) -> None:
        """SIGTERM every worker (our own children, by PID), wait, SIGKILL stragglers."""
        self._closing = True
        for worker in self.workers:
            self._close_pipe(worker)
            if worker.proc is not None and worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)
        for worker in self.workers:
            _reap(worker.proc)


def read_messages(conn: socket.socket) -> tuple[list[bytes], bool]:
    """The messages waiting on a non-blocking SOCK_SEQPACKET socket, and whether the
    other end has closed it."""
    out: list[bytes] = []
    while True:
        try:
            data = conn.recv(MESSAGE_MAX)
        except BlockingIOError:
            return out, False
        except OSError:
            return out, True
        if not data:
            return out, True
        out.append(data)


def _reap(proc: subprocess.Popen[bytes] | None, grace_s: float = REAP_GRACE_S) -> int | None:
    """Its exit status, after up to grace_s; SIGKILL if it has not exited by then."""
    if proc is None:
        return None
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# -- a worker ----------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    """The C library already in the process (bpf(2) and prctl(2) have no Python API)."""
    return ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _send_events(conn: socket.socket, tid: int, sub: Subscription) -> None:
    """A trace subscription's events to queue 0, in messages of at most ~48 KB (what
    the pipe cannot take now is counted lost, as a full subscription's would be)."""
    batch: list[dict[str, Any]] = []
    size = 0
    while sub.events:
        event = sub.events.popleft()
        batch.append(event)
        size += 200 + len(event.get("frame", ""))
        if size > 48_000 or not sub.events:
            try:
                conn.send(json.dumps({"op": "events", "id": tid, "events": batch}).encode())
            except OSError:
                sub.lost += len(batch)
            batch, size = [], 0


def counters_report(node: Any) -> dict[str, Any]:
    """What a worker tells queue 0 of its counters (each second, and when asked),
    and of its own process's garbage collector (dataplane/gc_pauses.py)."""
    pauses = gc_pauses.watched()
    return {
        "counters": node.forwarder.counters.as_dict() if node.forwarder else {},
        "fast": node.fast.counters.as_dict() if node.fast else {},
        "peers": len(node.forwarder.peers()) if node.forwarder else 0,
        "gc": pauses.as_dict() if pauses is not None else None,
    }


async def _serve(index: int, conn: socket.socket, stop: asyncio.Event) -> None:
    from dataplane.io.node import UserspaceDataplane

    gc_pauses.watch()  # (after the imports: they are what it freezes)
    spec = spec_from_json(os.environ["WEFT_QUEUE_SPEC"])
    loop = asyncio.get_running_loop()
    node = UserspaceDataplane(spec, queue=index)
    try:
        node.start(loop)
    except Exception as exc:  # said to queue 0, which fails its start with it
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"op": "error", "message": str(exc)}).encode())
        return
    traces: dict[int, Subscription] = {}
    try:
        conn.send(b'{"op": "ready"}')

        def on_message() -> None:
            messages, closed = read_messages(conn)
            if closed:  # queue 0 is gone
                loop.remove_reader(conn.fileno())
                stop.set()
            for data in messages:
                try:
                    msg = json.loads(data)
                    if msg["op"] == "add":
                        node.add_peer(decode_peer(msg["peer"]))
                    elif msg["op"] == "remove":
                        node.remove_peer(ip_network(msg["subnet"]))
                    elif msg["op"] == "trace" and node.tracer is not None:
                        traces[msg["id"]] = node.tracer.subscribe(
                            Subscription.from_request(msg["request"])
                        )
                    elif msg["op"] == "untrace" and msg["id"] in traces:
                        node.tracer.unsubscribe(traces.pop(msg["id"]))  # type: ignore[union-attr]
                    elif msg["op"] == "sample":
                        sent = node.forwarder.counters if node.forwarder else None
                        reply = {"op": "reply", "id": msg["id"], "at": time.monotonic(),
                                 "cpu": time.process_time(),
                                 "tx_bytes": sent.tx_bytes if sent else 0,
                                 "tx_packets": sent.tx_packets if sent else 0}  # fmt: skip
                        conn.send(json.dumps(reply).encode())
                    elif msg["op"] == "egress-thread":
                        node.egress_thread_switched(bool(msg["on"]))
                        conn.send(json.dumps({"op": "reply", "id": msg["id"]}).encode())
                    elif msg["op"] == "counters":
                        reply = {"op": "reply", "id": msg["id"], **counters_report(node)}
                        conn.send(json.dumps(reply).encode())
                except OSError as exc:  # a full pipe, or queue 0 gone (stop is set)
                    log.warning("queue %d: %r from queue 0: %s", index, data[:60], exc)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("queue %d: bad message from queue 0 (%s): %r", index, exc, data[:200])

        conn.setblocking(False)
        loop.add_reader(conn.fileno(), on_message)
        last_report = 0.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TRACE_FLUSH_S if traces else REPORT_INTERVAL_S)
            for tid, sub in traces.items():
                _send_events(conn, tid, sub)
            if time.monotonic() - last_report < REPORT_INTERVAL_S:
                continue
            last_report = time.monotonic()
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"op": "counters", **counters_report(node)}).encode())
        loop.remove_reader(conn.fileno())
    finally:
        node.stop()


def main(argv: list[str]) -> int:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _die_with_parent()
    index, fd, parent = int(argv[0]), int(argv[1]), int(argv[2])
    conn = socket.socket(fileno=fd)
    if os.getppid() != parent:  # queue 0 died before PR_SET_PDEATHSIG took
        return 1

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await _serve(index, conn, stop)

    uvloop.run(run())
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
