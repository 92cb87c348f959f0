"""uvloop glue: device and socket readers → forwarder → writers.

Each reader drains its fd until EAGAIN (at most BATCH packets, so one busy
direction cannot starve the other), hands every packet to the forwarder and
acts on the verdict at once. One preallocated buffer per direction: the
packet is read `headroom` bytes into it so encapsulation writes its headers
in front without copying, and the kernel copies it out again on send.

Busy polling (`--busy-poll USEC`, off by default): a packet that arrives
after the process has slept pays a cold wake-up — measured here, ~100-150 µs
per pass through weft after 10 ms idle against ~30 µs when packets come
every 0.2 ms (the CPU halted, and the interpreter's code and data left the
caches). With busy polling, once a reader has fired the engine keeps polling
both fds (a non-blocking read each, scheduled with call_soon so the event
loop still serves everything else) until USEC have passed without a packet,
then goes back to sleeping in epoll. It costs a CPU for as long as traffic
keeps coming within USEC, like the kernel's SO_BUSY_POLL.

Keeping warm (`--keep-warm USEC`, off by default) is the cheaper half of that:
while the engine took a packet within the last second but none for USEC, a
timer runs a warm pass (Engine.warm_pass: both readers over empty fds, the
forwarder over a made-up packet that is not sent), so the next lone packet
finds the process recently woken and its code in the caches (on the VM of
decisions §34 the wake-up itself is most of the gain). It decides from the
packet counts at each tick (idle.KeepWarm): nothing is added to the hot path.

uvloop rule: a registered fd must be removed with remove_reader() before it
is closed, or the process aborts (SIGABRT) on the next loop iteration.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

from dataplane.backends.base import DropReason
from dataplane.forwarder import Counters, Forwarder, Verdict
from dataplane.io.idle import KeepWarm, warm_datagram
from dataplane.io.sockets import SourcePorts
from dataplane.trace import Tracer

BATCH = 64
#: The fast engines' bound on device bytes read per readiness callback, so that the
#: receive side is not kept waiting (fastpath_receive.RX_ROUNDS bounds the other way).
TX_BUDGET = 512 << 10
BUFFER_SIZE = 65536 + 64


class Engine:
    """Moves packets between one device fd and one underlay socket."""

    def __init__(
        self,
        forwarder: Forwarder,
        device_fd: int,
        sock: socket.socket | None,
        *,
        send_socket: socket.socket | None = None,
        busy_poll_us: int = 0,
    ) -> None:
        self.forwarder = forwarder
        self.device_fd = device_fd
        self.sock = sock  # receives datagrams (vxlan, udp); None for host-gw
        self.send_socket = send_socket or sock  # host-gw: the AF_PACKET socket
        self._dev_buf = bytearray(BUFFER_SIZE)
        self._dev_view = memoryview(self._dev_buf)[forwarder.headroom :]
        self._dev_out = memoryview(self._dev_buf)
        self._net_buf = bytearray(BUFFER_SIZE)
        self._net_view = memoryview(self._net_buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        #: called (outside the hot loop) once a batch left work for the edge, e.g.
        #: host-gw gateways to resolve.
        self.after_batch: Callable[[], None] | None = None
        #: set while someone runs `weft trace live`; checked once per batch.
        self.tracer: Tracer | None = None
        #: vxlan: datagrams leave from the socket their inner flow hashes to, one
        #: outer source port per flow (sockets.SourcePorts); None: from `send_socket`.
        self.source_ports: SourcePorts | None = None
        self._send_socks: list[socket.socket] = [self.send_socket] if self.send_socket else []
        self._sendtos = [s.sendto for s in self._send_socks]  # bound once, not per drain
        self.busy_poll_ns = busy_poll_us * 1000
        self._spin: asyncio.Handle | None = None  # the next busy-poll round, while polling
        self._idle_since = 0  # monotonic ns of the last packet while busy polling
        self._got = 0  # packets taken by readers since the spin last looked
        #: --keep-warm: a warm pass every this many ns while traffic is sporadic (0: off)
        self.keep_warm_ns = 0
        self._warm: KeepWarm | None = None
        self._warm_timer: asyncio.TimerHandle | None = None
        self._warming = False  # inside a warm pass: its empty reads are not wake-ups
        self._warm_buf = bytearray(forwarder.headroom + 64)
        self._warm_counters = Counters()  # what the warm pass's made-up packet counts
        self._warm_dst: bytes | None = None  # … and where it goes: a peer's subnet

    def use_source_ports(self, ports: SourcePorts | None) -> None:
        """Send each flow's datagrams from its own port (None: all from send_socket)."""
        self.source_ports = ports
        if ports is not None:
            self._send_socks = list(ports.sockets)
        elif self.send_socket is not None:
            self._send_socks = [self.send_socket]
        self._sendtos = [s.sendto for s in self._send_socks]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        busy = self.busy_poll_ns > 0
        loop.add_reader(self.device_fd, self._woken_device if busy else self._on_device)
        if self.sock is not None:
            loop.add_reader(self.sock.fileno(), self._woken_network if busy else self._on_network)
        if self.keep_warm_ns > 0:
            self._warm = KeepWarm(self.keep_warm_ns)
            self._warm_timer = loop.call_later(self.keep_warm_ns / 1e9, self._keep_warm_tick)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._spin is not None:
            self._spin.cancel()
            self._spin = None
        if self._warm_timer is not None:
            self._warm_timer.cancel()
            self._warm_timer = None
        self._loop.remove_reader(self.device_fd)
        if self.sock is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._loop = None

    # -- keeping the packet path warm (--keep-warm, idle.KeepWarm) -------------------

    def _keep_warm_tick(self) -> None:
        loop, warm = self._loop, self._warm
        if loop is None or warm is None:
            return
        go, next_ns = warm.tick(time.monotonic_ns(), self.packets_taken())
        if go and self._spin is None:  # (a busy poll keeps it warm anyway)
            self.warm_pass()
        self._warm_timer = loop.call_later(next_ns / 1e9, self._keep_warm_tick)

    def warm_pass(self) -> None:
        """Run the packet path over nothing, so that the next lone packet finds its code
        and data in the CPU's caches: both readers as if woken (their reads find
        nothing; a packet that did come meanwhile is taken and counted as usual), and
        the forwarder's route lookup and encapsulation over a made-up packet to the
        first peer, counted apart and never sent."""
        self._warming = True
        try:
            self._on_device()
            if self.sock is not None:
                self._on_network()
        finally:
            self._warming = False
        self._warm_forwarder()
        self.forwarder.counters.warm_passes += 1

    def _warm_forwarder(self) -> None:
        """The forwarder over a made-up IPv4 packet to a peer (a TUN's; a TAP's frames
        are not made up here), with its counters swapped for a scratch set."""
        fwd = self.forwarder
        if fwd.l2:
            return
        dst = self._warm_dst
        if dst is None or fwd.routes.lookup_v4(int.from_bytes(dst, "big")) is None:
            # (peers() copies every route: only when the one warmed towards is gone)
            v4 = [p for p in fwd.peers() if p.subnet.version == 4]
            dst = self._warm_dst = v4[0].subnet.network_address.packed if v4 else None
        if dst is None:
            return
        buf, head = self._warm_buf, fwd.headroom
        buf[head : head + 28] = warm_datagram(dst)
        real, fwd.counters = fwd.counters, self._warm_counters
        try:
            fwd.from_device(buf, head, head + 28)
        finally:
            fwd.counters = real

    def packets_taken(self) -> int:
        """Packets the readers have taken since start, both ways (count_batch)."""
        taken = self.forwarder.counters.batch_packets
        return taken[0] + taken[1]

    # -- busy polling ---------------------------------------------------------------

    def _woken_device(self) -> None:
        self._on_device()
        self._start_spin()

    def _woken_network(self) -> None:
        self._on_network()
        self._start_spin()

    def _start_spin(self) -> None:
        self._idle_since = time.monotonic_ns()
        if self._spin is None and self._loop is not None:
            self._spin = self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        """One busy-poll round: drain both directions; again soon while packets keep coming."""
        self._got = 0
        self._on_device()
        if self.sock is not None:
            self._on_network()
        now = time.monotonic_ns()
        if self._got:
            self._idle_since = now
        if now - self._idle_since < self.busy_poll_ns and self._loop is not None:
            # Give the CPU to anything else runnable (the pods, a second weft on a
            # small machine): without it two spinning processes starved each other
            # for whole scheduler slices (ping p50 8 ms on 2 CPUs).
            os.sched_yield()
            self._spin = self._loop.call_soon(self._poll)
        else:
            self._spin = None

    def _on_device(self) -> None:
        fwd = self.forwarder
        buf = self._dev_buf
        out = self._dev_out
        head = fwd.headroom
        fd = self.device_fd
        readv = os.readv
        views = [self._dev_view]
        udp = self.forwarder.backend.transport == "udp"
        send = self.send_socket.send
        ports = self.source_ports
        sendtos = self._sendtos
        ip_at = head + (14 if fwd.l2 else 0)
        drops = fwd.counters.drops
        tracer = self.tracer if self.tracer is not None and self.tracer.active else None
        if tracer is not None:
            tracer.start_batch()
        got = 0
        for _ in range(BATCH):
            try:
                n = readv(fd, views)
            except BlockingIOError:
                break
            except OSError:
                break  # device went away; the agent notices and stops
            got += 1
            verdict = fwd.from_device(buf, head, head + n)
            if tracer is not None:
                tracer.from_device(buf, head, head + n, verdict, fwd)
            if verdict == Verdict.SEND:
                try:
                    if udp:
                        i = ports.index(buf, ip_at, head + n) if ports is not None else 0
                        sendtos[i](out[fwd.out_start : fwd.out_end], fwd.out_peer.sockaddr)  # type: ignore[union-attr]
                    else:
                        send(out[fwd.out_start : fwd.out_end])
                except OSError:
                    drops[DropReason.SEND_FAILED] += 1
            elif verdict == Verdict.REPLY:
                try:
                    os.write(fd, fwd.reply)
                except OSError:
                    drops[DropReason.WRITE_FAILED] += 1
        self.count_batch(0, got)
        if self.after_batch is not None:
            self.after_batch()

    #: how a delivered packet is written to the device; a device with a vnet
    #: header (the fast paths) puts one in front.
    write_device = staticmethod(os.write)

    def count_batch(self, source: int, packets: int) -> None:
        """One reader wake-up (source 0: device, 1: network) that took `packets`.

        Empty busy-poll rounds and warm passes are not wake-ups, and are not counted."""
        self._got += packets
        if not packets and (self._spin is not None or self._warming):
            return
        counters = self.forwarder.counters
        counters.batches[source] += 1
        counters.batch_packets[source] += packets

    def _on_network(self) -> None:
        fwd = self.forwarder
        buf = self._net_buf
        out = self._net_view
        recv = self.sock.recvfrom_into  # type: ignore[union-attr]
        fd = self.device_fd
        write = self.write_device
        drops = fwd.counters.drops
        tracer = self.tracer if self.tracer is not None and self.tracer.active else None
        if tracer is not None:
            tracer.start_batch()
        got = 0
        for _ in range(BATCH):
            try:
                n, addr = recv(buf)
            except BlockingIOError:
                break
            except OSError:
                # ICMP errors queued on the socket (port unreachable from a peer)
                # surface here; they are not packets, so just carry on.
                continue
            got += 1
            verdict = fwd.from_network(buf, n, addr[0])
            if tracer is not None:
                tracer.from_network(buf, n, addr, verdict, fwd)
            if verdict == Verdict.DELIVER:
                try:
                    write(fd, out[fwd.out_start : fwd.out_end])
                except OSError:
                    drops[DropReason.WRITE_FAILED] += 1
        self.count_batch(1, got)
