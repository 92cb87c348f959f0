"""TCP segmentation in userspace, and sending many datagrams with one UDP_SEGMENT sendmsg.

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

The last row's payload is padded with zeros to a full row: zeros do not
change a one's complement sum, and the padding is past the bytes sent.

One sendmsg takes at most MAX_SEGMENTS datagrams (the kernel's
UDP_MAX_SEGMENTS, 64 before Linux 6.10) and at most MAX_SEND_BYTES (the
64 KiB IP limit); a super-packet that needs more is cut in several batches.
"""

from __future__ import annotations

import socket
import struct

import numpy as np

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: the segment size for a send (socket option or cmsg)
#: UDP_MAX_SEGMENTS (1 << 6) in Linux before 6.10; later kernels take 128.
MAX_SEGMENTS = 64
#: An IPv4 datagram's payload is at most 65535 - 20 (IP) - 8 (UDP) bytes.
MAX_SEND_BYTES = 65535 - 20 - 8

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


def _fold(sums: np.ndarray) -> np.ndarray:
    """One's complement fold of 64-bit sums down to 16 bits (still as int64)."""
    sums = (sums & 0xFFFF) + (sums >> 16)
    sums = (sums & 0xFFFF) + (sums >> 16)
    return (sums & 0xFFFF) + (sums >> 16)


class Segmenter:
    """Cuts TCP super-packets into datagram payloads in one preallocated buffer.

    For one super-packet: `start(...)` once, then `fill(first, count)` for each
    batch of segments; after `fill`, `out[:nbytes]` holds `count` datagram
    payloads of `row` bytes each (the last may be shorter), to send with
    UDP_SEGMENT size `row`.
    """

    def __init__(self, capacity: int = MAX_SEND_BYTES) -> None:
        self.capacity = capacity
        self.out = bytearray(capacity)
        self.view = memoryview(self.out)
        self._arr = np.frombuffer(self.out, dtype=np.uint8)
        self.row = 0  # bytes per datagram payload (the UDP_SEGMENT size)
        self.segments = 0  # segments the current super-packet makes
        self.per_batch = 0  # at most this many segments per fill / sendmsg
        self._src: np.ndarray | None = None
        self._src_of: bytearray | None = None
        self._index = np.arange(65536, dtype=np.int64)  # segment numbers (≤ 64 KiB / 1)

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
    ) -> int:
        """A super-packet at buf[ip:end] (IPv4 or IPv6, TCP header at l4) whose datagrams
        start with the prefix buf[start:ip] (backend headers, inner Ethernet).
        Returns the number of segments (0: nothing to cut: not TCP, or malformed)."""
        thl = (buf[l4 + 12] >> 4) << 2
        data = l4 + thl
        if mss <= 0 or thl < 20 or data >= end or not start <= ip < l4:
            return 0
        if self._src is None or self._src_of is not buf:
            self._src = np.frombuffer(buf, dtype=np.uint8)
            self._src_of = buf
        self._start, self._ip, self._l4, self._data, self._end = start, ip, l4, data, end
        self._mss = mss
        hdrs = data - start
        self.row = row = hdrs + mss
        self.segments = -(-(end - data) // mss)
        self.per_batch = min(max_segments, self.capacity // row)
        if self.per_batch < 1:
            return 0
        version = buf[ip] >> 4
        self._v4 = version == 4
        if self._v4:
            ihl = (buf[ip] & 15) << 2
            words = struct.unpack_from(f"!{ihl // 2}H", buf, ip)
            # Everything but total length (1), ID (2) and the checksum (5).
            self._ip_base = sum(words) - words[1] - words[2] - words[5]
            self._ip_id = words[2]
            addr = struct.unpack_from("!4H", buf, ip + 12)
        elif version == 6:
            addr = struct.unpack_from("!16H", buf, ip + 8)
        else:
            return 0
        self._pseudo = sum(addr) + 6  # addresses + protocol TCP; the length per segment
        self._seq = int.from_bytes(buf[l4 + 4 : l4 + 8], "big")
        self._flags = buf[l4 + 13]
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
        rows = self._arr[: count * row].reshape(count, row)
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
        a = ip - start  # inner IP header in a row
        t = l4 - start  # TCP header in a row
        if self._v4:
            tot_len = data - ip + mss
            ids = (self._ip_id + index) & 0xFFFF
            csum = ~_fold(self._ip_base + tot_len + ids) & 0xFFFF
            if short:
                csum[last] = ~_fold_int(self._ip_base + tot_len - short + int(ids[last])) & 0xFFFF
            rows[:, a + 2 : a + 4].view(">u2")[:, 0] = tot_len
            rows[last, a + 2 : a + 4].view(">u2")[0] = tot_len - short
            rows[:, a + 4 : a + 6].view(">u2")[:, 0] = ids
            rows[:, a + 10 : a + 12].view(">u2")[:, 0] = csum
        else:
            plen = data - ip - 40 + mss
            rows[:, a + 4 : a + 6].view(">u2")[:, 0] = plen
            rows[last, a + 4 : a + 6].view(">u2")[0] = plen - short
        rows[:, t + 4 : t + 8].view(">u4")[:, 0] = (self._seq + index * mss) & 0xFFFFFFFF
        # tcp_gso_segment: CWR stays on the first segment, FIN and PSH on the last.
        flags = self._flags
        rows[:, t + 13] = flags & ~(TCP_CWR | TCP_FIN | TCP_PSH)
        if first == 0:
            rows[0, t + 13] = flags & ~(TCP_FIN | TCP_PSH) if self.segments > 1 else flags
        if first + count == self.segments:
            rows[last, t + 13] = flags & ~TCP_CWR if self.segments > 1 else flags
        rows[:, t + 16 : t + 18] = 0
        sums = self._row_sums(rows, t)
        tcp_len = data - l4 + mss
        tcp_csum = ~_fold(sums + (self._pseudo + tcp_len)) & 0xFFFF
        if short:
            tcp_csum[last] = ~_fold_int(int(sums[last]) + self._pseudo + tcp_len - short) & 0xFFFF
        rows[:, t + 16 : t + 18].view(">u2")[:, 0] = tcp_csum
        return count * row - short

    @staticmethod
    def _row_sums(rows: np.ndarray, t: int) -> np.ndarray:
        """Sum of the big-endian 16-bit words of rows[:, t:] (folded to 16 bits, as int64)."""
        row = rows.shape[1]
        if t % 2 == 0 and row % 2 == 0:
            # Native (little-endian on x86) words: a one's complement sum in swapped
            # byte order is the swapped sum (RFC 1071), so fold, then swap back.
            # uint32 accumulates fast and cannot overflow: a row is < 64 KiB.
            words = rows.view(np.uint16)[:, t // 2 :]
            s = _fold(words.sum(axis=1, dtype=np.uint32).astype(np.int64))
            if np.little_endian:
                s = ((s & 0xFF) << 8) | (s >> 8)
            return s
        tail = rows[:, t:]
        return _fold(
            (tail[:, 0::2].sum(axis=1, dtype=np.int64) << 8)
            + tail[:, 1::2].sum(axis=1, dtype=np.int64)
        )


def _fold_int(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total
