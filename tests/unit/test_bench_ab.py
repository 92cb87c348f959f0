"""bench.ab: the summary of interleaved pairs, and its argument errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import ab


def test_summary_gives_means_and_ratios_to_kernel_vxlan() -> None:
    records = [
        {"round": 0, "mode": "kernel-vxlan", "variant": "A", "test": "tcp4", "value": 4.0},
        {"round": 1, "mode": "kernel-vxlan", "variant": "A", "test": "tcp4", "value": 6.0},
        {"round": 0, "mode": "weft-vxlan-kernel", "variant": "A", "test": "tcp4", "value": 3.0},
        {"round": 0, "mode": "weft-vxlan-kernel", "variant": "B", "test": "tcp4", "value": 5.0},
    ]
    lines = ab.summary(records)
    assert lines[0].startswith("kernel-vxlan") and "mean 5.00 (1.00× kernel VXLAN)" in lines[0]
    assert "A   tcp4   3.00  mean 3.00 (0.60× kernel VXLAN)" in lines[1]
    assert "B   tcp4   5.00  mean 5.00 (1.00× kernel VXLAN)" in lines[2]


def test_unknown_modes_and_tests_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert ab.main(["--modes", "weft-vxlan,warp", "--tests", "tcp9"]) == 2
    err = capsys.readouterr().err
    assert err == "python -m bench.ab: unknown mode or test: warp, tcp9\n"


def test_summary_gives_the_weft_cpu_per_unit_moved() -> None:
    records = [
        {"round": 0, "mode": "kernel-weft-vxlan", "variant": "A", "test": "tcp1", "value": 3.0,
         "weft_cpu": 2.0},
        {"round": 1, "mode": "kernel-weft-vxlan", "variant": "A", "test": "tcp1", "value": 3.0,
         "weft_cpu": 3.0},
        {"round": 0, "mode": "kernel-weft-vxlan", "variant": "A", "test": "udp64", "value": 150,
         "weft_cpu": 4.5},
    ]  # fmt: skip
    lines = ab.summary(records)
    assert lines[0].endswith("mean 3.00, weft CPU 2.50 s/GB")
    assert lines[1].endswith("mean 150.00, weft CPU 4.50 s/M datagrams")


def test_a_source_that_is_not_weft_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ab.main(["--modes", "weft-vxlan", "--a-src", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m bench.ab: {tmp_path}: not a weft source tree\n"


def test_weft_source_switches_directory_and_path_and_restores_them(tmp_path: Path) -> None:
    cwd, path = os.getcwd(), os.environ.get("PYTHONPATH")
    with ab.weft_source(tmp_path):
        assert os.getcwd() == str(tmp_path)
        assert os.environ["PYTHONPATH"] == str(tmp_path)
    assert os.getcwd() == cwd and os.environ.get("PYTHONPATH") == path
    with ab.weft_source(None):
        assert os.getcwd() == cwd


@pytest.mark.parametrize(
    "test",
    [
        "udp64@60M",
        "udp64@500K",
        "udp64@1G",
        "udp64@100000",
        "tcp1@1500M",
        "tcp4@1G",
        "pingload@800M",
    ],
)
def test_a_fixed_rate_is_a_test(test: str) -> None:
    assert ab.known_test(test)


@pytest.mark.parametrize(
    "test",
    ["udp64@", "udp64@0", "udp64@60X", "udp64@-1", "tcp2@60M", "rr@1M", "tcp1@", "pingload"],
)
def test_a_malformed_fixed_rate_is_an_unknown_test(
    test: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not ab.known_test(test)
    assert ab.main(["--modes", "weft-vxlan", "--tests", test]) == 2
    assert capsys.readouterr().err == f"python -m bench.ab: unknown mode or test: {test}\n"


def test_the_fixed_rate_reaches_iperf3_and_counts_per_datagram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """probe() hands the rate to iperf3's -b (0: as fast as it can) and reports the
    weft CPU per million datagrams received."""
    seen: list[list[str]] = []

    def iperf3(env: object, args: list[str], seconds: float) -> str:
        seen.append(args)
        return '{"end": {"sum_received": {"packets": 1000, "lost_packets": 0, "seconds": 1.0}}}'

    monkeypatch.setattr(ab.probes, "_iperf3", iperf3)

    class Env:
        weft_pids = (os.getpid(),)

    got = ab.probe(Env(), "udp64@60M", 1.0)  # type: ignore[arg-type]
    assert seen[-1][-2:] == ["-b", "60M"]
    assert got.value == pytest.approx(1.0) and got.weft_cpu is not None and got.weft_cpu >= 0
    assert got.machine_cpu is not None and got.machine_cpu >= 0
    assert got.retransmits is None
    ab.probe(Env(), "udp64", 1.0)  # type: ignore[arg-type]
    assert seen[-1][-2:] == ["-b", "0"]
    lines = ab.summary(
        [{"round": 0, "mode": "weft-vxlan", "variant": "A", "test": "udp64@60M", "value": 115,
          "weft_cpu": 4.5}]
    )  # fmt: skip
    assert lines[0].endswith("weft CPU 4.50 s/M datagrams")


def test_a_fixed_tcp_rate_reaches_iperf3_per_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """tcp1@RATE / tcp4@RATE hand the rate to iperf3's -b with the streams, and
    report Gbit/s and the weft CPU per GB; plain tcp1 has no -b."""
    seen: list[list[str]] = []

    def iperf3(env: object, args: list[str], seconds: float) -> str:
        seen.append(args)
        received = {"bytes": 125_000_000, "seconds": 1.0, "bits_per_second": 1e9}
        return json.dumps({"end": {"sum_received": received, "sum_sent": {"retransmits": 7}}})

    monkeypatch.setattr(ab.probes, "_iperf3", iperf3)

    class Env:
        weft_pids = (os.getpid(),)

    got = ab.probe(Env(), "tcp4@1500M", 1.0)  # type: ignore[arg-type]
    assert seen[-1] == ["-P", "4", "-b", "1500M"]
    assert got.value == pytest.approx(1.0) and got.weft_cpu is not None and got.weft_cpu >= 0
    assert got.weft_user_cpu is not None and 0 <= got.weft_user_cpu <= got.weft_cpu
    assert got.machine_cpu is not None and got.machine_cpu >= 0
    assert got.retransmits == 7
    ab.probe(Env(), "tcp1@800M", 1.0)  # type: ignore[arg-type]
    assert seen[-1] == ["-b", "800M"]
    ab.probe(Env(), "tcp1", 1.0)  # type: ignore[arg-type]
    assert seen[-1] == []
    lines = ab.summary(
        [{"round": 0, "mode": "weft-vxlan", "variant": "A", "test": "tcp1@1500M", "value": 1.5,
          "weft_cpu": 2.5, "retransmits": 0},
         {"round": 1, "mode": "weft-vxlan", "variant": "A", "test": "tcp1@1500M", "value": 1.5,
          "weft_cpu": 2.5, "retransmits": 312}]
    )  # fmt: skip
    assert lines[0].endswith("weft CPU 2.50 s/GB, retransmits 0 / 312")


def test_the_summary_gives_the_whole_machines_cpu_beside_wefts() -> None:
    """Work weft hands to a kernel thread leaves weft's CPU figure: the machine's
    is shown too, for kernel VXLAN (no weft) as well; and how much of weft's is its
    own code (Python, numpy), the rest being the kernel's inside its system calls."""
    lines = ab.summary(
        [{"round": 0, "mode": "kernel-vxlan", "variant": "A", "test": "tcp1", "value": 2.0,
          "machine_cpu": 5.5},
         {"round": 0, "mode": "weft-vxlan", "variant": "A", "test": "tcp1", "value": 1.0,
          "weft_cpu": 2.5, "machine_cpu": 6.0, "weft_user_cpu": 1.0},
         {"round": 1, "mode": "weft-vxlan", "variant": "A", "test": "tcp1", "value": 1.0,
          "weft_cpu": 3.5, "machine_cpu": 7.0, "weft_user_cpu": 2.0}]
    )  # fmt: skip
    assert lines[0].endswith("(1.00× kernel VXLAN), machine CPU 5.50 s/GB")
    assert lines[1].endswith("weft CPU 3.00 s/GB (user space 1.50), machine CPU 6.50 s/GB")


