"""``LeaseStore`` on etcd v3, with aetcd (gRPC, asyncio; runs on uvloop).

What aetcd is used for, and what is done here instead:

- KV, lease and txn calls go through ``aetcd.Client`` methods (``get``,
  ``get_prefix``, ``put``, ``delete``, ``transaction``, ``lease``,
  ``revoke_lease``, ``get_lease_info``).
- ``aetcd.Client.connect`` always opens an *insecure* channel (aetcd 1.0.0 has
  no TLS), so ``_Client`` overrides it: secure or insecure channel, our
  channel options, optional ``Authenticate``.
- The watch is driven on aetcd's generated ``WatchStub`` directly, one gRPC
  stream per ``watch_prefix`` call, because ``aetcd.Client.watch`` yields
  single events (the per-response batch and its boundaries are lost), never
  reports a server-side cancel that is not a compaction (the iterator just
  hangs), and hangs too if the stream ends without an error.

Endpoints are tried in order on connect (a ``Status`` probe bounded by
``timeout``); the member that answered is kept until a call to it fails with
UNAVAILABLE or a deadline, then it is dropped and the next call starts with the
next endpoint. Reads (get, list_prefix, time_to_live) are retried once on
another endpoint; writes are not (a Txn whose reply was lost may have been
applied). An expired auth token is renewed (re-authenticate) and the call
retried once. Every unary call carries a ``timeout`` deadline.

Every aetcd/gRPC failure surfaces as ``StoreError`` (watch: ``WatchBroken``)
with one line naming the endpoint.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc as rpc
import grpc
import grpc.aio

from control.store import KeyValue, StoreError, WatchBroken, WatchEvent

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 2379
# etcd's rpctypes.MetadataRequireLeaderKey: the server cancels the watch stream
# when its member loses the leader (flannel's clientv3.WithRequireLeader).
_REQUIRE_LEADER = ("hasleader", "true")
_DETAIL_MAX = 300

# Everything aetcd and grpc.aio raise for a failed call.
_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    aetcd.ClientError,
    grpc.RpcError,
    grpc.aio.BaseError,
    TimeoutError,
    OSError,
)


def _channel_options(timeout: float) -> dict[str, Any]:
    return {
        # Reconnect quickly after a restart (flannel: 100 ms .. 5 s). Not
        # grpc.min_reconnect_backoff_ms: C-core also uses it as the minimum
        # *connect timeout* (default 20 s); 100 ms there fails slow handshakes.
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 5000,
        # Notice a silently dead peer under an open watch. etcd's keepalive
        # enforcement allows pings every 5 s with an active stream.
        "grpc.keepalive_time_ms": 10_000,
        "grpc.keepalive_timeout_ms": max(1000, int(timeout * 1000)),
        "grpc.http2.max_pings_without_data": 0,
        # Any unanswered ping (not only keepalive's) kills the transport; without
        # this a ping in flight when the peer froze suppresses keepalive (C-core
        # default 1 min; a test watch on a SIGSTOPped etcd still hung after 40 s).
        "grpc.http2.ping_timeout_ms": max(1000, int(timeout * 1000)),
        # Large prefix listings (Go's clientv3 uses MaxInt32 too).
        "grpc.max_receive_message_length": 2**31 - 1,
    }


@dataclass(frozen=True)
class _Endpoint:
    url: str  # as given, for messages
    target: str  # host:port for gRPC
    tls: bool


def _parse_endpoint(endpoint: str) -> _Endpoint:
    u = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"bad etcd endpoint {endpoint!r} (want http(s)://HOST:PORT)")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return _Endpoint(endpoint, f"{host}:{u.port or DEFAULT_PORT}", u.scheme == "https")


def _b(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _s(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


def _prefix_end(prefix: bytes) -> bytes:
    """The range end for ``prefix`` (clientv3.GetPrefixRangeEnd)."""
    s = bytearray(prefix)
    for i in reversed(range(len(s))):
        if s[i] < 0xFF:
            s[i] += 1
            return bytes(s[: i + 1])
    return b"\0"


class _Kind(enum.Enum):
    UNREACHABLE = "unreachable"  # UNAVAILABLE, deadline, socket: drop the member
    AUTH_EXPIRED = "auth-expired"  # re-authenticate and retry
    STALE = "stale"  # the channel was closed under us: reconnect and retry
    OTHER = "other"


def _rpc_error(e: BaseException) -> grpc.aio.AioRpcError | None:
    if isinstance(e, grpc.aio.AioRpcError):
        return e
    if isinstance(e.__cause__, grpc.aio.AioRpcError):  # aetcd wraps with `from`
        return e.__cause__
    return None


def _classify(e: BaseException) -> _Kind:
    if isinstance(e, aetcd.ConnectionFailedError | aetcd.ConnectionTimeoutError):
        return _Kind.UNREACHABLE
    if isinstance(e, TimeoutError | OSError):
        return _Kind.UNREACHABLE
    if isinstance(e, grpc.aio.UsageError):
        return _Kind.STALE
    err = _rpc_error(e)
    if err is not None:
        code = err.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return _Kind.UNREACHABLE
        if code == grpc.StatusCode.UNAUTHENTICATED and "invalid auth token" in (
            err.details() or ""
        ):
            return _Kind.AUTH_EXPIRED
    elif isinstance(e, aetcd.exceptions.UnauthenticatedError) and "invalid auth token" in str(e):
        return _Kind.AUTH_EXPIRED
    return _Kind.OTHER


_TLS_FAILURE = re.compile(r"TSI_|SSL|handshake|certificate|Unwrap failed", re.I)


def _detail(e: BaseException) -> str:
    err = _rpc_error(e)
    text = (err.details() if err is not None else None) or str(e) or type(e).__name__
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


def _locally_cancelled() -> bool:
    """A CancelledError that is not our task being cancelled: a closed channel."""
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


def _kv(kv: Any) -> KeyValue:
    return KeyValue(_s(kv.key), bytes(kv.value), kv.lease, kv.mod_revision)


def _event(ev: Any) -> WatchEvent:
    kv = ev.kv
    if ev.type == rpc.Event.DELETE:
        return WatchEvent("delete", _s(kv.key), b"", 0, kv.mod_revision)
    return WatchEvent("put", _s(kv.key), bytes(kv.value), kv.lease, kv.mod_revision)


class _Client(aetcd.Client):
    """aetcd's client with a channel we build (TLS, options) and a watch stub."""

    def __init__(
        self,
        endpoint: _Endpoint,
        index: int,
        *,
        credentials: grpc.ChannelCredentials | None,
        username: str | None,
        password: str | None,
        timeout: float,
    ) -> None:
        super().__init__(
            username=username,
            password=password,
            timeout=timeout,  # type: ignore[arg-type]  # used as a float deadline
            options=_channel_options(timeout),
        )
        self.endpoint = endpoint
        self.index = index
        self._credentials = credentials
        self.watchstub: Any = None

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = list(self._options.items())
        if self.channel is None:
            if self._credentials is not None:
                self.channel = rpc.secure_channel(
                    self.endpoint.target, self._credentials, options=options
                )
            else:
                self.channel = rpc.insecure_channel(self.endpoint.target, options=options)
        if self._username is not None:
            resp = await rpc.AuthStub(self.channel).Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password),
                timeout=self._timeout,
            )
            self.metadata = (("token", resp.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.watchstub = rpc.WatchStub(self.channel)
        self._connected.set()


class EtcdStore:
    """``LeaseStore`` on one etcd cluster (see the module docstring).

    ``cert``/``key`` (both or neither) and ``ca`` are PEM file paths; any of them,
    or an ``https://`` endpoint, selects TLS (no ``ca``: the system roots).
    ``username``/``password`` (both or neither) use etcd auth. ``timeout`` bounds
    each call and each endpoint's connect attempt, in seconds.
    """

    def __init__(
        self,
        endpoints: list[str],
        *,
        cert: str | None = None,
        key: str | None = None,
        ca: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        if (cert is None) != (key is None):
            raise ValueError("etcd client cert and key must be given together")
        if (username is None) != (password is None):
            raise ValueError("etcd username and password must be given together")
        self._endpoints = [_parse_endpoint(e) for e in endpoints]
        self._cert, self._key, self._ca = cert, key, ca
        self._username, self._password = username, password
        self._timeout = timeout
        self._client: _Client | None = None
        self._next = 0  # index of the endpoint to try first
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._watches: set[Any] = set()
        self._closed = False

    @property
    def endpoint(self) -> str | None:
        """The endpoint currently in use, if connected."""
        return self._client.endpoint.url if self._client is not None else None

    # -- connection ---------------------------------------------------------

    def _credentials(self, endpoint: _Endpoint) -> grpc.ChannelCredentials | None:
        if not (endpoint.tls or self._cert or self._ca):
            return None

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise StoreError(f"cannot read etcd TLS file {path}: {e.strerror}") from e

        return grpc.ssl_channel_credentials(
            root_certificates=read(self._ca),
            private_key=read(self._key),
            certificate_chain=read(self._cert),
        )

    async def connect(self) -> None:
        """Connect now (otherwise the first call does); ``StoreError`` if no endpoint works."""
        await self._acquire()

    async def _acquire(self) -> _Client:
        if self._closed:
            raise StoreError("etcd store is closed")
        client = self._client
        if client is not None:
            return client
        async with self._lock:
            if self._client is not None:
                return self._client
            failures: list[str] = []
            n = len(self._endpoints)
            for i in range(n):
                index = (self._next + i) % n
                endpoint = self._endpoints[index]
                credentials = self._credentials(endpoint)
                client = _Client(
                    endpoint,
                    index,
                    credentials=credentials,
                    username=self._username,
                    password=self._password,
                    timeout=self._timeout,
                )
                try:
                    await client.connect()
                    await client.maintenancestub.Status(
                        rpc.StatusRequest(), timeout=self._timeout, metadata=client.metadata
                    )
                except _CLIENT_ERRORS as e:
                    self._dispose(client)
                    detail = _detail(e)
                    if credentials is not None and "CERTIFICATE_VERIFY_FAILED" in detail:
                        what = (
                            "presented a certificate we do not trust (is its CA the one "
                            "in --etcd-cafile?)"
                        )
                    elif credentials is not None and _TLS_FAILURE.search(detail):
                        # gRPC words a refused client certificate as a dead server.
                        what = (
                            "refused the TLS handshake (is the client certificate one its "
                            "--trusted-ca-file trusts? see --etcd-certfile/--etcd-keyfile)"
                        )
                    elif _classify(e) is _Kind.UNREACHABLE:
                        what = "unreachable"
                    else:
                        what = "failed"
                    failures.append(f"etcd at {endpoint.url} {what}: {detail}")
                    continue
                except BaseException:
                    self._dispose(client)
                    raise
                self._client, self._next = client, index
                if i:
                    log.info("connected to etcd at %s", endpoint.url)
                return client
            if n == 1:
                raise StoreError(failures[0])
            raise StoreError("no etcd endpoint usable: " + "; ".join(failures))

    def _dispose(self, client: _Client, grace: float | None = None) -> None:
        """Close ``client``'s channel in the background (after ``grace`` for its calls)."""
        if client.channel is None:
            return
        channel, client.channel = client.channel, None
        client._connected.clear()
        task = asyncio.get_running_loop().create_task(channel.close(grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _drop(self, client: _Client, kind: _Kind) -> None:
        """Forget the current connection after ``kind`` of failure on ``client``."""
        if self._client is not client:
            return  # someone else already replaced it
        self._client = None
        if kind is _Kind.UNREACHABLE:
            self._next = (client.index + 1) % len(self._endpoints)
        self._dispose(client, grace=self._timeout)

    async def _call(
        self, what: str, fn: Callable[[_Client], Awaitable[T]], *, retry: bool = False
    ) -> T:
        """Run ``fn`` on a connected client; map every failure to ``StoreError``.

        Retried once on a fresh connection after an expired token or a closed
        channel, and (``retry``: reads) on the next endpoint after a lost member.
        """
        for attempt in (0, 1):
            client = await self._acquire()
            try:
                return await fn(client)
            except asyncio.CancelledError as e:
                if not _locally_cancelled():
                    raise  # our caller is being cancelled
                if self._closed:
                    raise StoreError("etcd store is closed") from e
                kind, detail, exc = _Kind.STALE, "call cancelled (channel closed)", e
            except _CLIENT_ERRORS as e:
                kind, detail, exc = _classify(e), _detail(e), e
            url = client.endpoint.url
            if kind is _Kind.OTHER:
                raise StoreError(f"etcd at {url}: {what} failed: {detail}") from exc
            self._drop(client, kind)
            again = kind in (_Kind.AUTH_EXPIRED, _Kind.STALE) or (
                retry and len(self._endpoints) > 1
            )
            if attempt == 0 and again:
                log.info("etcd at %s: %s: %s; retrying", url, what, detail)
                continue
            if kind is _Kind.UNREACHABLE:
                raise StoreError(f"etcd at {url} unreachable: {what}: {detail}") from exc
            raise StoreError(f"etcd at {url}: {what} failed: {detail}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        self._closed = True
        for call in list(self._watches):
            call.cancel()
        client, self._client = self._client, None
        if client is not None:
            self._dispose(client)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    # -- LeaseStore ---------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        r = await self._call(f"get {key}", lambda c: c.get(_b(key)), retry=True)
        return None if r is None else _kv(r)

    async def list_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        if not prefix:
            raise ValueError("empty prefix")
        r = await self._call(f"list {prefix}", lambda c: c.get_prefix(_b(prefix)), retry=True)
        return r.header.revision, [_kv(kv) for kv in r.kvs]

    async def create_with_lease(self, key: str, value: bytes, ttl_s: int) -> bool:
        k = _b(key)

        async def create(c: _Client) -> bool:
            lease = await c.lease(ttl_s)
            t = c.transactions
            ok, _ = await c.transaction(
                compare=[t.version(k) == 0],
                success=[t.put(k, value, lease=lease.id)],
                failure=[],
            )
            if not ok:
                await self._revoke_quietly(c, lease.id)
            return bool(ok)

        return await self._call(f"create {key}", create)

    async def _revoke_quietly(self, c: _Client, lease_id: int) -> None:
        try:
            await c.revoke_lease(lease_id)
        except _CLIENT_ERRORS as e:  # it has no keys and expires by itself
            log.warning("etcd: cannot revoke unused lease %x: %s", lease_id, _detail(e))

    async def put_with_lease(self, key: str, value: bytes, ttl_s: int) -> int:
        k = _b(key)

        async def put(c: _Client) -> int:
            lease = await c.lease(ttl_s)
            await c.put(k, value, lease=lease.id)
            return int(lease.id)

        return await self._call(f"put {key}", put)

    async def put(self, key: str, value: bytes) -> None:
        await self._call(f"put {key}", lambda c: c.put(_b(key), value))

    async def delete(self, key: str) -> bool:
        r = await self._call(f"delete {key}", lambda c: c.delete(_b(key)))
        return r is not None

    async def time_to_live(self, lease_id: int) -> float | None:
        if lease_id <= 0:
            return None
        r = await self._call(
            f"time-to-live {lease_id:x}",
            lambda c: c.get_lease_info(lease_id, keys=False),
            retry=True,
        )
        return None if r.TTL < 0 else float(r.TTL)

    async def watch_prefix(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[list[WatchEvent]]:
        if not prefix:
            raise ValueError("empty prefix")
        try:
            client = await self._acquire()
        except StoreError as e:
            raise WatchBroken(str(e)) from e
        url = client.endpoint.url
        p = _b(prefix)
        request = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=p, range_end=_prefix_end(p), start_revision=start_revision
            )
        )
        metadata = (*(client.metadata or ()), _REQUIRE_LEADER)
        call = None
        try:
            call = client.watchstub.Watch(metadata=metadata)
            self._watches.add(call)
            try:
                await asyncio.wait_for(call.write(request), self._timeout)
                resp = await asyncio.wait_for(call.read(), self._timeout)
            except TimeoutError:
                self._drop(client, _Kind.UNREACHABLE)
                raise WatchBroken(
                    f"etcd at {url} unreachable: watch {prefix} not created"
                    f" within {self._timeout:g}s"
                ) from None
            while True:
                if resp is grpc.aio.EOF:
                    raise WatchBroken(f"etcd at {url}: watch {prefix} stream ended")
                if resp.compact_revision:
                    raise WatchBroken(
                        f"etcd at {url}: watch {prefix} from revision {start_revision}:"
                        f" history compacted up to {resp.compact_revision}",
                        compacted=True,
                        compact_revision=resp.compact_revision,
                    )
                if resp.canceled:
                    reason = resp.cancel_reason or "no reason given"
                    raise WatchBroken(f"etcd at {url}: watch {prefix} cancelled: {reason}")
                if resp.events:
                    yield [_event(ev) for ev in resp.events]
                resp = await call.read()
        except asyncio.CancelledError as e:
            if self._closed and _locally_cancelled():
                raise WatchBroken("etcd store is closed") from e
            if _locally_cancelled():
                raise WatchBroken(f"etcd at {url}: watch {prefix} ended (channel closed)") from e
            raise
        except _CLIENT_ERRORS as e:
            kind = _classify(e)
            if kind is not _Kind.OTHER:
                self._drop(client, kind)
            what = "unreachable" if kind is _Kind.UNREACHABLE else "failed"
            raise WatchBroken(f"etcd at {url} {what}: watch {prefix}: {_detail(e)}") from e
        finally:
            if call is not None:
                self._watches.discard(call)
                call.cancel()
