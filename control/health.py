"""The health listener: GET /healthz (always 200), /readyz (200 once subnet.env is
written, as flanneld), /metrics (Prometheus text). No control operations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("weft.health")


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        is_ready: Callable[[], bool],
        metrics: Callable[[], Awaitable[str]],
    ) -> None:
        self.host = host
        self.port = port
        self.is_ready = is_ready
        self.metrics = metrics
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        log.info("health listener on %s:%d (/healthz /readyz /metrics)", self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            # Drain the headers; the request body (if any) is ignored.
            while await asyncio.wait_for(reader.readline(), timeout=5) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            content_type = "text/plain; charset=utf-8"
            if len(parts) < 2 or parts[0] != "GET":
                status, body = "405 Method Not Allowed", "only GET\n"
            elif path == "/healthz":
                status, body = "200 OK", "ok\n"
            elif path == "/readyz":
                ready = self.is_ready()
                status = "200 OK" if ready else "503 Service Unavailable"
                body = "ready\n" if ready else "not ready: subnet.env not written yet\n"
            elif path == "/metrics":
                status, body = "200 OK", await self.metrics()
                content_type = "text/plain; version=0.0.4; charset=utf-8"
            else:
                status, body = "404 Not Found", "not found\n"
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