def test_underlay_mtu_reaches_every_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    """--underlay-mtu 9000: the labs are built with it (the jumbo pairs of the
    eighteenth round); the lab itself is the bench's, not this test's subject."""
    built: list[int] = []

    class Stop(Exception):
        pass

    def build(mode, setting, mtu, *rest):  # type: ignore[no-untyped-def]
        built.append(mtu)
        raise Stop

    monkeypatch.setattr(ab.envmod, "build", build)
    with pytest.raises(Stop):
        ab.main(["--modes", "weft-vxlan", "--tests", "tcp1", "--underlay-mtu", "9000"])
    with pytest.raises(Stop):
        ab.main(["--modes", "weft-vxlan", "--tests", "tcp1"])
    assert built == [9000, 1500]


def test_counters_are_found_where_weft_keeps_them() -> None:
    """--counters: a fast-path counter, a forwarder counter and a nested drop reason
    are read from a status as `weft status` gives it; one it lacks is 0."""
    status = {
        "counters": {"tx_packets": 9, "drops": {"send_failed": 3}},
        "offload": {"counters": {"ordered_sends": 41, "tx_packets": 1}},
    }
    assert ab.status_count(status, "ordered_sends") == 41
    assert ab.status_count(status, "tx_packets") == 1  # the fast paths' first
    assert ab.status_count(status, "drops.send_failed") == 3
    assert ab.status_count(status, "drops.no_route") == 0
    assert ab.status_count({"counters": {}, "offload": None}, "egress_waits") == 0


