"""A reference point: the simplest Python TUN ↔ UDP forwarder (flannel's udp wire format).

    python naive.py LOCAL_IP PEER_IP SUBNET NETWORK MTU

Opens TUN ``naive0`` (IFF_TUN | IFF_NO_PI), gives it SUBNET's .0/32, MTU and a
route for NETWORK, binds UDP 8285 on LOCAL_IP, and forwards: every packet read
from the TUN is sent as is to PEER_IP:8285; every datagram received is written
to the TUN. No lookup, no TTL handling, no checks, one static peer — the floor
of what per-packet work costs in Python, to compare weft's engine with. Runs
until killed (the bench's lab stops it by PID).
"""

from __future__ import annotations

import fcntl
import os
import selectors
import socket
import struct
import subprocess
import sys

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PORT = 8285


def main(argv: list[str]) -> int:
    local_ip, peer_ip, subnet, network, mtu = argv
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"naive0", IFF_TUN | IFF_NO_PI))
    gw = subnet.split("/")[0]
    for cmd in (
        ["ip", "addr", "add", f"{gw}/32", "dev", "naive0"],
        ["ip", "link", "set", "naive0", "mtu", mtu, "up"],
        ["ip", "route", "add", network, "dev", "naive0"],
    ):
        subprocess.run(cmd, check=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((local_ip, PORT))
    sock.setblocking(False)
    peer = (peer_ip, PORT)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ, "tun")
    sel.register(sock, selectors.EVENT_READ, "udp")
    read, write, recv, sendto = os.read, os.write, sock.recv, sock.sendto
    print("naive forwarder up", flush=True)
    while True:
        for key, _ in sel.select():
            for _ in range(64):
                try:
                    if key.data == "tun":
                        sendto(read(fd, 65536), peer)
                    else:
                        write(fd, recv(65536))
                except BlockingIOError:
                    break
                except OSError:
                    continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
