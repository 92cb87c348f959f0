"""Batched socket system calls through ctypes: recvmmsg with a UDP_GRO cmsg per message.

Python's socket module has recvmsg but not recvmmsg. One `recvmmsg` call
fills up to `slots` messages; each message lands in its own fixed slot of one
preallocated buffer, with its source address and, when the socket has UDP_GRO
on, the segment size of a coalesced message (the kernel's UDP GRO glues
same-size datagrams of one flow together and says how to cut them apart).

The message headers, addresses and control buffers live in ctypes arrays
that are allocated once; after a call the lengths, sizes and addresses are
read through memoryview casts (one list per batch, not one ctypes attribute
access per field). Linux only; `available()` says whether libc has recvmmsg.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct

import numpy as np

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: UDP GSO, the segment size for a send
UDP_GRO = 104  # linux/udp.h: receive coalesced datagrams, the segment size in a cmsg
MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
MSG_CTRUNC = 0x08

SLOT_SIZE = 65536 + 64  # one GRO message can hold up to 64 KiB of datagrams


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


class _SockaddrIn(ctypes.Structure):
    _fields_ = (
        ("sin_family", ctypes.c_ushort),
        ("sin_port", ctypes.c_uint16),  # network byte order
        ("sin_addr", ctypes.c_uint8 * 4),
        ("sin_zero", ctypes.c_uint8 * 8),
    )


# struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } + an int, aligned.
_CMSG_HDR = ctypes.sizeof(ctypes.c_size_t) + 8
_CMSG_SPACE_INT = _CMSG_HDR + ctypes.sizeof(ctypes.c_size_t)  # CMSG_SPACE(sizeof(int))
_CMSG_LEVEL_AT = ctypes.sizeof(ctypes.c_size_t)  # cmsg_level, then cmsg_type

_libc: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            fn = lib.recvmmsg
        except (OSError, AttributeError):
            return None
        fn.argtypes = (
            ctypes.c_int,
            ctypes.POINTER(_Mmsghdr),
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_void_p,
        )
        fn.restype = ctypes.c_int
        _libc = lib
    return _libc


def available() -> bool:
    return _load() is not None


def enable_udp_gro(sock: socket.socket) -> None:
    """UDP_GRO on: recv may return many same-size datagrams glued, with their size in a cmsg.
    Raises OSError (ENOPROTOOPT before Linux 5.0)."""
    sock.setsockopt(SOL_UDP, UDP_GRO, 1)


class MmsgReceiver:
    """recvmmsg into `slots` fixed slots of one buffer.

        n = rx.receive(fd)            # messages received (0: nothing queued)
        rx.lengths[i], rx.segment_sizes[i], rx.sources[i], rx.ports[i]   # for i < n
        rx.buf[rx.offsets[i] : rx.offsets[i] + rx.lengths[i]]

    segment_sizes[i] is the UDP GRO segment size, or the message length when
    the message is a single datagram. `truncated[i]` is True when a datagram
    did not fit its slot (the kernel cut it).
    """

    def __init__(self, slots: int = 32, slot_size: int = SLOT_SIZE, *, shift: int = 0) -> None:
        lib = _load()
        if lib is None:
            raise OSError(errno.ENOSYS, "libc has no recvmmsg")
        self._recvmmsg = lib.recvmmsg
        self.slots = slots
        self.slot_size = slot_size
        # A little tail room: readers may look a few bytes past a message's end.
        self.buf = bytearray(slots * slot_size + 256)
        if not 0 <= shift < 64:
            raise ValueError("shift must be 0..63")
        # Each message lands `shift` bytes into its slot, so a reader can choose how
        # the datagrams' fields align (the fast path's checksum sums want the inner
        # TCP checksum range 4-byte aligned).
        self.offsets = [i * slot_size + shift for i in range(slots)]
        self._cbuf = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)
        base = ctypes.addressof(self._cbuf)
        self._iov = (_Iovec * slots)()
        self._names = (_SockaddrIn * slots)()
        self._control = (ctypes.c_char * (_CMSG_SPACE_INT * slots))()
        self._msgs = (_Mmsghdr * slots)()
        for i in range(slots):
            self._iov[i].iov_base = base + self.offsets[i]
            self._iov[i].iov_len = slot_size - shift
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = ctypes.addressof(self._names[i])
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1
            hdr.msg_control = ctypes.addressof(self._control) + i * _CMSG_SPACE_INT
        self._msgs_ptr = ctypes.cast(self._msgs, ctypes.POINTER(_Mmsghdr))
        # Views over the arrays, for reading all results at once and resetting
        # the in/out fields (namelen, controllen) before the next call.
        stride = ctypes.sizeof(_Mmsghdr)
        self._msg_raw = memoryview(self._msgs).cast("B")
        self._stride = stride
        self._off_namelen = _Msghdr.msg_namelen.offset
        self._off_controllen = _Msghdr.msg_controllen.offset
        self._off_flags = _Msghdr.msg_flags.offset
        self._off_len = _Mmsghdr.msg_len.offset
        self._size_t = "Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "I"
        # One message's results, read straight from the raw arrays (ctypes attribute
        # access makes an object per field): msg_controllen and msg_flags, msg_len;
        # the peer's port and address.
        self._hdr_fields = struct.Struct(f"={self._size_t}i")
        assert self._off_flags == self._off_controllen + ctypes.sizeof(ctypes.c_size_t)
        self._u32 = struct.Struct("=I")
        self._name_fields = struct.Struct("!H4s")
        self._names_raw = memoryview(self._names).cast("B")
        self._name_size = ctypes.sizeof(_SockaddrIn)
        self._reset_template = memoryview(bytes(self._msg_raw))  # namelen/controllen as set above
        # The kernel writes back the in/out fields of the messages it fills only, so
        # only those slots (and one more, for safety) are reset before the next call.
        self._dirty = slots
        self._slot0 = memoryview(self.buf)[self.offsets[0] : self.offsets[0] + slot_size - shift]
        self._ancbufsize = socket.CMSG_SPACE(4)
        self._native_int = struct.Struct("=i")
        self._addr_cache: dict[int | bytes, str] = {}
        self._control_raw = memoryview(self._control).cast("B")
        # numpy views over the ctypes arrays: one field of every message at once.
        msgs_buf, names_buf, ctl_buf = self._msgs, self._names, self._control
        count = (slots,)
        self._views = {
            "len": np.ndarray(count, np.uint32, msgs_buf, self._off_len, (stride,)),
            "flags": np.ndarray(count, np.int32, msgs_buf, self._off_flags, (stride,)),
            "controllen": np.ndarray(
                count, np.uint64 if self._size_t == "Q" else np.uint32, msgs_buf,
                self._off_controllen, (stride,),
            ),
            "level": np.ndarray(count, np.int32, ctl_buf, _CMSG_LEVEL_AT, (_CMSG_SPACE_INT,)),
            "type": np.ndarray(count, np.int32, ctl_buf, _CMSG_LEVEL_AT + 4, (_CMSG_SPACE_INT,)),
            "value": np.ndarray(count, np.int32, ctl_buf, _CMSG_HDR, (_CMSG_SPACE_INT,)),
            "addr": np.ndarray(count, ">u4", names_buf, 4, (ctypes.sizeof(_SockaddrIn),)),
            "port": np.ndarray(count, ">u2", names_buf, 2, (ctypes.sizeof(_SockaddrIn),)),
        }  # fmt: skip
        self.lengths: list[int] = []
        self.segment_sizes: list[int] = []
        self.sources: list[str] = []
        self.ports: list[int] = []
        self.truncated: list[bool] = []
        #: For batches of more than 4 messages, the same as numpy arrays (int64), and
        #: a peer key per message (address << 16 | port); None after a small batch.
        self.np_offsets = np.array(self.offsets, dtype=np.int64)
        self.np_lengths: np.ndarray | None = None
        self.np_sizes: np.ndarray | None = None
        self.np_peers: np.ndarray | None = None
        self.any_truncated = False
        self._reset()

    def _reset(self) -> None:
        raw, stride = self._msg_raw, self._stride
        for i in range(self.slots):
            struct.pack_into("I", raw, i * stride + self._off_namelen, ctypes.sizeof(_SockaddrIn))
            struct.pack_into(self._size_t, raw, i * stride + self._off_controllen, _CMSG_SPACE_INT)
        self._reset_template = memoryview(bytes(raw))

    def receive(self, fd: int) -> int:
        """One recvmmsg; returns the number of messages (0 when none were queued).

        Other errors (an ICMP error queued on the socket, ENOMEM) raise OSError.
        Fewer messages than slots means the socket's queue was empty when read."""
        dirty = self._dirty
        if dirty:
            end = dirty * self._stride
            self._msg_raw[:end] = self._reset_template[:end]
            self._dirty = 0
        n = self._recvmmsg(fd, self._msgs_ptr, self.slots, MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            self._dirty = 1
            raise OSError(err, os.strerror(err))
        self._dirty = min(n + 1, self.slots)
        if n <= 4:
            self._parse_few(n)
            self.np_lengths = self.np_sizes = self.np_peers = None
            return n
        v = self._views
        lengths = v["len"][:n].astype(np.int64)
        self.np_lengths = lengths
        self.lengths = lengths.tolist()
        gro = np.where(
            (v["controllen"][:n] >= _CMSG_HDR + 4)
            & (v["level"][:n] == SOL_UDP)
            & (v["type"][:n] == UDP_GRO)
            & (v["value"][:n] > 0),
            v["value"][:n],
            v["len"][:n],
        )
        self.np_sizes = gro.astype(np.int64)
        self.segment_sizes = gro.tolist()
        truncated = (v["flags"][:n] & MSG_TRUNC) != 0
        self.any_truncated = bool(truncated.any())
        self.truncated = truncated.tolist()
        ports = v["port"][:n]
        self.np_peers = v["addr"][:n].astype(np.int64) << 16 | ports
        self.ports = ports.tolist()
        cache = self._addr_cache
        if len(cache) >= 4096:  # spoofed floods must not grow it without bound
            cache.clear()
        sources = []
        for addr in v["addr"][:n].tolist():
            src = cache.get(addr)
            if src is None:
                src = cache[addr] = socket.inet_ntoa(addr.to_bytes(4, "big"))
            sources.append(src)
        self.sources = sources
        return n

    def receive_one(self, sock: socket.socket) -> int:
        """One message into slot 0 with Python's own recvmsg_into: 1, or 0 when none
        was queued; the same fields as receive() fills. After an idle gap a ctypes
        call runs cold (argument conversion, libffi) and costs a lone datagram more
        than the system call does; this path is C all the way to the kernel."""
        try:
            n, ancdata, flags, addr = sock.recvmsg_into(
                (self._slot0,), self._ancbufsize, MSG_DONTWAIT
            )
        except BlockingIOError:
            return 0
        gso = n
        for level, ctype, data in ancdata:
            if level == SOL_UDP and ctype == UDP_GRO and len(data) >= 4:
                value = self._native_int.unpack_from(data)[0]
                if value > 0:
                    gso = value
        self.lengths = [n]
        self.segment_sizes = [gso]
        self.sources = [addr[0]]
        self.ports = [addr[1]]
        self.truncated = [bool(flags & MSG_TRUNC)]
        self.np_lengths = self.np_sizes = self.np_peers = None
        return 1

    def _parse_few(self, n: int) -> None:
        """The results of a small batch, field by field (numpy's per-call cost would
        dominate: one datagram per wakeup is common when nothing is batched upstream)."""
        raw, stride = self._msg_raw, self._stride
        hdr_fields, u32 = self._hdr_fields.unpack_from, self._u32.unpack_from
        names, name_size = self._names_raw, self._name_size
        name_fields = self._name_fields.unpack_from
        off_controllen, off_len = self._off_controllen, self._off_len
        control = self._control_raw
        cache = self._addr_cache
        lengths: list[int] = []
        sizes: list[int] = []
        sources: list[str] = []
        ports: list[int] = []
        truncated: list[bool] = []
        for i in range(n):
            at = i * stride
            (length,) = u32(raw, at + off_len)
            controllen, flags = hdr_fields(raw, at + off_controllen)
            gso = length
            if controllen >= _CMSG_HDR + 4:
                level, ctype, value = struct.unpack_from(
                    "iii", control, i * _CMSG_SPACE_INT + _CMSG_LEVEL_AT
                )
                if level == SOL_UDP and ctype == UDP_GRO and value > 0:
                    gso = value
            port, addr = name_fields(names, i * name_size + 2)
            src = cache.get(addr)
            if src is None:
                if len(cache) >= 4096:
                    cache.clear()
                src = cache[addr] = socket.inet_ntoa(addr)
            lengths.append(length)
            sizes.append(gso)
            sources.append(src)
            ports.append(port)
            truncated.append(bool(flags & MSG_TRUNC))
        self.lengths, self.segment_sizes, self.sources = lengths, sizes, sources
        self.ports, self.truncated = ports, truncated
