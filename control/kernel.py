"""Kernel mode: the same control loop, programming Linux the way flanneld does.

vxlan: a `flannel.<VNI>` vxlan device (nolearning, dstport, local, dev), the
lease's .0 address as a /32, and per peer the chain route → permanent
neighbour → permanent FDB entry (facts §3b). host-gw: one route per peer via
its public IP on the underlay interface (facts §3c). Entries stay when weft
stops, as flanneld leaves them, so traffic survives a restart.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from dataplane.io import netlink
from dataplane.peers import Peer

log = logging.getLogger("weft.kernel")


@dataclass
class KernelSpec:
    backend: str
    subnet: IPv4Network
    local_ip: IPv4Address
    underlay_iface: str
    device_mtu: int
    vni: int = 1
    port: int = 8472
    vtep_mac: bytes | None = None
    network: IPv4Network | None = None  # the cluster network (stale addresses in it go)


class KernelDataplane:
    def __init__(self, spec: KernelSpec) -> None:
        if spec.backend not in ("vxlan", "host-gw"):
            raise ValueError(
                f"--dataplane kernel supports vxlan and host-gw, not {spec.backend} "
                "(flannel's udp backend is itself a userspace proxy: use --dataplane userspace)"
            )
        self.spec = spec
        self.device = f"flannel.{spec.vni}"
        self._peers: dict[IPv4Network, Peer] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        spec = self.spec
        if spec.backend != "vxlan":
            return
        assert spec.vtep_mac is not None
        if netlink.link_exists(self.device):
            if self._compatible():
                # flanneld reuses a compatible device, so a restart keeps traffic flowing.
                netlink.set_link(self.device, mac=spec.vtep_mac, mtu=spec.device_mtu)
                log.info("reusing existing %s", self.device)
            else:
                log.warning("%s exists with other settings; recreating it", self.device)
                netlink.delete_link(self.device)
        if not netlink.link_exists(self.device):
            netlink.create_vxlan(
                self.device,
                vni=spec.vni,
                local_ip=str(spec.local_ip),
                dev=spec.underlay_iface,
                port=spec.port,
                mac=spec.vtep_mac,
                mtu=spec.device_mtu,
            )
        own = f"{spec.subnet.network_address}/32"
        netlink.add_address(self.device, own)
        # As flanneld: no other address of the network stays on the device (an old
        # lease's .0 would make this node answer for a subnet another node holds).
        if spec.network is not None:
            netlink.flush_addresses_in(self.device, spec.network, keep=own)
        netlink.set_link(self.device, up=True)
        log.info("kernel vxlan device %s up (VNI %d, port %d)", self.device, spec.vni, spec.port)

    def _compatible(self) -> bool:
        """flanneld's check: same VNI, local IP, underlay link and port."""
        info = netlink.vxlan_info(self.device)
        if info is None:
            return False
        spec = self.spec
        return (
            info.get("id") == spec.vni
            and str(info.get("local")) == str(spec.local_ip)
            and info.get("link") == netlink.link_index(spec.underlay_iface)
            and info.get("port") in (spec.port, 0)
        )

    def add_peer(self, peer: Peer) -> None:
        old = self._peers.get(peer.subnet)
        if old is not None and old != peer:
            self.remove_peer(peer.subnet)
        if self.spec.backend == "vxlan":
            assert peer.vtep_mac is not None
            gw = str(peer.subnet.network_address)
            netlink.replace_neigh(gw, peer.vtep_mac, self.device)
            netlink.replace_fdb(peer.vtep_mac, self.device, str(peer.public_ip))
            netlink.replace_route(str(peer.subnet), dev=self.device, via=gw, onlink=True)
        else:
            netlink.replace_route(
                str(peer.subnet), dev=self.spec.underlay_iface, via=str(peer.public_ip)
            )
        self._peers[peer.subnet] = peer  # type: ignore[index]

    def remove_peer(self, subnet: IPv4Network) -> Peer | None:
        peer = self._peers.pop(subnet, None)
        if peer is None:
            return None
        if self.spec.backend == "vxlan":
            netlink.delete_route(str(subnet), dev=self.device)
            netlink.delete_neigh(str(subnet.network_address), self.device)
            assert peer.vtep_mac is not None
            netlink.delete_fdb(peer.vtep_mac, self.device, str(peer.public_ip))
        else:
            netlink.delete_route(str(subnet), dev=self.spec.underlay_iface)
        return peer

    def stop(self) -> None:
        pass  # flanneld leaves the device and entries in place

    def status(self) -> dict[str, Any]:
        return {"device": self.device, "device_kind": "kernel", "device_mtu": self.spec.device_mtu}


class DirectRouting:
    """vxlan `DirectRouting`: peers on our L2 get a plain kernel route, the rest go through
    the wrapped dataplane (userspace engine or kernel VXLAN), as flanneld does.

    "On our L2" is flannel's test: `ip route get <PublicIP>` gives a route with no
    gateway. The direct route is `<subnet> via <PublicIP> dev <that device>`.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._direct: dict[IPv4Network, str] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.inner.start(loop)

    def add_peer(self, peer: Peer) -> None:
        try:
            dev, gateway = netlink.route_get(str(peer.public_ip))
        except netlink.NetlinkError:
            dev, gateway = "", IPv4Address("0.0.0.0")
        subnet: IPv4Network = peer.subnet  # type: ignore[assignment]
        if gateway is None:
            if subnet not in self._direct:
                self.inner.remove_peer(subnet)
            netlink.replace_route(str(subnet), dev=dev, via=str(peer.public_ip))
            self._direct[subnet] = dev
            log.info("direct route %s via %s dev %s", subnet, peer.public_ip, dev)
            return
        if self._direct.pop(subnet, None) is not None:
            netlink.delete_route(str(subnet))
        self.inner.add_peer(peer)

    def remove_peer(self, subnet: IPv4Network) -> Peer | None:
        dev = self._direct.pop(subnet, None)
        if dev is not None:
            netlink.delete_route(str(subnet), dev=dev)
            return None
        return self.inner.remove_peer(subnet)

    def stop(self) -> None:
        self.inner.stop()

    async def refresh(self) -> None:
        refresh = getattr(self.inner, "refresh", None)
        if refresh is not None:
            await refresh()

    def status(self) -> dict[str, Any]:
        status = getattr(self.inner, "status", None)
        out: dict[str, Any] = dict(status()) if callable(status) else {}
        out["direct_routes"] = {str(s): d for s, d in self._direct.items()}
        return out
