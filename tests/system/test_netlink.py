"""dataplane.io.netlink inside lab namespaces, read back with ``ip -j`` /
``bridge -j``; and a node programmed with it interoperates with a node
programmed by the lab's ``ip``/``bridge`` commands (flanneld's layout)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from control.lab.netns import in_netns, netns_delete, netns_inode
from control.lab.topology import Lab, add_kernel_vxlan_peer, make_kernel_vxlan
from dataplane.io import netlink as nl

NET1 = IPv4Network("10.244.1.0/24")
NET2 = IPv4Network("10.244.2.0/24")
VTEP1 = bytes.fromhex("020000000101")
VTEP2 = bytes.fromhex("020000000202")


def flannel_device(node) -> bytes:
    """What flanneld does on start, through weft's adapter."""
    mac = nl.create_vxlan(
        "flannel.1", 1, node.underlay_ip, "eth0", 8472, mac=VTEP1, mtu=node.mtu - 50
    )
    nl.add_address("flannel.1", f"{NET1.network_address}/32")
    nl.set_link("flannel.1", up=True)
    return mac


def test_links_addresses_and_lookups(lab: Lab, two_nodes) -> None:
    n1, n2 = two_nodes
    with in_netns(n1.ns):
        assert nl.link_index("eth0") == lab.ip_json(n1, "link", "show", "eth0")[0]["ifindex"]
        assert nl.link_mac("eth0") == bytes.fromhex(n1.mac.replace(":", ""))
        assert nl.link_mtu("eth0") == 1500
        assert nl.interface_ipv4("eth0") == [IPv4Interface("192.168.77.10/24")]
        assert ("eth0", IPv4Interface("192.168.77.10/24")) in nl.all_ipv4()
        assert nl.route_get(n2.underlay_ip) == ("eth0", None)
        assert nl.default_route_interface() is None  # nodes have no default route
        with pytest.raises(nl.NetlinkError) as exc:
            nl.route_get("10.200.0.1")
        assert exc.value.errno == errno.ENETUNREACH and "\n" not in str(exc.value)
        assert nl.link_exists("eth0") and not nl.link_exists("nope0")
        with pytest.raises(nl.NetlinkError) as exc:
            nl.link_index("nope0")
        assert exc.value.errno == errno.ENODEV and "\n" not in str(exc.value)

        # neighbour seen through ARP after a ping is usable (REACHABLE/STALE/...)
        assert nl.lookup_neigh(n2.underlay_ip, "eth0") is None
    assert lab.ping(n1, n2.underlay_ip, count=1)
    with in_netns(n1.ns):
        assert nl.lookup_neigh(n2.underlay_ip, "eth0") == bytes.fromhex(n2.mac.replace(":", ""))

        nl.replace_route("10.50.0.0/16", dev="eth0", via=n2.underlay_ip)
        assert nl.route_get("10.50.1.1") == ("eth0", n2.underlay_ip)
        nl.replace_route("0.0.0.0/0", dev="eth0", via=n2.underlay_ip)
        assert nl.default_route_interface() == "eth0"
        nl.delete_route("0.0.0.0/0")
        nl.delete_route("10.50.0.0/16", dev="eth0")
        nl.delete_route("10.50.0.0/16", dev="eth0")  # missing: fine
        nl.delete_route("10.50.0.0/16", dev="nope0")  # missing device: fine
        nl.replace_route("10.52.0.0/16", dev="eth0")  # no gateway: scope link
        nl.delete_route("10.52.0.0/16")  # any scope goes, as with `ip route del`
        with pytest.raises(nl.NetlinkError) as exc:  # gateway not on-link
            nl.replace_route("10.51.0.0/16", dev="eth0", via="10.9.9.9")
        assert exc.value.errno == errno.ENETUNREACH
    assert [r["dst"] for r in lab.ip_json(n1, "route", "show")] == ["192.168.77.0/24"]


