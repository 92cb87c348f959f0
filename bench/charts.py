"""PNG charts of a dataplane run (matplotlib, Agg backend; optional dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.metrics import METRICS
from bench.report import SETTING_TITLE, blocks_of, runs_in

PANELS = (
    ("TCP throughput (Gbit/s)", ("tcp1_gbps", "tcp4_gbps")),
    ("64-byte UDP received (kpps)", ("udp64_kpps",)),
    ("ping RTT (ms)", ("ping_p50_ms", "ping_p99_ms")),
    ("CPU seconds per GB (TCP 1 stream)", ("tcp1_weft_cpu_s_per_gb", "tcp1_machine_cpu_s_per_gb")),
)
SHORT = {
    "tcp1_gbps": "1 stream",
    "tcp4_gbps": "4 streams",
    "udp64_kpps": "received",
    "ping_p50_ms": "p50",
    "ping_p99_ms": "p99",
    "tcp1_weft_cpu_s_per_gb": "forwarder processes",
    "tcp1_machine_cpu_s_per_gb": "whole machine",
}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _panel(ax: Any, runs: list[dict[str, Any]], title: str, metrics: tuple[str, ...]) -> None:
    labels = [r["label"] for r in runs]
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        meds, lo, hi = [], [], []
        for r in runs:
            s = r["summary"].get(metric) or {}
            med = s.get("median")
            meds.append(med if med is not None else 0.0)
            lo.append((med - s["min"]) if med is not None else 0.0)
            hi.append((s["max"] - med) if med is not None else 0.0)
        xs = [x + (i - (len(metrics) - 1) / 2) * width for x in range(len(runs))]
        bars = ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=SHORT.get(metric, metric))
        for bar, med in zip(bars, meds, strict=True):
            if med:
                ax.annotate(
                    METRICS[metric].fmt.format(med) if metric in METRICS else f"{med:.3g}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    if len(metrics) > 1:
        ax.legend(fontsize=7)


def write_charts(doc: dict[str, Any], out: Path) -> list[str]:
    """One 2×2 figure per (setting, MTU) block; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for setting, mtu in blocks_of(doc):
        runs = runs_in(doc, setting, mtu)
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for ax, (title, metrics) in zip(axes.flat, PANELS, strict=True):
            _panel(ax, runs, title, metrics)
        fig.suptitle(f"weft bench — {SETTING_TITLE.get(setting, setting)}, MTU {mtu}", fontsize=10)
        fig.tight_layout()
        name = f"dataplane_{setting}_{mtu}.png"
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        names.append(name)
    return names
