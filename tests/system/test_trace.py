"""See every packet: `weft trace explain`, `weft trace live` and /metrics on real namespaces.

The topology is the interop one (tests/system/test_dataplane_interop.py): weft's
userspace vxlan on n1 (a TUN, VtepMAC 02:77:00:00:00:01), a kernel VXLAN peer
on n2 made with ip/bridge exactly as flanneld makes it, one pod on each. The
`weft trace …` clients talk to the agent's unix socket; they are spawned in
n1's namespace so the lab stops them whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dataplane_interop import (
    WEFT_MAC,
    kernel_vxlan_node,
    two_node_pods,
    weft_vxlan_args,
    wire_like,
)
from weft_helpers import (
    WEFT,
    add_pod_from_subnet_env,
    iperf3_transfer,
    send_datagrams,
    start_agent,
    start_weft,
    status,
)

from control.api import api_request
from control.lab.etcd import EtcdServer
from control.lab.topology import Lab, Node, Pod

CONFIG_KEY = "/coreos.com/network/config"
DROP_REASONS = {"truncated", "wrong_vni", "bad_flags", "unknown_source"}


# -- the lab ------------------------------------------------------------------------


class Pair:
    """n1 (weft, vxlan on a TUN) and n2 (kernel VXLAN as flanneld makes it), with pods."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.n1, self.n2, self.pod1, self.pod2 = two_node_pods(lab, mtu=1450)
        self.kmac = kernel_vxlan_node(lab, self.n2, self.n1)
        self.proc, self.sock = start_weft(
            lab, self.n1, weft_vxlan_args(self.n1, self.n2, self.kmac), tmp, "n1"
        )
        assert lab.wait_ping(self.pod1, self.pod2.ip, timeout_s=10), "pod1 → pod2"

    def weft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A one-shot `weft` command against n1's API socket (run in n1's namespace)."""
        return self.lab.run(
            self.n1, *WEFT, *args, "--api-socket", str(self.sock), check=check, timeout=60
        )

    def live(self, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        """`weft trace live ARGS` in the background; its output goes to a log file."""
        log = self.tmp / f"{name}.out"
        proc = self.lab.spawn(
            self.n1,
            [*WEFT, "trace", "live", *args, "--api-socket", str(self.sock)],
            log=log,
        )
        return proc, log


@pytest.fixture
def pair(lab: Lab, tmp_path: Path) -> Pair:
    return Pair(lab, tmp_path)


def drive_until_done(
    proc: subprocess.Popen, action: Callable[[], None], timeout_s: float = 30
) -> None:
    """Repeat `action` (pings, bad datagrams) until the tracer has seen its --count.

    A trace client only sees packets after it has subscribed; repeating the
    traffic until it exits removes the race without sleeping for a guess.
    """
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, "weft trace live never reached its --count"
        action()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    assert proc.returncode == 0, f"weft trace live exited {proc.returncode}"


def event_lines(log: Path) -> list[list[str]]:
    """The event lines of `weft trace live` (HH:MM:SS.us dir backend …), split in words."""
    rows = []
    for line in log.read_text().splitlines():
        words = line.split()
        if len(words) > 3 and re.fullmatch(r"\d\d:\d\d:\d\d\.\d{6}", words[0]):
            rows.append(words)
    return rows


def hostile_datagrams(dst_mac: str, src_mac: str) -> list[bytes]:
    """Well-formed and broken VXLAN datagrams for the node whose VtepMAC is dst_mac,
    as in the hostile-burst interop test."""
    good_inner = bytes.fromhex("4500001c0001000040016fe30af402020af40102") + bytes(8)
    header = bytes.fromhex("0800000000000100")
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    frame = header + eth + b"\x08\x00" + good_inner
    kinds = [
        [frame[:i] for i in range(0, len(frame), 5)],  # truncated
        [bytes.fromhex("0800000000000200") + frame[8:]] * 10,  # wrong VNI
        [bytes.fromhex("0c00000000000100") + frame[8:]] * 10,  # GPE flags
        [frame] * 10,  # well-formed, but from a stranger
    ]
    # Interleaved, so that any run of a dozen drops shows every reason.
    return [d for group in zip(*kinds, strict=True) for d in group]


# -- (a) explain --------------------------------------------------------------------


def test_explain_names_the_kernel_peers_vtep_mac_public_ip_and_vni(
    pair: Pair, tmp_path: Path
) -> None:
    lab, n2 = pair.lab, pair.n2
    svg_path = tmp_path / "walk.svg"
    out = pair.weft("trace", "explain", str(pair.pod2.ip), "--json", "--svg", str(svg_path))
    r = json.loads(out.stdout)
    # What the kernel peer really is, read from the kernel, not from weft.
    kernel_mac = lab.link_mac(n2, "flannel.1")
    assert kernel_mac == pair.kmac
    vxlan = lab.ip_json(n2, "-d", "link", "show", "flannel.1")[0]["linkinfo"]["info_data"]
    assert vxlan["id"] == 1 and vxlan["port"] == 8472
    assert r["kind"] == "vxlan"
    assert r["neigh"]["mac"] == kernel_mac and r["fdb"]["mac"] == kernel_mac
    assert r["fdb"]["dst"] == str(n2.underlay_ip)
    assert r["neigh"]["ip"] == "10.244.2.0"  # flannel's VTEP address: the lease's .0
    layers = {o["layer"]: o for o in r["outer"]}
    assert layers["VXLAN"]["vni"] == vxlan["id"] == 1
    assert layers["UDP"]["dport"] == vxlan["port"]
    assert layers["IPv4"] == {
        "layer": "IPv4", "bytes": 20, "src": str(pair.n1.underlay_ip), "dst": str(n2.underlay_ip),
    }  # fmt: skip
    assert layers["Ethernet (inner)"]["src"] == WEFT_MAC
    assert layers["Ethernet (inner)"]["dst"] == kernel_mac
    assert r["node"]["device"] == "weft.1" and r["node"]["device_kind"] == "tun"
    assert r["overhead"] == 50
    # The kernel side holds the mirror image: our VtepMAC → our public IP.
    fdb = lab.bridge(n2, "fdb", "show", "dev", "flannel.1")
    assert f"{WEFT_MAC} dst {pair.n1.underlay_ip} self permanent" in fdb
    # The picture: valid XML naming the same values.
    root = ET.fromstring(svg_path.read_text())
    text = "\n".join(el.text or "" for el in root.iter())
    for value in (kernel_mac, str(n2.underlay_ip), str(pair.n1.underlay_ip), "VNI 1", WEFT_MAC):
        assert value in text, value
    # Without --json: the text walk, and where the picture went.
    plain = pair.weft("trace", "explain", str(pair.pod2.ip), "--svg", str(svg_path)).stdout
    assert f"fdb: {kernel_mac} dev weft.1 dst {n2.underlay_ip} self permanent" in plain
    assert f"(drawn in {svg_path})" in plain
    bad = pair.weft("trace", "explain", "not-an-ip", check=False)
    assert bad.returncode != 0 and "not an IP address" in bad.stderr


# -- (b) live: both directions --------------------------------------------------------


def test_live_shows_both_directions_of_a_ping(pair: Pair) -> None:
    proc, log = pair.live("live", "--count", "10")
    drive_until_done(proc, lambda: pair.lab.ping(pair.pod1, pair.pod2.ip, count=2, timeout_s=3))
    rows = event_lines(log)
    assert len(rows) == 10, log.read_text()
    dirs = {row[1] for row in rows}
    assert dirs == {"tx", "rx"}, log.read_text()
    text = log.read_text()
    # tx: pod1 → pod2 sent to the kernel peer; rx: pod2's reply delivered from it.
    assert f"tx vxlan {pair.pod1.ip} > {pair.pod2.ip} icmp type 8" in text, text
    assert f"rx vxlan {pair.pod2.ip} > {pair.pod1.ip} icmp type 0" in text, text
    assert f"peer {pair.n2.underlay_ip} send" in text and "deliver" in text


def test_live_dissect_shows_scapys_layers_outer_and_inner(pair: Pair) -> None:
    proc, log = pair.live("dissect", "--filter", "icmp and tx", "--count", "2", "--dissect")
    drive_until_done(proc, lambda: pair.lab.ping(pair.pod1, pair.pod2.ip, count=2, timeout_s=3))
    text = log.read_text()
    for layer in ("###[ Ethernet ]###", "###[ IP ]###", "###[ UDP ]###", "###[ VXLAN ]###",
                  "###[ ICMP ]###"):  # fmt: skip
        assert layer in text, text
    assert re.search(r"vni\s+= 0x1\b", text), text
    assert f"dst       = {pair.kmac}" in text, text  # the inner frame goes to the peer's VTEP


# -- (c) live --pcap, read back by tshark ---------------------------------------------


def test_live_pcap_decodes_in_tshark_as_vxlan_with_icmp_inside(pair: Pair, tmp_path: Path) -> None:
    pcap = tmp_path / "trace.pcap"
    proc, log = pair.live("pcap", "--filter", "icmp", "--count", "8", "--pcap", str(pcap))
    drive_until_done(proc, lambda: pair.lab.ping(pair.pod1, pair.pod2.ip, count=2, timeout_s=3))
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", "udp.port==8472,vxlan",
         "-T", "fields", "-E", "separator=|",
         "-e", "vxlan.vni", "-e", "icmp.type", "-e", "ip.src", "-e", "ip.dst", "-e", "eth.dst"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    rows = [line.split("|") for line in out.splitlines() if line]
    assert len(rows) == 8, (out, log.read_text())
    assert {vni for vni, *_ in rows} == {"1"}, out
    types = {icmp for _vni, icmp, *_ in rows}
    assert types == {"8", "0"}, out  # echo request (tx) and echo reply (rx)
    n1, n2 = str(pair.n1.underlay_ip), str(pair.n2.underlay_ip)
    p1, p2 = str(pair.pod1.ip), str(pair.pod2.ip)
    for _vni, icmp, ip_src, ip_dst, eth_dst in rows:
        if icmp == "8":  # outer n1 → n2 around pod1 → pod2, inner dst the kernel's VtepMAC
            assert ip_src.split(",") == [n1, p1] and ip_dst.split(",") == [n2, p2], out
            assert eth_dst.split(",")[-1] == pair.kmac, out
        else:
            assert ip_src.split(",") == [n2, p2] and ip_dst.split(",") == [n1, p1], out
            assert eth_dst.split(",")[-1] == WEFT_MAC, out


# -- (d) live --filter drop -------------------------------------------------------------


def test_live_drop_filter_shows_the_reasons_of_a_hostile_burst(pair: Pair) -> None:
    n3 = pair.lab.add_node("n3")  # a stranger on the underlay
    junk = hostile_datagrams(WEFT_MAC, pair.kmac)
    proc, log = pair.live("drops", "--filter", "drop", "--count", "24")

    def burst() -> None:
        send_datagrams(pair.lab, n3.ns, str(pair.n1.underlay_ip), 8472, junk)

    drive_until_done(proc, burst)
    rows = event_lines(log)
    assert len(rows) == 24, log.read_text()
    assert all(row[1] == "rx" and f"peer {n3.underlay_ip}" in " ".join(row) for row in rows)
    reasons = set(re.findall(r"drop \((\w+)\)", log.read_text()))
    assert reasons == DROP_REASONS, log.read_text()
    assert pair.lab.ping(pair.pod1, pair.pod2.ip, count=2)  # the burst broke nothing


# -- (e) /metrics on an agent -----------------------------------------------------------


@pytest.fixture
def etcd(lab: Lab) -> Iterator[EtcdServer]:
    lab.add_underlay()
    node = lab.add_node("etcd")
    with EtcdServer(str(node.underlay_ip), netns=node.ns) as server:
        yield server


def agent_node(lab: Lab, name: str) -> Node:
    node = lab.add_node(name)
    wire_like(lab, node)
    return node


def scrape(lab: Lab, node: Node, port: int = 8081) -> dict[str, float]:
    """GET /metrics from inside the node's namespace; {'name{labels}': value}."""
    code = (
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://{node.underlay_ip}:{port}/metrics',"
        "timeout=5).read().decode())\n"
    )
    out = lab.run(node, "python3", "-c", code).stdout
    samples = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_packets_and_drops_by_reason(
    lab: Lab, etcd: EtcdServer, tmp_path: Path
) -> None:
    etcd.etcdctl("put", CONFIG_KEY, '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}')
    n1, n2 = agent_node(lab, "n1"), agent_node(lab, "n2")
    n3 = lab.add_node("n3")  # a stranger
    healthz = ["--healthz-ip", str(n1.underlay_ip), "--healthz-port", "8081"]
    _, d1 = start_agent(lab, n1, etcd.endpoint, tmp_path, healthz)
    _, d2 = start_agent(lab, n2, etcd.endpoint, tmp_path)
    p1: Pod = add_pod_from_subnet_env(lab, n1, d1)
    p2: Pod = add_pod_from_subnet_env(lab, n2, d2)
    assert lab.wait_ping(p1, p2.ip, timeout_s=15)
    tx = 'weft_packets_total{direction="tx",backend="vxlan"}'
    rx = 'weft_packets_total{direction="rx",backend="vxlan"}'
    before = scrape(lab, n1)
    assert before["weft_ready"] == 1 and before["weft_peers"] == 1
    assert lab.ping(p1, p2.ip, count=5)
    st1 = status(d1 / "weft.sock")
    junk = hostile_datagrams(st1["vtep_mac"], st1["peers"][0]["vtep_mac"])
    send_datagrams(lab, n3.ns, str(n1.underlay_ip), 8472, junk)
    after = scrape(lab, n1)
    assert after[tx] >= before[tx] + 5, (before, after)
    assert after[rx] >= before[rx] + 5, (before, after)
    drops = {
        m.group(1): v
        for k, v in after.items()
        if (m := re.match(r'weft_drops_total\{reason="(\w+)"\}', k))
    }
    assert {"truncated", "unknown_source"} <= set(drops), after
    assert all(v > 0 for v in drops.values())
    # The same numbers as `weft status`: one source of truth.
    st = status(d1 / "weft.sock")["counters"]
    assert st["drops"]["truncated"] == drops["truncated"]


