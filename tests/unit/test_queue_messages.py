"""Queue workers' pure parts: the spec and peer messages, counter sums, steering;
and queue 0 asking its workers over real pipes."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

import pytest

from dataplane.egress_thread import QueueSample
from dataplane.io.node import NodeSpec
from dataplane.io.queues import (
    QueueWorkers,
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


def _spec(**more: object) -> NodeSpec:
    return NodeSpec(
        backend="vxlan",
        network=IPv4Network("10.244.0.0/16"),
        subnet=IPv4Network("10.244.3.0/24"),
        public_ip=IPv4Address("192.168.77.10"),
        underlay_iface="eth0",
        **more,  # type: ignore[arg-type]
    )


def test_a_spec_survives_the_trip_to_a_worker() -> None:
    spec = _spec(
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


def _ip(proto: int, l4: bytes, *, frag: int = 0, src: int = 1, dst: int = 2) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, frag, 64, proto, 0,
        bytes([10, 244, src, 2]), bytes([10, 244, dst, 3]),
    )  # fmt: skip
    return ip + l4


def test_an_icmp_echos_packets_and_a_datagrams_fragments_stay_together() -> None:
    """Only TCP, UDP, SCTP and UDP-Lite outside fragments have ports in the hash (as
    flows.inner_flow_hash): an ICMP echo's checksum, which sits where ports would and
    changes with every sequence number, does not spread one ping over the queues,
    and its reply meets it; a fragmented datagram's pieces meet on one queue."""
    echoes = {
        steering_queue(_ip(1, struct.pack("!BBHHH", 8, 0, 0xF7FF - seq, 7, seq)), 0, 64)
        for seq in range(50)
    }
    reply = _ip(1, struct.pack("!BBHHH", 0, 0, 0xFFFF, 7, 0), src=2, dst=1)  # (same XOR)
    assert len(echoes) == 1 and steering_queue(reply, 0, 64) in echoes
    first = _ip(17, struct.pack("!HHHH", 40000, 5201, 1480, 0), frag=0x2000)  # MF
    later = _ip(17, b"\x55" * 8, frag=185)  # offset 1480
    whole = _ip(17, struct.pack("!HHHH", 40000, 5201, 8, 0))
    assert steering_queue(first, 0, 64) == steering_queue(later, 0, 64) == echoes.pop()
    assert steering_queue(whole, 0, 64) != steering_queue(first, 0, 64)  # ports count here
    for proto in (6, 17, 132, 136):  # the protocols with ports
        assert steering_queue(_ip(proto, struct.pack("!HH", 40000, 5201)), 0, 64) == steering_queue(
            whole, 0, 64
        )
    ipv6ish = b"\x60" + _ip(17, struct.pack("!HH", 40000, 5201))[1:]
    assert steering_queue(ipv6ish, 0, 64) == 0  # not IPv4: the first queue
    assert steering_queue(_ip(6, b"\0\1"), 0, 64) == 0  # ports cut off: the first queue


def test_the_program_ends_with_the_queue_count() -> None:
    prog = steering_program(22, 4)
    assert prog[-3] == (0x94, 0, 0, 4)  # A %= 4
    assert prog[-2] == (0x16, 0, 0, 0)  # return A
    assert prog[-1] == (0x06, 0, 0, 0)  # (not IPv4:) return 0
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


def test_queue_0_collects_the_workers_replies_and_waits_for_no_straggler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QueueWorkers.ask over real pipes, the workers' ends answered here: queue 1
    answers at once, queue 2 only after the timeout (its late reply is ignored, and
    it counts as not answering), queue 3 is not ready (not asked). When every asked
    worker has answered, the ask ends then, not at the timeout."""
    from dataplane.io import queues

    spec = _spec(queues=4)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        workers = QueueWorkers(spec, loop)
        theirs: dict[int, socket.socket] = {}
        for worker in workers.workers:
            ours, theirs[worker.index] = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            worker.conn, worker.ready = ours, worker.index != 3
            loop.add_reader(ours.fileno(), workers._on_message, worker)

        def answer(index: int, **fields: object) -> None:
            msg = json.loads(theirs[index].recv(4096))
            reply = {"op": "reply", "id": msg["id"], **fields}
            theirs[index].send(json.dumps(reply).encode())

        sample = {"at": 5.0, "cpu": 1.5, "tx_bytes": 3000, "tx_packets": 2}
        monkeypatch.setattr(queues, "REPLY_TIMEOUT_S", 0.3)
        loop.call_later(0.01, lambda: answer(1, **sample))
        got = await workers.sample()
        assert got == {1: QueueSample(5.0, 1.5, 3000, 2)}
        answer(2, **sample)  # too late: nobody waits for it
        await asyncio.sleep(0.01)
        assert workers._asked == {}
        theirs[3].setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs[3].recv(4096)  # not ready: not asked

        monkeypatch.setattr(queues, "REPLY_TIMEOUT_S", 600.0)
        loop.call_later(0.01, lambda: answer(1))
        loop.call_later(0.02, lambda: answer(2))
        # (ended by the answers: were the timeout awaited, wait_for would give up)
        assert await asyncio.wait_for(workers.egress_thread_switched(True), 30) == 0
        monkeypatch.setattr(queues, "REPLY_TIMEOUT_S", 0.3)
        loop.call_later(0.01, lambda: answer(1))
        assert await workers.egress_thread_switched(False) == 1  # queue 2 silent
        for worker in workers.workers:
            loop.remove_reader(worker.conn.fileno())  # type: ignore[union-attr]
            worker.conn.close()  # type: ignore[union-attr]
            theirs[worker.index].close()

    asyncio.run(scenario())
