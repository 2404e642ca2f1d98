"""Human-readable views of results: the summary table printed after a run, sweep and plan
tables, and a sweep's plots (:mod:`hetero_sched.plots`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import json

import pyarrow.parquet as pq
from rich import box
from rich.console import Group
from rich.table import Table

from hetero_sched import plots
from hetero_sched.errors import UserError
from hetero_sched.results import ensure_folder
from hetero_sched.sweep import POINTS_DIR, TABLE


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
    totals.add_column(style="bold", no_wrap=True)
    totals.add_column(overflow="fold")
    totals.add_row("requests", f"{summary['requests']:,} ({summary['completed']:,} completed, {summary['rejected']:,} rejected)")
    examples = summary.get("reject_examples", {})
    for code, n in summary["reject_reasons"].items():
        totals.add_row("  rejected", f"{n:,} {code}" + (f" (e.g. {examples[code]})" if examples.get(code) else ""))
    totals.add_row("SLO attainment", f"{summary['slo_attainment']:.1%} of all requests meet {slo['name']} "
                                     f"(TTFT {slo['ttft_s']:g} s, TPOT {slo['tpot_s'] * 1e3:g} ms)")
    totals.add_row("throughput", f"{summary['throughput_rps']:.2f} req/s, {summary['output_tokens_per_s']:,.0f} output tokens/s")
    totals.add_row("preemptions", f"{summary['preemptions']:,}")
    kv = summary.get("kv_cache")
    cache = summary.get("prefix_cache")
    if kv is not None:                  # the tiers' detail says more than the plain hit rate
        ideal = kv["ideal_hit_rate"]
        tiers = ", ".join(f"{name} {t['hit_rate']:.1%}" for name, t in kv["tiers"].items())
        totals.add_row("prefix reuse", f"{kv['hit_rate']:.1%} of prompt tokens ({tiers})"
                       + ("" if ideal is None else f"; an unlimited cache: {ideal:.1%}")
                       + f"; {kv['compute_saved_s']:,.1f} s of prefill saved")
    elif cache is not None:
        totals.add_row("prefix cache", f"{cache['token_hit_rate']:.1%} of prompt tokens hit "
                                       f"({cache['hit_tokens']:,} of {cache['prompt_tokens']:,}); "
                                       f"{cache['request_hit_rate']:.1%} of requests hit at least one block")
    totals.add_row("cluster cost", f"${summary['cluster_dollars_per_hour']:,.2f}/h"
                   + ("" if cost is None else f", ${cost:,.2f} per 1M output tokens"))
    groups = Table(show_header=True, box=None, padding=(0, 1), pad_edge=False,
                   caption="busy: share of the run spent in spans; decode batch: mean sequences decoding (of "
                           "max_num_seqs); KV: mean share of KV blocks in use — all over the run's length",
                   caption_justify="left")
    for col in ("group", "device", "role", "busy", "decode batch", "KV", "$/h"):
        groups.add_column(col, no_wrap=True, justify="left" if col in ("group", "device", "role") else "right")
    for g in summary["groups"]:
        batch = g.get("mean_decode_batch")
        occupancy = g.get("batch_occupancy")
        kv = g.get("kv_occupancy")
        groups.add_row(g["name"], g["device"], g["role"], f"{g['utilization']:.1%}",
                       "-" if batch is None else f"{batch:,.1f}" + ("" if occupancy is None else f" ({occupancy:.1%})"),
                       "-" if kv is None else f"{kv:.1%}", f"{g['dollars_per_hour']:,.2f}")
    return Group(t, totals, groups)


# --- sweeps and plans -------------------------------------------------------------------------
def _num(v: Any, fmt: str = ",.2f") -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, fmt)


def compact_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], text: Sequence[str] = (),
                  left: int = 1) -> Table:
    """A table for an 80-column terminal: names and numbers are never cut or wrapped — each
    column is as wide as its widest cell or the longest word of its header (headers wrap, a
    dotted field name at its dots); only the ``text`` columns fold into what width is left.
    The first ``left`` columns are left-aligned, the rest right."""
    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for i, col in enumerate(columns):
        header = col.replace(".", ". ") if "." in col else col      # a dotted name may wrap at its dots
        if col in text:
            t.add_column(header, overflow="fold")
            continue
        words = [w for part in col.split() for w in part.split(".")]
        width = max([len(r[i]) for r in rows] + [len(w) + 1 for w in words])
        t.add_column(header, width=width, overflow="fold", justify="left" if i < left else "right")
    for r in rows:
        t.add_row(*r)
    return t


def sweep_tables(rows: list[dict[str, Any]], axes: list[str], tiers: list[str]) -> list[Table]:
    """A sweep's points as tables narrow enough for a terminal: each point at its configured
    rate (attainment, latency, rejections, price), then its goodput, one row per point and tier."""
    at_rate = []
    for r in rows:
        cells = [str(r.get(a)) for a in axes]
        if r.get("status") != "ok":
            at_rate.append([*cells, f"error: {r.get('error')}", "", "", "", ""])
            continue
        at_rate.append([*cells, _num(r.get("slo_attainment"), ".1%"), _num((r.get("ttft_p90_s") or 0) * 1e3, ",.0f"),
                        _num((r.get("tpot_p90_s") or 0) * 1e3, ",.1f"), _num(r.get("rejected"), ","),
                        _num(r.get("cluster_dollars_per_hour"))])
    tables = [compact_table("sweep points at their configured rate",
                            [*axes, "attained", "TTFT p90 ms", "TPOT p90 ms", "rejected", "$/h"], at_rate,
                            left=len(axes))]
    if tiers:
        good = []
        for r in rows:
            for tier in tiers if r.get("status") == "ok" else ():
                k = tier.replace("-", "_")
                be = r.get(f"breakeven_cs3_dollars_per_hour_{k}")
                good.append([*(str(r.get(a)) for a in axes), tier, _num(r.get(f"goodput_rps_{k}")),
                             _num(r.get(f"goodput_tokens_per_s_{k}"), ",.0f"),
                             _num(r.get(f"goodput_tokens_per_dollar_{k}"), ",.0f"),
                             _num(r.get(f"pct_of_bound_{k}"), ".0f"),
                             "-" if be is None else ("never" if be <= 0 else f"{be:,.0f}")])
        tables.append(compact_table("goodput: the highest rate at which >= 90% of requests meet the tier's SLOs",
                                    [*axes, "tier", "req/s", "output tok/s", "output tok/$", "% of bound",
                                     "CS-3 break-even $/h"], good, left=len(axes) + 1))
    return tables


def sweep_report(folder: Path, out: Optional[Path] = None) -> tuple[list[Table], list[Path]]:
    """Tables and PNGs for a sweep folder (written to ``out``, default ``<folder>/plots``)."""
    folder = Path(folder)
    if not (folder / TABLE).is_file():
        raise UserError(f"{folder}: not a sweep folder (no {TABLE}; run `hetero-sched sweep` first)")
    out = ensure_folder(out if out is not None else folder / "plots", "--out")
    meta = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").is_file() else {}
    rows = pq.read_table(folder / TABLE).to_pylist()
    axes = meta.get("axes") or ["policy", "cluster"]
    tiers = [t for t in plots.TIERS if any(f"goodput_rps_{t.replace('-', '_')}" in r for r in rows)]
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
    return sweep_tables(rows, axes, tiers), [p for p in written if p is not None]


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
                  _num(g.pct_of_bound, ".0f"), e.why())
    return t
