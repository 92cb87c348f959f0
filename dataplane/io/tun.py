"""TUN/TAP devices through ``/dev/net/tun`` with stdlib ioctls (no pytun).

    with open_tun("weft0") as tun:          # IFF_TUN | IFF_NO_PI, O_NONBLOCK
        loop.add_reader(tun.fileno(), on_readable)
        ...
        loop.remove_reader(tun.fileno())    # BEFORE close
    # tun.close() ran here

**The uvloop rule**: call ``loop.remove_reader(fd)`` (and ``remove_writer``)
*before* ``close()``.  uvloop aborts the whole process (SIGABRT, no traceback)
on the next loop iteration if a registered fd was closed.  For the same reason
``TunDevice`` has no ``__del__``: garbage collection never closes the fd
behind the loop's back — close it explicitly (or use ``with``).

The device is created in the network namespace of the *calling thread* (see
``control.lab.netns.in_netns``) and stays there.  Without a persistent flag
(TUNSETPERSIST is not used) the kernel deletes the interface when the last fd
is closed.  The fd is non-blocking: drain reads until ``BlockingIOError``;
use a buffer of at least MTU (65535 is safe) or packets are truncated.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

TUN_PATH = "/dev/net/tun"

# ioctl request numbers (linux/if_tun.h, _IOW/_IOR('T', n, int))
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETFEATURES = 0x800454CF
TUNSETQUEUE = 0x400454D9
TUNSETVNETHDRSZ = 0x400454D8
TUNGETSNDBUF = 0x800454D3
TUNSETSNDBUF = 0x400454D4

# ifr_flags
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NAPI = 0x0010
IFF_NAPI_FRAGS = 0x0020
IFF_NO_CARRIER = 0x0040
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# TUNSETOFFLOAD flags
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
#: Checksum offload and TCP segmentation, IPv4 and IPv6: what a device must take for
#: the kernel to hand it TCP super-packets (and, with the tunnel bits, to take them).
TSO_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, short flags, padding to 40 bytes


class TunError(OSError):
    """Opening or configuring a TUN/TAP device failed (one line, with errno)."""


def errno_text(exc: OSError) -> str:
    """'EINVAL: Invalid argument': the errno's name, which the kernel's sources use."""
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{name}: {exc.strerror or exc}"


def _error(exc: OSError, what: str) -> TunError:
    hint = ""
    if exc.errno == errno.ENOENT:
        hint = " (no /dev/net/tun: load the tun module or create the node c 10 200)"
    elif exc.errno in (errno.EPERM, errno.EACCES):
        hint = " (needs root or CAP_NET_ADMIN)"
    elif exc.errno == errno.EBUSY:
        hint = " (name in use by a device of another type or flags)"
    return TunError(exc.errno, f"{what}: {os.strerror(exc.errno or 0)}{hint}")


class TunDevice:
    """An open TUN/TAP queue: ``fd`` (non-blocking), ``name``, ``tap``."""

    __slots__ = ("_closed", "fd", "multi_queue", "name", "tap", "vnet_hdr")

    def __init__(
        self, fd: int, name: str, tap: bool, *, vnet_hdr: bool = False, multi_queue: bool = False
    ) -> None:
        self.fd = fd
        self.name = name
        self.tap = tap
        self.vnet_hdr = vnet_hdr
        self.multi_queue = multi_queue
        self._closed = False

    def fileno(self) -> int:
        if self._closed:
            raise ValueError(f"TUN device {self.name} is closed")
        return self.fd

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, bufsize: int = 65536) -> bytes:
        """One packet (TUN) or frame (TAP); ``BlockingIOError`` when none is queued."""
        return os.read(self.fd, bufsize)

    def write(self, packet: bytes | bytearray | memoryview) -> int:
        return os.write(self.fd, packet)

    def close(self) -> None:
        """Close the fd (idempotent).  With uvloop: ``remove_reader`` first!"""
        if self._closed:
            return
        self._closed = True
        os.close(self.fd)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "tap" if self.tap else "tun"
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"<TunDevice {kind} {self.name} {state}>"


def open_tun(
    name: str,
    *,
    tap: bool = False,
    vnet_hdr: bool = False,
    multi_queue: bool = False,
    napi: bool = False,
) -> TunDevice:
    """Create (or attach to) TUN/TAP device ``name`` in the calling thread's
    network namespace.  Flags: IFF_TUN or IFF_TAP, always IFF_NO_PI, plus
    IFF_VNET_HDR / IFF_MULTI_QUEUE / IFF_NAPI on request (IFF_NAPI: what is
    written is queued to the device's NAPI instance, which the kernel polls:
    in its own thread once the device is ``threaded``).  ``name`` may be a template
    such as ``"weft%d"``; the kernel's chosen name is returned in ``.name``.
    With ``multi_queue`` each call on the same name opens another queue.
    The device is not brought up and has no address (use netlink)."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise TunError(errno.EINVAL, f"bad interface name {name!r} (1..15 bytes)")
    flags = (IFF_TAP if tap else IFF_TUN) | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    if napi:
        flags |= IFF_NAPI
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _error(e, f"open {TUN_PATH}") from None
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, flags))
    except OSError as e:
        os.close(fd)
        raise _error(e, f"TUNSETIFF {name} flags={flags:#x}") from None
    actual = _IFREQ.unpack(res)[0].rstrip(b"\0").decode()
    return TunDevice(fd, actual, tap, vnet_hdr=vnet_hdr, multi_queue=multi_queue)


