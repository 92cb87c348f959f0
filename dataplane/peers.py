"""What the dataplane knows of a remote node: its pod subnet and how to reach it."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network


@dataclass(frozen=True, slots=True)
class Peer:
    """A remote node as a lease describes it.

    `vtep_mac` is the peer's VXLAN tunnel endpoint MAC (vxlan only). `port` is
    the UDP port its encapsulated traffic goes to (vxlan, udp); host-gw has none.
    """

    subnet: IPv4Network | IPv6Network
    public_ip: IPv4Address
    vtep_mac: bytes | None = None
    port: int = 0
    # Precomputed socket address, so the hot loop does not build a tuple per packet.
    sockaddr: tuple[str, int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sockaddr", (str(self.public_ip), self.port))
