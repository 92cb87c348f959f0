"""When a callback's first packet is a lone one: a ping, a request, its answer.

After an idle gap every cold step costs a lone packet more than its system calls
(decisions §19), so the engine's two callbacks (device: the pod side; network: the
UDP socket) take such a packet alone: each returns to the loop after it instead of
a second read that finds nothing (readiness is level-triggered: a packet that came
meanwhile brings it back), and when the last receive callback also took one lone
datagram, the receive side reads it with one recvmsg_into instead of a ctypes
recvmmsg (MmsgReceiver.receive_one).

A callback starts after a gap when its own side did nothing for IDLE_NS and

- so did the other side (the engine did nothing: its last callback, either side,
  ended that long ago): under load one callback follows another and they batch as
  before, and a long one on one side (a run of TAP writes) does not make the other
  side look idle; or
- the other side's last callback took one lone packet after a gap: the answer to a
  request just sent (the ping's reply on the node that sent the echo, ~0.1 ms after
  it left), the reply to a request just received. Bulk traffic does not look so:
  its callbacks read super-packets and GRO messages, never one packet alone.

(Not after GRO messages: a bulk flow at a moderate rate also leaves gaps, and
reading its burst's first message alone would split a super-packet in two; a
1-byte request/response through weft here leaves gaps of ~0.3–0.5 ms.)

`KeepWarm` is --keep-warm's timer (decisions §34): on this kind of machine a lone
packet after ~10 ms of idleness finds a halted vCPU and weft's code out of the
caches, and each hop costs ~0.1 ms more than warm; waking for a pass over the
packet path every few milliseconds while traffic is sporadic avoids most of it.
It decides from the engine's running packet count alone, so the hot path does
nothing for it.

Pure: the engine passes monotonic nanoseconds in.
"""

from __future__ import annotations

IDLE_NS = 250_000


class IdleGaps:
    """Each side's last callback: when it ended, and whether it took one lone packet
    after a gap. (The engine was idle when both sides were.)"""

    __slots__ = ("device_end", "device_lone", "network_end", "network_lone")

    def __init__(self) -> None:
        self.device_end = self.network_end = 0
        self.device_lone = self.network_lone = False

    def device_idle(self, now: int) -> bool:
        """Does a device callback starting at `now` start after a gap?"""
        return now - self.device_end > IDLE_NS and (
            self.network_lone or now - self.network_end > IDLE_NS
        )

    def network_idle(self, now: int) -> bool:
        """Does a network callback starting at `now` start after a gap?"""
        return now - self.network_end > IDLE_NS and (
            self.device_lone or now - self.device_end > IDLE_NS
        )

    def state(self) -> tuple[int, bool, int, bool]:
        return self.device_end, self.device_lone, self.network_end, self.network_lone

    def restore(self, state: tuple[int, bool, int, bool]) -> None:
        """Back to `state` (a warm pass that took no packet is not a callback)."""
        self.device_end, self.device_lone, self.network_end, self.network_lone = state

    def device_done(self, now: int, lone: bool) -> None:
        self.device_end = now
        self.device_lone = lone

    def network_done(self, now: int, lone: bool) -> None:
        self.network_end = now
        self.network_lone = lone


#: --keep-warm USEC bounds: more often is nearly a busy poll, less often than every
#: 0.1 s leaves the caches cold anyway (a few ms of idleness does it here).
KEEP_WARM_MIN_US, KEEP_WARM_MAX_US = 200, 100_000
#: --keep-warm: warm passes go on this long after the engine last took a packet …
WARM_HOLD_NS = 1_000_000_000
#: … and after that the timer only looks for traffic this often (each wake-up of an
#: idle process costs ~0.1 ms of CPU here, so an idle node pays ~0.02 % of a CPU).
WARM_LOOK_NS = 500_000_000


class KeepWarm:
    """Each tick: was there traffic since the last one (the engine's running count of
    packets taken)? Then no pass is needed (the path just ran); if not, but there was
    within WARM_HOLD_NS, run a warm pass; tick again after `period_ns`, or after
    WARM_LOOK_NS once the node has been idle for longer than the hold."""

    __slots__ = ("last_traffic", "period_ns", "seen")

    def __init__(self, period_ns: int) -> None:
        self.period_ns = period_ns
        self.seen = 0
        self.last_traffic: int | None = None

    def tick(self, now: int, packets: int) -> tuple[bool, int]:
        """(run a warm pass now?, nanoseconds until the next tick)"""
        if packets != self.seen:
            self.seen = packets
            self.last_traffic = now
            return False, self.period_ns
        if self.last_traffic is not None and now - self.last_traffic < WARM_HOLD_NS:
            return True, self.period_ns
        return False, WARM_LOOK_NS


def warm_datagram(dst: bytes) -> bytes:
    """The made-up packet of a warm pass: a 28-byte IPv4/UDP datagram (port 9, no
    payload) to `dst` (4 bytes), for the forwarder to route and encapsulate."""
    ip = bytes((0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0)) + bytes(4) + dst
    return ip + bytes((0, 9, 0, 9, 0, 8, 0, 0))
