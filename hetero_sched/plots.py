"""PNG plots of a sweep a person can read without the code (matplotlib, Agg backend).

matplotlib is the optional dependency ``plot`` (``pip install 'hetero-sched[plot]'``); without
it every function here raises a one-line UserError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hetero_sched.errors import UserError
from hetero_sched.metrics import SLO_TIERS

TIERS = ("standard", "high-speed")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'hetero-sched[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def point_label(row: dict[str, Any], axes: Sequence[str]) -> str:
    """A point's legend label: its axis values (all of them, or the policy and cluster)."""
    parts = [str(row[a]) for a in axes if a in row and row[a] is not None]
    return ", ".join(parts) if parts else f"{row.get('policy')} · {row.get('cluster')}"


def attainment_vs_rate(rows: Sequence[dict[str, Any]], axes: Sequence[str], path: Path) -> Optional[Path]:
    """SLO attainment against arrival rate per point, one panel per tier, from the goodput
    searches' simulations; the 90% target line shows where goodput is read off."""
    tiers = [t for t in TIERS if any(r.get(f"goodput_points_{t.replace('-', '_')}") for r in rows)]
    if not tiers:
        return None
    plt = _pyplot()
    fig, panels = plt.subplots(1, len(tiers), figsize=(6.5 * len(tiers), 4.5), squeeze=False)
    for ax, tier in zip(panels[0], tiers):
        key = tier.replace("-", "_")
        for r in rows:
            pts = sorted(json.loads(r[f"goodput_points_{key}"])) if r.get(f"goodput_points_{key}") else []
            if pts:
                x, y = zip(*pts)
                ax.plot(x, [100 * v for v in y], marker="o", ms=3, label=point_label(r, axes))
        ax.axhline(90, color="grey", ls="--", lw=1)
        slo = SLO_TIERS[tier]
        ax.set(title=f"{tier} SLO (TTFT {slo.ttft_s:g} s, TPOT {slo.tpot_s * 1e3:g} ms)",
               xlabel="arrival rate (requests/s)", ylabel="requests meeting the SLO (%)", ylim=(-2, 102))
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("SLO attainment vs load (goodput = highest rate at the dashed 90% line)")
    return _save(fig, path)


def latency_cdfs(runs: Sequence[tuple[str, pa.Table]], slo_name: Optional[str], path: Path) -> Optional[Path]:
    """TTFT and TPOT CDFs of each point's run (its configured rate), SLO limits marked."""
    if not runs:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, table in runs:
        for ax, col in ((a1, "ttft_s"), (a2, "tpot_s")):
            v = table.column(col).to_numpy(zero_copy_only=False).astype(float)
            v = np.sort(v[~np.isnan(v)])
            if v.size:
                ax.plot(v * 1e3, np.arange(1, v.size + 1) / table.num_rows * 100, label=label)
    for ax, name, key in ((a1, "TTFT", "ttft_s"), (a2, "TPOT", "tpot_s")):
        for tier in TIERS:
            ax.axvline(getattr(SLO_TIERS[tier], key) * 1e3, color="grey", ls=":" if tier == "standard" else "--",
                       lw=1, label=f"{tier} SLO")
        ax.set(xlabel=f"{name} (ms, log scale)", ylabel="requests (%, rejected never reach 100)",
               title=f"{name} distribution", ylim=(0, 101))
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    return _save(fig, path)


