"""control/watcher.py: snapshot diff, PUT/DELETE events, the attrs cache."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network

from control.model import Lease, LeaseAttrs, vxlan_backend_data
from control.watcher import Event, EventKind, LeaseWatcher

OWN = IPv4Network("10.244.1.0/24")


def lease(
    subnet: str, ip: str = "192.168.1.2", mac: str = "020000000002", exp: float = 100.0
) -> Lease:
    attrs = LeaseAttrs(
        IPv4Address(ip),
        backend_type="vxlan",
        backend_data=vxlan_backend_data(1, bytes.fromhex(mac)),
    )
    return Lease(IPv4Network(subnet), None, attrs, expiration=exp, etcd_lease_id=5)


def kinds(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.kind.value, str(e.lease.subnet)) for e in events]


def test_reset_from_empty_adds_all_but_own() -> None:
    w = LeaseWatcher(OWN)
    events = w.reset([lease("10.244.1.0/24"), lease("10.244.2.0/24"), lease("10.244.3.0/24")])
    assert kinds(events) == [("added", "10.244.2.0/24"), ("added", "10.244.3.0/24")]
    assert all(e.changed for e in events)
    assert [x.subnet for x in w.peers()] == [
        IPv4Network("10.244.2.0/24"),
        IPv4Network("10.244.3.0/24"),
    ]
    assert len(w) == 2
    assert IPv4Network("10.244.2.0/24") in w
    assert OWN not in w


def test_reset_diff_removed_first_then_added() -> None:
    w = LeaseWatcher(OWN)
    b = lease("10.244.2.0/24", mac="02000000000b")
    c = lease("10.244.3.0/24", mac="02000000000c")
    w.reset([b, c])
    c2 = lease("10.244.3.0/24", mac="02000000000c", exp=999.0)  # only the expiry moved
    d = lease("10.244.4.0/24", mac="02000000000b")  # node b moved to .4 with its MAC
    events = w.reset([c2, d])
    assert kinds(events) == [("removed", "10.244.2.0/24"), ("added", "10.244.4.0/24")]
    assert events[0].lease is b  # cached attrs, so b's FDB/neigh entries can go
    assert w.get(IPv4Network("10.244.3.0/24")) is c2  # expiry refreshed silently


def test_reset_reports_changed_attrs() -> None:
    w = LeaseWatcher(OWN)
    w.reset([lease("10.244.2.0/24", mac="020000000001")])
    events = w.reset([lease("10.244.2.0/24", mac="020000000099")])
    assert kinds(events) == [("added", "10.244.2.0/24")]
    assert events[0].changed


def test_reset_to_empty_removes_everything() -> None:
    w = LeaseWatcher(OWN)
    w.reset([lease("10.244.2.0/24"), lease("10.244.3.0/24")])
    events = w.reset([])
    assert kinds(events) == [("removed", "10.244.2.0/24"), ("removed", "10.244.3.0/24")]
    assert w.peers() == []


def test_put_new_then_renewal_then_change() -> None:
    w = LeaseWatcher(OWN)
    first = lease("10.244.2.0/24")
    assert w.apply_put(first) == [Event(EventKind.ADDED, first, changed=True)]
    renewed = lease("10.244.2.0/24", exp=500.0)
    assert w.apply_put(renewed) == [Event(EventKind.ADDED, renewed, changed=False)]
    assert w.get(IPv4Network("10.244.2.0/24")) is renewed
    moved = lease("10.244.2.0/24", ip="192.168.1.3")
    assert w.apply_put(moved) == [Event(EventKind.ADDED, moved, changed=True)]


def test_delete_returns_cached_attrs() -> None:
    w = LeaseWatcher(OWN)
    peer = lease("10.244.2.0/24", mac="02aabbccddee")
    w.apply_put(peer)
    events = w.apply_delete(IPv4Network("10.244.2.0/24"))
    assert events == [Event(EventKind.REMOVED, peer)]
    assert events[0].lease.attrs.backend_data == {"VNI": 1, "VtepMAC": "02:aa:bb:cc:dd:ee"}
    assert w.peers() == []
    assert w.apply_delete(IPv4Network("10.244.2.0/24")) == []  # unknown: nothing to undo


def test_own_subnet_filtered() -> None:
    w = LeaseWatcher(OWN)
    assert w.apply_put(lease("10.244.1.0/24")) == []
    assert w.apply_delete(OWN) == []
    assert w.reset([lease("10.244.1.0/24")]) == []
    assert w.peers() == []


def test_own_subnet_set_later() -> None:
    w = LeaseWatcher()
    assert w.own_subnet is None
    mine = lease("10.244.1.0/24")
    w.reset([mine, lease("10.244.2.0/24")])
    events = w.set_own_subnet(OWN)
    assert events == [Event(EventKind.REMOVED, mine)]
    assert w.own_subnet == OWN
    assert w.apply_put(lease("10.244.1.0/24", exp=7.0)) == []
    assert [x.subnet for x in w.peers()] == [IPv4Network("10.244.2.0/24")]
    assert w.set_own_subnet(OWN) == []


def test_dual_stack_keys_are_distinct() -> None:
    w = LeaseWatcher(OWN)
    attrs = LeaseAttrs(IPv4Address("192.168.1.2"))
    v6 = IPv6Network("fc00:0:0:2::/64")
    dual = Lease(IPv4Network("10.244.2.0/24"), v6, attrs, 1.0, 1)
    w.apply_put(dual)
    assert w.apply_delete(IPv4Network("10.244.2.0/24")) == []
    assert w.get(IPv4Network("10.244.2.0/24"), v6) is dual
    assert w.apply_delete(IPv4Network("10.244.2.0/24"), v6) == [Event(EventKind.REMOVED, dual)]
