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

    def device_done(self, now: int, lone: bool) -> None:
        self.device_end = now
        self.device_lone = lone

    def network_done(self, now: int, lone: bool) -> None:
        self.network_end = now
        self.network_lone = lone
