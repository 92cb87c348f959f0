"""TCP (and UDP) segmentation in userspace, and sending many datagrams with one
UDP_SEGMENT sendmsg.

The send fallback for kernels without UDP-tunnel GSO (before Linux 6.17, e.g.
Debian 12's 6.1): weft still reads TCP super-packets from the pod device
(IFF_VNET_HDR + TSO), cuts them here into the segments the kernel's
tcp_gso_segment would make, each with the backend's prefix in front (VXLAN
header + inner Ethernet for vxlan, nothing for udp), back to back in one
buffer — and hands that buffer to the UDP socket with one sendmsg carrying a
UDP_SEGMENT cmsg (Linux 4.18+): the kernel cuts it into standard datagrams of
`gso_size` bytes (the last may be shorter) and fills in the outer UDP checksum.

The cutting is vectorised with numpy: a batch of N segments is an N × row
matrix (one row per datagram payload); the headers are broadcast into every
row, the payload is copied in one reshape, and the per-segment fields are
computed as arrays of N:

    inner IPv4   total length, ID (first + i), header checksum
    inner IPv6   payload length
    TCP          sequence number (first + i·MSS), flags (CWR only on the first
                 segment, FIN and PSH only on the last), checksum
    UDP          (a UDP super-packet: uso_read) checksum, and the last datagram's
                 length; as the kernel's __udp_gso_segment makes them

The last row's payload is padded with zeros to a full row: zeros do not
change a one's complement sum, and the padding is past the bytes sent.

One sendmsg takes at most MAX_SEGMENTS datagrams (the kernel's
UDP_MAX_SEGMENTS, 64 before Linux 6.10) and at most MAX_SEND_BYTES (the
64 KiB IP limit); a super-packet that needs more (at MTU 1500 a 64 KB one makes
46 segments: 44 + 2) is still cut in one `fill` — the numpy calls cost the
same for 2 rows as for 44 — and sent as several sendmsg slices of its buffer.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import numpy as np

from dataplane.packet.vnet import complete_checksum

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: the segment size for a send (socket option or cmsg)
#: UDP_MAX_SEGMENTS (1 << 6) in Linux before 6.10; later kernels take 128.
MAX_SEGMENTS = 64
#: An IPv4 datagram's payload is at most 65535 - 20 (IP) - 8 (UDP) bytes.
MAX_SEND_BYTES = 65535 - 20 - 8
#: Segmenter's buffer: a whole 64 KB super-packet cut at once (one `fill`, its numpy
#: calls paid once) down to an MSS of ~300, then sent in sendmsg-sized slices.
FILL_BYTES = 4 * 65536

UDP_HLEN = 8
TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80

_U16 = struct.Struct("=H")


def probe_udp_segment(sock: socket.socket) -> None:
    """Raises OSError (ENOPROTOOPT before Linux 4.18) when the socket has no UDP GSO.

    Setting the socket-wide size to 0 changes nothing (0 means "no GSO"); the
    size weft uses travels with each sendmsg as a cmsg."""
    sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)


def segment_cmsg(size: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data of a sendmsg whose datagrams are `size` bytes (the last may be less)."""
    return [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))]


