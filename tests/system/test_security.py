"""Issue 7, security: weft lets no stranger in.

- The receive side takes an encapsulated packet only from a known peer's public
  IP with an inner source inside that peer's subnet; ``--accept-any-source``
  takes anything, as flannel and the kernel do.
- etcd with TLS client certificates and with username/password auth, against a
  real etcd started here (certificates made here with openssl): the right
  credentials work, wrong ones are one clear line, never a traceback.
- The local API socket is 0600 and read-only; the health listener binds only
  where told and answers only GET /healthz, /readyz and /metrics.

Everything runs in lab namespaces (control/lab/cluster.py). The figures and
the exact error lines are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from control.api import api_request
from control.lab.cluster import Cluster, ClusterNode
from control.lab.etcd import EtcdServer
from control.lab.topology import Lab, Node

HEALTHZ_PORT = 8081
FOREIGN_SRC = "10.244.250.5"  # an inner source in no node's subnet
STRANGER_MAC = "02:00:00:00:00:99"
BAD_CREDENTIAL_WAIT_S = 5.0  # how long an agent with bad credentials is watched


def report(what: str, **figures: Any) -> None:
    print(f"\n[figures] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# -- packets, built here (not with weft's codecs) -----------------------------------------


def ip_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    head = bytearray(b"\x45\x00" + (20 + len(payload)).to_bytes(2, "big") + b"\x43\x21\x00\x00")
    head += bytes([64, proto]) + b"\0\0" + IPv4Address(src).packed + IPv4Address(dst).packed
    head[10:12] = ip_checksum(bytes(head)).to_bytes(2, "big")
    return bytes(head) + payload


def icmp_echo(src: str, dst: str, seq: int) -> bytes:
    icmp = bytearray(b"\x08\x00\0\0\x57\x46" + seq.to_bytes(2, "big") + b"stranger-danger")
    icmp[2:4] = ip_checksum(bytes(icmp)).to_bytes(2, "big")
    return ipv4(src, dst, 1, bytes(icmp))


def vxlan_frame(inner: bytes, dst_mac: str, vni: int = 1) -> bytes:
    mac = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(STRANGER_MAC.replace(":", ""))
    return b"\x08\0\0\0" + (vni << 8).to_bytes(4, "big") + mac + b"\x08\x00" + inner


SENDER = r"""
import json, socket, sys
spec = json.load(sys.stdin)
if spec["forge_source"]:
    # A raw IPv4 packet with someone else's source address (IP_HDRINCL).
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for h in spec["packets"]:
    s.sendto(bytes.fromhex(h), (spec["dst"], 0 if spec["forge_source"] else spec["port"]))
