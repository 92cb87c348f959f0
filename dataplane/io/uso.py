"""Receive-side UDP coalescing: which received datagrams can go to the device as one
UDP GSO (USO) packet.

A small-datagram stream (64-byte iperf3 UDP, DNS bursts, QUIC, RTP) reaches weft as
one encapsulated datagram per inner packet; writing each to the device costs one
system call, which is where weft's receive time goes. Consecutive datagrams of one
inner UDP flow and one size can instead be written as ONE packet with a
virtio_net_hdr of gso_type VIRTIO_NET_HDR_GSO_UDP_L4 and gso_size = the payload
size: the kernel forwards it (bridge, veth) as one GSO skb and cuts it back into
the original datagrams at the pod's UDP socket (udp_rcv_segment), or wherever a
device cannot take it. Measured on Linux 6.18 through a TUN, the lab's cni0 bridge
and a pod's veth: every datagram arrives, same bytes, same order; the TUN needs no
TUNSETOFFLOAD for such writes (offload flags govern what the kernel *reads* out),
and the kernel refuses (EINVAL) more than UDP_MAX_SEGMENTS (128 on 6.18, 64 on
older kernels) segments per packet.

The datagrams of one recvmmsg batch sit in the receive buffer at known offsets:
fixed-stride slots, and within a UDP GRO message one datagram every `size` bytes.
So the batch's datagram headers are one gather (a fancy index over a sliding-window
view of the buffer) into an N × header matrix, and a fixed dozen numpy calls decide
for all of them at once, whatever N is. A datagram joins the one before it when:

- both are IPv4 without options, UDP, not fragments, with IP total length and UDP
  length matching the datagram, and at least one payload byte;
- same peer (outer address and port), same length, and the same bytes in every
  header position except the IP ID, the IP checksum and the UDP checksum — that is
  the bytes before the inner IP header (VXLAN header, inner Ethernet), TOS, DF,
  TTL, addresses and ports;
- both IP header checksums are valid, and both UDP checksums are valid or zero.

The merged packet goes up as CHECKSUM_PARTIAL, which the receiving stack takes as
verified, so every datagram's checksums are checked here first (a datagram with a
bad checksum is delivered alone and the kernel drops it, counted in the pod's
UdpInCsumErrors as without weft). A UDP checksum of zero means "no checksum" in
IPv4: the kernel delivers such a datagram unverified (udp4_csum_init), and the
segments of a merged packet are delivered unverified too, with the same payload
bytes — so merging them changes nothing the receiver could check, and they are
merged. (The ID is not kept: the kernel numbers the segments from the first.)

Most batches of a small-datagram stream are one flow at one size: every header the
same bytes but for the ID and the checksums. Such a batch is recognised with three
comparisons, the rules above are checked once on its first datagram, and only the
checksums row by row (about a third less time a batch than the general path).
"""

from __future__ import annotations

import struct

import numpy as np

from dataplane.packet.checksum import ones_complement_sum
from dataplane.packet.vnet import UDP_CSUM_OFFSET, VNET_STRUCT, GsoType, VnetFlag

#: Linux's UDP_MAX_SEGMENTS: 64 until 6.x, then 128; a GSO write of more segments
#: is refused with EINVAL. 64 is safe on every kernel with USO; the engine starts at
#: 128 and comes down to 64 at the first such refusal.
MAX_SEGMENTS = 64
MAX_SEGMENTS_6X = 128
#: IP total length ≤ 65535: IP and UDP headers, then the payloads.
MAX_PAYLOAD = 65535 - 20 - 8
UDP_HLEN = 8

_ONES = np.uint64(0xFFFF)
_U16 = struct.Struct("!H")


