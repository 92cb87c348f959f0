"""The registry interface the control loop talks to: keys, bytes, leases, a watch.

Independent of etcd (``control/etcd_store.py`` implements it with aetcd; a
Kubernetes source could come later). Bytes-level on purpose: parsing lease
keys and JSON values belongs to ``control/model.py``.

Semantics follow flannel's v3 registry (pkg/subnet/etcd/registry.go):

- ``create_with_lease``: grant a lease, then ``Txn(If version(key)==0 Then
  Put(key, value, lease))``; a lost race revokes the fresh lease and returns
  False.
- ``put_with_lease`` (renew / reuse): a plain Put with a *new* lease; the old
  lease is not revoked, it expires with no keys.
- ``put`` without a lease: the network config and reservations.
- ``watch_prefix(prefix, R + 1)`` after ``list_prefix`` returned revision R sees
  exactly the later changes; lease expiry shows up as a delete. A watch never
  resumes by itself: when it ends it raises ``WatchBroken`` and the caller
  re-lists (``compacted`` tells whether history was lost) and watches again.

Every failure of the backing store surfaces as ``StoreError`` with a one-line
message; nothing of the client library leaks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol


class StoreError(Exception):
    """The store failed; one line, e.g. ``etcd at http://127.0.0.1:2379 unreachable: …``."""


class WatchBroken(StoreError):
    """A watch ended: the connection was lost, the server cancelled it, or its
    start revision was compacted (``compacted`` True, ``compact_revision`` the
    oldest revision still available). The caller re-lists and watches again."""

    def __init__(self, message: str, *, compacted: bool = False, compact_revision: int = 0):
        super().__init__(message)
        self.compacted = compacted
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    lease_id: int  # 0: no lease (a reservation, or the config)
    mod_revision: int


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes  # empty for a delete
    lease_id: int  # 0 for a delete
    revision: int  # the revision of this change (resume from the last one + 1)


class LeaseStore(Protocol):
    async def get(self, key: str) -> KeyValue | None:
        """The key, or None if absent."""
        ...

    async def list_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """(header revision, all keys under ``prefix`` in key order), one consistent read."""
        ...

    async def create_with_lease(self, key: str, value: bytes, ttl_s: int) -> bool:
        """Create ``key`` with a new lease of ``ttl_s`` if it does not exist (CAS).

        False if it exists (the fresh lease is revoked)."""
        ...

    async def put_with_lease(self, key: str, value: bytes, ttl_s: int) -> int:
        """Put ``key`` with a new lease of ``ttl_s``; return the lease id."""
        ...

    async def put(self, key: str, value: bytes) -> None:
        """Put ``key`` with no lease."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        ...

    async def time_to_live(self, lease_id: int) -> float | None:
        """Remaining seconds of the lease; None for no lease (0) or an expired one."""
        ...

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Changes under ``prefix`` from ``start_revision`` (inclusive), one list per
        server response, in revision order. Raises ``WatchBroken`` when it ends."""
        ...

    async def close(self) -> None:
        """Release connections; open watches end."""
        ...
