"""Human-readable views of results: the summary table printed after a run."""

from __future__ import annotations

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
    totals.add_row("cluster cost", f"${summary['cluster_dollars_per_hour']:,.2f}/h"
                   + ("" if cost is None else f", ${cost:,.2f} per 1M output tokens"))
    groups = Table(show_header=True, box=None, padding=(0, 2))
    for col in ("group", "device", "role", "utilization", "$/h"):
        groups.add_column(col)
    for g in summary["groups"]:
        groups.add_row(g["name"], g["device"], g["role"], f"{g['utilization']:.1%}", f"{g['dollars_per_hour']:,.2f}")
    return Group(t, totals, groups)