def test_counters_grow_per_probe_and_show_in_the_summary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each probe's record holds how much the counters grew during it (summed over
    the weft nodes), for weft modes; the summary lists them per round."""
    sends = [0]

    class Lab:
        def close(self) -> None:
            pass

    class Env:
        lab = Lab()

        def weft_status(self) -> dict[str, dict]:
            node = {"offload": {"counters": {"ordered_sends": sends[0]}}}
            return {"n1": node, "n2": node}

    def probe(env: object, test: str, seconds: float) -> ab.Reading:
        sends[0] += 5
        return ab.Reading(1.0)

    monkeypatch.setattr(ab.envmod, "build", lambda *a: Env())
    monkeypatch.setattr(ab, "probe", probe)
    records = ab.run(["kernel-vxlan", "weft-vxlan"], ["tcp1"], 1, {"A": [], "B": []}, 1.0,
                     counters=["ordered_sends"])  # fmt: skip
    assert "counters" not in records[0]
    assert [r["counters"] for r in records[1:]] == [{"ordered_sends": 10}] * 2
    assert ab.summary(records)[1].endswith("mean 1.00 (1.00× kernel VXLAN), ordered_sends 10")


def test_a_variants_python_reaches_its_weft_processes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--a-python / --b-python: while a variant's lab is built, weft's argv starts
    with that Python; before and after, with the bench's own. A path that is not an
    executable is a one-line error, and so is asking for weft-kernel (its agents
    come from the lab cluster)."""
    import sys

    monkeypatch.delenv(ab.envmod.WEFT_PYTHON_ENV, raising=False)
    assert ab.envmod.weft_python() == sys.executable
    node = SimpleNamespace(underlay_ip="192.168.77.11")
    args = ("vxlan", node, "10.244.1.0/24", node, "10.244.2.0/24", "aa", "bb", 1500, tmp_path)
    with ab.weft_python(Path("/opt/py313/bin/python")):
        assert ab.envmod._weft_argv(*args)[:3] == ["/opt/py313/bin/python", "-m", "control.cli"]
    assert ab.envmod._weft_argv(*args)[0] == sys.executable
    with ab.weft_python(None):
        assert ab.envmod.weft_python() == sys.executable
    assert ab.main(["--modes", "weft-vxlan", "--b-python", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m bench.ab: {tmp_path / 'nope'}: not an executable Python\n"
    modes = ["--modes", "weft-vxlan,weft-kernel", "--a-python", sys.executable]
    assert ab.main(modes) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m bench.ab: --a-python/--b-python: weft-kernel runs")
    assert err.count("\n") == 1


def test_pings_beside_a_stream_give_their_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    """pingload@RATE: pings every 5 ms while iperf3 runs one TCP stream at RATE; the
    reading is their p99.9, so that one long stall among a thousand pings shows."""
    seen: list[list[str]] = []

    def iperf3(env: object, args: list[str], seconds: float) -> str:
        seen.append(args)
        received = {"bytes": 100_000_000, "seconds": seconds, "bits_per_second": 8e8}
        return json.dumps({"end": {"sum_received": received, "sum_sent": {"retransmits": 0}}})

    class Lab:
        def run(self, ns: object, *argv: str, **kw: object) -> object:
            assert argv[0] == "ping" and argv[argv.index("-i") + 1] == "0.005"
            count = int(argv[argv.index("-c") + 1])
            times = [1.0] * (count - 1) + [45.0]  # one stall
            lines = [f"64 bytes from x: icmp_seq={i} ttl=64 time={t} ms" for i, t in
                     enumerate(times)]  # fmt: skip
            lines.append(f"{count} packets transmitted, {count} received, 0% packet loss")

            class Done:
                stdout, stderr, returncode = "\n".join(lines), "", 0

            return Done()

    class Env:
        lab, pod1, pod2 = Lab(), "pod1", type("Pod", (), {"ip": "10.244.2.2"})()
        weft_pids = ()

    monkeypatch.setattr(ab.probes, "_iperf3", iperf3)
    monkeypatch.setattr(ab.probes.time, "sleep", lambda s: None)
    got = ab.probe(Env(), "pingload@800M", 5.0)  # type: ignore[arg-type]
    assert seen == [["-b", "800M"]]
    assert got.value == pytest.approx(45.0 - 0.001 * 999 * 44.0, rel=0.01)  # the p99.9
    assert got.weft_cpu is None
    # … the median and p99 beside it, and the stream's rate; listed in the summary
    assert got.extra == {"p50_ms": 1.0, "p99_ms": 1.0, "gbps": pytest.approx(0.8)}
    rec = {"round": 0, "mode": "weft-vxlan", "variant": "A", "test": "pingload@800M",
           "value": 1.04, "extra": {"p50_ms": 1.0, "p99_ms": 1.0}}  # fmt: skip
    assert ab.summary([rec, {**rec, "round": 1, "extra": {"p50_ms": 2.0, "p99_ms": 3.5}}]) == [
        "weft-vxlan           A   pingload@800M 1.04 / 1.04  mean 1.04, p50_ms 1.0 / 2.0, "
        "p99_ms 1.0 / 3.5"
    ]
    stats = ab.probes.ping_under_load(Env(), 5.0, "800M")  # type: ignore[arg-type]
    assert stats["received"] == 1000 and stats["max_ms"] == 45.0
    assert stats["gbps"] == pytest.approx(0.8)


def test_turnaround_probes_need_vxlan_modes(capsys: pytest.CaptureFixture[str]) -> None:
    """turnload@RATE reads VXLAN-decoded captures: other modes are a one-line error."""
    assert ab.main(["--modes", "weft-vxlan,weft-udp", "--tests", "turnload@100M"]) == 2
    err = capsys.readouterr().err
    assert err == "python -m bench.ab: turnload@100M needs VXLAN modes, not weft-udp\n"
