"""Peer leases as a stream of Added/Removed events (flannel's ``LeaseWatcher``).

Pure: no I/O. The edge feeds it a snapshot (``reset``) and then each etcd watch
event (``apply_put`` / ``apply_delete``); it answers with the events the dataplane
must act on.

* It keeps every known peer lease, keyed by its key's subnets, because an etcd
  DELETE (lease expiry included) carries no value: the Removed event hands back
  the cached lease with its attrs, so the backend can remove the right
  neighbour/FDB entries.
* Our own subnet is filtered out of everything. It is known only once the lease
  is acquired, hence :meth:`LeaseWatcher.set_own_subnet`. Watching our own key
  (flannel exits when it is deleted) is the caller's business.
* Every renewal is a PUT, so a PUT with unchanged attrs still yields an Added
  event (flannel re-programs idempotently) but flagged ``changed=False`` so
  consumers may skip the work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Network, IPv6Network

from control.model import Lease

__all__ = ["Event", "EventKind", "LeaseWatcher"]

_Key = tuple[IPv4Network, IPv6Network | None]


class EventKind(Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class Event:
    """A peer appeared/changed (ADDED) or went away (REMOVED).

    ``changed`` is False only for an ADDED whose attrs equal what was already known
    (a renewal); REMOVED events always carry the cached lease, attrs included.
    """

    kind: EventKind
    lease: Lease
    changed: bool = True


def _key(lease: Lease) -> _Key:
    return (lease.subnet, lease.subnet_v6)


class LeaseWatcher:
    """The known peer leases, by subnet."""

    def __init__(self, own_subnet: IPv4Network | None = None) -> None:
        self._own: IPv4Network | None = own_subnet
        self._leases: dict[_Key, Lease] = {}

    # ---- own subnet ------------------------------------------------------------------

    @property
    def own_subnet(self) -> IPv4Network | None:
        return self._own

    def set_own_subnet(self, subnet: IPv4Network | None) -> list[Event]:
        """Set (or change) our own subnet. If it was known as a peer it is dropped,
        and a REMOVED event for it is returned so nothing stays programmed for it."""
        self._own = subnet
        events: list[Event] = []
        for key, lease in list(self._leases.items()):
            if self._is_own(lease.subnet):
                del self._leases[key]
                events.append(Event(EventKind.REMOVED, lease))
        return events

    def _is_own(self, subnet: IPv4Network) -> bool:
        return self._own is not None and subnet == self._own

    # ---- queries ---------------------------------------------------------------------

    def peers(self) -> list[Lease]:
        """The known peer leases, in the order they were first seen."""
        return list(self._leases.values())

    def get(self, subnet: IPv4Network, subnet_v6: IPv6Network | None = None) -> Lease | None:
        return self._leases.get((subnet, subnet_v6))

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, subnet: object) -> bool:
        return any(key[0] == subnet for key in self._leases)

    # ---- inputs ----------------------------------------------------------------------

    def reset(self, snapshot: Iterable[Lease]) -> list[Event]:
        """Replace the known set with a full listing and return the difference.

        REMOVED events (for leases gone from the listing) come first, then ADDED
        events for new leases and for known ones whose attrs changed, in listing
        order. Known leases with identical attrs yield nothing (their expiration is
        still refreshed). Removing first keeps a node that moved to a new subnet
        with the same VtepMAC from having its fresh FDB entry deleted afterwards.
        """
        fresh: dict[_Key, Lease] = {}
        for lease in snapshot:
            if self._is_own(lease.subnet):
                continue
            fresh[_key(lease)] = lease  # a duplicate key: the later entry wins

        events: list[Event] = [
            Event(EventKind.REMOVED, old) for key, old in self._leases.items() if key not in fresh
        ]
        for key, lease in fresh.items():
            old = self._leases.get(key)
            if old is None or old.attrs != lease.attrs:
                events.append(Event(EventKind.ADDED, lease))
        self._leases = fresh
        return events

    def apply_put(self, lease: Lease) -> list[Event]:
        """A PUT on a lease key: always one ADDED event (unless it is our own), with
        ``changed=False`` when the attrs are the ones already known."""
        if self._is_own(lease.subnet):
            return []
        key = _key(lease)
        old = self._leases.get(key)
        self._leases[key] = lease
        changed = old is None or old.attrs != lease.attrs
        return [Event(EventKind.ADDED, lease, changed=changed)]

    def apply_delete(
        self, subnet: IPv4Network, subnet_v6: IPv6Network | None = None
    ) -> list[Event]:
        """A DELETE (or expiry) of a lease key: a REMOVED event carrying the cached
        lease. Our own subnet, or a lease never seen, yields nothing."""
        if self._is_own(subnet):
            return []
        old = self._leases.pop((subnet, subnet_v6), None)
        if old is None:
            return []
        return [Event(EventKind.REMOVED, old)]