"""


def send_from(lab: Lab, node: Node, dst: str, port: int, payloads: list[bytes],
              forge_source: str | None = None) -> None:  # fmt: skip
    """UDP datagrams from ``node`` to dst:port; with ``forge_source``, as raw IP
    packets that claim to come from that address (UDP checksum 0: none)."""
    if forge_source:
        packets = []
        for p in payloads:
            udp = (40000).to_bytes(2, "big") + port.to_bytes(2, "big")
            udp += (8 + len(p)).to_bytes(2, "big") + b"\0\0" + p
            packets.append(ipv4(forge_source, dst, 17, udp))
    else:
        packets = payloads
    spec = {"dst": dst, "port": port, "forge_source": bool(forge_source),
            "packets": [p.hex() for p in packets]}  # fmt: skip
    subprocess.run(["ip", "netns", "exec", node.ns, sys.executable, "-c", SENDER],
                   input=json.dumps(spec), text=True, check=True, timeout=60)  # fmt: skip


def pcap_count(pcap: Path, flt: str) -> int:
    cp = subprocess.run(["tcpdump", "-n", "-r", str(pcap), flt], capture_output=True,
                        text=True, timeout=30)  # fmt: skip
    return len([line for line in cp.stdout.splitlines() if line.strip()])


# -- the cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """n1: defaults, health listener on its underlay address; n2: --accept-any-source;
    x1: a stranger on the underlay, no agent. One pod on n1 and n2."""
    cluster = Cluster(tmp_path_factory.mktemp("sec"))
    try:
        cluster.set_config("10.244.0.0/16", "vxlan")
        node = cluster.add_node("n1")
        health = ["--healthz-ip", str(node.underlay_ip), "--healthz-port", str(HEALTHZ_PORT)]
        n1 = cluster.start_weft_node("n1", node=node, extra_args=health)
        n2 = cluster.start_weft_node("n2", extra_args=["--accept-any-source"])
        for cn in (n1, n2):
            cluster.wait_ready(cn)
        for cn in (n1, n2):
            cluster.wire_pods(cn)
        cluster.add_node("x1")
        for cn in (n1, n2):
            cluster.wait_peers(cn, [o.subnet for o in (n1, n2) if o is not cn])
        yield cluster
    finally:
        cluster.close()


def stranger(cluster: Cluster) -> Node:
    return next(n for n in cluster.lab.nodes if n.name == "x1")


def counters(cluster: Cluster, cn: ClusterNode) -> dict[str, int]:
    c = cluster.status(cn)["counters"]
    return {"rx_packets": c["rx_packets"], **c["drops"]}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
            if after.get(k, 0) != before.get(k, 0)}  # fmt: skip


@contextlib.contextmanager
def captured(lab: Lab, cn: ClusterNode, path: Path) -> Iterator[Path]:
    """tcpdump of ICMP on the node's pod's eth0 while the block runs."""
    cap = lab.capture(cn.pod, "eth0", path, "icmp")
    try:
        yield path
        time.sleep(1.0)  # let the last packets land and tcpdump write them
    finally:
        lab.stop(cap)


# -- the source check ------------------------------------------------------------------------


def test_a_strangers_vxlan_frames_never_reach_a_pod(sec: Cluster, tmp_path: Path) -> None:
    """Well-formed VXLAN frames, right VNI and VtepMAC, a valid ICMP echo inside for
    n1's pod: from a stranger's own address (unknown_source) and forged with n2's
    public IP but an inner source outside n2's subnet (spoofed). The pod sees none."""
    n1, n2 = sec.nodes["n1"], sec.nodes["n2"]
    st = sec.status(n1)
    frames = [vxlan_frame(icmp_echo(FOREIGN_SRC, str(n1.pod.ip), i), st["vtep_mac"])
              for i in range(20)]  # fmt: skip
    before = counters(sec, n1)
    with captured(sec.lab, n1, tmp_path / "n1-pod.pcap") as pcap:
        send_from(sec.lab, stranger(sec), str(n1.underlay_ip), st["port"], frames)
        send_from(sec.lab, stranger(sec), str(n1.underlay_ip), st["port"], frames,
                  forge_source=str(n2.underlay_ip))  # fmt: skip
    seen = pcap_count(pcap, f"icmp and host {FOREIGN_SRC}")
    got = delta(counters(sec, n1), before)
    report("stranger's VXLAN frames at n1 (default)", sent=40, seen_in_pod=seen, counters=got)
    assert seen == 0
    assert got == {"unknown_source": 20, "spoofed": 20}, got
    assert sec.lab.ping(n2.pod, n1.pod.ip, count=2)  # the real peer still gets through


def test_accept_any_source_delivers_them_as_flannel_does(sec: Cluster, tmp_path: Path) -> None:
    n2 = sec.nodes["n2"]
    st = sec.status(n2)
    frames = [vxlan_frame(icmp_echo(FOREIGN_SRC, str(n2.pod.ip), i), st["vtep_mac"])
              for i in range(20)]  # fmt: skip
    before = counters(sec, n2)
    with captured(sec.lab, n2, tmp_path / "n2-pod.pcap") as pcap:
        send_from(sec.lab, stranger(sec), str(n2.underlay_ip), st["port"], frames)
    seen = pcap_count(pcap, f"icmp and src host {FOREIGN_SRC} and icmp[icmptype] = icmp-echo")
    got = delta(counters(sec, n2), before)
    report("stranger's VXLAN frames at n2 (--accept-any-source)", sent=20, seen_in_pod=seen,
           counters=got)  # fmt: skip
    assert seen == 20
    assert got.get("rx_packets", 0) >= 20 and "unknown_source" not in got, got