# -- (f) a slow reader never stalls the dataplane ----------------------------------------


def test_a_stopped_trace_reader_does_not_stall_the_dataplane(pair: Pair) -> None:
    proc, log = pair.live("slow")
    # Wait until it is subscribed (it printed an event), then freeze it.
    deadline = time.monotonic() + 20
    while not event_lines(log):
        assert time.monotonic() < deadline, "weft trace live printed nothing"
        assert proc.poll() is None, log.read_text()
        pair.lab.ping(pair.pod1, pair.pod2.ip, count=1, timeout_s=2)
    counters_before = status(pair.sock)["counters"]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        end = iperf3_transfer(pair.lab, pair.pod1, pair.pod2, seconds=3)
        assert end["sum_received"]["bytes"] > 1_000_000
        t0 = time.monotonic()
        st: dict[str, Any] = api_request(str(pair.sock), {"op": "status"}, timeout=5)
        assert time.monotonic() - t0 < 2, "weft status was slow to answer"
        assert st["counters"]["tx_packets"] > counters_before["tx_packets"] + 500
        assert pair.lab.ping(pair.pod1, pair.pod2.ip, count=3)
        assert "weft.1" in pair.weft("status").stdout
        assert proc.poll() is None  # still there, still frozen
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        pair.lab.stop(proc)


