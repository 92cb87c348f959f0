"""One hash of an inner flow, for the places weft spreads flows apart.

- The outer UDP source port of a VXLAN datagram. RFC 7348 §5 recommends a hash
  of the inner packet, and the kernel's VXLAN device does it
  (`udp_flow_src_port`): routers' ECMP and NICs' RSS then spread the flows of
  one node pair over paths and queues, and a receiver's GRO keeps them apart.
  weft picks one of a few sockets bound to kernel-chosen ports
  (dataplane/io/sockets.SourcePorts) with `source_index`.
- The queue a flow is served on (dataplane/io/queues.py, where the same
  arithmetic also runs as BPF programs in the kernel).

The hash is symmetric (source ^ destination address, source ^ destination
port), so a flow's two directions get the same value, as the kernel's flow
hash does.
"""

from __future__ import annotations

import struct

GOLDEN = 0x9E3779B1  # 2**32 / golden ratio: a multiply that spreads every input bit up

#: TCP, UDP, SCTP, UDP-Lite: the two ports are the first four bytes of their header.
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})

_IPV4 = struct.Struct("!B5xHxB2xII")  # version/IHL, flags/fragment offset, protocol, src, dst
_PORTS = struct.Struct("!I")
FRAGMENT = 0x3FFF  # MF and the offset: a fragment carries no ports, or not in all pieces


def flow_hash(addresses: int, ports: int) -> int:
    """A 32-bit hash of source ^ destination address and source ^ destination port."""
    a = addresses ^ ports
    a = (a ^ a >> 16) * GOLDEN & 0xFFFFFFFF
    return a ^ a >> 16


def inner_flow_hash(packet: bytes | bytearray | memoryview, at: int, end: int) -> int:
    """flow_hash of the IPv4 packet at packet[at:end]: its addresses, and its ports
    when it is TCP, UDP, SCTP or UDP-Lite and not a fragment (as the kernel's flow
    hash, so every piece of a fragmented datagram gets the same value). Anything
    that is not IPv4, or too short, hashes to 0."""
    if end - at < 20:
        return 0
    vhl, frag, proto, src, dst = _IPV4.unpack_from(packet, at)
    if vhl >> 4 != 4:
        return 0
    ports = 0
    if proto in PORT_PROTOCOLS and not frag & FRAGMENT:
        l4 = at + (vhl & 0x0F) * 4
        if l4 + 4 <= end:
            (both,) = _PORTS.unpack_from(packet, l4)
            ports = both >> 16 ^ both & 0xFFFF
    return flow_hash(src ^ dst, ports)


def source_index(hash_: int, count: int) -> int:
    """Which of `count` source ports a flow with this hash uses: the hash's top bits
    scaled to the count (the kernel's reciprocal_scale), so the choice does not
    follow the low bits that pick a queue (hash % queues)."""
    return hash_ * count >> 32
