"""`python -m bench compare OLD NEW`: did any mode get slower from one results.json to the next?

Absolute figures move with the machine's load, so the comparison is between
ratios to kernel VXLAN, each taken within its own run (the bench's headline
figures). A change is a regression when a mode's ratio got worse by more than
the threshold (default 10 %): lower for throughput and rates, higher for
latency and CPU. Modes or figures that only one run has are listed as such.

Ratios cancel the load, not the machine: a faster CPU speeds the kernel's
datapaths and Python's by different factors, and costlier system calls (the
Meltdown/Spectre mitigations) weigh on weft alone. So when the two runs name
different machines (CPU model, core count, kernel, Python), the report says so
first: a flagged figure there may be the machine's, and two commits are compared
fairly in the same labs (`python -m bench.ab --a-src OLD_TREE --b-src NEW_TREE`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: (metric, True when higher is better): the headline ratios.
METRICS: tuple[tuple[str, bool], ...] = (
    ("tcp1_gbps", True),
    ("tcp4_gbps", True),
    ("udp64_kpps", True),
    ("ping_p50_ms", False),
    ("rr_per_s", True),
    ("tcp1_machine_cpu_s_per_gb", False),
)
DEFAULT_THRESHOLD = 0.10


@dataclass(frozen=True)
class Change:
    setting: str
    mtu: int
    mode: str
    metric: str
    old: float | None  # ratio to kernel VXLAN in the old run
    new: float | None
    higher_is_better: bool

    @property
    def change(self) -> float | None:
        """new ÷ old − 1 (None when either is missing or old is 0)."""
        if self.old is None or self.new is None or self.old == 0:
            return None
        return self.new / self.old - 1

    def regression(self, threshold: float) -> bool:
        c = self.change
        if c is None:
            return False
        return c < -threshold if self.higher_is_better else c > threshold


def _ratios(doc: dict[str, Any]) -> dict[tuple[str, int, str, str], float | None]:
    out: dict[tuple[str, int, str, str], float | None] = {}
    for run in doc.get("runs", []):
        for metric, _ in METRICS:
            ratio = run.get("ratios", {}).get(metric, {}).get("vs_kernel_vxlan")
            out[(run["setting"], int(run["mtu"]), run["mode"], metric)] = ratio
    return out


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every (setting, MTU, mode, metric) in either run, old ratio beside new."""
    a, b = _ratios(old), _ratios(new)
    better = dict(METRICS)
    keys = sorted(set(a) | set(b), key=lambda k: (k[0], k[1], k[2], list(better).index(k[3])))
    # kernel VXLAN is the reference (always 1×): left out.
    return [
        Change(*key, a.get(key), b.get(key), better[key[3]])
        for key in keys
        if key[2] != "kernel-vxlan"
    ]


#: The results.json machine fields that make two runs different machines.
MACHINE_FIELDS: tuple[tuple[str, str], ...] = (
    ("cpu_model", "CPU"),
    ("nproc", "CPUs"),
    ("kernel", "kernel"),
    ("python", "Python"),
)


def machine_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`CPU: A → B` for every machine field the two runs recorded differently
    (fields a run did not record are not compared)."""
    a, b = old.get("machine") or {}, new.get("machine") or {}
    return [
        f"{label}: {a[field]} → {b[field]}"
        for field, label in MACHINE_FIELDS
        if field in a and field in b and a[field] != b[field]
    ]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def markdown(
    changes: list[Change],
    threshold: float,
    old_name: str,
    new_name: str,
    machines: list[str] | None = None,
) -> str:
    lines = [
        f"Ratios to kernel VXLAN, each from its own run: `{old_name}` → `{new_name}` "
        f"(regression: worse by more than {threshold:.0%})",
        "",
    ]
    if machines:
        lines += [
            f"**Different machines** ({'; '.join(machines)}): a flagged figure may be the "
            "machine's, not the code's. Compare the two commits in the same labs: "
            "`python -m bench.ab --a-src OLD_TREE --b-src NEW_TREE`.",
            "",
        ]
    lines += [
        "| setting | mode | figure | old | new | change | |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in changes:
        ch = c.change
        flag = "**regression**" if c.regression(threshold) else ""
        if c.old is None or c.new is None:
            flag = "only in one run" if (c.old is None) != (c.new is None) else ""
        change = "–" if ch is None else f"{ch:+.0%}"
        lines.append(
            f"| {c.setting} {c.mtu} | {c.mode} | {c.metric} | {_fmt(c.old)} | {_fmt(c.new)} "
            f"| {change} | {flag} |"
        )
    return "\n".join(lines) + "\n"


class CompareError(Exception):
    """A results file that cannot be read or is not a bench results.json."""


def load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise CompareError(f"{path}: not a bench results.json (no runs)")
    return doc


def main(old: Path, new: Path, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Print the comparison; 1 when any figure regressed, 2 on unreadable input."""
    try:
        a, b = load(old), load(new)
    except CompareError as exc:
        print(f"bench compare: {exc}")
        return 2
    changes = compare(a, b)
    print(markdown(changes, threshold, str(old), str(new), machine_differences(a, b)), end="")
    return 1 if any(c.regression(threshold) for c in changes) else 0
