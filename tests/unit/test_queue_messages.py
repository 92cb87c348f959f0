"""Queue workers' pure parts: the spec and peer messages, counter sums, steering."""

from __future__ import annotations

import socket
import struct
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

import pytest

from dataplane.io.node import NodeSpec
from dataplane.io.queues import (
    add_counts,
    decode_peer,
    encode_peer,
    read_messages,
    spec_from_json,
    spec_to_json,
    steering_program,
    steering_queue,
)
from dataplane.peers import Peer


def test_a_spec_survives_the_trip_to_a_worker() -> None:
    spec = NodeSpec(
        backend="vxlan",
        network=IPv4Network("10.244.0.0/16"),
        subnet=IPv4Network("10.244.3.0/24"),
        public_ip=IPv4Address("192.168.77.10"),
        underlay_iface="eth0",
        underlay_mtu=9000,
        device="tap",
        vni=7,
        vtep_mac=bytes.fromhex("027700000001"),
        offload="on",
        busy_poll_us=50,
        queues=3,
    )
    assert spec_from_json(spec_to_json(spec)) == spec


def test_a_peer_survives_the_trip_to_a_worker() -> None:
    for peer in (
        Peer(IPv4Network("10.244.2.0/24"), IPv4Address("192.168.77.11"), b"\x02" * 6, 8472),
        Peer(IPv4Network("10.244.5.0/24"), IPv4Address("192.168.77.12"), None, 8285),
    ):
        back = decode_peer(encode_peer(peer))
        assert back == peer and back.sockaddr == peer.sockaddr


def test_counts_add_up_through_nested_dicts() -> None:
    a = {"tx_packets": 3, "drops": {"no_route": 1}, "batches": {"device": {"batches": 2}}}
    b = {"tx_packets": 4, "drops": {"no_route": 2, "ttl": 5}, "batches": {"device": {"batches": 1}}}
    assert add_counts(a, b) == {
        "tx_packets": 7,
        "drops": {"no_route": 3, "ttl": 5},
        "batches": {"device": {"batches": 3}},
    }
    assert add_counts({}, {"x": True, "y": "text"}) == {}  # only counts are added
    assert a["tx_packets"] == 3  # inputs unchanged


def _datagram(ip_off: int, sport: int, dport: int = 5201, ihl: int = 5) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, 60, 0, 0, 64, 6, 0,
        bytes([10, 244, 1, 2]), bytes([10, 244, 2, 3]),
    )  # fmt: skip
    return b"\0" * ip_off + ip + b"\1" * (ihl * 4 - 20) + struct.pack("!HH", sport, dport)


@pytest.mark.parametrize("queues", [2, 3, 4])
def test_client_flows_spread_over_the_queues(queues: int) -> None:
    """connect() picks even ports: 32 client flows still use every queue."""
    got = Counter(steering_queue(_datagram(22, p), 22, queues) for p in range(40000, 40064, 2))
    assert set(got) == set(range(queues))
    assert min(got.values()) >= 32 // queues // 3


def test_steering_reads_the_ports_after_ip_options() -> None:
    with_options = _datagram(0, 40000, ihl=6)
    plain = _datagram(0, 40000)
    assert steering_queue(with_options, 0, 64) == steering_queue(plain, 0, 64)
    assert steering_queue(b"\0" * 30, 22, 4) == 0  # too short: the first socket


def test_the_program_ends_with_the_queue_count() -> None:
    prog = steering_program(22, 4)
    assert prog[-2] == (0x94, 0, 0, 4)  # A %= 4
    assert prog[-1] == (0x16, 0, 0, 0)  # return A
    assert len(prog) < 4096  # BPF_MAXINSNS


def test_messages_keep_their_bounds_and_a_close_is_seen() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.setblocking(False)
        assert read_messages(b) == ([], False)
        a.send(b'{"op": "ready"}')
        a.send(b'{"op": "counters"}')
        assert read_messages(b) == ([b'{"op": "ready"}', b'{"op": "counters"}'], False)
        a.send(b"last")
        a.close()
        assert read_messages(b) == ([b"last"], True)


def test_both_directions_of_a_flow_meet_on_one_queue() -> None:
    def packet(src: int, dst: int, sport: int, dport: int) -> bytes:
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0,
            bytes([10, 244, src, 2]), bytes([10, 244, dst, 3]),
        )  # fmt: skip
        return ip + struct.pack("!HH", sport, dport)

    for sport in range(40000, 40100, 7):
        there = packet(1, 2, sport, 5201)
        back = packet(2, 1, 5201, sport)
        back = back[:12] + there[16:20] + there[12:16] + back[20:]  # swap the addresses
        assert steering_queue(there, 0, 4) == steering_queue(back, 0, 4)


def test_queue_counts_and_backends_that_do_not_go_together() -> None:
    from dataplane.io.queues import queues_error

    assert queues_error("vxlan", 2) is None and queues_error("host-gw", 1) is None
    assert queues_error("udp", 0) == "--queues 0: expected 1..64"
    assert queues_error("udp", 65) == "--queues 65: expected 1..64"
    assert queues_error("host-gw", 2) == "--queues above 1 is for the vxlan and udp backends"
