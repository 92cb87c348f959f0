"""bench.hops: pairing tcpdump timestamps into send and receive hops."""

from __future__ import annotations

from pathlib import Path

from bench.hops import _timestamps, pair_hops

DEVICE = """\
100.000100000 IP 10.244.1.2 > 10.244.2.2: ICMP echo request, id 1, seq 1, length 64
100.000400000 IP 10.244.2.2 > 10.244.1.2: ICMP echo reply, id 1, seq 1, length 64
"""
WIRE = """\
100.000250000 IP 192.168.77.10.8472 > 192.168.77.11.8472: VXLAN, flags [I] (0x08), vni 1
IP 10.244.1.2 > 10.244.2.2: ICMP echo request, id 1, seq 1, length 64
100.000300000 IP 192.168.77.11.8472 > 192.168.77.10.8472: VXLAN, flags [I] (0x08), vni 1
IP 10.244.2.2 > 10.244.1.2: ICMP echo reply, id 1, seq 1, length 64
"""


def test_hops_from_tcpdump_listings(tmp_path: Path) -> None:
    (tmp_path / "dev.txt").write_text(DEVICE)
    (tmp_path / "wire.txt").write_text(WIRE)
    wire = _timestamps(tmp_path / "wire.txt")
    assert len(wire) == 2 and "echo request" in wire[0][1]  # continuation lines joined
    send, receive = pair_hops(_timestamps(tmp_path / "dev.txt"), wire)
    assert [round(x) for x in send] == [150]
    assert [round(x) for x in receive] == [100]
