"""`weft status` as text: what an operator reads, fast paths and busy polling included."""

from __future__ import annotations

from control.cli import render_status

STATUS = {
    "public_ip": "192.168.77.10",
    "subnet": "10.244.1.0/24",
    "backend": "vxlan",
    "device": "weft.1",
    "device_kind": "tun",
    "device_mtu": 1450,
    "vtep_mac": "02:77:00:00:00:01",
    "peers": [{"subnet": "10.244.2.0/24", "public_ip": "192.168.77.11", "vtep_mac": None}],
    "counters": {"tx_packets": 3, "tx_bytes": 300, "rx_packets": 2, "rx_bytes": 200,
                 "icmp_sent": 0, "drops": {"no_route": 1}},
    "offload": {"mode": "auto", "on": ["tso_read", "udp_segment"],
                "off": {"tunnel_gso": "net.ipv4.conf.all.rp_filter=2 would drop …"}},
    "busy_poll_us": 2000,
    "placement": "CPU 0; egress work on CPU 1-3 (RPS)",
    "gc": {"frozen": 41502, "collections": [70, 6, 1], "total_ms": [17.0, 14.0, 0.2],
           "longest_ms": [0.9, 2.6, 0.208]},
}  # fmt: skip


def test_status_text_names_the_fast_paths_and_busy_polling() -> None:
    text = render_status(STATUS)
    assert "node 192.168.77.10  subnet 10.244.1.0/24  backend vxlan  device weft.1" in text
    assert "10.244.2.0/24        192.168.77.11    -" in text
    assert "drops: no_route 1" in text
    assert "fast paths (auto): tso_read, udp_segment" in text
    assert "  tunnel_gso off: net.ipv4.conf.all.rp_filter=2" in text
    assert "busy polling: 2000 µs" in text
    assert "cpus: CPU 0; egress work on CPU 1-3 (RPS)" in text
    assert (
        "gc: 41502 objects frozen at start-up; collections since (generation 0/1/2) "
        "70/6/1, longest 0.9/2.6/0.208 ms"
    ) in text


def test_status_text_of_a_kernel_mode_node_has_no_fast_path_lines() -> None:
    kernel = {
        k: v for k, v in STATUS.items() if k not in ("offload", "busy_poll_us", "placement", "gc")
    }
    kernel["counters"] = {}
    text = render_status(kernel)
    assert "drops: none" in text and "fast paths" not in text and "busy" not in text
    assert "cpus" not in text


def test_status_text_puts_paths_off_for_one_reason_on_one_line() -> None:
    hostgw = dict(STATUS, backend="host-gw")
    why = "vxlan and udp only (host-gw moves no datagrams)"
    hostgw["offload"] = {
        "mode": "auto",
        "on": ["tso_read", "packet_gso"],
        "off": {"udp_gro": why, "recvmmsg": why, "tunnel_gso": why},
    }
    text = render_status(hostgw)
    assert "fast paths (auto): tso_read, packet_gso" in text
    assert f"  recvmmsg, tunnel_gso, udp_gro off: {why}" in text
    assert text.count(" off: ") == 1