def merged_header(
    first: memoryview | bytes, ip: int, count: int, size: int
) -> tuple[bytes, bytearray]:
    """(vnet header, packet headers) of a USO packet for `count` datagrams of `size`
    payload bytes whose first one starts with the headers `first` (the inner IP
    header `ip` bytes in; a TAP's Ethernet header before it): the IP and UDP lengths
    of the whole, a new IP checksum, and in the UDP checksum field the pseudo-header
    sum (not complemented), as NEEDS_CSUM wants; the kernel fills in each segment's."""
    header = bytearray(first)
    total = count * size
    _U16.pack_into(header, ip + 2, 20 + UDP_HLEN + total)
    header[ip + 10] = header[ip + 11] = 0
    _U16.pack_into(header, ip + 10, ~ones_complement_sum(header[ip : ip + 20]) & 0xFFFF)
    _U16.pack_into(header, ip + 24, UDP_HLEN + total)
    pseudo = ones_complement_sum(header[ip + 12 : ip + 20], 17 + UDP_HLEN + total)
    _U16.pack_into(header, ip + 26, pseudo)
    vnet = VNET_STRUCT.pack(
        VnetFlag.NEEDS_CSUM, GsoType.UDP_L4, len(header), size, ip + 20, UDP_CSUM_OFFSET
    )
    return vnet, header


