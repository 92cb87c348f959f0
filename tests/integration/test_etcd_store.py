"""EtcdStore against a real etcd 3.4 on 127.0.0.1 (run on uvloop via tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from control.etcd_store import EtcdStore
from control.lab.etcd import EtcdServer, free_ports
from control.store import StoreError, WatchBroken, WatchEvent

pytestmark = pytest.mark.integration

PREFIX = "/coreos.com/network/subnets/"
KEY_A = PREFIX + "10.244.1.0-24"
KEY_B = PREFIX + "10.244.2.0-24"
LEASE_JSON = json.dumps(
    {
        "PublicIP": "192.168.1.10",
        "PublicIPv6": None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"},
    },
    separators=(",", ":"),
).encode()


@pytest.fixture
async def store(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    s = EtcdStore([etcd_server.endpoint], timeout=3.0)
    try:
        yield s
    finally:
        await s.close()


async def collect(
    watch: AsyncIterator[list[WatchEvent]], n: int, timeout: float = 10.0
) -> list[WatchEvent]:
    """The next ``n`` events (at least) from an open watch, without closing it."""
    out: list[WatchEvent] = []
    async with asyncio.timeout(timeout):
        async for batch in watch:
            out.extend(batch)
            if len(out) >= n:
                return out
    raise AssertionError("watch iterator ended without an exception")


def lease_count(server: EtcdServer) -> int:
    first = server.etcdctl("lease", "list").splitlines()[0]  # "found N leases"
    return int(first.split()[1])


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """An endpoint that accepts TCP (kernel backlog) but never speaks HTTP/2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_create_with_lease_is_cas_and_revokes_losing_lease(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    assert await store.create_with_lease(KEY_A, LEASE_JSON, 600) is True
    assert lease_count(etcd_server) == 1
    assert await store.create_with_lease(KEY_A, b"other", 600) is False
    assert lease_count(etcd_server) == 1  # the losing attempt's lease was revoked
    kv = await store.get(KEY_A)
    assert kv is not None and kv.value == LEASE_JSON and kv.lease_id != 0
    # a reservation (no lease) blocks creation too
    await store.put(KEY_B, b"reserved")
    assert await store.create_with_lease(KEY_B, b"mine", 600) is False
    assert lease_count(etcd_server) == 1


async def test_put_with_lease_attaches_new_lease(store: EtcdStore) -> None:
    lease1 = await store.put_with_lease(KEY_A, LEASE_JSON, 120)
    kv = await store.get(KEY_A)
    assert kv is not None and kv.lease_id == lease1
    ttl = await store.time_to_live(lease1)
    assert ttl is not None and 100 <= ttl <= 120
    # renew as flannel does: a new lease, the old one is left to expire
    lease2 = await store.put_with_lease(KEY_A, LEASE_JSON, 120)
    assert lease2 != lease1
    kv = await store.get(KEY_A)
    assert kv is not None and kv.lease_id == lease2
    assert await store.time_to_live(lease1) is not None


async def test_time_to_live_none_for_reservation_and_unknown_lease(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    await store.put(KEY_A, LEASE_JSON)
    etcd_server.etcdctl("put", KEY_B, LEASE_JSON.decode())
    for key in (KEY_A, KEY_B):
        kv = await store.get(key)
        assert kv is not None and kv.lease_id == 0
        assert await store.time_to_live(kv.lease_id) is None
    assert await store.time_to_live(0x7E57) is None  # never granted: etcd says TTL -1
    assert await store.get(PREFIX + "10.244.9.0-24") is None
    assert await store.delete(KEY_A) is True
    assert await store.delete(KEY_A) is False


async def test_list_then_watch_sees_exactly_later_events(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    await store.put(KEY_A, b"before")
    rev, kvs = await store.list_prefix(PREFIX)
    assert [(kv.key, kv.value) for kv in kvs] == [(KEY_A, b"before")]
    assert rev >= kvs[0].mod_revision
    # written after the list but before the watch starts: must still be seen
    lease_b = await store.put_with_lease(KEY_B, LEASE_JSON, 600)
    watch = store.watch_prefix(PREFIX, rev + 1)
    try:
        first = await collect(watch, 1)
        await store.put("/coreos.com/network/config", b"{}")  # outside the prefix
        await store.delete(KEY_A)
        await store.put(KEY_A, b"after")
        events = first + await collect(watch, 2)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    assert [(e.kind, e.key, e.value) for e in events] == [
        ("put", KEY_B, LEASE_JSON),
        ("delete", KEY_A, b""),
        ("put", KEY_A, b"after"),
    ]
    assert events[0].lease_id == lease_b and events[2].lease_id == 0
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and revisions[0] == rev + 1


async def test_lease_expiry_is_a_delete_event(store: EtcdStore) -> None:
    rev, _ = await store.list_prefix(PREFIX)
    lease = await store.put_with_lease(KEY_A, LEASE_JSON, 2)
    watch = store.watch_prefix(PREFIX, rev + 1)
    try:
        events = await collect(watch, 2, timeout=20.0)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    assert [(e.kind, e.key) for e in events] == [("put", KEY_A), ("delete", KEY_A)]
    assert await store.get(KEY_A) is None
    assert await store.time_to_live(lease) is None


async def test_compaction_breaks_watch_with_compacted(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    rev0, _ = await store.list_prefix(PREFIX)
    for i in range(5):
        await store.put(KEY_A, b"v%d" % i)
    rev, _ = await store.list_prefix(PREFIX)
    etcd_server.etcdctl("compact", str(rev))
    with pytest.raises(WatchBroken) as info:
        await collect(store.watch_prefix(PREFIX, rev0 + 1), 1)
    assert info.value.compacted is True
    assert info.value.compact_revision == rev
    # the resync path: re-list, watch from the new revision
    rev2, kvs = await store.list_prefix(PREFIX)
    assert [kv.value for kv in kvs] == [b"v4"]
    watch = store.watch_prefix(PREFIX, rev2 + 1)
    try:
        await store.put(KEY_B, b"new")
        events = await collect(watch, 1)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    assert [(e.kind, e.key) for e in events] == [("put", KEY_B)]


async def test_server_loss_breaks_watch_and_restart_recovers(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    await store.put(KEY_A, b"kept")
    rev, _ = await store.list_prefix(PREFIX)
    watch = store.watch_prefix(PREFIX, rev + 1)
    try:
        await store.put(KEY_B, b"1")
        assert len(await collect(watch, 1)) == 1
        etcd_server.kill()
        with pytest.raises(WatchBroken) as info:
            await collect(watch, 1)
        assert info.value.compacted is False
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="unreachable"):
        await store.put(KEY_B, b"while down")
    assert time.monotonic() - t0 < 5.0
    etcd_server.restart()
    await store.put(KEY_B, b"2")
    kv = await store.get(KEY_A)
    assert kv is not None and kv.value == b"kept"
    kv = await store.get(KEY_B)
    assert kv is not None and kv.value == b"2"


async def test_hung_server_breaks_watch(etcd_server: EtcdServer) -> None:
    """A member that stops answering (SIGSTOP: TCP still up) must not hang the watch."""
    s = EtcdStore([etcd_server.endpoint], timeout=2.0)
    try:
        rev, _ = await s.list_prefix(PREFIX)
        watch = s.watch_prefix(PREFIX, rev + 1)
        try:
            await s.put(KEY_A, b"1")
            assert len(await collect(watch, 1)) == 1
            etcd_server.pause()
            try:
                with pytest.raises(WatchBroken, match="unreachable"):
                    await collect(watch, 1, timeout=30.0)  # keepalive 10 s + ping timeout
                with pytest.raises(StoreError, match="unreachable"):
                    await s.get(KEY_A)
            finally:
                etcd_server.resume()
        finally:
            await watch.aclose()  # type: ignore[attr-defined]
        kv = await s.get(KEY_A)
        assert kv is not None and kv.value == b"1"
    finally:
        await s.close()


async def test_unreachable_endpoint_fails_fast_with_clear_error() -> None:
    (port,) = free_ports("127.0.0.1", 1)  # nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    s = EtcdStore([endpoint], timeout=2.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError) as info:
            await s.get(KEY_A)
        assert time.monotonic() - t0 < 2.5
        message = str(info.value)
        assert f"etcd at {endpoint} unreachable" in message and "\n" not in message
        with pytest.raises(WatchBroken):
            await collect(s.watch_prefix(PREFIX, 1), 1)
    finally:
        await s.close()


async def test_silent_endpoint_fails_within_timeout() -> None:
    with silent_listener() as endpoint:
        s = EtcdStore([endpoint], timeout=1.0)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="unreachable"):
                await s.put(KEY_A, b"x")
            assert time.monotonic() - t0 < 3.0
        finally:
            await s.close()


async def test_first_endpoint_dead_second_works(etcd_server: EtcdServer) -> None:
    (port,) = free_ports("127.0.0.1", 1)
    s = EtcdStore([f"http://127.0.0.1:{port}", etcd_server.endpoint], timeout=2.0)
    try:
        await s.put(KEY_A, b"x")
        assert s.endpoint == etcd_server.endpoint
        kv = await s.get(KEY_A)
        assert kv is not None and kv.value == b"x"
        rev, _ = await s.list_prefix(PREFIX)
        watch = s.watch_prefix(PREFIX, rev + 1)
        try:
            await s.delete(KEY_A)
            assert [e.kind for e in await collect(watch, 1)] == ["delete"]
        finally:
            await watch.aclose()  # type: ignore[attr-defined]
    finally:
        await s.close()


async def test_member_loss_moves_to_next_endpoint(etcd_server: EtcdServer) -> None:
    """Two independent single-member servers stand in for two members: after the
    current one dies a read is retried on the next, a write fails once, then works."""
    with EtcdServer(name="second") as second:
        second.etcdctl("put", KEY_A, "from-second")
        s = EtcdStore([etcd_server.endpoint, second.endpoint], timeout=2.0)
        try:
            await s.put(KEY_A, b"from-first")
            assert s.endpoint == etcd_server.endpoint
            etcd_server.kill()
            kv = await s.get(KEY_A)  # retried on the next endpoint
            assert kv is not None and kv.value == b"from-second"
            assert s.endpoint == second.endpoint
            second.kill()
            with pytest.raises(StoreError, match="unreachable"):
                await s.put(KEY_B, b"x")  # writes are not retried
            etcd_server.restart()
            await s.put(KEY_B, b"x")  # next call starts with the next endpoint
            assert s.endpoint == etcd_server.endpoint
        finally:
            await s.close()


async def test_values_from_etcdctl_are_byte_exact(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    values = {
        KEY_A: LEASE_JSON.decode(),
        KEY_B: '{"PublicIP":"10.0.0.2", "note":"ünïcödé ✓"}  ',
    }
    rev, _ = await store.list_prefix(PREFIX)
    for key, text in values.items():
        etcd_server.etcdctl("put", key, text)
    _, kvs = await store.list_prefix(PREFIX)
    assert {kv.key: kv.value for kv in kvs} == {k: v.encode() for k, v in values.items()}
    watch = store.watch_prefix(PREFIX, rev + 1)
    try:
        events = await collect(watch, 2)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    assert [(e.key, e.value) for e in events] == [(k, v.encode()) for k, v in values.items()]
    # and the other way round
    raw = '{"VtepMAC":"02:00:00:00:00:01"}\t\u00e9'
    await store.put(KEY_A, raw.encode())
    assert etcd_server.etcdctl("get", KEY_A, "--print-value-only") == raw + "\n"


async def test_close_ends_open_watch(store: EtcdStore) -> None:
    rev, _ = await store.list_prefix(PREFIX)
    watch = store.watch_prefix(PREFIX, rev + 1)
    await store.put(KEY_B, b"ping")
    assert len(await collect(watch, 1)) == 1  # the watch is established
    task = asyncio.create_task(collect(watch, 1))
    await asyncio.sleep(0.2)
    await store.close()
    with pytest.raises(WatchBroken, match="closed"):
        await task
    with pytest.raises(StoreError, match="closed"):
        await store.get(KEY_A)


def make_test_pki(d: Path) -> None:
    """ca.crt, and server/client key+cert for 127.0.0.1, signed by it (openssl CLI)."""

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt",
        "-days", "2", "-subj", "/CN=weft-test-ca")  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr",
            "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.crt",
            "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-out", f"{d}/{name}.crt",
            "-days", "2", "-extfile", f"{d}/ext.cnf")  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed for test certs")
async def test_tls_with_client_certificate(tmp_path: Path) -> None:
    make_test_pki(tmp_path)
    d = tmp_path
    server = EtcdServer(
        extra_args=[f"--cert-file={d}/server.crt", f"--key-file={d}/server.key",
                    f"--trusted-ca-file={d}/ca.crt", "--client-cert-auth"],
        client_scheme="https",
        etcdctl_args=[f"--cacert={d}/ca.crt", f"--cert={d}/client.crt",
                      f"--key={d}/client.key"],
    )  # fmt: skip
    with server:
        assert server.endpoint.startswith("https://127.0.0.1:")
        s = EtcdStore(
            [server.endpoint], cert=f"{d}/client.crt", key=f"{d}/client.key", ca=f"{d}/ca.crt"
        )
        try:
            await s.put(KEY_A, LEASE_JSON)
            rev, kvs = await s.list_prefix(PREFIX)
            assert [kv.value for kv in kvs] == [LEASE_JSON]
            watch = s.watch_prefix(PREFIX, rev + 1)
            try:
                await s.delete(KEY_A)
                assert [e.kind for e in await collect(watch, 1)] == ["delete"]
            finally:
                await watch.aclose()  # type: ignore[attr-defined]
        finally:
            await s.close()
        no_cert = EtcdStore([server.endpoint], ca=f"{d}/ca.crt", timeout=2.0)
        try:
            # gRPC reports the refusal as a dead server; the store says what it is.
            with pytest.raises(StoreError, match="refused the TLS handshake"):
                await no_cert.get(KEY_A)
        finally:
            await no_cert.close()


async def test_auth_and_expired_token_renewal(caplog: pytest.LogCaptureFixture) -> None:
    with EtcdServer(extra_args=["--auth-token=simple", "--auth-token-ttl=1"]) as server:
        server.etcdctl("user", "add", "root:secret")
        server.etcdctl("auth", "enable")
        s = EtcdStore([server.endpoint], username="root", password="secret")
        try:
            await s.put(KEY_A, b"x")
            await asyncio.sleep(3)  # the simple token expires; the store re-authenticates
            with caplog.at_level(logging.INFO, logger="control.etcd_store"):
                kv = await s.get(KEY_A)
            assert kv is not None and kv.value == b"x"
            assert "invalid auth token; retrying" in caplog.text
        finally:
            await s.close()
        for creds in ({"username": "root", "password": "wrong"}, {}):
            bad = EtcdStore([server.endpoint], timeout=2.0, **creds)  # type: ignore[arg-type]
            try:
                with pytest.raises(StoreError):
                    await bad.get(KEY_A)
            finally:
                await bad.close()
