"""A single-member etcd server for tests and the lab, run from Debian's binary.

``EtcdServer`` starts ``/usr/bin/etcd`` with a fresh temp data dir, client and
peer URLs on free ports of ``host`` (127.0.0.1 by default; never a wildcard
address) and optionally inside a network namespace (``ip netns exec NS etcd
…``; ``ip`` execs etcd, so the PID we hold is etcd's own). etcd logs to
``<tmpdir>/etcd.log``; a start that fails raises ``EtcdServerError`` with the
tail of that log.

Readiness: outside a namespace, ``GET /health`` over HTTP until
``"health":"true"``; inside one (the host cannot reach its addresses) or with
a non-http client scheme, ``etcdctl endpoint health`` run in the namespace.

``stop()`` keeps the data dir so ``restart()`` brings the same member back on
the same URLs (for fault tests); ``close()`` (and the context manager) stops
and removes the temp dir.

``etcdctl(endpoint, *args)`` runs ``etcdctl --endpoints=… ARGS`` with
``ETCDCTL_API=3`` and returns its stdout.

``start_etcd_cluster(members)`` runs a multi-member cluster, one member per
``(host, netns)``: every member is launched before any is waited for (a member
is healthy only once a quorum has formed). Members in namespaces of their own
use the standard ports 2379/2380.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

ETCD_BIN = "/usr/bin/etcd"
ETCDCTL_BIN = "/usr/bin/etcdctl"
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
BIND_RETRIES = 5
_BIND_CLASH = "address already in use"
_ERROR_LINE = re.compile(r'"level":"(error|fatal|panic)"|^flag provided|^Error|^error', re.I)
# /health goes straight to 127.0.0.1 even when http_proxy is set in the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EtcdServerError(RuntimeError):
    """etcd could not be started, or etcdctl failed; the message says why."""


def _ns_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    return list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]


def _url_host(host: str) -> str:
    return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host


def _check_host(host: str) -> None:
    addr = ipaddress.ip_address(host)  # ValueError for names: we want literal addresses
    if addr.is_unspecified:
        raise ValueError(f"refusing to listen on the wildcard address {host}")


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports that were free on ``host`` a moment ago (bind to port 0).

    Inherently racy; ``EtcdServer`` retries with new ports when etcd reports a clash.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def etcdctl(
    endpoint: str,
    *args: str,
    netns: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 15.0,
) -> str:
    """Run ``etcdctl --endpoints=ENDPOINT [EXTRA] ARGS`` (API v3); return stdout.

    ``extra_args`` go before ``args`` (TLS flags, ``--user``, timeouts). Raises
    ``EtcdServerError`` with etcdctl's stderr on a non-zero exit or a timeout.
    """
    argv = _ns_argv(netns, [ETCDCTL_BIN, f"--endpoints={endpoint}", *extra_args, *args])
    env = {**os.environ, "ETCDCTL_API": "3"}
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise EtcdServerError(f"etcdctl {' '.join(args)} timed out after {timeout}s") from e
    if cp.returncode != 0:
        err = (cp.stderr or cp.stdout).strip().replace("\n", " | ")
        raise EtcdServerError(f"etcdctl {' '.join(args)} -> rc {cp.returncode}: {err}")
    return cp.stdout


class EtcdServer:
    """One etcd member on ``host`` (see the module docstring).

    ``extra_args`` are appended to etcd's command line (TLS, auth, compaction…).
    ``client_scheme`` is the scheme of the client URL ("https" once TLS flags are
    given); ``etcdctl_args`` are passed to every etcdctl call this object makes
    (readiness with TLS needs ``--cacert`` etc.).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        netns: str | None = None,
        name: str = "weft",
        extra_args: Sequence[str] = (),
        client_scheme: str = "http",
        etcdctl_args: Sequence[str] = (),
        ready_timeout: float = READY_TIMEOUT_S,
        binary: str = ETCD_BIN,
        client_port: int = 0,
        peer_port: int = 0,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
    ) -> None:
        """``client_port``/``peer_port`` fix the ports (0: pick free ones);
        ``initial_cluster`` (``name=peerURL,…``) and ``cluster_token`` make this
        member one of a multi-member cluster (see ``start_etcd_cluster``)."""
        _check_host(host)
        self.host = host
        self.netns = netns
        self.name = name
        self.extra_args = list(extra_args)
        self.client_scheme = client_scheme
        self.etcdctl_args = list(etcdctl_args)
        self.ready_timeout = ready_timeout
        self.binary = binary
        self.tmpdir: Path | None = None
        self.client_port = client_port
        self.peer_port = peer_port
        self._fixed_ports = bool(client_port and peer_port)
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token or f"weft-{secrets.token_hex(4)}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: int | None = None

    # -- properties ---------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The client URL, e.g. ``http://127.0.0.1:40123``."""
        if not self.client_port:
            raise EtcdServerError("etcd server has not been started")
        return f"{self.client_scheme}://{_url_host(self.host)}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        return self._tmp() / "data"

    @property
    def log_path(self) -> Path:
        return self._tmp() / "etcd.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------

    def start(self, *, wait: bool = True) -> EtcdServer:
        """Start a new member on fresh ports; retry with other ports on a bind clash.

        ``wait=False`` returns once the process runs (call ``wait_ready`` later):
        the members of a new multi-member cluster must all be up before any of
        them is healthy."""
        if self._proc is not None:
            raise EtcdServerError("etcd server already started")
        if self.tmpdir is None:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="weft-etcd-"))
        try:
            for attempt in range(BIND_RETRIES):
                self._pick_ports()
                try:
                    self._launch(wait=wait)
                    return self
                except EtcdServerError as e:
                    if (
                        _BIND_CLASH not in str(e)
                        or attempt == BIND_RETRIES - 1
                        or self._fixed_ports
                    ):
                        raise
                    shutil.rmtree(self.data_dir, ignore_errors=True)
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self.close()
            raise

    def restart(self) -> None:
        """Stop (if running) and start again on the same data dir and URLs."""
        self.stop()
        if self.tmpdir is None or not self.client_port:
            raise EtcdServerError("restart() needs a server that was started before")
        self._launch()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; wait for the process. Keeps the data."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGCONT)  # in case it was paused
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self._proc = None
        self._close_log()

    def kill(self) -> None:
        """SIGKILL (a crash, for fault tests) and wait. Keeps the data."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self._proc = None
        self._close_log()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung member)."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop and remove the temp dir (data and log)."""
        self.stop()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> EtcdServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------

    def etcdctl(self, *args: str, timeout: float = 15.0) -> str:
        """``etcdctl`` against this server (in its namespace, with ``etcdctl_args``)."""
        return etcdctl(
            self.endpoint, *args, netns=self.netns, extra_args=self.etcdctl_args, timeout=timeout
        )

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of etcd's log, preceded by its first few error lines
        (etcd often logs the cause early and then a page of shutdown or usage text)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, EtcdServerError):
            return "(no log)"
        all_lines = text.splitlines()
        tail = all_lines[-lines:]
        errors = [ln for ln in all_lines[:-lines] if _ERROR_LINE.search(ln)][:3]
        if errors:
            return "\n".join([*errors, "...", *tail])
        return "\n".join(tail)

    def _tmp(self) -> Path:
        if self.tmpdir is None:
            raise EtcdServerError("etcd server has no temp dir (not started or closed)")
        return self.tmpdir

    def _pick_ports(self) -> None:
        if self._fixed_ports:
            return
        if self.netns is None:
            self.client_port, self.peer_port = free_ports(self.host, 2)
        else:
            # The host's view says nothing about the namespace; pick at random and
            # rely on the bind-clash retry.
            self.client_port, self.peer_port = random.sample(range(20000, 32000), 2)

    def _argv(self) -> list[str]:
        client = self.endpoint
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--logger=zap",
            "--log-outputs=stderr",
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            *self.extra_args,
        ]  # fmt: skip

    def _launch(self, *, wait: bool = True) -> None:
        self._close_log()
        self._log_file = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._log_file, f"--- weft: starting etcd at {time.time():.3f}\n".encode())
        try:
            self._proc = subprocess.Popen(
                _ns_argv(self.netns, self._argv()),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=self._log_file,
                start_new_session=True,
            )
        except OSError as e:
            self._close_log()
            raise EtcdServerError(f"cannot run {self.binary}: {e}") from e
        if not wait:
            return
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def wait_ready(self) -> None:
        """Wait until the member is healthy (after ``start(wait=False)``); on a
        timeout or an early exit, kill it and raise ``EtcdServerError``."""
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise EtcdServerError(
                    f"etcd exited with rc {rc} during startup; log tail:\n{self.log_tail()}"
                )
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise EtcdServerError(
                    f"etcd at {self.endpoint} not ready after {self.ready_timeout}s;"
                    f" log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _healthy(self) -> bool:
        if self.netns is None and self.client_scheme == "http":
            try:
                with _NO_PROXY.open(f"{self.endpoint}/health", timeout=1.0) as resp:
                    body = resp.read()
            except (OSError, urllib.error.URLError):
                return False
            return b'"health":"true"' in body
        try:
            self.etcdctl("--dial-timeout=1s", "--command-timeout=2s", "endpoint", "health",
                         timeout=5.0)  # fmt: skip
        except EtcdServerError:
            return False
        return True

    def _close_log(self) -> None:
        if self._log_file is not None:
            os.close(self._log_file)
            self._log_file = None


CLUSTER_CLIENT_PORT = 2379
CLUSTER_PEER_PORT = 2380


def start_etcd_cluster(
    members: Sequence[tuple[str, str | None]],
    *,
    tmpdirs: Sequence[Path] | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = READY_TIMEOUT_S,
) -> list[EtcdServer]:
    """A new etcd cluster of ``len(members)`` members, member ``i`` named ``m<i+1>``
    listening on ``members[i] = (host, netns)``; returns them all healthy.

    Members that share a namespace (or none) get free ports; a member alone in
    its namespace uses 2379/2380. ``tmpdirs`` (one per member) keep data and
    logs where the caller wants them. On any failure every member is closed.
    """
    if not members:
        raise ValueError("an etcd cluster needs at least one member")
    namespaces = [ns for _, ns in members]
    servers: list[EtcdServer] = []
    for i, (host, ns) in enumerate(members):
        alone = ns is not None and namespaces.count(ns) == 1
        if alone:
            client_port, peer_port = CLUSTER_CLIENT_PORT, CLUSTER_PEER_PORT
        elif ns is None:
            client_port, peer_port = free_ports(host, 2)
        else:
            client_port, peer_port = random.sample(range(20000, 32000), 2)
        servers.append(
            EtcdServer(
                host,
                netns=ns,
                name=f"m{i + 1}",
                extra_args=extra_args,
                ready_timeout=ready_timeout,
                client_port=client_port,
                peer_port=peer_port,
            )
        )
    initial = ",".join(f"{s.name}={s.peer_url}" for s in servers)
    token = f"weft-{secrets.token_hex(4)}"
    try:
        for i, server in enumerate(servers):
            server.initial_cluster = initial
            server.cluster_token = token
            if tmpdirs is not None:
                tmpdirs[i].mkdir(parents=True, exist_ok=True)
                server.tmpdir = tmpdirs[i]
            server.start(wait=False)
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            with contextlib.suppress(Exception):
                server.close()
        raise
    return servers
