"""Underlay sockets: UDP for vxlan/udp, AF_PACKET for host-gw."""

from __future__ import annotations

import socket

ETH_P_ARP = 0x0806
SOCKET_BUFFER = 4 << 20  # flannel's proxy lost 8–9 % of frames with default buffers
SO_SNDBUFFORCE = 32  # Linux values; Python's socket module does not export them
SO_RCVBUFFORCE = 33


def _grow_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
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