# -- the pcap of received udp-backend packets ---------------------------------------------


def test_udp_rx_pcap_shows_the_datagram_as_received(lab: Lab, tmp_path: Path) -> None:
    n1, n2, pod1, pod2 = two_node_pods(lab, mtu=1472)
    subnets = {n1: "10.244.1.0/24", n2: "10.244.2.0/24"}
    socks = {}
    for node, peer in ((n1, n2), (n2, n1)):
        args = [
            "dataplane", "run", "--backend", "udp", "--network", "10.244.0.0/16",
            "--subnet", subnets[node], "--public-ip", str(node.underlay_ip),
            "--peer", f"{subnets[peer]},{peer.underlay_ip}",
        ]  # fmt: skip
        _, socks[node] = start_weft(lab, node, args, tmp_path, node.name)
    assert lab.wait_ping(pod1, pod2.ip, timeout_s=10)
    wire, traced = tmp_path / "wire.pcap", tmp_path / "trace.pcap"
    cap = lab.capture(n1, "eth0", wire, "udp port 8285")
    proc = lab.spawn(
        n1,
        [*WEFT, "trace", "live", "--filter", "rx", "--count", "1", "--pcap", str(traced),
         "--api-socket", str(socks[n1])],
        log=tmp_path / "trace.out",
    )  # fmt: skip
    drive_until_done(proc, lambda: lab.ping(pod1, pod2.ip, count=1, timeout_s=2))
    lab.stop_capture(cap, wire)

    def inner_ttls(pcap: Path) -> list[str]:
        out = subprocess.run(
            ["tshark", "-r", str(pcap), "-d", "udp.port==8285,ip", "-Y", "icmp.type==0",
             "-T", "fields", "-e", "ip.ttl"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        return [line.split(",")[-1] for line in out.split()]

    on_wire, in_trace = inner_ttls(wire), inner_ttls(traced)
    assert on_wire and in_trace, (on_wire, in_trace)
    assert in_trace[0] == on_wire[0], (in_trace, on_wire)
