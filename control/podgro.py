"""UDP GRO forwarding on the pods' veths (`weft agent --pod-udp-gro`).

A pod's small UDP datagrams cost weft one TUN read each, unless the node merges
them first: GRO on the node's end of the pod's veth, with rx-udp-gro-forwarding
and a gro_flush_timeout, glues up to 64 datagrams of one flow into one UDP GSO
packet, which the TUN hands to weft whole (the `uso_read` fast path; numbers in
docs/decisions.md §10). The CNI bridge plugin makes a veth per pod and plugs it
into the bridge (cni0), so the agent looks at the bridge's ports every few
seconds and sets the knob on each new veth, once. A pod's TCP is not affected
(a veth hands TSO traffic to GRO only for UDP sockets' packets); a lone UDP
datagram may wait up to the flush timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("weft.podgro")

#: How long a merged packet stays open for more datagrams (20 µs, as the bench;
#: `--pod-udp-gro-flush-us`). A request/response over UDP pays it at both pods'
#: veths: 20 µs added ~0.02 ms to a round trip, 100 µs ~0.24 ms (decisions §10).
FLUSH_TIMEOUT_US = 20
FLUSH_TIMEOUT_NS = FLUSH_TIMEOUT_US * 1000
SCAN_INTERVAL_S = 2.0


def ports_to_tune(ports: list[tuple[int, str, str]], tuned: set[int]) -> list[tuple[int, str]]:
    """The bridge's veths not tuned yet, as (index, name); `tuned` forgets the
    indexes that left the bridge (a new pod may get an old index)."""
    present = {index for index, _, _ in ports}
    tuned &= present
    return [(index, name) for index, name, kind in ports if kind == "veth" and index not in tuned]


class PodGro:
    """Scans `bridge` and tunes its new veths; `tuned` holds their indexes."""

    def __init__(self, bridge: str, flush_timeout_ns: int = FLUSH_TIMEOUT_NS) -> None:
        self.bridge = bridge
        self.flush_timeout_ns = flush_timeout_ns
        self.tuned: set[int] = set()
        self.failed: set[int] = set()  # indexes whose failure was said (once each)

    def scan(self) -> list[str]:
        """One pass (blocking: run it in an executor); the names tuned in it."""
        from dataplane.io import netlink  # here: the CLI reads FLUSH_TIMEOUT_NS at start

        ports = netlink.bridge_ports(self.bridge)
        self.failed &= {index for index, _, _ in ports}
        done = []
        for index, name in ports_to_tune(ports, self.tuned):
            try:
                netlink.enable_udp_gro_forwarding(name, self.flush_timeout_ns)
            except netlink.NetlinkError as exc:
                if index not in self.failed:
                    self.failed.add(index)
                    log.warning("pod veth %s: UDP GRO forwarding not set: %s", name, exc)
                continue
            self.tuned.add(index)
            self.failed.discard(index)
            done.append(name)
        return done


async def run_pod_gro(
    bridge: str,
    stop: asyncio.Event,
    flush_timeout_ns: int = FLUSH_TIMEOUT_NS,
    interval_s: float = SCAN_INTERVAL_S,
) -> None:
    """Tune `bridge`'s veths until `stop` is set."""
    from dataplane.io import netlink

    pod_gro = PodGro(bridge, flush_timeout_ns)
    loop = asyncio.get_running_loop()
    log.info("UDP GRO forwarding on the veths of %s (flush timeout %d ns)", bridge,
             pod_gro.flush_timeout_ns)  # fmt: skip
    while not stop.is_set():
        try:
            names = await loop.run_in_executor(None, pod_gro.scan)
        except netlink.NetlinkError as exc:
            log.warning("scanning %s: %s", bridge, exc)
            names = []
        for name in names:
            log.info("pod veth %s: UDP GRO forwarding on", name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
