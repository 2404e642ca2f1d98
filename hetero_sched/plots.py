"""PNG plots of a sweep a person can read without the code (matplotlib, Agg backend).

What each figure does so it is not misread: legends name every axis value (``rate_per_s=4``,
not ``4``) and sit below the panels, never over the data; curves that are identical are drawn
once with both names; overlapping ones differ by line style; a point with no goodput at a tier
is listed rather than silently missing; log axes carry plain numbers, large counts thousands
separators (no ``1e6`` multiplier).

matplotlib is the optional dependency ``plot`` (``pip install 'hetero-sched[plot]'``); without
it every function here raises a one-line UserError.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hetero_sched.errors import UserError
from hetero_sched.metrics import SLO_TIERS

TIERS = ("standard", "high-speed")
LINE_STYLES = ("-", "--", "-.", ":")
"""Cycled with the colours, so curves lying on each other stay distinguishable."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'hetero-sched[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def point_label(row: dict[str, Any], axes: Sequence[str]) -> str:
    """A point's legend label: each axis by name and value (``setup=a, rate_per_s=4``; a dotted
    axis by its last part), or the policy and cluster when there are no axes."""
    parts = [f"{a.rsplit('.', 1)[-1]}={row[a]}" for a in axes if a in row and row[a] is not None]
    return ", ".join(parts) if parts else f"{row.get('policy')} · {row.get('cluster')}"


