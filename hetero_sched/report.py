"""Human-readable views of results: the summary table printed after a run, sweep and plan
tables, and a sweep's plots (:mod:`hetero_sched.plots`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rich.console import Group
from rich.table import Table


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1e3:,.1f}"


def summary_table(summary: dict[str, Any]) -> Group:
    """A run summary as a table: latency percentiles, attainment, throughput, cost, groups."""
    slo = summary["slo"]
    t = Table(title=f"{summary.get('experiment', '')} · {summary.get('policy', '')}", show_header=True)
    t.add_column("metric")
    t.add_column("mean", justify="right")
    t.add_column("p50", justify="right")
    t.add_column("p90", justify="right")
    t.add_column("p99", justify="right")
    for key, label in (("ttft_s", "TTFT (ms)"), ("tpot_s", "TPOT (ms)"), ("time_to_token2_s", "time to token 2 (ms)"),
                       ("max_gap_s", "largest token gap (ms)"), ("e2e_s", "end to end (ms)")):
        p = summary[key]
        t.add_row(label, _ms(p["mean"]), _ms(p["p50"]), _ms(p["p90"]), _ms(p["p99"]))
    cost = summary["dollars_per_million_output_tokens"]
    totals = Table(show_header=False, box=None, padding=(0, 2))
    totals.add_column(style="bold")
    totals.add_column()
    totals.add_row("requests", f"{summary['requests']:,} ({summary['completed']:,} completed, {summary['rejected']:,} rejected)")
    for reason, n in summary["reject_reasons"].items():
        totals.add_row("  rejected", f"{n:,}: {reason}")
    totals.add_row("SLO attainment", f"{summary['slo_attainment']:.1%} of all requests meet {slo['name']} "
                                     f"(TTFT {slo['ttft_s']:g} s, TPOT {slo['tpot_s'] * 1e3:g} ms)")
    totals.add_row("throughput", f"{summary['throughput_rps']:.2f} req/s, {summary['output_tokens_per_s']:,.0f} output tokens/s")
    totals.add_row("preemptions", f"{summary['preemptions']:,}")
    kv = summary.get("kv_cache")
    if kv is not None:
        ideal = kv["ideal_hit_rate"]
        tiers = ", ".join(f"{name} {t['hit_rate']:.1%}" for name, t in kv["tiers"].items())
        totals.add_row("prefix reuse", f"{kv['hit_rate']:.1%} of prompt tokens ({tiers})"
                       + ("" if ideal is None else f"; an unlimited cache: {ideal:.1%}")
                       + f"; {kv['compute_saved_s']:,.1f} s of prefill saved")
    totals.add_row("cluster cost", f"${summary['cluster_dollars_per_hour']:,.2f}/h"
                   + ("" if cost is None else f", ${cost:,.2f} per 1M output tokens"))
    groups = Table(show_header=True, box=None, padding=(0, 2))
    for col in ("group", "device", "role", "utilization", "$/h"):
        groups.add_column(col)
    for g in summary["groups"]:
        groups.add_row(g["name"], g["device"], g["role"], f"{g['utilization']:.1%}", f"{g['dollars_per_hour']:,.2f}")
    return Group(t, totals, groups)


# --- sweeps and plans -------------------------------------------------------------------------
def _num(v: Any, fmt: str = ",.2f") -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, fmt)


def sweep_table(rows: list[dict[str, Any]], axes: list[str], tiers: list[str]) -> Table:
    """One row per sweep point: its axes, attainment at its rate, latency, and goodput per tier."""
    t = Table(title="sweep points", show_lines=False)
    for a in axes:
        t.add_column(a, overflow="fold")
    for col in ("attain.", "TTFT p90 ms", "TPOT p90 ms", "$/h"):
        t.add_column(col, justify="right")
    for tier in tiers:
        for col in ("goodput req/s", "tok/s", "tok/$", "% bound", "CS-3 break-even $/h"):
            t.add_column(f"{tier} {col}", justify="right")
    for r in rows:
        if r.get("status") != "ok":
            t.add_row(*[str(r.get(a)) for a in axes], f"error: {r.get('error')}", *[""] * (3 + 5 * len(tiers)))
            continue
        cells = [str(r.get(a)) for a in axes]
        cells += [_num(r.get("slo_attainment"), ".1%"), _num((r.get("ttft_p90_s") or 0) * 1e3, ",.0f"),
                  _num((r.get("tpot_p90_s") or 0) * 1e3, ",.1f"), _num(r.get("cluster_dollars_per_hour"))]
        for tier in tiers:
            k = tier.replace("-", "_")
            be = r.get(f"breakeven_cs3_dollars_per_hour_{k}")
            cells += [_num(r.get(f"goodput_rps_{k}")), _num(r.get(f"goodput_tokens_per_s_{k}"), ",.0f"),
                      _num(r.get(f"goodput_tokens_per_dollar_{k}"), ",.0f"), _num(r.get(f"pct_of_bound_{k}"), ".0f"),
                      "-" if be is None else ("never" if be <= 0 else f"{be:,.0f}")]
        t.add_row(*cells)
    return t


def sweep_report(folder: Path, out: Optional[Path] = None) -> tuple[Table, list[Path]]:
    """Tables and PNGs for a sweep folder (written to ``out``, default ``<folder>/plots``)."""
    import json

    import pyarrow.parquet as pq

    from hetero_sched import plots
    from hetero_sched.errors import UserError
    from hetero_sched.sweep import POINTS_DIR, TABLE

    folder = Path(folder)
    if not (folder / TABLE).is_file():
        raise UserError(f"{folder}: not a sweep folder (no {TABLE}; run `hetero-sched sweep` first)")
    meta = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").is_file() else {}
    rows = pq.read_table(folder / TABLE).to_pylist()
    axes = meta.get("axes") or ["policy", "cluster"]
    tiers = [t for t in plots.TIERS if any(f"goodput_rps_{t.replace('-', '_')}" in r for r in rows)]
    out = Path(out) if out is not None else folder / "plots"
    ok = [r for r in rows if r.get("status") == "ok"]
    written = [plots.attainment_vs_rate(ok, axes, out / "attainment_vs_rate.png"),
               plots.goodput_bars(ok, axes, out / "goodput_per_dollar.png")]
    cdf_runs, util_runs = [], []
    for r in ok:
        req, dec, names = plots.read_run(folder / POINTS_DIR / r["point_id"] / "run")
        label = plots.point_label(r, axes)
        if req is not None:
            cdf_runs.append((label, req))
        if dec is not None:
            util_runs.append((label, dec, names))
    written.append(plots.latency_cdfs(cdf_runs, None, out / "latency_cdf.png"))
    written.append(plots.utilization_over_time(util_runs, out / "utilization.png"))
    return sweep_table(rows, axes, tiers), [p for p in written if p is not None]


def plan_table(result: Any, top: int) -> Table:
    """The planner's top configurations and why they win."""
    t = Table(title=f"best configurations by goodput per dollar ({result.evaluated} simulated of "
                    f"{result.candidates} candidates; {result.pruned} skipped by the bound)", show_lines=True)
    for col in ("#", "configuration", "$/h", "goodput req/s", "tok/s", "req/$", "bound req/s", "% bound", "why"):
        t.add_column(col, justify="left" if col in ("configuration", "why") else "right", overflow="fold")
    for i, e in enumerate(result.ranked[:top], 1):
        g = e.goodput
        t.add_row(str(i), e.candidate.label(), f"{e.candidate.dollars_per_hour:,.2f}", f"{g.rate_per_s:,.2f}",
                  f"{g.tokens_per_s:,.0f}", f"{g.requests_per_dollar:,.1f}", f"{g.bound.rate_per_s:,.2f}",
                  f"{g.pct_of_bound:.0f}", e.why())
    return t
