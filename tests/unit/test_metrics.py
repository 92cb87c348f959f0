from control.metrics import render_metrics


def test_metrics_text_has_counters_drops_batches_and_control_stats() -> None:
    status = {
        "backend": "vxlan",
        "ready": True,
        "lease_expires_in": 86000,
        "peers": [{"subnet": "10.244.2.0/24"}],
        "counters": {
            "tx_packets": 5,
            "tx_bytes": 500,
            "rx_packets": 4,
            "rx_bytes": 400,
            "icmp_sent": 1,
            "drops": {"wrong_vni": 3},
            "batches": {
                "device": {"batches": 2, "packets": 5},
                "network": {"batches": 4, "packets": 4},
            },
        },
        "control": {"watch_resyncs": 1, "route_updates": 2},
    }
    text = render_metrics(status)
    for line in (
        'weft_packets_total{direction="tx",backend="vxlan"} 5',
        'weft_bytes_total{direction="rx",backend="vxlan"} 400',
        'weft_drops_total{reason="wrong_vni"} 3',
        'weft_batches_total{source="device"} 2',
        'weft_batch_packets_total{source="device"} 5',
        "weft_peers 1",
        "weft_lease_expiry_seconds 86000",
        "weft_watch_resyncs_total 1",
        "weft_route_updates_total 2",
        "weft_ready 1",
    ):
        assert line in text.splitlines(), line
    # Every sample line belongs to a declared metric family.
    families = {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")}
    for ln in text.splitlines():
        if not ln.startswith("#"):
            assert ln.split("{")[0].split()[0] in families, ln


def test_metrics_count_queue_workers_when_there_are_queues() -> None:
    workers = [
        {"running": True, "ready": True},
        {"running": True, "ready": False},  # restarted, still starting
        {"running": False, "ready": False},
    ]
    queues = {"count": 4, "restarts": 2, "workers": workers}
    lines = render_metrics({"backend": "vxlan", "queues": queues}).splitlines()
    for line in ("weft_queues 4", "weft_queue_workers_running 2", "weft_queue_workers_ready 1",
                 "weft_queue_worker_restarts_total 2"):  # fmt: skip
        assert line in lines, line
    assert not [ln for ln in render_metrics({"backend": "vxlan"}).splitlines() if "queue" in ln]
