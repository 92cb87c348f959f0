"""Pure arithmetic: what each encapsulation costs on the wire.

Per inner IP packet, vxlan adds 50 bytes on the underlay (outer IPv4 20 + UDP 8 +
VXLAN 8 + inner Ethernet 14), flannel's udp backend 28 (outer IPv4 20 + UDP 8) and
host-gw / plain routing 0. The pods' MTU is the underlay MTU minus that, so every
packet also carries less payload.

Two views of "the wire":

* ``counted``: what Linux interface counters count for a frame, i.e. the IP packet
  plus the 14-byte Ethernet header (no FCS). This is what the bench measures on
  the underlay veth, so it is the number to compare a measurement with.
* ``l1``: a real Ethernet wire, which also carries preamble + SFD (8), FCS (4) and
  the inter-frame gap (12): 38 bytes per frame beyond the IP packet.

TCP payload per full-sized segment is the inner MTU minus IPv4 (20), TCP (20) and
the timestamp option Linux sends by default (12).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ETH_HEADER = 14
ETH_L1_EXTRA = 8 + 4 + 12  # preamble+SFD, FCS, inter-frame gap
IPV4_HEADER = 20
TCP_HEADER = 20
TCP_TIMESTAMPS = 12
UDP_HEADER = 8

#: Bytes added per packet on the underlay, by encapsulation.
OVERHEAD = {"none": 0, "vxlan": 50, "udp": 28, "host-gw": 0}


@dataclass(frozen=True)
class WireCost:
    encap: str
    underlay_mtu: int
    overhead: int
    inner_mtu: int  # the pods' MTU
    tcp_payload: int  # TCP payload bytes in one full-sized segment
    frame_counted: int  # bytes an interface counter counts for that segment
    frame_l1: int  # bytes it occupies on a real Ethernet wire
    wire_bytes_per_payload: float  # frame_counted / tcp_payload
    goodput_efficiency: float  # tcp_payload / frame_l1 (share of line rate that is payload)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def inner_mtu(underlay_mtu: int, overhead: int) -> int:
    mtu = underlay_mtu - overhead
    if mtu < IPV4_HEADER + TCP_HEADER + TCP_TIMESTAMPS + 1:
        raise ValueError(f"underlay MTU {underlay_mtu} leaves no room after {overhead} bytes")
    return mtu


def tcp_payload_per_segment(
    underlay_mtu: int, overhead: int, tcp_options: int = TCP_TIMESTAMPS
) -> int:
    return inner_mtu(underlay_mtu, overhead) - IPV4_HEADER - TCP_HEADER - tcp_options


def tcp_wire_cost(underlay_mtu: int, encap: str, tcp_options: int = TCP_TIMESTAMPS) -> WireCost:
    """Full-sized TCP segments through ``encap`` on an underlay of ``underlay_mtu``."""
    overhead = OVERHEAD[encap]
    payload = tcp_payload_per_segment(underlay_mtu, overhead, tcp_options)
    counted = underlay_mtu + ETH_HEADER
    l1 = underlay_mtu + ETH_HEADER + ETH_L1_EXTRA
    return WireCost(
        encap=encap,
        underlay_mtu=underlay_mtu,
        overhead=overhead,
        inner_mtu=inner_mtu(underlay_mtu, overhead),
        tcp_payload=payload,
        frame_counted=counted,
        frame_l1=l1,
        wire_bytes_per_payload=counted / payload,
        goodput_efficiency=payload / l1,
    )


def udp_frame_bytes(payload: int, encap: str) -> int:
    """Counted bytes of one frame carrying a UDP datagram of ``payload`` bytes."""
    return ETH_HEADER + IPV4_HEADER + UDP_HEADER + payload + OVERHEAD[encap]


def udp_wire_bytes_per_payload(payload: int, encap: str) -> float:
    return udp_frame_bytes(payload, encap) / payload


def wire_table(mtus: tuple[int, ...] = (1500, 9000)) -> list[dict[str, object]]:
    """tcp_wire_cost for vxlan, udp and none at each MTU (the report's computed table)."""
    return [
        tcp_wire_cost(mtu, encap).as_dict() for mtu in mtus for encap in ("none", "udp", "vxlan")
    ]