class UdpCoalescer:
    """Plans USO runs over datagrams received into `buf` (never resized while in use)."""

    def __init__(self, buf: bytearray, ip_off: int, *, max_segments: int = MAX_SEGMENTS) -> None:
        self.buf = buf
        self.u8 = np.frombuffer(buf, dtype=np.uint8)
        self.ip_off = ip_off
        self.max_segments = max_segments
        #: Bytes from a datagram's start to its UDP payload.
        self.hlen = ip_off + 20 + UDP_HLEN
        hl = self.hlen
        # Every window of `hl` bytes of the buffer, as rows: rows[starts] gathers headers.
        self._headers = np.ndarray((len(buf) - hl, hl), np.uint8, buf, 0, (1, 1))
        ip = ip_off
        # Header bytes that may differ between the datagrams of a run: IP ID and
        # checksum, UDP checksum (checked on their own below).
        self._may_differ = np.zeros(hl, dtype=bool)
        self._may_differ[[ip + 4, ip + 5, ip + 10, ip + 11, ip + 26, ip + 27]] = True
        self._windows: dict[int, np.ndarray] = {}

    def _window(self, width: int) -> np.ndarray:
        win = self._windows.get(width)
        if win is None:
            buf = self.buf
            win = np.ndarray((len(buf) - width, width), np.uint8, buf, 0, (1, 1))
            if len(self._windows) > 64:
                self._windows.clear()
            self._windows[width] = win
        return win

    def joins(self, starts: np.ndarray, lengths: np.ndarray, peers: np.ndarray) -> np.ndarray:
        """joins[k]: datagram k may go in one USO packet with datagram k - 1 (joins[0]
        is False). `starts` are offsets in the buffer, `peers` any integer per
        datagram that differs between peers (e.g. address << 16 | port)."""
        count = len(starts)
        joins = np.zeros(count, dtype=bool)
        if count < 2:
            return joins
        ip = self.ip_off
        hl = self.hlen
        h = self._headers[starts]  # count × hl, a copy
        if (
            (lengths == lengths[0]).all()
            and (peers == peers[0]).all()
            and ((h == h[0]) | self._may_differ).all()
        ):
            # One flow, one size (a small-datagram stream's usual batch): every
            # datagram's headers are the first one's but for the bytes that may differ,
            # so the first one's fields decide for all, and only the checksums are
            # left to check row by row.
            length = int(lengths[0])
            if self._candidate(h[0].tobytes(), length):
                ok = self._checksums_ok(h, starts, length)
                joins[1:] = ok[1:] & ok[:-1]
            return joins
        words = h.view(">u2")  # (hl and ip_off are even)
        inner = lengths - ip
        candidate = (
            (h[:, ip] == 0x45)
            & (h[:, ip + 9] == 17)
            & ((words[:, (ip + 6) >> 1] & 0x3FFF) == 0)  # MF, fragment offset
            & (words[:, (ip + 2) >> 1] == inner)  # IP total length
            & (words[:, (ip + 24) >> 1] == inner - 20)  # UDP length
            & (lengths > hl)
        )
        same = ((h[1:] == h[:-1]) | self._may_differ).all(axis=1)
        joins[1:] = (
            same
            & candidate[1:]
            & candidate[:-1]
            & (lengths[1:] == lengths[:-1])
            & (peers[1:] == peers[:-1])
        )
        involved = joins.copy()
        involved[:-1] |= joins[1:]
        rows = np.flatnonzero(involved)
        if not len(rows):
            return joins
        # The checksums of the datagrams involved, one matrix per datagram length (a
        # run has one length; a batch usually has one or two).
        ok = np.zeros(count, dtype=bool)
        row_lengths = lengths[rows]
        distinct = set(row_lengths.tolist())
        for length in distinct:
            sel = rows[row_lengths == length] if len(distinct) > 1 else rows
            ok[sel] = self._checksums_ok(h[sel], starts[sel], length)
        joins[1:] &= ok[1:] & ok[:-1]
        return joins

    def _candidate(self, row: bytes, length: int) -> bool:
        """The rules above for one datagram's headers `row` (all but the checksums)."""
        ip = self.ip_off
        inner = length - ip
        return (
            row[ip] == 0x45
            and row[ip + 9] == 17
            and (row[ip + 6] & 0x3F) == 0 == row[ip + 7]  # MF, fragment offset
            and row[ip + 2] << 8 | row[ip + 3] == inner  # IP total length
            and row[ip + 24] << 8 | row[ip + 25] == inner - 20  # UDP length
            and length > self.hlen
        )

    def _checksums_ok(self, h: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
        """Per datagram (headers `h`, all `length` bytes long): IP header checksum valid,
        UDP checksum valid or zero ("none", see the module's notes). The IP header's
        one's complement sum of little-endian words is 0 mod 0xFFFF in either byte
        order when the checksum is valid."""
        ip = self.ip_off
        ip_ok = h[:, ip : ip + 20].view("<u2").sum(axis=1, dtype=np.uint64) % _ONES == 0
        udp = h[:, ip + 26 : ip + 28].view("<u2")[:, 0]
        return ip_ok & ((udp == 0) | self._udp_sums_ok(starts, length))

    def _udp_sums_ok(self, starts: np.ndarray, length: int) -> np.ndarray:
        """UDP checksums of the datagrams at `starts`, all `length` bytes long: from the
        inner addresses (the pseudo-header's) to the end, in 32-bit words, zero-padded;
        protocol and UDP length added (× 256: the words were summed little-endian)."""
        ip = self.ip_off
        covered = length - ip - 12
        width = -(-covered // 4) * 4
        words = self._window(width)[starts + ip + 12]
        words[:, covered:] = 0
        sums = words.view("<u4").sum(axis=1, dtype=np.uint64)
        return (sums + np.uint64((17 + length - ip - 20) * 256)) % _ONES == 0

    def runs(
        self, starts: np.ndarray, lengths: np.ndarray, peers: np.ndarray
    ) -> list[tuple[int, int]]:
        """(first, count) over the datagrams, in order: runs of two or more go to the
        device as one USO packet, runs of one as they came."""
        joins = self.joins(starts, lengths, peers)
        count = len(starts)
        firsts = np.flatnonzero(~joins).tolist()
        out: list[tuple[int, int]] = []
        cap = self.max_segments
        lengths_l: list[int] | None = None
        for i, first in enumerate(firsts):
            n = (firsts[i + 1] if i + 1 < len(firsts) else count) - first
            if n == 1:
                out.append((first, 1))
                continue
            if lengths_l is None:
                lengths_l = lengths.tolist()
            most = min(cap, MAX_PAYLOAD // (lengths_l[first] - self.hlen))
            while n > 0:
                take = min(n, most)
                out.append((first, take))
                first += take
                n -= take
        return out

    def payloads(self, starts: np.ndarray, size: int) -> np.ndarray:
        """The payloads of the datagrams at `starts` (each `size` bytes after the
        headers), one after the other: one gather instead of an iovec per datagram."""
        return self._window(size)[starts + self.hlen]
