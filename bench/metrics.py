"""What the dataplane benchmark reports: one entry per metric, used by the JSON,
the markdown tables and the charts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str = "{:.2f}"


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("tcp1_gbps", "TCP 1 stream", "Gbit/s", True),
        Metric("tcp4_gbps", "TCP 4 streams", "Gbit/s", True),
        Metric("udp64_kpps", "UDP 64 B received", "kpps", True, "{:.0f}"),
        Metric("udp64_loss_pct", "UDP 64 B loss", "%", False, "{:.1f}"),
        Metric("ping_p50_ms", "ping RTT p50", "ms", False, "{:.3f}"),
        Metric("ping_p99_ms", "ping RTT p99", "ms", False, "{:.3f}"),
        Metric("ping_loss_pct", "ping loss", "%", False, "{:.1f}"),
        Metric("rr_per_s", "TCP 1-byte request/response", "trans/s", True, "{:.0f}"),
        Metric("rr_p50_ms", "TCP request/response RTT p50", "ms", False, "{:.3f}"),
        Metric("udp_rr_per_s", "UDP 4-byte request/response", "trans/s", True, "{:.0f}"),
        Metric("udp_rr_p50_ms", "UDP request/response RTT p50", "ms", False, "{:.3f}"),
        Metric("tcp1_weft_cpu_s_per_gb", "forwarder processes CPU per GB (TCP 1)", "s/GB", False),
        Metric(
            "tcp1_weft_user_cpu_s_per_gb",
            "forwarder processes user-space CPU per GB (TCP 1)",
            "s/GB",
            False,
        ),
        Metric("tcp1_machine_cpu_s_per_gb", "machine CPU per GB (TCP 1)", "s/GB", False),
        Metric(
            "udp64_weft_cpu_s_per_mpkt",
            "forwarder processes CPU per Mpkt (UDP 64 B)",
            "s/Mpkt",
            False,
        ),
        Metric(
            "udp64_weft_user_cpu_s_per_mpkt",
            "forwarder processes user-space CPU per Mpkt (UDP 64 B)",
            "s/Mpkt",
            False,
        ),
        Metric("udp64_machine_cpu_s_per_mpkt", "machine CPU per Mpkt (UDP 64 B)", "s/Mpkt", False),
        Metric(
            "tcp1_wire_bytes_per_payload",
            "wire bytes per payload byte (TCP 1)",
            "B/B",
            False,
            "{:.3f}",
        ),
        Metric(
            "udp64_wire_frame_bytes", "frame size on the underlay (UDP 64 B)", "B", False, "{:.1f}"
        ),
        Metric("tcp1_retransmits", "TCP 1 stream retransmits", "segments", False, "{:.0f}"),
        Metric("udp64_sent_kpps", "UDP 64 B sent by iperf3", "kpps", True, "{:.0f}"),
        Metric(
            "udp64_lost_pod_socket_pct",
            "at the receiving pod's socket (buffer full)",
            "%",
            False,
            "{:.1f}",
        ),
        Metric(
            "udp64_lost_node_socket_pct",
            "at the receiving node's UDP socket",
            "%",
            False,
            "{:.1f}",
        ),
        Metric("udp64_lost_devices_pct", "in the nodes' device queues", "%", False, "{:.1f}"),
        Metric("udp64_lost_weft_pct", "dropped by weft (counted)", "%", False, "{:.1f}"),
    )
}

#: The columns of the main table, in order.
HEADLINE = (
    "tcp1_gbps",
    "tcp4_gbps",
    "udp64_kpps",
    "udp64_loss_pct",
    "ping_p50_ms",
    "ping_p99_ms",
    "rr_per_s",
    "udp_rr_per_s",
)
#: Where the UDP 64 B datagrams that did not arrive were lost, % of those sent.
LOSSES = (
    "udp64_loss_pct",
    "udp64_lost_pod_socket_pct",
    "udp64_lost_node_socket_pct",
    "udp64_lost_devices_pct",
    "udp64_lost_weft_pct",
)
COST = (
    "tcp1_weft_cpu_s_per_gb",
    "tcp1_weft_user_cpu_s_per_gb",
    "tcp1_machine_cpu_s_per_gb",
    "udp64_weft_cpu_s_per_mpkt",
    "udp64_weft_user_cpu_s_per_mpkt",
    "udp64_machine_cpu_s_per_mpkt",
    "tcp1_wire_bytes_per_payload",
    "udp64_wire_frame_bytes",
    "tcp1_retransmits",
)
