"""The result document as files: results.json, results.md (tables), PNG charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.metrics import COST, HEADLINE, LOSSES, METRICS

SETTING_TITLE = {
    "wire": "wire (MTU-sized frames, checksums filled, GRO on receive)",
    "offload": "offload (veth defaults: 64 KB super-packets cross the underlay)",
}


def write_json(doc: dict[str, Any], out: Path, name: str = "results.json") -> Path:
    path = out / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def fmt_value(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    return METRICS[metric].fmt.format(value) if metric in METRICS else f"{value:.3g}"


def fmt_summary(metric: str, summary: dict[str, Any] | None) -> str:
    """``median (min–max)``; just the median when there was one sample."""
    if not summary or summary.get("median") is None:
        return "–"
    med = fmt_value(metric, summary["median"])
    if summary.get("n", 0) > 1 and summary["min"] != summary["max"]:
        return f"{med} ({fmt_value(metric, summary['min'])}–{fmt_value(metric, summary['max'])})"
    return med


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def blocks_of(doc: dict[str, Any]) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    for run in doc.get("runs", []):
        key = (run["setting"], run["mtu"])
        if key not in seen:
            seen.append(key)
    return seen


def runs_in(doc: dict[str, Any], setting: str, mtu: int) -> list[dict[str, Any]]:
    return [r for r in doc.get("runs", []) if r["setting"] == setting and r["mtu"] == mtu]


def _table(runs: list[dict[str, Any]], metrics: tuple[str, ...]) -> list[str]:
    present = [m for m in metrics if any(r["summary"].get(m, {}).get("n") for r in runs)]
    if not present:
        return []
    head = ["mode", *[f"{METRICS[m].label} ({METRICS[m].unit})" for m in present]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r["label"]] + [fmt_summary(m, r["summary"].get(m)) for m in present]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ratio_table(runs: list[dict[str, Any]], metrics: tuple[str, ...]) -> list[str]:
    present = [m for m in metrics if any(r["summary"].get(m, {}).get("n") for r in runs)]
    if not present:
        return []
    head = ["mode", *[f"{METRICS[m].label}: ÷kernel VXLAN / ÷plain" for m in present]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r["label"]]
        for m in present:
            rat = r["ratios"].get(m, {})
            cells.append(
                f"{fmt_ratio(rat.get('vs_kernel_vxlan'))} / {fmt_ratio(rat.get('vs_plain'))}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(doc: dict[str, Any], charts: list[str] | None = None) -> str:
    """The human-readable report of a dataplane run."""
    p = doc.get("params", {})
    m = doc.get("machine", {})
    lines = [
        "# weft dataplane benchmark",
        "",
        f"- command: `{doc.get('command', '')}`",
        f"- started {doc.get('started', '?')}, took {doc.get('elapsed_s', '?')} s"
        + (
            " — **time budget ran out; some steps were skipped**"
            if doc.get("budget_exhausted")
            else ""
        ),
        f"- measured: commit {m.get('git', {}).get('commit')}"
        + (
            f" with uncommitted changes to {', '.join(m['git']['modified'])}"
            if m.get("git", {}).get("modified")
            else ""
        ),
        f"- machine: {m.get('nproc')} CPUs, {m.get('cpu_model')}, Linux {m.get('kernel')}, "
        f"Python {m.get('python')}; load average at start {' '.join(m.get('loadavg', []))}, "
        f"{m.get('busy_pct_before')}% busy in the second before",
        f"- each figure: {p.get('repeat')} repeat(s) of {p.get('seconds')} s (ping: "
        f"{p.get('ping_count')} × {p.get('ping_interval_s')} s; request/response: "
        f"{p.get('rr_seconds')} s), shown as median (min–max); pod1 → pod2 across the underlay",
        f"- weft dataplane run with: `{' '.join(_weft_args(p))}`"
        if _weft_args(p)
        else "- weft dataplane run with its default options",
        "- pods' node-side veths: "
        + (
            "UDP GRO forwarding (`ethtool -K gro on rx-udp-gro-forwarding on`, "
            f"gro_flush_timeout {p.get('pod_gro_flush_us', 20)} µs)"
            if p.get("pod_gro", False)
            else "veth defaults (no GRO)"
        ),
        "",
        "Underlay settings:",
        "",
    ]
    for name, text in doc.get("settings", {}).items():
        lines.append(f"- `{name}`: {text}")
    lines += ["", "Modes:", ""]
    for key, mode in doc.get("modes", {}).items():
        lines.append(f"- **{mode['label']}** (`{key}`): {mode['note']}")
    for setting, mtu in blocks_of(doc):
        runs = runs_in(doc, setting, mtu)
        title = SETTING_TITLE.get(setting, setting)
        lines += ["", f"## {title}, underlay MTU {mtu}", ""]
        lines += _table(runs, HEADLINE)
        lines += ["", "Ratios of medians (this mode ÷ kernel VXLAN / ÷ plain routing):", ""]
        lines += _ratio_table(
            runs, ("tcp1_gbps", "tcp4_gbps", "udp64_kpps", "ping_p50_ms", "rr_per_s")
        )
        lines += ["", "Cost:", ""]
        lines += _table(runs, COST)
        where = _table(runs, LOSSES)
        if where:
            lines += ["", "Where the UDP 64 B datagrams were lost (% of those sent):", ""]
            lines += where
        errors = [(r["label"], e) for r in runs for e in r.get("errors", [])]
        if errors:
            lines += ["", "Errors:", ""]
            lines += [f"- {label}: {e}" for label, e in errors]
        for chart in charts or []:
            if f"_{setting}_{mtu}" in chart:
                lines += ["", f"![{Path(chart).stem}]({chart})"]
    profiles = doc.get("profiles") or {}
    if profiles:
        lines += ["", "## Where the time goes (py-spy, busy samples only, extra runs)", ""]
        for where, entry in profiles.items():
            for test, res in entry.items():
                lines += [f"**{where} {test}** ({res.get('run', res.get('error', '?'))}):", ""]
                for node, prof in res.items():
                    if node in ("run", "error") or not isinstance(prof, dict):
                        continue
                    top = ", ".join(
                        f"{name} {100 * share:.0f}%" for name, share in prof.get("top", [])[:6]
                    )
                    lines.append(
                        f"- {node} ({prof.get('samples', 0)} samples): "
                        f"{top or prof.get('error', '')}"
                    )
                lines.append("")
    comp = doc.get("computed", {})
    if comp:
        lines += [
            "",
            "## Computed wire cost (full-sized TCP segments)",
            "",
            "| encapsulation | underlay MTU | pod MTU | TCP payload/segment | counted "
            "frame | wire bytes per payload byte | goodput efficiency (L1) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in comp.get("tcp", []):
            lines.append(
                f"| {row['encap']} (+{row['overhead']} B) | {row['underlay_mtu']} | "
                f"{row['inner_mtu']} | {row['tcp_payload']} | {row['frame_counted']} | "
                f"{row['wire_bytes_per_payload']:.4f} | {100 * row['goodput_efficiency']:.1f}% |"
            )
        udp = comp.get("udp64_frame_bytes", {})
        if udp:
            lines += [
                "",
                "64-byte UDP datagram, counted frame size: "
                + ", ".join(f"{k} {v} B" for k, v in udp.items()),
            ]
    return "\n".join(lines) + "\n"


def write_markdown(doc: dict[str, Any], out: Path, charts: list[str] | None = None) -> Path:
    path = out / "results.md"
    path.write_text(markdown(doc, charts))
    return path


def _weft_args(p: dict[str, Any]) -> list[str]:
    """The options the bench passed to every `weft dataplane run`."""
    args = [f"--offload {p['weft_offload']}"] if p.get("weft_offload") else []
    if p.get("weft_busy_poll"):
        args.append(f"--busy-poll {p['weft_busy_poll']}")
    if p.get("weft_keep_warm"):
        args.append(f"--keep-warm {p['weft_keep_warm']}")
    if p.get("weft_queues"):
        args.append(f"--queues {p['weft_queues']}")
    if p.get("weft_cpus"):
        args.append(f"--cpus {p['weft_cpus']}")
    if p.get("weft_egress_thread"):
        args.append("--egress-thread")
    return args