# -- etcd over TLS with client certificates ----------------------------------------------------


def make_pki(d: Path, server_ip: str) -> None:
    """ca.crt + server and client certificates signed by it, and a rogue CA with a
    client certificate of its own (openssl CLI, EC P-256, 2 days)."""

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (d / "ext.cnf").write_text(
        f"subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", *ec, "-keyout", f"{d}/{ca}.key", "-out", f"{d}/{ca}.crt",
            "-days", "2", "-subj", f"/CN=weft-test-{ca}")  # fmt: skip
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue", "rogue-ca")):
        run("req", *ec, "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr",
            "-subj", f"/CN=weft-{name}")  # fmt: skip
        run("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/{ca}.crt",
            "-CAkey", f"{d}/{ca}.key", "-CAcreateserial", "-out", f"{d}/{name}.crt",
            "-days", "2", "-extfile", f"{d}/ext.cnf")  # fmt: skip


def etcd_in(cluster: Cluster, name: str, **kw: Any) -> tuple[Node, EtcdServer]:
    node = cluster.add_node(name)
    return node, EtcdServer(str(node.underlay_ip), netns=node.ns, name=name, **kw)


def credential_verdict(cn: ClusterNode, endpoint: str) -> str:
    """How an agent with bad credentials ended up after BAD_CREDENTIAL_WAIT_S: it
    exited non-zero with one ``weft: error:`` line, or it waits and says why in
    WARNING lines naming ``endpoint`` (or the file it could not read). Returns the
    line it printed."""
    log = cn.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log
    assert not cn.subnet_file.exists(), f"{cn.name} got a lease with bad credentials"
    assert cn.proc is not None
    if cn.proc.poll() is not None:
        errors = [ln for ln in log.splitlines() if ln.startswith("weft: ")]
        assert cn.proc.returncode != 0 and len(errors) == 1, log
        assert errors[0].startswith("weft: error: ") and endpoint in errors[0], log
        return errors[0]
    warnings = [ln for ln in log.splitlines() if " WARNING " in ln]
    assert warnings and all(endpoint in ln for ln in warnings), log
    return warnings[0].split(" WARNING ", 1)[1]


def start_agents(
    cluster: Cluster, cases: dict[str, tuple[str, list[str]]]
) -> dict[str, ClusterNode]:
    return {name: cluster.start_weft_node(name, endpoints=endpoint, extra_args=args)
            for name, (endpoint, args) in cases.items()}  # fmt: skip


