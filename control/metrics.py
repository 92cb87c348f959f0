"""Prometheus text exposition of an agent's status (served at /metrics)."""

from __future__ import annotations

from typing import Any


def _line(out: list[str], name: str, value: float, labels: dict[str, str] | None = None) -> None:
    if labels:
        inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
        out.append(f"{name}{{{inner}}} {value}")
    else:
        out.append(f"{name} {value}")


def render_metrics(status: dict[str, Any]) -> str:
    out: list[str] = []
    backend = str(status.get("backend") or "")
    counters = status.get("counters") or {}
    out.append("# HELP weft_packets_total Packets forwarded, by direction.")
    out.append("# TYPE weft_packets_total counter")
    for direction in ("tx", "rx"):
        _line(
            out,
            "weft_packets_total",
            counters.get(f"{direction}_packets", 0),
            {"direction": direction, "backend": backend},
        )
    out.append("# HELP weft_bytes_total Inner bytes forwarded, by direction.")
    out.append("# TYPE weft_bytes_total counter")
    for direction in ("tx", "rx"):
        _line(
            out,
            "weft_bytes_total",
            counters.get(f"{direction}_bytes", 0),
            {"direction": direction, "backend": backend},
        )
    out.append("# HELP weft_drops_total Packets dropped, by reason.")
    out.append("# TYPE weft_drops_total counter")
    for reason, count in sorted((counters.get("drops") or {}).items()):
        _line(out, "weft_drops_total", count, {"reason": reason})
    batches = counters.get("batches") or {}
    if batches:
        out.append("# HELP weft_batches_total Reader wake-ups, by source (device or network).")
        out.append("# TYPE weft_batches_total counter")
        for source, b in sorted(batches.items()):
            _line(out, "weft_batches_total", b.get("batches", 0), {"source": source})
        out.append(
            "# HELP weft_batch_packets_total Packets taken by those wake-ups "
            "(÷ weft_batches_total = mean batch size)."
        )
        out.append("# TYPE weft_batch_packets_total counter")
        for source, b in sorted(batches.items()):
            _line(out, "weft_batch_packets_total", b.get("packets", 0), {"source": source})
    out.append("# HELP weft_icmp_sent_total ICMP errors written back to the device.")
    out.append("# TYPE weft_icmp_sent_total counter")
    _line(out, "weft_icmp_sent_total", counters.get("icmp_sent", 0))
    out.append("# HELP weft_peers Peers currently routed.")
    out.append("# TYPE weft_peers gauge")
    _line(out, "weft_peers", len(status.get("peers") or []))
    if status.get("lease_expires_in") is not None:
        out.append("# HELP weft_lease_expiry_seconds Seconds until our lease expires.")
        out.append("# TYPE weft_lease_expiry_seconds gauge")
        _line(out, "weft_lease_expiry_seconds", status["lease_expires_in"])
    control = status.get("control") or {}
    for key, help_text in (
        ("watch_resyncs", "Times the lease watch was re-listed after a break."),
        ("route_updates", "Peer routes added or removed."),
        ("lease_renewals", "Lease renewals."),
        ("foreign_values_skipped", "Keys or values in etcd that did not parse."),
    ):
        name = f"weft_{key}_total"
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} counter")
        _line(out, name, control.get(key, 0))
    queues = status.get("queues")
    if isinstance(queues, dict):
        workers = queues.get("workers") or []
        out.append("# HELP weft_queues Device queues (--queues), each served by a process.")
        out.append("# TYPE weft_queues gauge")
        _line(out, "weft_queues", queues.get("count", 1))
        out.append("# HELP weft_queue_workers_running Worker processes (queues 1…N-1) running.")
        out.append("# TYPE weft_queue_workers_running gauge")
        _line(out, "weft_queue_workers_running", sum(1 for w in workers if w.get("running")))
        out.append(
            "# HELP weft_queue_workers_ready Worker processes with their queue and socket "
            "open (a restarted one is running before it is ready)."
        )
        out.append("# TYPE weft_queue_workers_ready gauge")
        _line(out, "weft_queue_workers_ready", sum(1 for w in workers if w.get("ready")))
        out.append("# HELP weft_queue_worker_restarts_total Worker processes started again.")
        out.append("# TYPE weft_queue_worker_restarts_total counter")
        _line(out, "weft_queue_worker_restarts_total", queues.get("restarts", 0))
    out.append("# HELP weft_ready 1 once subnet.env is written.")
    out.append("# TYPE weft_ready gauge")
    _line(out, "weft_ready", 1 if status.get("ready") else 0)
    return "\n".join(out) + "\n"