def test_vxlan_device_neigh_fdb_route_like_flanneld(lab: Lab, two_nodes) -> None:
    n1, _ = two_nodes
    with in_netns(n1.ns):
        assert flannel_device(n1) == VTEP1
        info = nl.vxlan_info("flannel.1")
        assert info is not None and nl.vxlan_info("eth0") is None
        assert (info["id"], info["port"], info["local"], info["learning"]) == (
            1, 8472, "192.168.77.10", 0)  # fmt: skip
        assert info["link"] == nl.link_index("eth0")
        nl.add_address("flannel.1", "10.244.1.0/32")  # idempotent
        nl.add_address("flannel.1", "10.244.7.0/32")  # stale lease address
        assert nl.flush_addresses_in("flannel.1", "10.244.0.0/16", keep="10.244.1.0/32") == [
            IPv4Interface("10.244.7.0/32")
        ]
        nl.replace_neigh("10.244.2.0", VTEP2, "flannel.1")
        nl.replace_fdb(VTEP2, "flannel.1", "192.168.77.11")
        nl.replace_fdb(VTEP2, "flannel.1", "192.168.77.11")  # replace: still one
        nl.replace_route(NET2, dev="flannel.1", via="10.244.2.0", onlink=True)
        nl.replace_route(NET2, dev="flannel.1", via="10.244.2.0", onlink=True)
        assert nl.lookup_neigh("10.244.2.0", "flannel.1") == VTEP2
        assert nl.fdb_entries("flannel.1") == [(VTEP2, IPv4Address("192.168.77.11"))]
        assert nl.routes_to(NET2) == [("flannel.1", IPv4Address("10.244.2.0"))]
        assert nl.route_get("10.244.2.9") == ("flannel.1", IPv4Address("10.244.2.0"))
        nl.sysctl_set("net/ipv4/conf/flannel.1/rp_filter", 2)  # dotted ifname form
        assert nl.sysctl_get("net/ipv4/conf/flannel.1/rp_filter") == "2"

    link = lab.ip_json(n1, "-d", "link", "show", "flannel.1")[0]
    data = link["linkinfo"]["info_data"]
    assert link["address"] == "02:00:00:00:01:01" and link["mtu"] == 1450
    assert "UP" in link["flags"]
    assert (data["id"], data["port"], data["local"], data["link"]) == (
        1, 8472, "192.168.77.10", "eth0")  # fmt: skip
    assert data["learning"] is False and data["udp_csum"] is True
    addrs = lab.ip_json(n1, "-4", "addr", "show", "flannel.1")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [("10.244.1.0", 32)]
    neigh = lab.ip_json(n1, "neigh", "show", "dev", "flannel.1")
    assert neigh == [{"dst": "10.244.2.0", "lladdr": "02:00:00:00:02:02", "state": ["PERMANENT"]}]
    fdb = json.loads(lab.bridge(n1, "-j", "fdb", "show", "dev", "flannel.1"))
    remote = [e for e in fdb if e.get("dst")]
    assert len(remote) == 1
    assert remote[0]["mac"] == "02:00:00:00:02:02" and remote[0]["dst"] == "192.168.77.11"
    assert "self" in remote[0]["flags"] and remote[0]["state"] == "permanent"
    route = lab.ip_json(n1, "route", "show", str(NET2))[0]
    assert route["gateway"] == "10.244.2.0" and route["dev"] == "flannel.1"
    assert route["flags"] == ["onlink"] and route.get("scope", "global") == "global"
    # identical to what `ip`/`bridge` would have made
    assert (
        lab.bridge(n1, "fdb", "show", "dev", "flannel.1").count("dst 192.168.77.11 self permanent")
        == 1
    )

    with in_netns(n1.ns):
        nl.delete_route(NET2, dev="flannel.1")
        nl.delete_neigh("10.244.2.0", "flannel.1")
        nl.delete_fdb(VTEP2, "flannel.1", "192.168.77.11")
        for _ in range(2):  # missing entries are not errors
            nl.delete_route(NET2, dev="flannel.1")
            nl.delete_neigh("10.244.2.0", "flannel.1")
            nl.delete_fdb(VTEP2, "flannel.1", "192.168.77.11")
        assert nl.lookup_neigh("10.244.2.0", "flannel.1") is None
        assert nl.fdb_entries("flannel.1") == []
        with pytest.raises(nl.NetlinkError) as exc:
            nl.create_vxlan("flannel.1", 1, n1.underlay_ip, "eth0")
        assert exc.value.errno == errno.EEXIST
        nl.delete_link("flannel.1")
        nl.delete_link("flannel.1")
        assert not nl.link_exists("flannel.1")


def test_set_link_mac_mtu_state(lab: Lab) -> None:
    ns = lab.add_netns("sl")
    lab.ip(ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    with in_netns(ns):
        nl.set_link("d0", mac="02:11:22:33:44:55", mtu=1300, up=True)
        assert nl.link_mac("d0") == bytes.fromhex("021122334455")
        link = lab.ip_json(ns, "link", "show", "d0")[0]
        assert link["mtu"] == 1300 and "UP" in link["flags"]
        nl.set_link("d0", up=False)
        assert "UP" not in lab.ip_json(ns, "link", "show", "d0")[0]["flags"]
        with pytest.raises(nl.NetlinkError):
            nl.set_link("d0", mac=b"\x01\x02")


def test_sysctl_is_per_namespace(lab: Lab) -> None:
    ns = lab.add_netns("sc")
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        root_value = f.read().strip()
    with in_netns(ns):
        nl.sysctl_set("net.ipv4.ip_forward", 1 - int(root_value))
        assert nl.sysctl_get("net.ipv4.ip_forward") == str(1 - int(root_value))
    assert lab.run(ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == str(
        1 - int(root_value)
    )
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == root_value
    with pytest.raises(nl.NetlinkError):
        nl.sysctl_set("net.ipv4.no_such_knob", 1)


async def test_works_from_a_running_event_loop(lab: Lab, two_nodes) -> None:
    """pyroute2's sync IPRoute cannot run inside a running loop; the adapter
    hands the call to a helper thread that inherits the namespace."""
    n1, _ = two_nodes
    with in_netns(n1.ns):
        assert nl.interface_ipv4("eth0") == [IPv4Interface("192.168.77.10/24")]
        nl.replace_route("10.60.0.0/16", dev="eth0", via="192.168.77.11")
        assert nl.route_get("10.60.0.1") == ("eth0", IPv4Address("192.168.77.11"))
        nl.delete_route("10.60.0.0/16")
    assert asyncio.get_running_loop().is_running()


def test_adapter_programmed_node_interoperates_with_kernel_peer(lab: Lab, two_nodes) -> None:
    """n1 programmed through dataplane.io.netlink, n2 with ip/bridge as flanneld:
    pods ping across VXLAN both ways."""
    n1, n2 = two_nodes
    lab.add_cni(n1, NET1, mtu=1450)
    lab.add_cni(n2, NET2, mtu=1450)
    p1, p2 = lab.add_pod(n1), lab.add_pod(n2)
    mac2 = make_kernel_vxlan(lab, n2, NET2, mac=VTEP2)
    add_kernel_vxlan_peer(lab, n2, vni=1, peer_subnet=NET1, peer_mac=VTEP1,
                          peer_public_ip=n1.underlay_ip)  # fmt: skip
    with in_netns(n1.ns):
        flannel_device(n1)
        nl.replace_neigh(NET2.network_address, mac2, "flannel.1")
        nl.replace_fdb(mac2, "flannel.1", n2.underlay_ip)
        nl.replace_route(NET2, dev="flannel.1", via=NET2.network_address, onlink=True)
    assert lab.ping(p1, p2.ip)
    assert lab.ping(p2, p1.ip)


# -- the per-namespace worker: one socket for many calls, released when idle ----------


def _our_netlink_sockets() -> set[int]:
    """Inodes of this process's open netlink sockets in the calling thread's namespace."""
    with open("/proc/thread-self/net/netlink") as f:
        in_ns = {int(line.split()[-1]) for line in f.readlines()[1:]}
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            ours.add(int(target[8:-1]))
    return in_ns & ours


def _workers_in(ns: str) -> list[threading.Thread]:
    name = f"weft-netlink-{netns_inode(ns)}"
    return [t for t in threading.enumerate() if t.name == name]


def test_one_socket_and_one_thread_serve_many_calls(lab: Lab) -> None:
    """Calls from one namespace, with and without a running event loop, reuse
    one IPRoute socket held by one worker thread (not one socket, or one
    thread, per call)."""
    ns = lab.add_netns("so")
    seen: list[frozenset[int]] = []
    workers: set[int] = set()

    def calls() -> None:
        for _ in range(10):
            assert nl.link_mtu("lo") == 65536
            seen.append(frozenset(_our_netlink_sockets()))
            workers.update(t.ident or 0 for t in _workers_in(ns))

    async def calls_in_loop() -> None:
        calls()

    with in_netns(ns):
        calls()
        asyncio.run(calls_in_loop())
    assert len(set(seen)) == 1 and len(seen[0]) == 1
    assert len(workers) == 1


def test_concurrent_callers_in_several_namespaces(lab: Lab) -> None:
    """Threads calling at once, two per namespace (one from an event loop),
    each get their own namespace's answer."""
    names = [lab.add_netns(f"c{i}") for i in range(2)]
    for i, ns in enumerate(names):
        lab.ip(ns, "link", "add", "v0", "mtu", str(1400 + i), "type", "veth", "peer", "name", "v1")
        lab.ip(ns, "link", "set", "v1", "up")
        lab.ip(ns, "link", "set", "v0", "up")
    failures: list[str] = []

    def caller(i: int, in_loop: bool) -> None:
        async def loop_body() -> None:
            body()

        def body() -> None:
            for n in range(40):
                mtu = nl.link_mtu("v0")
                if mtu != 1400 + i:
                    failures.append(f"{names[i]} call {n}: mtu {mtu}")
                nl.replace_route(f"10.7{i}.{n}.0/24", dev="v0")

        try:
            with in_netns(names[i]):
                asyncio.run(loop_body()) if in_loop else body()
        except Exception as e:
            failures.append(f"{names[i]}: {e!r}")

    threads = [threading.Thread(target=caller, args=(i, loop)) for i in (0, 1) for loop in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    for i, ns in enumerate(names):
        routes = {r["dst"] for r in lab.ip_json(ns, "route", "show", "dev", "v0")}
        assert routes == {f"10.7{i}.{n}.0/24" for n in range(40)}


def test_a_socket_error_gets_a_fresh_socket_a_kernel_error_does_not(lab: Lab) -> None:
    ns = lab.add_netns("se")
    with in_netns(ns):
        first = nl._run(lambda ipr: ipr)
        assert nl._run(lambda ipr: ipr) is first
        with pytest.raises(nl.NetlinkError) as exc:  # the kernel's answer: same socket
            nl.replace_route("10.9.0.0/16", dev="lo", via="10.99.9.9")
        assert exc.value.errno == errno.ENETUNREACH
        assert nl._run(lambda ipr: ipr) is first

        def socket_fails(ipr: object) -> None:
            raise OSError(errno.ENOBUFS, "No buffer space available")

        with pytest.raises(nl.NetlinkError) as exc:
            nl._call("socket_fails", socket_fails)
        assert exc.value.errno == errno.ENOBUFS and exc.value.strerror.startswith("socket_fails:")
        assert nl._run(lambda ipr: ipr) is not first
        assert nl.link_mtu("lo") == 65536


def test_a_deleted_namespace_is_released_once_its_worker_is_idle(lab: Lab) -> None:
    """The worker's socket and thread pin the namespace after ``ip netns del``;
    after IDLE_S without calls they are gone, and so is the namespace with its
    devices: the veth end in the other namespace disappears."""
    a, b = lab.add_netns("ra"), lab.add_netns("rb")
    lab.ip(a, "link", "add", "ra0", "type", "veth", "peer", "name", "rb0", "netns", b)
    with in_netns(a):
        assert nl.link_mtu("ra0") == 1500
    workers = _workers_in(a)
    assert len(workers) == 1
    netns_delete(a)
    deadline = time.monotonic() + nl.IDLE_S + 10
    while "rb0" in lab.ip(b, "link", "show") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "rb0" not in lab.ip(b, "link", "show")
    workers[0].join(timeout=1)
    assert not workers[0].is_alive()


def test_unread_replies_do_not_pile_up_on_a_long_lived_socket(lab: Lab) -> None:
    """pyroute2 0.9.7 never reads the ack that follows each ``link("get")``
    reply; on a socket that served every call of an agent's lifetime they would
    pile up (~1.6 KB each).  The worker replaces its socket every
    CALLS_PER_SOCKET calls, so the backlog stays bounded."""
    ns = lab.add_netns("rq")
    with in_netns(ns):
        for _ in range(3 * nl.CALLS_PER_SOCKET):
            assert nl.link_mtu("lo") == 65536
        backlog = nl._run(lambda ipr: ipr.asyncore.msg_queue.root.qsize())
    assert backlog < nl.CALLS_PER_SOCKET