@pytest.fixture(scope="module")
def tls(sec: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """etcd with --client-cert-auth in its own namespace, and six agents against it,
    one with the right certificate; observed once. Yields each bad agent's line."""
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("openssl CLI needed for test certificates")
    node, etcd = etcd_in(sec, "etcdtls")
    d = tmp_path_factory.mktemp("pki")
    make_pki(d, str(node.underlay_ip))
    etcd.extra_args = [f"--cert-file={d}/server.crt", f"--key-file={d}/server.key",
                       f"--trusted-ca-file={d}/ca.crt", "--client-cert-auth"]  # fmt: skip
    etcd.client_scheme = "https"
    etcd.etcdctl_args = [f"--cacert={d}/ca.crt", f"--cert={d}/client.crt",
                         f"--key={d}/client.key"]  # fmt: skip
    try:
        etcd.start()
        etcd.etcdctl("put", f"{sec.prefix}/config",
                     '{"Network":"10.245.0.0/16","Backend":{"Type":"vxlan"}}')  # fmt: skip
        https, plain = etcd.endpoint, etcd.endpoint.replace("https://", "http://")
        ca, cert, key = f"{d}/ca.crt", f"{d}/client.crt", f"{d}/client.key"
        cases = {
            "tok": (https, ["--etcd-cafile", ca, "--etcd-certfile", cert, "--etcd-keyfile", key]),
            "trogue": (https, ["--etcd-cafile", ca, "--etcd-certfile", f"{d}/rogue.crt",
                               "--etcd-keyfile", f"{d}/rogue.key"]),
            "tnocert": (https, ["--etcd-cafile", ca]),
            "tuntrusted": (https, ["--etcd-cafile", f"{d}/rogue-ca.crt", "--etcd-certfile",
                                   cert, "--etcd-keyfile", key]),
            "tplain": (plain, []),
            "tmissing": (https, ["--etcd-cafile", ca, "--etcd-certfile", f"{d}/nope.crt",
                                 "--etcd-keyfile", key]),
        }  # fmt: skip
        agents = start_agents(sec, cases)
        t0 = time.monotonic()
        ok = sec.wait_ready(agents["tok"])
        leases = etcd.etcdctl("get", "--prefix", f"{sec.prefix}/subnets/", "--print-value-only")
        assert f'"PublicIP":"{ok.underlay_ip}"' in leases, leases
        time.sleep(max(0.0, t0 + BAD_CREDENTIAL_WAIT_S - time.monotonic()))
        needles = {name: cases[name][0] for name in cases}
        needles["tmissing"] = f"{d}/nope.crt"
        lines = {name: credential_verdict(agents[name], needles[name])
                 for name in cases if name != "tok"}  # fmt: skip
        report("etcd TLS: what an agent with bad credentials says", **lines)
        yield lines
    finally:
        etcd.close()


def test_etcd_tls_with_client_certificates(tls: dict[str, str]) -> None:
    """The right certificate works (in the fixture); a certificate from another CA, no
    certificate, a CA that does not know the server, plain http and a missing file
    are each one line naming the endpoint (or the file), no traceback, no lease."""
    assert set(tls) == {"trogue", "tnocert", "tuntrusted", "tplain", "tmissing"}
    assert re.search(r"CERTIFICATE_VERIFY_FAILED", tls["tuntrusted"]), tls["tuntrusted"]
    assert "nope.crt: No such file" in tls["tmissing"], tls["tmissing"]


def test_an_untrusted_server_certificate_points_at_the_ca_file(tls: dict[str, str]) -> None:
    line = tls["tuntrusted"]
    assert "CERTIFICATE_VERIFY_FAILED" in line, line
    assert "--etcd-cafile" in line and "--etcd-certfile" not in line, line


def test_a_rejected_client_certificate_says_so(tls: dict[str, str]) -> None:
    for name in ("trogue", "tnocert"):
        assert re.search(r"certificate|TLS", tls[name], re.I), tls[name]
        assert "unreachable" not in tls[name], tls[name]


# -- etcd username/password auth -----------------------------------------------------------


def test_etcd_username_and_password(sec: Cluster) -> None:
    """etcd with auth enabled (user root): the right password works; a wrong
    password, an unknown user and no credentials at all are each one clear line."""
    _, etcd = etcd_in(sec, "etcdauth")
    try:
        etcd.start()
        etcd.etcdctl("user", "add", "root:s3cret")
        etcd.etcdctl("auth", "enable")
        etcd.etcdctl_args = ["--user", "root:s3cret"]
        etcd.etcdctl("put", f"{sec.prefix}/config",
                     '{"Network":"10.246.0.0/16","Backend":{"Type":"vxlan"}}')  # fmt: skip
        url = etcd.endpoint
        cases = {
            "aok": (url, ["--etcd-username", "root", "--etcd-password", "s3cret"]),
            "awrong": (url, ["--etcd-username", "root", "--etcd-password", "guess"]),
            "aghost": (url, ["--etcd-username", "ghost", "--etcd-password", "s3cret"]),
            "anone": (url, []),
        }
        agents = start_agents(sec, cases)
        t0 = time.monotonic()
        ok = sec.wait_ready(agents["aok"])
        leases = etcd.etcdctl("get", "--prefix", f"{sec.prefix}/subnets/", "--print-value-only")
        assert f'"PublicIP":"{ok.underlay_ip}"' in leases, leases
        time.sleep(max(0.0, t0 + BAD_CREDENTIAL_WAIT_S - time.monotonic()))
        lines = {name: credential_verdict(agents[name], url) for name in cases if name != "aok"}
        report("etcd auth: what an agent with bad credentials says", **lines)
        for name in ("awrong", "aghost"):
            assert "authentication failed" in lines[name], lines[name]
    finally:
        etcd.close()


# -- the local API and the health listener ---------------------------------------------------


def test_api_socket_is_0600_root_only_and_read_only(sec: Cluster) -> None:
    n1 = sec.nodes["n1"]
    info = os.stat(n1.api_socket)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert info.st_uid == 0
    as_nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
         str(n1.api_socket)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert as_nobody.returncode != 0 and "PermissionError" in as_nobody.stderr, as_nobody
    before = sec.status(n1)
    for op in ("add_peer", "remove_peer", "set_config", "stop", "shutdown", "exec"):
        reply = api_request(str(n1.api_socket), {"op": op, "subnet": "10.244.9.0/24"})
        assert reply == {"error": f"unknown op {op!r}"}, reply
    after = sec.status(n1)
    assert after["peers"] == before["peers"] and after["subnet"] == before["subnet"]


HTTP_PROBE = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
out = {}
for raw in json.load(sys.stdin):
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(raw.encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        out[raw] = (line, "weft_" in data.decode("latin-1", "replace"))
    except OSError as e:
        out[raw] = ("error: " + type(e).__name__, False)
print(json.dumps(out))
"""


def http_probe(lab: Lab, node: Node, host: str, requests: list[str]) -> dict[str, Any]:
    cp = subprocess.run(
        ["ip", "netns", "exec", node.ns, sys.executable, "-c", HTTP_PROBE, host, str(HEALTHZ_PORT)],
        input=json.dumps(requests), capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(cp.stdout)


def listeners(cluster: Cluster, cn: ClusterNode) -> list[str]:
    """TCP listening addresses owned by the agent's process, in its node."""
    assert cn.proc is not None
    out = cluster.lab.run(cn.node, "ss", "-Hltnp").stdout
    return sorted(line.split()[3] for line in out.splitlines() if f"pid={cn.proc.pid}," in line)


def test_health_listener_binds_where_told_and_serves_only_get(sec: Cluster) -> None:
    n1, n2 = sec.nodes["n1"], sec.nodes["n2"]
    n1_ip = str(n1.underlay_ip)
    assert listeners(sec, n1) == [f"{n1_ip}:{HEALTHZ_PORT}"]
    assert listeners(sec, n2) == []  # no --healthz-port: no listener at all
    before = sec.status(n1)

    def req(method: str, path: str, body: str = "") -> str:
        extra = f"Content-Length: {len(body)}\r\n" if body else ""
        return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n{body}"

    allowed = [req("GET", p) for p in ("/healthz", "/readyz", "/metrics")]
    refused = [
        req("POST", "/healthz", '{"op":"remove_peer"}'), req("PUT", "/metrics", "x"),
        req("DELETE", "/readyz"), req("PATCH", "/healthz", "x"), req("OPTIONS", "*"),
        req("GET", "/"), req("GET", "/status"), req("GET", "/api"), req("GET", "/debug/pprof"),
        req("GET", "/healthz/../admin"), req("GET", "/metrics?op=remove_peer"),
        "GARBAGE\r\n\r\n", "\r\n\r\n",
    ]  # fmt: skip
    got = http_probe(sec.lab, stranger(sec), n1_ip, allowed + refused)
    report("health listener, from another node", **{
        r.split("\r\n", 1)[0] or repr(r): got[r][0] for r in allowed + refused})  # fmt: skip
    for r in allowed:
        assert got[r][0] == "HTTP/1.1 200 OK", (r, got[r])
    assert got[allowed[2]][1], "no weft_ metrics in /metrics"
    for r in refused:
        assert got[r][0] in ("HTTP/1.1 404 Not Found", "HTTP/1.1 405 Method Not Allowed"), (
            r,
            got[r],
        )
    # bound to the underlay address only: not on the node's loopback
    local = http_probe(sec.lab, n1.node, "127.0.0.1", [allowed[0]])
    assert local[allowed[0]][0].startswith("error: ConnectionRefused"), local
    after = sec.status(n1)
    assert n1.proc is not None and n1.proc.poll() is None
    assert after["peers"] == before["peers"] and after["subnet"] == before["subnet"]
