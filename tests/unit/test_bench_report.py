"""bench: summaries, ratios, the markdown report, charts, CLI defaults and the micro harness
(no root, no namespaces)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bench import env as envmod
from bench.cli import add_arguments, dataplane_params
from bench.dataplane import Params, RunRecord, summarize_runs
from bench.metrics import COST, HEADLINE, LOSSES, METRICS
from bench.micro import codec_loops, make_pair, route_table
from bench.report import fmt_summary, markdown


def _record(mode: str, tcp: list[float], ping: list[float]) -> RunRecord:
    rec = RunRecord("wire", 1500, mode, envmod.MODES[mode].label, "", "none", 1450)
    for v in tcp:
        rec.add("tcp1_gbps", v)
    for v in ping:
        rec.add("ping_p50_ms", v)
    return rec


def _doc() -> dict[str, Any]:
    runs = summarize_runs(
        [
            _record("plain", [10.0, 12.0, 11.0], [0.1, 0.1, 0.1]),
            _record("kernel-vxlan", [8.0, 8.0, 8.0], [0.2, 0.2, 0.2]),
            _record("weft-vxlan", [1.0, 0.8, None], [0.8, 0.6, 0.7]),
        ]
    )
    return {
        "command": "python -m bench",
        "params": {"repeat": 3, "seconds": 5},
        "machine": {"nproc": 2, "loadavg": ["0.1", "0.2", "0.3"]},
        "settings": {"wire": "knobs"},
        "modes": {},
        "runs": runs,
        "computed": {"tcp": [], "udp64_frame_bytes": {"vxlan": 156}},
    }


def test_summaries_and_ratios_use_the_same_block() -> None:
    runs = {r["mode"]: r for r in _doc()["runs"]}
    weft = runs["weft-vxlan"]
    assert weft["summary"]["tcp1_gbps"] == {"min": 0.8, "median": 0.9, "max": 1.0, "n": 2}
    assert weft["ratios"]["tcp1_gbps"]["vs_kernel_vxlan"] == pytest.approx(0.9 / 8.0)
    assert weft["ratios"]["tcp1_gbps"]["vs_plain"] == pytest.approx(0.9 / 11.0)
    assert weft["ratios"]["ping_p50_ms"]["vs_kernel_vxlan"] == pytest.approx(3.5)
    assert runs["kernel-vxlan"]["ratios"]["tcp1_gbps"]["vs_kernel_vxlan"] == 1.0


def test_markdown_has_tables_ratios_and_computed_costs() -> None:
    md = markdown(_doc(), charts=["dataplane_wire_1500.png"])
    assert "| mode | TCP 1 stream (Gbit/s)" in md
    assert "| weft vxlan | 0.90 (0.80–1.00)" in md
    assert "0.11× / 0.08×" in md  # 0.9/8 and 0.9/11
    assert "![dataplane_wire_1500](dataplane_wire_1500.png)" in md
    assert "vxlan 156 B" in md
    assert fmt_summary("tcp1_gbps", {"min": 1, "median": 1, "max": 1, "n": 1}) == "1.00"
    assert fmt_summary("tcp1_gbps", None) == "–"


def test_every_reported_metric_is_described() -> None:
    assert set(HEADLINE) | set(COST) | set(LOSSES) <= set(METRICS)


def test_where_udp_datagrams_were_lost_is_a_table_of_its_own() -> None:
    """The nineteenth round's finding, as the report shows it: weft delivered every
    datagram and the receiving pod's socket dropped 44 % (its buffer full). Runs
    without the loss figures (an older results.json) get no such table."""
    assert "Where the UDP 64 B" not in markdown(_doc())
    rec = RunRecord("wire", 1500, "weft-vxlan", "weft vxlan", "", "vxlan", 1450)
    for where, pct in (("loss", 44.2), ("lost_pod_socket", 44.1), ("lost_node_socket", 0.0),
                       ("lost_devices", 0.0), ("lost_weft", 0.0)):  # fmt: skip
        rec.add(f"udp64_{where}_pct", pct)
    doc = {**_doc(), "runs": summarize_runs([rec])}
    md = markdown(doc)
    table = md[md.index("Where the UDP 64 B datagrams were lost (% of those sent):") :]
    assert "| mode | UDP 64 B loss (%) | at the receiving pod's socket (buffer full) (%)" in table
    assert "| weft vxlan | 44.2 | 44.1 | 0.0 | 0.0 | 0.0 |" in table


def test_charts(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.charts import write_charts

    names = write_charts(_doc(), tmp_path)
    assert names == ["dataplane_wire_1500.png"]
    assert (tmp_path / names[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_defaults_full_and_quick() -> None:
    full = dataplane_params(_args(), "x")
    assert (full.seconds, full.repeat, full.ping_count) == (5.0, 3, 200)
    assert full.modes == envmod.DEFAULT_MODES and full.settings == ("wire", "offload")
    quick = dataplane_params(_args("--quick"), "x")
    assert (quick.seconds, quick.repeat) == (1.0, 1)
    assert {"plain", "kernel-vxlan", "weft-vxlan"} <= set(quick.modes)
    assert _args("micro", "--best-of", "3").bench_what == "micro"
    ctl = _args("control", "--leases", "10,20")
    assert ctl.bench_what == "control" and ctl.leases == (10, 20)


def test_weft_options_reach_every_weft_and_the_report() -> None:
    from bench.report import _weft_args

    argv = ("--weft-queues", "2", "--weft-busy-poll", "50", "--weft-cpus", "0")
    p = dataplane_params(_args(*argv, "--weft-egress-thread"), "x")
    assert p.weft_extra() == (
        "--busy-poll", "50", "--queues", "2", "--cpus", "0", "--egress-thread",
    )  # fmt: skip
    warm = dataplane_params(_args("--weft-keep-warm", "2000"), "x").weft_extra()
    assert warm == ("--keep-warm", "2000")
    assert _weft_args({"weft_keep_warm": 2000}) == ["--keep-warm 2000"]
    assert dataplane_params(_args(*argv), "x").weft_extra()[-1] == "0"
    params = {"weft_queues": 2, "weft_busy_poll": 50, "weft_cpus": "0"}
    assert _weft_args({**params, "weft_egress_thread": True}) == [
        "--busy-poll 50",
        "--queues 2",
        "--cpus 0",
        "--egress-thread",
    ]
    assert _weft_args({**params, "weft_egress_thread": False})[-1] == "--cpus 0"


def test_cli_rejects_unknown_modes_and_silly_lengths() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        dataplane_params(_args("--modes", "plain,warp"), "x")
    with pytest.raises(ValueError):
        dataplane_params(_args("--seconds", "0"), "x")
    with pytest.raises(ValueError, match="unknown setting"):
        dataplane_params(_args("--settings", "fast"), "x")


def test_blocks_jumbo_is_wire_only() -> None:
    assert Params(settings=("wire", "offload")).blocks() == [("wire", 1500), ("offload", 1500)]
    assert Params(settings=("wire", "offload"), jumbo=True).blocks()[-1] == ("wire", 9000)
    assert Params(settings=("offload",), jumbo=True).blocks() == [("offload", 1500)]


def test_knobs_per_setting_and_mode() -> None:
    plain, weft = envmod.MODES["plain"], envmod.MODES["weft-vxlan"]
    assert envmod.node_knobs("wire", plain) == envmod.node_knobs("wire", weft)
    assert "gso" in envmod.node_knobs("wire", plain)
    assert envmod.node_knobs("offload", plain) == ()
    assert envmod.node_knobs("offload", weft) == ("tx", "off")
    assert envmod.node_knobs("offload", envmod.MODES["weft-kernel"]) == ("tx", "on", "tso", "on")
    assert envmod.pod_mtu(1500, weft) == 1450
    assert envmod.pod_mtu(9000, envmod.MODES["weft-udp"]) == 8972
    assert envmod.MODES["weft-vxlan-kernel"].weft_nodes == ("n1",)
    assert envmod.MODES["kernel-weft-vxlan"].weft_nodes == ("n2",)
    assert envmod.MODES["kernel-weft-vxlan"].userspace_receiver
    assert envmod.node_knobs("offload", envmod.MODES["naive-udp"]) == ("tx", "off")
    assert "naive-udp" not in envmod.DEFAULT_MODES and "weft-kernel" in envmod.DEFAULT_MODES
    with pytest.raises(ValueError):
        envmod.node_knobs("turbo", plain)


@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_micro_loops_forward_every_packet(backend: str) -> None:
    """The harness must measure forwarding, not drops (the udp backend's TTL is refilled)."""
    a, b = make_pair(backend)
    loops = codec_loops(backend, 64, (a, b))
    for loop in loops.values():
        loop(1000)
    assert not any(a.counters.drops) and not any(b.counters.drops)
    assert a.counters.tx_packets == 2001  # the setup's check, from_device, round_trip
    assert b.counters.rx_packets == 2001


def test_micro_route_tables() -> None:
    import random

    table, addrs = route_table(1000, random.Random(1))
    assert len(table) == 1000 and len(addrs) == 1000
    assert all(table.lookup_v4(a) is not None for a in addrs)
