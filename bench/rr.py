"""Request/response (ping-pong) probes over TCP and UDP, run inside lab pods by the bench.

    python rr.py server HOST PORT SECONDS      # TCP: echo one connection, exit by SECONDS
    python rr.py client HOST PORT SECONDS      # TCP: 1-byte ping-pong for SECONDS; prints JSON
    python rr.py udp-server HOST PORT SECONDS  # UDP: echo every datagram until SECONDS
    python rr.py udp-client HOST PORT SECONDS  # UDP: 4-byte ping-pong; prints JSON

The client prints one JSON line: transactions, seconds, the round trips' p50 and
p99 in ms, and (UDP) how many requests got no answer within UDP_WAIT_S. A lone UDP
datagram is what the pods' GRO flush timeout delays (Lab.udp_gro_forwarding), and
a TCP 1-byte segment (PSH) is not held, so the two probes tell that apart.

Both sides are bounded in time: the server exits after its deadline even if no
client came, and every socket call has a timeout. Standard library only, so it
runs with any python3 in the namespace.
"""

from __future__ import annotations

import json
import socket
import sys
import time

#: How long a UDP request waits for its answer before it counts as lost.
UDP_WAIT_S = 0.2


def server(host: str, port: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(4)
        while time.monotonic() < deadline:
            srv.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                return 0
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while time.monotonic() < deadline:
                    conn.settimeout(max(0.05, deadline - time.monotonic()))
                    try:
                        data = conn.recv(64)
                    except (TimeoutError, OSError):
                        break
                    if not data:
                        break
                    conn.sendall(data)
    return 0


def client(host: str, port: int, seconds: float) -> int:
    sock = None
    give_up = time.monotonic() + 5.0
    while sock is None:
        try:
            sock = socket.create_connection((host, port), timeout=1.0)
        except OSError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.05)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(2.0)
        rtts: list[float] = []
        start = time.perf_counter()
        end = start + seconds
        now = start
        while now < end:
            sock.sendall(b"x")
            if not sock.recv(1):
                break
            sent, now = now, time.perf_counter()
            rtts.append(now - sent)
        elapsed = now - start
    print(json.dumps(result(rtts, elapsed)))
    return 0


def udp_server(host: str, port: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(max(0.05, left))
            try:
                data, peer = sock.recvfrom(64)
            except TimeoutError:
                return 0
            sock.sendto(data, peer)
    return 0


def udp_client(host: str, port: int, seconds: float) -> int:
    """Each request is its 4-byte sequence number, echoed back. One request in
    flight at a time; a request unanswered within UDP_WAIT_S counts
    as lost and the next goes out. Each request carries a sequence number, so a late
    answer to a lost one is not taken for the current one. The clock starts at the
    server's first answer (it may still be starting, as TCP's connect waits for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        sock.settimeout(0.05)
        give_up = time.monotonic() + 5.0
        while True:
            sock.send(b"hello")
            try:
                if sock.recv(64) == b"hello":
                    break
            except (TimeoutError, ConnectionRefusedError):
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.01)  # refused comes back at once: do not spin
        sock.settimeout(UDP_WAIT_S)
        rtts: list[float] = []
        lost = 0
        seq = 0
        start = time.perf_counter()
        end = start + seconds
        now = start
        while now < end:
            seq = (seq + 1) & 0xFFFFFFFF
            want = seq.to_bytes(4, "big")
            sent = time.perf_counter()
            sock.send(want)
            try:
                while sock.recv(64) != want:
                    pass
            except (TimeoutError, ConnectionRefusedError):
                lost += 1
                now = time.perf_counter()
                continue
            now = time.perf_counter()
            rtts.append(now - sent)
        elapsed = now - start
    out = result(rtts, elapsed)
    out["lost"] = lost
    print(json.dumps(out))
    return 0


def result(rtts: list[float], elapsed: float) -> dict[str, float]:
    """Transactions, seconds and the round trips' p50/p99 in ms (nearest rank)."""
    out: dict[str, float] = {"transactions": len(rtts), "seconds": elapsed}
    if rtts:
        ordered = sorted(rtts)
        for name, q in (("p50_ms", 0.50), ("p99_ms", 0.99)):
            out[name] = ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
    return out


def main(argv: list[str]) -> int:
    roles = {"server": server, "client": client, "udp-server": udp_server, "udp-client": udp_client}
    if len(argv) != 4 or argv[0] not in roles:
        print(__doc__, file=sys.stderr)
        return 2
    return roles[argv[0]](argv[1], int(argv[2]), float(argv[3]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
