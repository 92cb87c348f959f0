"""`weft config set|show` and `weft leases` against a real etcd."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from control.lab.etcd import EtcdServer

pytestmark = pytest.mark.integration

WEFT = [sys.executable, "-m", "control.cli"]
FLANNEL_LEASE = (
    '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)


def weft(etcd: EtcdServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WEFT, *args, "--etcd-endpoints", etcd.endpoint],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_config_set_writes_flannel_json_that_etcdctl_reads(etcd_server: EtcdServer) -> None:
    cp = weft(etcd_server, "config", "set", "--network", "10.244.0.0/16", "--backend", "vxlan",
              "--vni", "4", "--port", "4789", "--direct-routing")  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    raw = etcd_server.etcdctl("get", "--print-value-only", "/coreos.com/network/config").strip()
    assert json.loads(raw) == {
        "Network": "10.244.0.0/16",
        "Backend": {"Type": "vxlan", "VNI": 4, "Port": 4789, "DirectRouting": True},
    }
    cp = weft(etcd_server, "config", "show")
    assert cp.returncode == 0
    assert "VNI 4, port 4789" in cp.stdout and "10.244.1.0 to 10.244.255.0" in cp.stdout


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--network", "10.244.0.0/33"], "Network"),
        (["--network", "10.244.0.0/16", "--subnet-len", "40"], "SubnetLen"),
        (["--network", "10.244.0.0/16", "--vni", "99999999"], "VNI"),
    ],
)
def test_config_set_refuses_bad_values_in_one_line(
    etcd_server: EtcdServer, args: list[str], field: str
) -> None:
    cp = weft(etcd_server, "config", "set", *args)
    assert cp.returncode == 1
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weft: error:") and field in lines[0]
    assert "Traceback" not in cp.stderr


def test_config_show_without_config_says_how_to_write_one(etcd_server: EtcdServer) -> None:
    cp = weft(etcd_server, "config", "show")
    assert cp.returncode == 1 and "weft config set" in cp.stderr


def test_leases_lists_flannel_leases_and_flags_foreign_keys(etcd_server: EtcdServer) -> None:
    etcd_server.etcdctl("put", "/coreos.com/network/subnets/10.244.3.0-24", FLANNEL_LEASE)
    lease = etcd_server.etcdctl("lease", "grant", "600").split()[1]
    etcd_server.etcdctl(
        "put", "--lease", lease, "/coreos.com/network/subnets/10.244.4.0-24",
        '{"PublicIP":"192.168.64.4","PublicIPv6":null}',
    )  # fmt: skip
    etcd_server.etcdctl("put", "/coreos.com/network/subnets/garbage", "not json")
    cp = weft(etcd_server, "leases", "--json")
    assert cp.returncode == 0, cp.stderr
    rows = {r.get("subnet", r.get("key")): r for r in json.loads(cp.stdout)}
    assert rows["10.244.3.0/24"]["vtep_mac"] == "c6:d2:32:6f:8f:44"
    assert rows["10.244.3.0/24"]["expires_in"] is None  # a reservation
    assert rows["10.244.4.0/24"]["backend"] == "udp"
    assert 500 < rows["10.244.4.0/24"]["expires_in"] <= 600
    assert "error" in rows["/coreos.com/network/subnets/garbage"]
    text = weft(etcd_server, "leases").stdout
    assert "never (reservation)" in text and "unreadable" in text


def test_unreachable_etcd_is_one_clear_line() -> None:
    cp = subprocess.run(
        [*WEFT, "leases", "--etcd-endpoints", "http://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cp.returncode == 1
    assert "unreachable" in cp.stderr and "Traceback" not in cp.stderr