def _fold(total: int) -> int:
    """One's complement fold of a non-negative sum to 16 bits."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


class _FillViews:
    """Views into Segmenter.out for one shape of fill — `count` rows of `row` bytes,
    the inner IP header at `a` and the transport header at `t` in a row, its
    checksum at `c` — made once per shape: a super-packet of a bulk flow has the same
    shape as the last one, and the dozen numpy views cost ~6 µs a fill to make."""

    __slots__ = ("csum", "ip_csum", "ip_id", "rows", "seq", "words")

    def __init__(
        self, arr: np.ndarray, count: int, row: int, a: int, t: int, c: int, v4: bool, udp: bool
    ) -> None:
        rows = arr[: count * row].reshape(count, row)
        self.rows = rows
        self.ip_id = rows[:, a + 4 : a + 6].view(">u2")[:, 0] if v4 else None
        self.ip_csum = rows[:, a + 10 : a + 12].view(">u2")[:, 0] if v4 else None
        self.seq = None if udp else rows[:, t + 4 : t + 8].view(">u4")[:, 0]
        # Rows summed as native (little-endian) words where they can be (fill).
        native = t % 2 == 0 and row % 2 == 0 and np.little_endian
        self.words = rows.view(np.uint16)[:, t // 2 :] if native else None
        self.csum = rows[:, c : c + 2].view("<u2" if native else ">u2")[:, 0]


class Segmenter:
    """Cuts TCP (or UDP) super-packets into datagram payloads in one preallocated buffer.

    For one super-packet: `start(...)` once, then `fill(first, count)` for up to
    `per_fill` segments at a time; after `fill`, `out[:nbytes]` holds `count`
    datagram payloads of `row` bytes each (the last may be shorter), to send with
    UDP_SEGMENT size `row`, at most `per_batch` of them a sendmsg (`sends`).

    `start` rewrites the super-packet's headers in place into those of a
    middle segment (full length, no CWR/FIN/PSH, checksums zero), so that
    `fill` broadcasts them into every row and patches only what differs per
    segment: a few numpy operations per batch, whatever the number of segments
    (their fixed cost is what counts at ~45 segments a batch).
    """

    def __init__(self, capacity: int = FILL_BYTES) -> None:
        self.capacity = capacity
        self.out = bytearray(capacity)
        self.view = memoryview(self.out)
        self._arr = np.frombuffer(self.out, dtype=np.uint8)
        self._index = np.arange(65536, dtype=np.uint32)  # segment numbers
        self.row = 0  # bytes per datagram payload (the UDP_SEGMENT size)
        self.segments = 0  # segments the current super-packet makes
        self.per_batch = 0  # at most this many segments per sendmsg
        self.per_fill = 0  # at most this many segments per fill (a multiple of per_batch)
        self._src: np.ndarray | None = None
        self._views: dict[tuple[int, ...], _FillViews] = {}
        self._src_of: bytearray | None = None

    def start(
        self,
        buf: bytearray,
        start: int,
        ip: int,
        l4: int,
        end: int,
        mss: int,
        *,
        max_segments: int = MAX_SEGMENTS,
        udp: bool = False,
    ) -> int:
        """A super-packet at buf[ip:end] (IPv4 or IPv6, TCP header at l4; with `udp`, a
        UDP header: a UDP GSO packet) whose datagrams start with the prefix
        buf[start:ip] (backend headers, inner Ethernet). Returns the number of
        segments (0: nothing to cut: malformed). The headers in buf are rewritten
        (see the class)."""
        thl = UDP_HLEN if udp else (buf[l4 + 12] >> 4) << 2
        data = l4 + thl
        if mss <= 0 or (thl < 20 and not udp) or data >= end or not start <= ip < l4:
            return 0
        row = data - start + mss
        per_batch = min(max_segments, min(self.capacity, MAX_SEND_BYTES) // row)
        version = buf[ip] >> 4
        if per_batch < 1 or version not in (4, 6):
            return 0
        if self._src is None or self._src_of is not buf:
            self._src = np.frombuffer(buf, dtype=np.uint8)
            self._src_of = buf
        self._start, self._ip, self._l4, self._data, self._end = start, ip, l4, data, end
        self._mss = mss
        self.row = row
        self.per_batch = per_batch
        self.per_fill = self.capacity // row // per_batch * per_batch
        self.segments = -(-(end - data) // mss)
        self._v4 = version == 4
        if self._v4:
            ihl = (buf[ip] & 15) << 2
            self._ip_id = (buf[ip + 4] << 8) | buf[ip + 5]
            tot_len = data - ip + mss
            buf[ip + 2 : ip + 4] = tot_len.to_bytes(2, "big")
            buf[ip + 4 : ip + 6] = b"\0\0"
            buf[ip + 10 : ip + 12] = b"\0\0"
            # The header's sum without the ID; the checksum of segment i is
            # ~(ip_sum + id_i), the last one's also with its own length.
            words = struct.unpack_from(f"!{ihl // 2}H", buf, ip)
            self._ip_sum = sum(words)
            addr = sum(words[6:10])
        else:
            buf[ip + 4 : ip + 6] = (l4 - ip - 40 + thl + mss).to_bytes(2, "big")
            addr = sum(struct.unpack_from("!16H", buf, ip + 8))
        self._udp = udp
        if udp:
            # UDP: the length field of a full datagram (the last one's is set in fill),
            # the checksum field zero; the pseudo-header as for TCP, protocol 17.
            buf[l4 + 4 : l4 + 6] = (thl + mss).to_bytes(2, "big")
            buf[l4 + 6] = buf[l4 + 7] = 0
            self._pseudo = addr + 17 + thl + mss
            self._csum_at = l4 - start + 6
            return self.segments
        # TCP pseudo-header (addresses, protocol, a full segment's length) as a
        # sum of little-endian words: the rows are summed as native words (see fill).
        self._pseudo = addr + 6 + thl + mss
        self._csum_at = l4 - start + 16
        self._seq = int.from_bytes(buf[l4 + 4 : l4 + 8], "big")
        self._flags = flags = buf[l4 + 13]
        buf[l4 + 13] = flags & ~(TCP_CWR | TCP_FIN | TCP_PSH)
        buf[l4 + 16] = buf[l4 + 17] = 0
        return self.segments

    def fill(self, first: int, count: int) -> int:
        """Segments first..first+count-1 into `out`, back to back; returns the bytes to send."""
        src = self._src
        assert src is not None
        start, ip, l4, data, end, mss = (
            self._start, self._ip, self._l4, self._data, self._end, self._mss,
        )  # fmt: skip
        row = self.row
        hdrs = data - start
        a = ip - start  # inner IP header in a row
        t = l4 - start  # TCP header in a row
        c = self._csum_at  # the transport checksum in a row
        key = (count, row, a, t, c, self._v4, self._udp)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 64:
                self._views.clear()
            views = self._views[key] = _FillViews(
                self._arr, count, row, a, t, c, self._v4, self._udp
            )
        rows = views.rows
        rows[:, :hdrs] = src[start:data]
        lo = data + first * mss
        hi = min(end, lo + count * mss)
        full = (hi - lo) // mss
        if full:
            rows[:full, hdrs:] = src[lo : lo + full * mss].reshape(full, mss)
        rest = hi - lo - full * mss  # payload of a short last segment (0: none)
        if rest:
            rows[full, hdrs : hdrs + rest] = src[lo + full * mss : hi]
            rows[full, hdrs + rest :] = 0
        last = count - 1
        short = mss - rest if rest else 0  # how much shorter the last row is
        index = self._index[first : first + count]
        if self._v4:
            assert views.ip_id is not None and views.ip_csum is not None
            ids = index + self._ip_id
            if self._ip_id + first + count > 0xFFFF:
                ids &= 0xFFFF
            views.ip_id[:] = ids
            # ~fold(x) for x > 0 is 0xFFFF - ((x - 1) % 0xFFFF + 1).
            ip_csum = ids + (self._ip_sum - 1)
            ip_csum %= 0xFFFF
            np.subtract(0xFFFE, ip_csum, out=views.ip_csum, casting="unsafe")
            if short:
                length = data - ip + rest
                rows[last, a + 2 : a + 4].view(">u2")[0] = length
                fixed = _fold(self._ip_sum - short + int(ids[last]))
                rows[last, a + 10 : a + 12].view(">u2")[0] = 0xFFFF - fixed
        elif short:
            plen = l4 - ip - 40 + data - l4 + rest
            rows[last, a + 4 : a + 6].view(">u2")[0] = plen
        if self._udp:
            if short:
                rows[last, t + 4 : t + 6].view(">u2")[0] = UDP_HLEN + rest
        else:
            assert views.seq is not None
            seq = index * mss
            seq += self._seq
            views.seq[:] = seq  # uint32: wraps as TCP's does
            # tcp_gso_segment: CWR stays on the first segment, FIN and PSH on the last.
            flags = self._flags
            if first == 0:
                rows[0, t + 13] = flags & ~(TCP_FIN | TCP_PSH) if self.segments > 1 else flags
            if first + count == self.segments:
                rows[last, t + 13] = flags & ~TCP_CWR if self.segments > 1 else flags
        out = views.csum
        if views.words is not None:
            # Rows summed as native (little-endian) words: a one's complement sum in
            # swapped byte order is the swapped sum (RFC 1071), so the pseudo-header
            # goes in swapped, and the result is stored little-endian.
            sums = views.words.sum(axis=1, dtype=np.uint32)
            pseudo = _swap16(_fold(self._pseudo))
            csum = sums + (pseudo - 1)
            csum %= 0xFFFF
            np.subtract(0xFFFE, csum, out=out, casting="unsafe")
            if short:
                pseudo = _swap16(_fold(self._pseudo - short))
                out[last] = 0xFFFF - _fold(int(sums[last]) + pseudo)
        else:
            tail = rows[:, t:]
            sums = (tail[:, 0::2].sum(axis=1, dtype=np.int64) << 8) + tail[:, 1::2].sum(
                axis=1, dtype=np.int64
            )
            lengths = np.full(count, self._pseudo, dtype=np.int64)
            lengths[last] -= short
            csum = (sums + lengths - 1) % 0xFFFF
            out[:] = 0xFFFE - csum
        if self._udp:
            out[out == 0] = 0xFFFF  # UDP sends a computed 0 as all ones (0: no checksum)
        return count * row - short

    def sends(self, nbytes: int) -> Iterator[tuple[memoryview, int]]:
        """`out[:nbytes]` (what `fill` made) as (bytes, datagrams) for one sendmsg each."""
        step = self.per_batch * self.row
        for off in range(0, nbytes, step):
            chunk = min(step, nbytes - off)
            yield self.view[off : off + chunk], -(-chunk // self.row)


def complete_checksums(
    buf: bytearray,
    base: int,
    size: int,
    count: int,
    stop: int,
    csum_start: int,
    csum_offset: int,
) -> None:
    """What NEEDS_CSUM asks (vnet.complete_checksum) for `count` datagrams at once:
    datagram i at buf[base + i * size:], every one `size` bytes long but the last,
    which ends at `stop`; in each, the one's complement sum runs from `csum_start`
    to its end, and the checksum field (holding the pseudo-header sum) is at
    csum_start + csum_offset. A result of 0 is stored as 0xFFFF, as the kernel does.

    All but the last are the rows of a strided view, summed in one numpy call; the
    last (its length may differ) goes through vnet.complete_checksum. Nothing
    outside the datagrams is read or written (the next packet may already sit at
    `stop`)."""
    full = count - 1
    if full:
        span = size - csum_start  # bytes summed in a row
        rows = np.ndarray((full, span >> 1), ">u2", buf, base + csum_start, (size, 2))
        sums = rows.sum(axis=1, dtype=np.uint64)
        if span & 1:
            # A row's odd last byte is the high half of a word whose low half is zero.
            odd = np.ndarray((full,), np.uint8, buf, base + size - 1, (size,))
            sums += odd.astype(np.uint64) << np.uint64(8)
        folded = sums % np.uint64(0xFFFF)
        # ~fold(total) is 0xFFFF - (total mod 0xFFFF); a total ≡ 0 (fold 0xFFFF) gives
        # 0, stored as 0xFFFF.
        field = np.ndarray((full,), ">u2", buf, base + csum_start + csum_offset, (size,))
        field[:] = np.where(folded == 0, 0xFFFF, 0xFFFF - folded)
    last = base + full * size
    complete_checksum(memoryview(buf)[last:stop], csum_start, csum_offset)
