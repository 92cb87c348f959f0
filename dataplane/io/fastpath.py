"""Fast paths: move many packets per system call, and let the kernel cut and checksum.

Where each part lives: offloads.py asks the kernel for each path at start-up
(`FastPaths`), egress_tap.py sets up the send path's TAP, this module's
`FastEngine` holds the state, and its two halves move the packets:
fastpath_send.py (device → network) and fastpath_receive.py (network → device).

weft's plain engine (runner.Engine) does one read, one send per packet;
profiling showed ~9 µs of system calls per packet against ~0.15 µs of Python,
so speed comes from moving more bytes per call. Kernel features do it, each
probed at start-up and used only when the kernel accepts it:

**Send: TSO in, UDP-tunnel GSO out.** The pod-side device is opened with
IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6): the kernel hands weft whole
TCP super-packets (up to 64 KB) with a virtio_net_hdr saying how to cut them.
weft writes the outer Ethernet / IPv4 / UDP headers (and VXLAN, inner Ethernet
through the backend's encap, as for any packet) in front *once*, and writes
the frame to an egress TAP opened with the 24-byte tunnel vnet header and
TUN_F_UDP_TUNNEL_GSO(_CSUM) (Linux 6.17+). The kernel takes it as if it came
in from a NIC, routes it to the peer's public IP (ip_forward, accept_local,
rp_filter 0 on the TAP; this needs net.ipv4.conf.all.rp_filter=0 too, and
weft adds an iptables FORWARD ACCEPT rule for the TAP) and, on the way out,
segments it into MTU-sized standard VXLAN datagrams with every inner and
outer checksum filled in — the same datagrams a kernel VXLAN device sends.
Packets that are not GSO (ACKs, pings, small writes) still go through the UDP
socket; both sends run the kernel's transmit path synchronously inside the
system call, in order, so a flow is not reordered between them.

**Send fallback: TSO in, segments cut in userspace, UDP_SEGMENT out.** Without
the egress TAP (Linux < 6.17, rp_filter, or switched off) weft still reads
super-packets, cuts them itself into the segments the kernel's TCP GSO would
make (dataplane/io/segment.py, numpy over all segments at once), each with
the backend's headers in front, back to back in one buffer, and sends that
with one sendmsg carrying a UDP_SEGMENT cmsg (Linux 4.18+): the kernel cuts
the buffer into standard datagrams and fills in the outer UDP checksums. When
the kernel refuses that send (before Linux 6.11 it does when the underlay
device has no checksum offload: EIO) weft turns UDP_SEGMENT and TSO off and
sends one datagram per call (cutting in userspace without UDP_SEGMENT cost as
much as not asking for TSO at all).

**Send: small datagrams batched (tx_batch).** Within one drain of the device,
consecutive packets to one peer whose datagrams have the same size (a 64-byte
UDP flood, a run of pure ACKs) are read back to back into one buffer and sent
with one UDP_SEGMENT sendmsg; the run is flushed when the size or peer changes,
before any other send, and at the end of the drain, and the first packet of a
drain is sent at once, so nothing waits for a later packet.

**Send: UDP super-packets (uso_read).** A pod's small datagrams cost a read
each — unless something merged them on the way: with GRO forwarding on the
pod's veth (`ethtool -K <veth> gro on rx-udp-gro-forwarding on` and a
gro_flush_timeout, see control.lab.topology.Lab.udp_gro_forwarding) the kernel
glues up to 64 same-size datagrams of one flow into one UDP GSO packet, and the
pod device, with TUN_F_USO4|TUN_F_USO6 set, hands it to weft whole. It leaves
like a TCP super-packet: outer headers once, then the egress TAP with an inner
GSO type of UDP_L4, and the kernel cuts one standard datagram per pod datagram
(inner UDP checksums filled in); without the TAP weft cuts it itself, as a TCP
one (segment.py), for one UDP_SEGMENT send. A kernel whose TAP refuses it
switches it off.

**Send: one outer source port per flow (vxlan).** Each inner flow's datagrams
leave from one of `--source-ports` sockets (dataplane/io/sockets.SourcePorts),
picked by a hash of the flow (dataplane/flows.py), as the kernel's VXLAN picks
a port; the egress TAP path writes the same port into the headers it builds. A
tx_batch run whose datagrams have several ports (the ACKs of several flows) goes
as one UDP_SEGMENT send per port, each gathering its datagrams.

**Receive: UDP GRO + recvmmsg in, GSO out.** The UDP socket has UDP_GRO on:
one message can hold many same-size datagrams of one flow (the segment size
comes in a cmsg), and recvmmsg (ctypes, dataplane/io/batch.py) takes up to
128 messages per call. The consecutive TCP segments of one inner flow in GRO
messages are validated and coalesced (dataplane/io/gro.py, numpy over whole
messages) and written to the device as one super-packet with a GSO vnet
header; the kernel delivers it to the pod as its own GRO would have. Single
datagrams (no GRO upstream: e.g. a sender's outer UDP checksum 0) that carry
one TCP flow's consecutive segments in consecutive recvmmsg slots are coalesced
the same way, planned for the whole batch at once (gro.DatagramPlanner, numpy
over strided views of the slots; coalescing them in the interpreter cost more
than the writes it saved); other single datagrams go to the device one by one.
Same-size datagrams of one inner *UDP* flow go to the device as one UDP GSO
(USO) write (dataplane/io/uso.py): the kernel cuts it back into the same
datagrams at the pod's socket.

Datagrams still pass the forwarder (VXLAN header, VNI, VtepMAC, source
check); for a coalesced run the first segment decides for all, because the
rest carry the same bytes in every field the forwarder reads. ICMP errors
(no route, frag-needed for PMTU) are the forwarder's as before: a GSO packet
is judged by its first segment, whose size is what the wire would carry.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable

import numpy as np

from dataplane.forwarder import Forwarder
from dataplane.io import batch
from dataplane.io import uso as uso_mod
from dataplane.io.fastpath_receive import ReceivePath
from dataplane.io.fastpath_send import EGRESS_ORDER_NS, OUTER_HLEN, SendPath
from dataplane.io.gro import Coalescer, DatagramPlanner
from dataplane.io.idle import IdleGaps
from dataplane.io.offloads import FastPaths
from dataplane.io.runner import BATCH, BUFFER_SIZE
from dataplane.io.segment import MAX_SEGMENTS, MAX_SEND_BYTES, Segmenter
from dataplane.io.sockets import SourcePorts
from dataplane.io.uso import UdpCoalescer
from dataplane.packet.vnet import VNET_HDR_LEN, VNET_HDR_TUNNEL_LEN

RX_SLOTS = 128
#: A receive slot: the longest GRO message, and room after it to pad its last segment
#: to a jumbo frame's segment size (gro.Coalescer.plan_batch pads in place).
RX_SLOT_SIZE = batch.SLOT_SIZE + 9216
#: --egress-thread auto: after the thread is switched on or off, every flow's packets
#: go through the TAP for this long (FastEngine.egress_thread_switched): as long as
#: the order window, for the same reason (a thread waiting for a CPU).
EGRESS_SWITCH_NS = EGRESS_ORDER_NS


class FastEngine(SendPath, ReceivePath):
    """Engine whose device has a vnet header; uses whichever fast paths are on.

    Its two directions are its bases: fastpath_send.SendPath (device → network)
    and fastpath_receive.ReceivePath (network → device); the state they share —
    buffers, sockets, the paths on, counters, idle gaps — is set up here."""

    def __init__(
        self,
        forwarder: Forwarder,
        device_fd: int,
        sock: socket.socket,
        paths: FastPaths,
        *,
        public_ip: str,
        underlay_mac: bytes,
        port: int,
    ) -> None:
        super().__init__(forwarder, device_fd, sock)
        self.paths = paths
        # A run of datagrams (tx_batch) starts at _base; every packet is read
        # `headroom` bytes after where the previous datagram ended, with room in
        # front of the first for the egress TAP's headers, and room for a whole
        # super-packet after the longest run.
        self._base = VNET_HDR_TUNNEL_LEN + OUTER_HLEN
        head = self._base + forwarder.headroom
        self._tx_buf = bytearray(head + MAX_SEND_BYTES + BUFFER_SIZE)
        self._tx_view = memoryview(self._tx_buf)
        self._tx_vnet = bytearray(VNET_HDR_LEN)
        self._tx_iov = [self._tx_vnet, self._tx_view[head : head + BUFFER_SIZE]]
        self._iov_at = head
        self._egress_fd = paths.egress.fileno() if paths.egress is not None else -1
        # While the kernel thread sends, writes wait in the TAP's queue for it: a
        # flow's lone packets follow its super-packets through the TAP
        # (EGRESS_ORDER_NS), and a full queue is waited on. (--egress-thread auto
        # switches it: egress_thread_switched; meanwhile the TAP's NAPI runs inside
        # each write, nothing waits, and nothing can be overtaken.)
        self._egress_thread = paths.egress_thread and self._egress_fd >= 0
        self._ordered_until = 0  # … and for a while after a switch, whatever it was
        self._egress_poll = select.poll()
        if self._egress_fd >= 0 and paths.egress_thread_mode != "off":
            self._egress_poll.register(self._egress_fd, select.POLLOUT)
        # --egress-thread: per source port (a hash of the inner flow), when that port's
        # last super-packet went to the TAP (EGRESS_ORDER_NS)
        self._tap_at = [0]
        self._egress_mac = paths.egress_mac
        self._underlay_mac = underlay_mac
        self._src = socket.inet_aton(public_ip)
        self._port = port
        self._source_port_numbers = [port]
        self._run_ports = [0] * (MAX_SEGMENTS + 1)  # each datagram's port, in a tx_batch run
        self._ip_id = 0
        self._outer: dict[tuple[str, int], tuple[int, int, bytes]] = {}
        # Without the egress TAP, super-packets are cut here (dataplane/io/segment.py).
        self._segmenter = Segmenter() if paths.on["tso_read"] and self._egress_fd < 0 else None
        l2 = forwarder.l2
        # Where the inner IP header sits in a received datagram (vxlan: after the
        # VXLAN header and inner Ethernet; udp: at once) and in what weft writes.
        backend = forwarder.backend
        self._ip_off = 22 if backend.name == "vxlan" else 0
        self._l2 = l2
        # receive
        self._rx: batch.MmsgReceiver | None = None
        self._coalescer: Coalescer | None = None
        self._planner: DatagramPlanner | None = None
        if paths.on["recvmmsg"]:
            # Datagrams land so that the inner TCP checksum range (from the inner IP
            # addresses on) is 4-byte aligned: see gro.Coalescer._tcp_sums_ok.
            shift = -(self._ip_off + 12) % 4
            self._rx = batch.MmsgReceiver(RX_SLOTS, RX_SLOT_SIZE, shift=shift)
            if paths.on["gso_write"]:
                self._coalescer = Coalescer(self._rx.buf, self._ip_off)
                if paths.on["gso_datagrams"]:
                    self._planner = DatagramPlanner(self._rx.buf, self._ip_off)
        self._uso: UdpCoalescer | None = None
        if self._rx is not None and paths.on["uso_write"]:
            # Runs of up to 128 datagrams (UDP_MAX_SEGMENTS on Linux 6.x); the first
            # EINVAL for a longer run than older kernels take brings it down to 64.
            self._uso = UdpCoalescer(
                self._rx.buf, self._ip_off, max_segments=uso_mod.MAX_SEGMENTS_6X
            )
        self._rx_view = memoryview(self._rx.buf) if self._rx is not None else None
        self._rx_u8 = np.frombuffer(self._rx.buf, np.uint8) if self._rx is not None else None
        # (segment size, header length) → per receive slot, views of the payloads
        # of the first segments of a GRO message there, as many as one has needed
        # (_deliver_chain).
        self._payload_views: dict[tuple[int, int], list[list[memoryview]]] = {}
        self._gso_write_failed = False
        self._uso_write_failed = False
        # When each side's last callback ended, and whether it took a lone packet.
        self._gaps = IdleGaps()
        self._fc = paths.counters
        self.on_first_error: Callable[[str], None] | None = None

    def use_source_ports(self, ports: SourcePorts | None) -> None:
        super().use_source_ports(ports)
        # The egress TAP path writes the outer UDP header itself: the same port.
        self._source_port_numbers = list(ports.ports) if ports is not None else [self._port]
        self._tap_at = [0] * len(self._source_port_numbers)

    def egress_thread_switched(self, on: bool) -> None:
        """The TAP's NAPI just moved into (`on`) or out of its kernel thread
        (--egress-thread auto): for EGRESS_SWITCH_NS every flow's packets go through
        the TAP, behind whatever the switch left queued (a thread just started may be
        slow to run, and one stopping hands its last packets back)."""
        now = time.monotonic_ns()
        self._egress_thread = on and self._egress_fd >= 0
        self._ordered_until = now + EGRESS_SWITCH_NS
        self._tap_at = [now + EGRESS_SWITCH_NS - EGRESS_ORDER_NS] * len(self._tap_at)

    def _tap_queues(self, now: int) -> bool:
        """May what weft writes to the TAP wait in its queue (a thread sends it), so
        that a flow's packets must follow their super-packets there?"""
        return self._egress_thread or now < self._ordered_until

    def start(self, loop) -> None:  # type: ignore[no-untyped-def]
        super().start(loop)
        if self._egress_fd >= 0:
            loop.add_reader(self._egress_fd, self._drain_egress)

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._egress_fd >= 0:
            loop.remove_reader(self._egress_fd)
        super().stop()

    def warm_pass(self) -> None:
        # A pass that took no packet leaves the idle gaps as the last real packets
        # left them (idle.IdleGaps: the next lone packet is still taken alone).
        gaps = self._gaps.state()
        before = self.packets_taken()
        super().warm_pass()
        if self.packets_taken() == before:
            self._gaps.restore(gaps)

    def _drain_egress(self) -> None:
        # The kernel may queue frames to the TAP (it is an interface like any
        # other); nothing should go there, and nothing read there matters.
        for _ in range(BATCH):
            try:
                os.read(self._egress_fd, 65536)
            except OSError:
                return

    def _first_error(self, what: str) -> None:
        if self.on_first_error is not None:
            self.on_first_error(what)
            self.on_first_error = None
