"""A TCP request/response (ping-pong) probe, run inside lab pods by the bench.

    python rr.py server HOST PORT SECONDS     # echo one connection, exit by SECONDS
    python rr.py client HOST PORT SECONDS     # 1-byte ping-pong for SECONDS; prints JSON

Both sides are bounded in time: the server exits after its deadline even if no
client came, and every socket call has a timeout. Standard library only, so it
runs with any python3 in the namespace.
"""

from __future__ import annotations

import json
import socket
import sys
import time


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
        count = 0
        start = time.perf_counter()
        end = start + seconds
        now = start
        while now < end:
            sock.sendall(b"x")
            if not sock.recv(1):
                break
            count += 1
            now = time.perf_counter()
        elapsed = now - start
    print(json.dumps({"transactions": count, "seconds": elapsed}))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("server", "client"):
        print(__doc__, file=sys.stderr)
        return 2
    role, host, port, seconds = argv[0], argv[1], int(argv[2]), float(argv[3])
    return server(host, port, seconds) if role == "server" else client(host, port, seconds)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
