"""Network-namespace plumbing for the lab: naming, ``ip netns`` wrappers,
entering a namespace in-process, killing the lab's own processes.

Everything here shells out to ``ip`` (iproute2) on purpose: the lab is the
reference the weft dataplane is tested against, so it must not depend on
weft's own netlink code.

Entering a namespace from Python (``in_netns``)
-----------------------------------------------
``setns(2)`` with ``CLONE_NEWNET`` moves only the *calling thread*.  While
inside ``with in_netns("wl1a2b-n1"):`` the thread's new sockets, TUN/TAP
devices, netlink sockets (pyroute2 ``IPRoute()``), ``/proc/sys/net`` writes and
any child process it forks (``subprocess``) belong to that namespace; fds
opened inside keep their namespace after the block exits.  Threads started
inside inherit the namespace; threads that already existed (an executor pool)
do not.  ``/sys/class/net`` does *not* follow (sysfs is tied to the mount).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

NETNS_RUN_DIR = Path("/run/netns")
STATE_DIR = Path("/run/weft-lab")
CLONE_NEWNET = 0x40000000
TAG_PREFIX = "wl"


class LabError(RuntimeError):
    """A lab command failed; the message is one line: the command and its stderr."""


# -- commands ---------------------------------------------------------------


def sh(
    *argv: str, check: bool = True, timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell), capture text output; ``LabError`` on failure if ``check``."""
    try:
        cp = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    except FileNotFoundError as e:
        raise LabError(f"command not found: {argv[0]}") from e
    if check and cp.returncode != 0:
        err = (cp.stderr or cp.stdout).strip().replace("\n", " | ")
        raise LabError(f"{' '.join(argv)} -> rc {cp.returncode}: {err}")
    return cp


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside namespace ``ns`` (``None``: as is)."""
    if ns is None:
        return list(argv)
    return ["ip", "netns", "exec", ns, *argv]


# -- namespaces -------------------------------------------------------------


def new_tag(prefix: str = TAG_PREFIX) -> str:
    """A tag like ``wl3f9a`` that no namespace or lab state currently uses."""
    existing = list_netns()
    for _ in range(1000):
        tag = f"{prefix}{secrets.token_hex(2)}"
        if (
            not any(n == tag or n.startswith(tag + "-") for n in existing)
            and not (STATE_DIR / f"{tag}.json").exists()
        ):
            return tag
    raise LabError("could not find a free lab tag")


def list_netns() -> list[str]:
    """Names of the named network namespaces (``/run/netns``)."""
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def netns_add(name: str) -> None:
    if len(name) > 64 or "/" in name:
        raise LabError(f"bad namespace name {name!r}")
    sh("ip", "netns", "add", name)


def netns_delete(name: str) -> None:
    """Delete a named namespace; a missing one is not an error."""
    if not netns_exists(name):
        return
    cp = sh("ip", "netns", "delete", name, check=False)
    if cp.returncode != 0 and netns_exists(name):
        raise LabError(f"ip netns delete {name}: {cp.stderr.strip()}")


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(NETNS_RUN_DIR / name).st_ino
    except OSError:
        return None


def pid_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


# -- entering a namespace in-process -------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ns_path(ns: str) -> str:
    return ns if "/" in ns else str(NETNS_RUN_DIR / ns)


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the body with the *calling thread* in network namespace ``ns``.

    ``ns`` is a name under /run/netns or a path such as ``/proc/<pid>/ns/net``.
    A missing namespace raises ``LabError`` (nothing is created).  The thread
    always returns to its previous namespace, also when the body raises.
    """
    path = _ns_path(ns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise LabError(f"no network namespace {ns!r}") from e
    try:
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(saved)
        finally:
            os.close(saved)
    finally:
        os.close(target)


# -- processes ----------------------------------------------------------------


def _stat(pid: int) -> tuple[bytes, int, int, int] | None:
    """(state, pgrp, session, starttime) from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[3]), int(fields[19])


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in (b"Z", b"X")


def pid_starttime(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[3]


def _members(pgid: int, *, session: bool = False) -> list[int]:
    """Live processes whose process group (or session) id is ``pgid``."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st and st[0] not in (b"Z", b"X") and st[2 if session else 1] == pgid:
            out.append(int(entry.name))
    return out


def _exited_unreaped(pid: int) -> bool:
    """Our child ``pid`` has exited; it is left a zombie, so its id stays ours."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def stop_process(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Stop a process this code started with ``start_new_session=True`` and
    whatever it left in its process group: SIGTERM to the group, up to
    ``grace_s`` for all of it to exit, SIGKILL to the rest, reap.  Never raises.

    The group is signalled by id only while the leader is an unreaped child
    (zombie at worst), so the id cannot have been recycled."""
    pid = proc.pid
    try:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if _exited_unreaped(pid) and not [m for m in _members(pid) if m != pid]:
                    break
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        else:
            # leader already reaped: kill stragglers of its group unless the id
            # now belongs to a new group leader (then it is not ours any more)
            members = _members(pid)
            if pid not in members:
                for m in members:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(m, signal.SIGKILL)
    except Exception:  # teardown must not raise
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


def kill_session_if_in(sid: int, inodes: set[int], grace_s: float = 2.0) -> None:
    """Kill the leftovers of a crashed run's spawned process ``sid`` (session
    leader, and anything else in that session) — only processes that sit in
    one of the run's namespaces ``inodes``, so a recycled id is never touched."""

    def ours() -> list[int]:
        pids = set(_members(sid, session=True))
        if pid_alive(sid):
            pids.add(sid)
        return [p for p in pids if pid_netns_inode(p) in inodes]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and ours():
            time.sleep(0.05)


# -- run state (for cleaning up after crashed runs) --------------------------------


class RunState:
    """``/run/weft-lab/<tag>.json``: the owner process and what it created, so
    ``cleanup_stale`` can tell a crashed run's leftovers from a live run's."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.path = STATE_DIR / f"{tag}.json"
        self.data: dict = {
            "owner_pid": os.getpid(),
            "owner_start": pid_starttime(os.getpid()),
            "netns": [],
            "pids": [],
        }

    def save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)

    def add(self, kind: str, value: object) -> None:
        self.data[kind].append(value)
        self.save()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @staticmethod
    def load(tag: str) -> dict | None:
        try:
            return json.loads((STATE_DIR / f"{tag}.json").read_text())
        except (OSError, ValueError):
            return None


def owner_alive(state: dict | None) -> bool:
    if not state:
        return False
    pid = state.get("owner_pid")
    return (
        isinstance(pid, int) and pid_alive(pid) and pid_starttime(pid) == state.get("owner_start")
    )


def tag_of(nsname: str) -> str:
    return nsname.split("-", 1)[0]


def cleanup_stale(tag_prefix: str = TAG_PREFIX) -> list[str]:
    """Remove leftovers of crashed lab runs whose tag starts with ``tag_prefix``.

    A run is stale when its state file is missing or names an owner process
    that no longer exists.  Live runs (other test sessions) are left alone.
    Processes recorded by the stale run are killed only if they still sit in
    one of its namespaces.  Returns the namespaces removed.
    """
    removed: list[str] = []
    by_tag: dict[str, list[str]] = {}
    for name in list_netns():
        if name.startswith(tag_prefix) and "-" in name:
            by_tag.setdefault(tag_of(name), []).append(name)
    tags = set(by_tag)
    if STATE_DIR.is_dir():
        tags |= {p.stem for p in STATE_DIR.glob(f"{tag_prefix}*.json")}
    for tag in sorted(tags):
        state = RunState.load(tag)
        if owner_alive(state):
            continue
        names = by_tag.get(tag, [])
        inodes = {i for i in (netns_inode(n) for n in names) if i is not None}
        for pid in (state or {}).get("pids", []):
            if isinstance(pid, int) and inodes:
                kill_session_if_in(pid, inodes)
        for name in reversed(names):
            with contextlib.suppress(LabError):
                netns_delete(name)
                removed.append(name)
        with contextlib.suppress(FileNotFoundError):
            (STATE_DIR / f"{tag}.json").unlink()
    return removed


__all__ = [
    "CLONE_NEWNET",
    "NETNS_RUN_DIR",
    "STATE_DIR",
    "TAG_PREFIX",
    "LabError",
    "RunState",
    "cleanup_stale",
    "in_netns",
    "list_netns",
    "netns_add",
    "netns_delete",
    "netns_exists",
    "netns_inode",
    "new_tag",
    "ns_argv",
    "pid_alive",
    "sh",
    "stop_process",
]