def _style(i: int) -> dict[str, Any]:
    return {"color": f"C{i % 10}", "ls": LINE_STYLES[(i // 10 + i) % len(LINE_STYLES)]}


def _merge_identical(series: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Series with equal data drawn once, labelled with every name ("a = b (identical)")."""
    merged: list[tuple[list[str], Any]] = []
    for label, data in series:
        for names, seen in merged:
            if _equal(seen, data):
                names.append(label)
                break
        else:
            merged.append(([label], data))
    return [(names[0] if len(names) == 1 else " = ".join(names) + " (identical)", data) for names, data in merged]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _plain_log_x(ax: Any) -> None:
    """Log axis ticks at 1-2-5 steps as plain numbers (0.5, 2, 100); the minor ticks carry no
    labels (matplotlib's "3×10⁰ 4×10⁰ 6×10⁰" minor labels run into each other). Call it once
    the data are plotted: the ticks are chosen from the axis's limits."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = sorted(ax.get_xlim())                       # (get_xlim settles a pending autoscale)
    axis = ax.xaxis
    if lo > 0:
        ticks = [m * 10.0 ** k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
                 for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
        axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
    axis.set_minor_formatter(NullFormatter())


def _thousands_axis(axis: Any) -> None:
    """Counts with thousands separators: no ``1e6`` offset text to collide with a title."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def _legend_below(fig: Any, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """One legend under all panels (``_save`` keeps it in the image)."""
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2 if len(labels) > 3 else 1,
                   fontsize=8, frameon=False)


def attainment_vs_rate(rows: Sequence[dict[str, Any]], axes: Sequence[str], path: Path) -> Optional[Path]:
    """SLO attainment against arrival rate per point, one panel per tier, from the goodput
    searches' simulations; the 90% target line shows where goodput is read off. A point with
    no goodput at a tier (no rate meets it) is named in that panel."""
    tiers = [t for t in TIERS if any(f"goodput_rps_{t.replace('-', '_')}" in r for r in rows)]
    if not tiers:
        return None
    plt = _pyplot()
    fig, panels = plt.subplots(1, len(tiers), figsize=(6.5 * len(tiers), 4.5), squeeze=False)
    labels = {point_label(r, axes): i for i, r in enumerate(rows)}
    handles: dict[str, Any] = {}
    for ax, tier in zip(panels[0], tiers):
        key = tier.replace("-", "_")
        points = {point_label(r, axes): sorted(json.loads(r.get(f"goodput_points_{key}") or "[]")) for r in rows}
        series = [(label, tuple(zip(*pts))) for label, pts in points.items() if pts]
        for label, (x, y) in _merge_identical(series):
            (line,) = ax.plot(x, [100 * v for v in y], marker="o", ms=3, **_style(labels[label.split(" = ")[0]]))
            handles.setdefault(label, line)
        none = [label for label, pts in points.items() if not pts]
        if none:
            ax.text(0.02, 0.03, "no rate meets this SLO (goodput 0):\n" + "\n".join(none), transform=ax.transAxes,
                    fontsize=7, va="bottom", color="dimgrey")
        ax.axhline(90, color="grey", ls="--", lw=1)
        slo = SLO_TIERS[tier]
        ax.set(title=f"{tier} SLO (TTFT {slo.ttft_s:g} s, TPOT {slo.tpot_s * 1e3:g} ms)",
               xlabel="arrival rate (requests/s, log scale)", ylabel="requests meeting the SLO (%)", ylim=(-2, 102))
        ax.set_xscale("log")
        _plain_log_x(ax)
    fig.suptitle("SLO attainment vs load (goodput = highest rate at the dashed 90% line)")
    _legend_below(fig, list(handles.values()), list(handles))
    return _save(fig, path)


def latency_cdfs(runs: Sequence[tuple[str, pa.Table]], slo_name: Optional[str], path: Path) -> Optional[Path]:
    """TTFT and TPOT CDFs of each point's run (its configured rate), SLO limits marked."""
    if not runs:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    handles: dict[str, Any] = {}
    for ax, col in ((a1, "ttft_s"), (a2, "tpot_s")):
        series = []
        for label, table in runs:
            v = table.column(col).to_numpy(zero_copy_only=False).astype(float)
            v = np.sort(v[~np.isnan(v)])
            if v.size:
                series.append((label, (v * 1e3, np.arange(1, v.size + 1) / table.num_rows * 100)))
        order = {label: i for i, (label, _) in enumerate(runs)}
        for label, (x, y) in _merge_identical(series):
            (line,) = ax.plot(x, y, lw=1.5, **_style(order[label.split(" = ")[0]]))
            handles.setdefault(label, line)
    for ax, name, key in ((a1, "TTFT", "ttft_s"), (a2, "TPOT", "tpot_s")):
        for tier in TIERS:
            limit = ax.axvline(getattr(SLO_TIERS[tier], key) * 1e3, color="grey", lw=1,
                               ls=":" if tier == "standard" else "--")
            handles.setdefault(f"{tier} SLO limit", limit)
        ax.set(xlabel=f"{name} (ms, log scale)", ylabel="requests (%; rejected ones never reach 100)",
               title=f"{name} distribution at each point's configured rate", ylim=(0, 101))
        ax.set_xscale("log")
        _plain_log_x(ax)
    _legend_below(fig, list(handles.values()), list(handles))
    return _save(fig, path)


def goodput_bars(rows: Sequence[dict[str, Any]], axes: Sequence[str], path: Path) -> Optional[Path]:
    """Goodput per dollar (output tokens per $) per point and tier, with the bound's as outline."""
    tiers = [t for t in TIERS if any(r.get(f"goodput_tokens_per_dollar_{t.replace('-', '_')}") is not None for r in rows)]
    if not tiers:
        return None
    plt = _pyplot()
    labels = [point_label(r, axes).replace(", ", "\n") for r in rows]
    widest = max(len(part) for label in labels for part in label.split("\n"))
    per_bar = max(1.1, 0.075 * widest + 0.2)                 # inches: a tick label never runs into the next
    fig, panels = plt.subplots(len(tiers), 1, figsize=(max(7.0, per_bar * len(rows) + 2.5), 4 * len(tiers)),
                               squeeze=False)
    x = np.arange(len(rows))
    for ax, tier in zip(panels[:, 0], tiers):
        key = tier.replace("-", "_")
        good = [r.get(f"goodput_tokens_per_dollar_{key}") or 0.0 for r in rows]
        bound = [(r.get(f"bound_tokens_per_s_{key}") or 0.0) * 3600 / r["cluster_dollars_per_hour"]
                 if r.get("cluster_dollars_per_hour") else 0.0 for r in rows]
        bound = [b if np.isfinite(b) else 0.0 for b in bound]   # an unlimited bound (short trace): no outline
        ax.bar(x, bound, color="none", edgecolor="grey", ls="--", label="bound")
        bars = ax.bar(x, good, color="tab:blue", label="goodput")
        top = max([*good, *bound, 1.0])
        for b, r, g in zip(bars, rows, good):
            pct = r.get(f"pct_of_bound_{key}")
            text = "0: no rate meets this SLO" if g == 0 else (f"{pct:.0f}% of bound" if pct is not None else "")
            ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height() + 0.01 * top), ha="center",
                        va="bottom", fontsize=7, rotation=90 if g == 0 else 0)
        ax.set(title=f"{tier}: SLO-meeting output tokens per dollar", ylabel="output tokens / $", ylim=(0, top * 1.15))
        _thousands_axis(ax.yaxis)
        ax.set_xticks(x, labels, fontsize=7)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
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


def _busy_share(intervals: list[tuple[float, float]], edges: np.ndarray) -> np.ndarray:
    bins = len(edges) - 1
    busy = np.zeros(bins)
    for a, b in intervals:
        lo, hi = np.searchsorted(edges, [a, b], side="right") - 1
        for k in range(max(lo, 0), min(hi, bins - 1) + 1):
            busy[k] += max(0.0, min(b, edges[k + 1]) - max(a, edges[k]))
    return 100 * busy / (edges[1] - edges[0])


def utilization_over_time(runs: Sequence[tuple[str, pa.Table, list[str]]], path: Path,
                          bins: int = 60) -> Optional[Path]:
    """Each group's busy share per time bin, one panel per run (first six). Replicas of one
    group (``name-0``, ``name-1``, ...) are one line, their mean, with a band from the least to
    the most busy replica: six identical lines would hide each other."""
    runs = list(runs)[:6]
    if not runs:
        return None
    plt = _pyplot()
    fig, panels = plt.subplots(len(runs), 1, figsize=(11, 2.6 * len(runs)), squeeze=False)
    for ax, (label, decisions, names) in zip(panels[:, 0], runs):
        intervals = busy_intervals(decisions)
        end = max((b for v in intervals.values() for _, b in v), default=1.0)
        edges = np.linspace(0.0, end, bins + 1)
        mid = (edges[:-1] + edges[1:]) / 2
        kinds: dict[str, list[np.ndarray]] = {}
        for gid in range(max(len(names), max(intervals, default=-1) + 1)):
            name = names[gid] if gid < len(names) else f"group {gid}"
            kinds.setdefault(re.sub(r"-\d+$", "", name), []).append(_busy_share(intervals.get(gid, []), edges))
        for i, (kind, shares) in enumerate(kinds.items()):
            stack = np.vstack(shares)
            style = _style(i)
            ax.plot(mid, stack.mean(axis=0), lw=1.2, color=style["color"], ls=style["ls"],
                    label=kind if len(shares) == 1 else f"{kind} ×{len(shares)} (mean; band: least to most busy)")
            if len(shares) > 1:
                ax.fill_between(mid, stack.min(axis=0), stack.max(axis=0), color=style["color"], alpha=0.15, lw=0)
        ax.set(title=label, ylabel="busy (%)", ylim=(-2, 102))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    panels[-1, 0].set_xlabel("time since first arrival (s)")
    fig.suptitle("Group utilization over time (busy share of each time bin, from the decision log's spans)")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")      # tight: keeps legends placed outside the panels
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