def set_offload(fd: int | TunDevice, flags: int) -> None:
    """TUNSETOFFLOAD: the offloads (``TUN_F_*``) this reader can accept.
    Only meaningful on a device opened with ``vnet_hdr=True`` (the kernel
    accepts it on others too)."""
    fd = fd.fileno() if isinstance(fd, TunDevice) else fd
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as e:
        raise _error(e, f"TUNSETOFFLOAD {flags:#x}") from None


def set_sndbuf(fd: int | TunDevice, size: int) -> None:
    """TUNSETSNDBUF: how many bytes of this queue's writes the kernel may hold before
    a write fails with EAGAIN (a TUN/TAP starts with no limit)."""
    fd = fd.fileno() if isinstance(fd, TunDevice) else fd
    try:
        fcntl.ioctl(fd, TUNSETSNDBUF, struct.pack("i", size))
    except OSError as e:
        raise _error(e, f"TUNSETSNDBUF {size}") from None


def get_sndbuf(fd: int | TunDevice) -> int:
    fd = fd.fileno() if isinstance(fd, TunDevice) else fd
    try:
        raw = fcntl.ioctl(fd, TUNGETSNDBUF, struct.pack("i", 0))
    except OSError as e:
        raise _error(e, "TUNGETSNDBUF") from None
    return int(struct.unpack("i", raw)[0])


def set_vnet_hdr_size(fd: int | TunDevice, size: int) -> None:
    """TUNSETVNETHDRSZ (10 by default; 12 for virtio_net_hdr_mrg_rxbuf)."""
    fd = fd.fileno() if isinstance(fd, TunDevice) else fd
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", size))
    except OSError as e:
        raise _error(e, f"TUNSETVNETHDRSZ {size}") from None


def set_queue(fd: int | TunDevice, attach: bool) -> None:
    """TUNSETQUEUE: attach/detach a multi-queue fd (IFF_ATTACH/DETACH_QUEUE)."""
    fd = fd.fileno() if isinstance(fd, TunDevice) else fd
    flags = IFF_ATTACH_QUEUE if attach else IFF_DETACH_QUEUE
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, _IFREQ.pack(b"", flags))
    except OSError as e:
        raise _error(e, f"TUNSETQUEUE {flags:#x}") from None


def features() -> int:
    """TUNGETFEATURES: the IFF_* flags this kernel's tun driver supports."""
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise _error(e, f"open {TUN_PATH}") from None
    try:
        buf = fcntl.ioctl(fd, TUNGETFEATURES, struct.pack("I", 0))
        return struct.unpack("I", buf)[0]
    except OSError as e:
        raise _error(e, "TUNGETFEATURES") from None
    finally:
        os.close(fd)
