"""The dataplane benchmark: every mode, side by side, in one run.

For each underlay setting (and MTU), one lab per mode is built up front; then
the repeats go round-robin over the modes (repeat 1 of every mode, then repeat
2, …), so a burst of background load on this shared machine hits every mode
alike rather than one. Each measurement reads CPU and underlay counters before
and after. Results are written after every (setting, MTU) block, so an
interrupted run still leaves its numbers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import env as envmod
from bench import probes
from bench.env import MODES, Env
from bench.overhead import tcp_wire_cost, udp_frame_bytes, wire_table
from bench.parse import cpuinfo_model
from bench.progress import Progress
from bench.sampling import delta, machine_cpu_seconds, pid_rss_kb, snapshot
from bench.stats import per_unit, ratio, summarize
from control.podgro import FLUSH_TIMEOUT_US

TESTS = ("tcp1", "tcp4", "udp64", "ping", "rr", "udprr")
REFERENCES = {"kernel-vxlan": "vs_kernel_vxlan", "plain": "vs_plain"}


@dataclass
class Params:
    seconds: float = 5.0
    repeat: int = 3
    modes: tuple[str, ...] = envmod.DEFAULT_MODES
    settings: tuple[str, ...] = envmod.SETTINGS
    mtu: int = 1500
    jumbo: bool = False
    ping_count: int = 200
    ping_interval_s: float = 0.01
    rr_seconds: float = 2.0
    tests: tuple[str, ...] = TESTS
    budget_s: float = 20 * 60.0
    quick: bool = False
    profile: bool = False
    weft_offload: str | None = None  # passed as --offload to weft dataplane run when set
    weft_busy_poll: int | None = None  # passed as --busy-poll when set
    weft_keep_warm: int | None = None  # passed as --keep-warm when set
    weft_queues: int | None = None  # passed as --queues when set
    weft_cpus: str | None = None  # passed as --cpus when set
    weft_egress_thread: bool = False  # passed as --egress-thread when set
    #: GRO forwarding for UDP on the pods' node-side veths, in every mode (the lab's
    #: Lab.udp_gro_forwarding): a pod's small datagrams cross the node merged.
    pod_gro: bool = True
    #: The pods' veths' gro_flush_timeout when pod_gro is on: how long a merged UDP
    #: packet stays open, and so how long a lone datagram may wait (udprr measures it).
    pod_gro_flush_us: int = FLUSH_TIMEOUT_US

    def weft_extra(self) -> tuple[str, ...]:
        extra = ("--offload", self.weft_offload) if self.weft_offload else ()
        if self.weft_busy_poll:
            extra += ("--busy-poll", str(self.weft_busy_poll))
        if self.weft_keep_warm:
            extra += ("--keep-warm", str(self.weft_keep_warm))
        if self.weft_queues:
            extra += ("--queues", str(self.weft_queues))
        if self.weft_cpus:
            extra += ("--cpus", self.weft_cpus)
        if self.weft_egress_thread:
            extra += ("--egress-thread",)
        return extra

    command: str = ""

    def blocks(self) -> list[tuple[str, int]]:
        """(setting, underlay MTU) pairs to run. Jumbo frames only for ``wire``: with
        offloads on, 64 KB super-packets cross the veth whatever the MTU."""
        out = [(s, self.mtu) for s in self.settings]
        if self.jumbo and "wire" in self.settings and self.mtu != 9000:
            out.append(("wire", 9000))
        return out


@dataclass
class RunRecord:
    setting: str
    mtu: int
    mode: str
    label: str
    note: str
    knobs: str
    pod_mtu: int
    samples: dict[str, list[float | None]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    weft_final: dict[str, Any] = field(default_factory=dict)

    def add(self, metric: str, value: float | None) -> None:
        self.samples.setdefault(metric, []).append(value)


def machine_info() -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    b0, t0 = machine_cpu_seconds()
    time.sleep(1.0)
    b1, t1 = machine_cpu_seconds()
    return {
        "git": git_state(),
        "nproc": os.cpu_count(),
        "cpu_model": cpuinfo_model(read("/proc/cpuinfo")),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": read("/proc/loadavg").split()[:3],
        "busy_pct_before": round(100 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else None,
    }


def git_state() -> dict[str, Any]:
    """The commit measured, and which tracked files differ from it (others may be
    editing the tree while the bench runs; docs/benchmarks.md runs from an export)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    exported = os.environ.get("WEFT_BENCH_COMMIT")  # a `git archive` export has no .git
    if exported:
        return {"commit": exported, "modified": [], "source": str(root)}

    def git(*args: str) -> str:
        try:
            cp = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return cp.stdout if cp.returncode == 0 else ""

    status = git("status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in status.splitlines() if len(line) > 3]
    return {"commit": git("rev-parse", "--short=12", "HEAD").strip() or None, "modified": changed}


def profile_block(envs: dict[str, Env], p: Params, out: Path, progress: Progress) -> dict[str, Any]:
    """Extra, uncounted runs of tcp1 and udp64 with py-spy on the weft processes."""
    from bench.profile import profile_run

    profiles: dict[str, Any] = {}
    for key, e in envs.items():
        if not e.weft or not e.mode.userspace_receiver:
            continue
        tag = f"{e.setting}-{e.underlay_mtu}-{key}"
        entry: dict[str, Any] = {}
        for test in ("tcp1", "udp64"):

            def one(test: str = test, e: Env = e) -> str:
                if test == "tcp1":
                    return f"{probes.tcp(e, p.seconds).bits_per_second / 1e9:.2f} Gbit/s"
                res = probes.udp_small(e, p.seconds)
                return f"{res.received_pps / 1e3:.0f} kpps"

            try:
                entry[test] = profile_run(e, one, p.seconds, out, f"{tag}-{test}")
            except Exception as exc:
                entry[test] = {"error": str(exc)[:300]}
            progress.note(f"{tag} {test}: profiled ({entry[test].get('run', 'failed')})")
        profiles[f"{e.setting}/{e.underlay_mtu}/{key}"] = entry
    return profiles


def measure(env: Env, record: RunRecord, test: str, p: Params) -> str:
    """Run one test in ``env``; add its samples to ``record``; return a short summary."""
    pids = env.weft_pids
    # (read outside the CPU snapshots: the reads start processes of their own)
    lost_before = env.loss_counters() if test == "udp64" else {}
    before = snapshot(pids, env.wire_counters())
    if test in ("tcp1", "tcp4"):
        res = probes.tcp(env, p.seconds, streams=1 if test == "tcp1" else 4)
        d = delta(before, snapshot(pids, env.wire_counters()))
        record.add(f"{test}_gbps", res.bits_per_second / 1e9)
        if test == "tcp1":
            record.add("tcp1_retransmits", res.retransmits)
            record.add("tcp1_weft_cpu_s_per_gb", per_unit(d.procs_cpu_s, res.bytes, 1e9))
            record.add("tcp1_weft_user_cpu_s_per_gb", per_unit(d.procs_user_cpu_s, res.bytes, 1e9))
            record.add("tcp1_machine_cpu_s_per_gb", per_unit(d.machine_cpu_s, res.bytes, 1e9))
            record.add(
                "tcp1_wire_bytes_per_payload",
                d.wire_bytes / res.bytes if d.wire_bytes and res.bytes else None,
            )
        return f"{res.bits_per_second / 1e9:.2f} Gbit/s"
    if test == "udp64":
        res = probes.udp_small(env, p.seconds)
        d = delta(before, snapshot(pids, env.wire_counters()))
        lost_after = env.loss_counters()
        for where, n in lost_after.items():
            record.add(
                f"udp64_lost_{where}_pct",
                100.0 * (n - lost_before[where]) / res.sent_packets if res.sent_packets else None,
            )
        record.add("udp64_kpps", res.received_pps / 1e3)
        record.add("udp64_sent_kpps", res.sent_packets / res.seconds / 1e3 if res.seconds else None)
        record.add("udp64_loss_pct", res.loss_pct)
        record.add("udp64_weft_cpu_s_per_mpkt", per_unit(d.procs_cpu_s, res.received_packets, 1e6))
        record.add(
            "udp64_weft_user_cpu_s_per_mpkt",
            per_unit(d.procs_user_cpu_s, res.received_packets, 1e6),
        )
        record.add(
            "udp64_machine_cpu_s_per_mpkt", per_unit(d.machine_cpu_s, res.received_packets, 1e6)
        )
        record.add(
            "udp64_wire_frame_bytes", d.wire_bytes / d.wire_packets if d.wire_packets else None
        )
        return f"{res.received_pps / 1e3:.0f} kpps received, {res.loss_pct:.1f}% lost"
    if test == "ping":
        st = probes.ping(env, p.ping_count, p.ping_interval_s)
        record.add("ping_p50_ms", st["p50_ms"])
        record.add("ping_p99_ms", st["p99_ms"])
        record.add("ping_loss_pct", st["loss_pct"])
        return f"p50 {st['p50_ms']:.3f} ms, p99 {st['p99_ms']:.3f} ms"
    if test in ("rr", "udprr"):
        udp = test == "udprr"
        res = probes.rr(env, p.rr_seconds, udp=udp)
        key = "udp_rr" if udp else "rr"
        record.add(f"{key}_per_s", res["per_second"])
        record.add(f"{key}_p50_ms", res.get("p50_ms"))
        p50 = res.get("p50_ms", float("nan"))
        lost = f", {res['lost']:.0f} lost" if udp else ""
        return f"{res['per_second']:.0f} trans/s, p50 {p50:.3f} ms{lost}"
    raise ValueError(f"unknown test {test!r}")


def summarize_runs(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """Each run as a dict with min/median/max per metric and ratios to the references
    of the same (setting, MTU) block."""
    out = []
    summaries = {
        (r.setting, r.mtu, r.mode): {k: summarize(v) for k, v in r.samples.items()} for r in runs
    }
    for r in runs:
        summ = summaries[(r.setting, r.mtu, r.mode)]
        ratios: dict[str, dict[str, float | None]] = {}
        for metric, s in summ.items():
            ratios[metric] = {}
            for ref_mode, name in REFERENCES.items():
                ref = summaries.get((r.setting, r.mtu, ref_mode), {}).get(metric)
                ratios[metric][name] = ratio(s["median"], ref["median"] if ref else None)
        d = asdict(r)
        d["summary"] = summ
        d["ratios"] = ratios
        out.append(d)
    return out


def computed_costs(mtus: list[int]) -> dict[str, Any]:
    return {
        "tcp": wire_table(tuple(sorted(set(mtus) | {1500, 9000}))),
        "udp64_frame_bytes": {
            e: udp_frame_bytes(probes.SMALL_PAYLOAD, e) for e in ("none", "udp", "vxlan")
        },
    }


def run(
    p: Params,
    out: Path,
    progress: Progress | None = None,
    on_block: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the whole benchmark; returns (and hands ``on_block`` after every block) the
    result document."""
    missing = envmod.check_tools()
    if missing:
        raise ValueError("the dataplane benchmark needs: " + ", ".join(missing))
    progress = progress or Progress()
    blocks = p.blocks()
    modes = [MODES[m] for m in p.modes]
    total = len(blocks) * len(modes) * (1 + p.repeat * len(p.tests))
    progress.start(total)
    started = time.monotonic()
    doc: dict[str, Any] = {
        "kind": "dataplane",
        "schema": 1,
        "command": p.command,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "params": {**asdict(p), "blocks": blocks},
        "settings": {
            "wire": "ethtool -K eth0 " + " ".join(envmod.WIRE_KNOBS) + " on both nodes, every mode",
            "offload": "veth defaults for plain and kernel-vxlan; ethtool -K eth0 "
            + " ".join(envmod.WEFT_OFFLOAD_KNOBS)
            + " on both nodes for modes where weft decapsulates in userspace"
            + " (weft-kernel: ethtool -K eth0 "
            + " ".join(envmod.KERNEL_AGENT_OFFLOAD_KNOBS)
            + ", back to the defaults)",
        },
        "modes": {m.key: {"label": m.label, "encap": m.encap, "note": m.note} for m in modes},
        "computed": computed_costs([mtu for _, mtu in blocks]),
        "runs": [],
        "profiles": {},
        "budget_exhausted": False,
    }
    records: list[RunRecord] = []
    logdir = out / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="weft-bench-") as sockdir:
        for setting, mtu in blocks:
            envs: dict[str, Env] = {}
            block_records: dict[str, RunRecord] = {}
            try:
                for mode in modes:
                    knobs = envmod.node_knobs(setting, mode)
                    rec = RunRecord(
                        setting,
                        mtu,
                        mode.key,
                        mode.label,
                        mode.note,
                        ("ethtool -K eth0 " + " ".join(knobs)) if knobs else "none",
                        envmod.pod_mtu(mtu, mode),
                    )
                    block_records[mode.key] = rec
                    records.append(rec)
                    try:
                        envs[mode.key] = envmod.build(
                            mode,
                            setting,
                            mtu,
                            logdir,
                            Path(sockdir),
                            p.weft_extra(),
                            pod_gro=p.pod_gro,
                            pod_gro_flush_ns=p.pod_gro_flush_us * 1000,
                        )
                        progress.step(
                            f"{setting} mtu {mtu} {mode.key}: lab up (pod MTU {rec.pod_mtu})"
                        )
                    except Exception as exc:  # record and carry on with the other modes
                        rec.errors.append(f"setup: {exc}")
                        progress.step(f"{setting} mtu {mtu} {mode.key}: SETUP FAILED: {exc}")
                for rep in range(p.repeat):
                    for mode in modes:
                        e = envs.get(mode.key)
                        rec = block_records[mode.key]
                        for test in p.tests:
                            where = f"{setting} mtu {mtu} {mode.key} #{rep + 1} {test}"
                            if e is None:
                                progress.step(f"{where}: skipped (no lab)")
                                continue
                            if time.monotonic() - started > p.budget_s:
                                doc["budget_exhausted"] = True
                                progress.step(f"{where}: skipped (time budget spent)")
                                continue
                            try:
                                progress.step(f"{where}: {measure(e, rec, test, p)}")
                            except Exception as exc:
                                rec.errors.append(f"#{rep + 1} {test}: {exc}")
                                progress.step(f"{where}: FAILED: {str(exc)[:200]}")
                if p.profile:
                    doc["profiles"].update(profile_block(envs, p, out, progress))
                for key, e in envs.items():
                    block_records[key].weft_final = {
                        name: {"counters": st.get("counters"), "device_mtu": st.get("device_mtu")}
                        for name, st in e.weft_status().items()
                    }
                    for name, pid in zip(e.weft, e.weft_pids, strict=True):
                        block_records[key].weft_final.setdefault(name, {})["rss_kb"] = pid_rss_kb(
                            pid
                        )
            finally:
                for e in envs.values():
                    with contextlib.suppress(Exception):
                        e.close()
            doc["runs"] = summarize_runs(records)
            doc["elapsed_s"] = round(time.monotonic() - started, 1)
            if on_block is not None:
                on_block(doc)
    doc["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    return doc


def tcp_expected_wire_bytes_per_payload(mtu: int, encap: str) -> float:
    return tcp_wire_cost(mtu, encap).wire_bytes_per_payload
