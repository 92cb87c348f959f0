"""Underlay sockets: UDP for vxlan/udp, AF_PACKET for host-gw."""

from __future__ import annotations

import ctypes
import socket
import struct

from dataplane.flows import inner_flow_hash, source_index

ETH_P_ARP = 0x0806
SOCKET_BUFFER = 4 << 20  # flannel's proxy lost 8–9 % of frames with default buffers
SO_SNDBUFFORCE = 32  # Linux values; Python's socket module does not export them
SO_RCVBUFFORCE = 33


def _grow_buffers(sock: socket.socket, *, receive: bool = True) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF) if receive else (socket.SO_SNDBUF,):
        try:
            # SO_*BUFFORCE ignores rmem_max/wmem_max (we are root); fall back if refused.
            force = SO_RCVBUFFORCE if opt == socket.SO_RCVBUF else SO_SNDBUFFORCE
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


def open_udp_socket(bind_ip: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket on bind_ip:port (flannel binds the interface address).

    With reuse_port, every queue worker (dataplane/io/queues.py) binds its own socket
    to the same address: the kernel hashes each datagram's addresses and ports to one
    of them, so a tunnel flow (one outer source port) always reaches the same worker."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _grow_buffers(sock)
        sock.bind((bind_ip, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot bind UDP {bind_ip}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


#: How many outer source ports the vxlan backend spreads flows over by default.
SOURCE_PORTS = 16
MAX_SOURCE_PORTS = 256
SO_ATTACH_FILTER = 26
_SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_KEEP_NOTHING = [(0x06, 0, 0, 0)]  # BPF_RET|BPF_K 0: keep no byte


def attach_classic_bpf(
    sock: socket.socket, option: int, program: list[tuple[int, int, int, int]]
) -> None:
    """Put a classic BPF program (code, jt, jf, k instructions) on `sock` with
    SO_ATTACH_FILTER or SO_ATTACH_REUSEPORT_CBPF; the kernel copies it."""
    code = ctypes.create_string_buffer(b"".join(_SOCK_FILTER.pack(*ins) for ins in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, option, fprog)


class SourcePorts:
    """Sockets that only send, each bound to bind_ip on a port the kernel picks:
    a datagram leaves from the one its inner flow hashes to (flows.source_index),
    so each flow has one outer source port, as from the kernel's VXLAN device.

    Only weft's vxlan backend uses them; replies come to the listening socket
    (peers send to port 8472 whatever our source port). A filter that keeps no
    byte stops anything sent to these ports from queueing here."""

    def __init__(self, bind_ip: str, count: int) -> None:
        self.sockets: list[socket.socket] = []
        try:
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.sockets.append(sock)
                _grow_buffers(sock, receive=False)
                attach_classic_bpf(sock, SO_ATTACH_FILTER, _KEEP_NOTHING)
                sock.bind((bind_ip, 0))
                sock.setblocking(False)
        except OSError as exc:
            self.close()
            raise OSError(
                exc.errno, f"cannot open source ports on {bind_ip}: {exc.strerror}"
            ) from None
        self.ports = [s.getsockname()[1] for s in self.sockets]
        self.count = count

    def index(self, packet: bytes | bytearray | memoryview, at: int, end: int) -> int:
        """Which socket sends the datagram carrying the IP packet at packet[at:end]."""
        return source_index(inner_flow_hash(packet, at, end), self.count)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def open_packet_socket(iface: str, protocol: int = 0) -> socket.socket:
    """A non-blocking AF_PACKET socket on iface; protocol 0 sends only, receives nothing."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
    try:
        _grow_buffers(sock)
        sock.bind((iface, protocol))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot open AF_PACKET on {iface}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock
