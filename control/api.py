"""The local API: a unix socket (0600) that answers one JSON request per connection.

Request: one line of JSON, e.g. {"op": "status"}. Reply: one line of JSON.
Handlers are registered by the composition (agent or `weft dataplane run`);
there are no control operations here, only reads. A handler may be a coroutine
(status waits for the queue workers' counters) or return an async iterator (a
stream: trace).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[dict[str, Any]], Any]


def api_handlers(
    status: Callable[[], dict[str, Any]],
    trace: Handler,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Handler]:
    """The read-only operations every weft process serves: status, explain, trace.
    `refresh`, if given, runs before each status (the queue workers' counters)."""

    async def status_op(_request: dict[str, Any]) -> dict[str, Any]:
        if refresh is not None:
            await refresh()
        return status()

    def explain_op(request: dict[str, Any]) -> Any:
        from control.explain import ExplainError, explain

        try:
            return explain(str(request.get("dst")), request.get("src"), status())
        except (ExplainError, KeyError, ValueError) as exc:
            return {"error": str(exc)}

    return {"status": status_op, "explain": explain_op, "trace": trace}


class ApiServer:
    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old_umask = os.umask(0o177)  # the socket is born 0600: root only
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        finally:
            os.umask(old_umask)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            try:
                request = json.loads(line or b"{}")
                handler = self.handlers.get(request.get("op", "status"))
                if handler is None:
                    reply: Any = {"error": f"unknown op {request.get('op')!r}"}
                else:
                    reply = handler(request)
                    if inspect.isawaitable(reply):
                        reply = await reply
            except (ValueError, AttributeError) as exc:
                reply = {"error": f"bad request: {exc}"}
            if hasattr(reply, "__aiter__"):
                # A stream (trace events): one JSON line each until either side stops.
                try:
                    async for item in reply:
                        writer.write(json.dumps(item).encode() + b"\n")
                        await writer.drain()
                except ValueError as exc:  # e.g. a bad trace filter
                    writer.write(json.dumps({"error": str(exc)}).encode() + b"\n")
                    await writer.drain()
                finally:
                    await reply.aclose()
                return
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _send(path: str, request: dict[str, Any], timeout: float | None) -> socket.socket:
    """Connect to the API socket and send one request line."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
    except OSError as exc:
        sock.close()
        raise ConnectionError(f"no weft agent answers on {path}: {exc.strerror or exc}") from None
    return sock


def api_stream(path: str, request: dict[str, Any]) -> Any:
    """Blocking client for streams: yields each decoded line until the server ends."""
    with _send(path, request, None) as sock, sock.makefile("rb") as lines:
        for line in lines:
            yield json.loads(line)


def api_request(path: str, request: dict[str, Any], timeout: float = 5.0) -> Any:
    """Blocking client for the CLI: send one request, return the decoded reply."""
    with _send(path, request, timeout) as sock, sock.makefile("rb") as lines:
        return json.loads(lines.readline())