def goodput_bars(rows: Sequence[dict[str, Any]], axes: Sequence[str], path: Path) -> Optional[Path]:
    """Goodput per dollar (output tokens per $) per point and tier, with the bound's as outline."""
    tiers = [t for t in TIERS if any(r.get(f"goodput_tokens_per_dollar_{t.replace('-', '_')}") is not None for r in rows)]
    if not tiers:
        return None
    plt = _pyplot()
    fig, panels = plt.subplots(len(tiers), 1, figsize=(max(7, 1.1 * len(rows) + 3), 4 * len(tiers)), squeeze=False)
    labels = [point_label(r, axes) for r in rows]
    x = np.arange(len(rows))
    for ax, tier in zip(panels[:, 0], tiers):
        key = tier.replace("-", "_")
        good = [r.get(f"goodput_tokens_per_dollar_{key}") or 0.0 for r in rows]
        bound = [(r.get(f"bound_tokens_per_s_{key}") or 0.0) * 3600 / r["cluster_dollars_per_hour"]
                 if r.get("cluster_dollars_per_hour") else 0.0 for r in rows]
        bound = [b if np.isfinite(b) else 0.0 for b in bound]   # an unlimited bound (short trace): no outline
        ax.bar(x, bound, color="none", edgecolor="grey", ls="--", label="bound")
        bars = ax.bar(x, good, color="tab:blue", label="goodput")
        for b, r in zip(bars, rows):
            pct = r.get(f"pct_of_bound_{key}")
            if pct is not None:
                ax.annotate(f"{pct:.0f}%", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
        ax.set(title=f"{tier}: SLO-meeting output tokens per dollar (label: % of the bound)",
               ylabel="output tokens / $")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    return _save(fig, path)


def busy_intervals(decisions: pa.Table) -> dict[int, list[tuple[float, float]]]:
    """Per group, the (start, end) of every span, cuts applied, from a decision log table."""
    spans: dict[int, list[list[float]]] = {}
    for t, kind, gid, dur, end in zip(*(decisions.column(c).to_pylist()
                                        for c in ("time_s", "kind", "group_id", "duration_s", "end_s"))):
        if gid is None:
            continue
        if dur is not None:
            spans.setdefault(gid, []).append([t, t + dur])
        elif kind == "cut" and spans.get(gid) and end is not None:
            spans[gid][-1][1] = end
    return {g: [(a, b) for a, b in v] for g, v in spans.items()}


def utilization_over_time(runs: Sequence[tuple[str, pa.Table, list[str]]], path: Path,
                          bins: int = 60) -> Optional[Path]:
    """Each group's busy share per time bin, one panel per run (first six)."""
    runs = list(runs)[:6]
    if not runs:
        return None
    plt = _pyplot()
    fig, panels = plt.subplots(len(runs), 1, figsize=(11, 2.6 * len(runs)), squeeze=False)
    for ax, (label, decisions, names) in zip(panels[:, 0], runs):
        intervals = busy_intervals(decisions)
        end = max((b for v in intervals.values() for _, b in v), default=1.0)
        edges = np.linspace(0.0, end, bins + 1)
        width = edges[1] - edges[0]
        for gid in sorted(intervals):
            busy = np.zeros(bins)
            for a, b in intervals[gid]:
                lo, hi = np.searchsorted(edges, [a, b], side="right") - 1
                for k in range(max(lo, 0), min(hi, bins - 1) + 1):
                    busy[k] += max(0.0, min(b, edges[k + 1]) - max(a, edges[k]))
            name = names[gid] if gid < len(names) else f"group {gid}"
            ax.plot((edges[:-1] + edges[1:]) / 2, 100 * busy / width, label=name, lw=1)
        ax.set(title=label, ylabel="busy (%)", ylim=(-2, 102))
        ax.legend(fontsize=6, ncol=4, loc="lower right")
    panels[-1, 0].set_xlabel("time since first arrival (s)")
    fig.suptitle("Group utilization over time (from the decision log's spans)")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def read_run(folder: Path) -> tuple[Optional[pa.Table], Optional[pa.Table], list[str]]:
    """A run folder's requests and decisions tables and its group names (None where missing)."""
    req = pq.read_table(folder / "requests.parquet") if (folder / "requests.parquet").is_file() else None
    dec = pq.read_table(folder / "decisions.parquet") if (folder / "decisions.parquet").is_file() else None
    names: list[str] = []
    if (folder / "summary.json").is_file():
        names = [g["name"] for g in json.loads((folder / "summary.json").read_text())["summary"].get("groups", [])]
    return req, dec, names
