"""Per-request records → metrics, exactly as DESIGN contract §5 defines them.

- Prefill produces output token 1. TTFT = arrival → token 1.
- TPOT = (finish − token 1) / (output tokens − 1): KV transfer and decode queueing fall inside
  it. A one-token request has no TPOT (it meets any TPOT SLO).
- Time to token 2 and the largest inter-token gap are kept too.
- A rejected request counts as an SLO miss; attainment is over *all* requests.
- Goodput = the highest arrival rate at which >= 90% of all requests meet both SLOs, found by
  scanning a rate grid (attainment is not monotone on a finite trace) and then bisecting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hetero_sched.core.scheduler import RECORD_COLUMNS


@dataclass(frozen=True)
class SLO:
    """Latency objectives a request must meet (both)."""

    ttft_s: float
    tpot_s: float
    name: str = "custom"


SLO_TIERS = {
    "standard": SLO(2.0, 0.050, "standard"),
    "high-speed": SLO(1.0, 0.002, "high-speed"),  # >= 500 tokens/s per user: what a CS-3 is for
}

_TYPES = {
    "request_id": pa.int64(), "arrival_s": pa.float64(), "prompt_tokens": pa.int64(),
    "output_tokens": pa.int64(), "predicted_output": pa.int64(), "cached_tokens": pa.int64(),
    "status": pa.string(), "reason": pa.string(), "prefill_group": pa.int64(),
    "decode_group": pa.int64(), "token1_s": pa.float64(), "token2_s": pa.float64(),
    "finish_s": pa.float64(), "max_gap_s": pa.float64(), "preemptions": pa.int64(),
    "generated": pa.int64(), "reason_code": pa.string(),
}
_ROW = pa.struct([(name, _TYPES[name]) for name in RECORD_COLUMNS])
"""A record tuple as one Arrow struct: Arrow reads the rows' fields in one C pass."""


def records_table(rows: Sequence[tuple], slo: Optional[SLO] = None) -> pa.Table:
    """Rows from the scheduler → an Arrow table sorted by request id, with derived metrics.

    Adds ``ttft_s``, ``tpot_s``, ``ttt2_s`` (time to token 2), ``e2e_s`` and, given an SLO,
    ``meets_slo``.
    """
    # Arrow reads the tuples as structs (no transposing in Python: half the time), and the id
    # order is applied to the typed table (a streamed run's rows come in order: no sort at all)
    table = pa.Table.from_struct_array(pa.array(rows, type=_ROW))
    ids = table.column("request_id").to_numpy()
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        table = table.take(np.argsort(ids, kind="stable"))
    arrival = _np(table, "arrival_s")
    t1 = _np(table, "token1_s")
    fin = _np(table, "finish_s")
    out = _np(table, "output_tokens")
    completed = _is(table.column("status"), "completed")
    with np.errstate(invalid="ignore", divide="ignore"):
        ttft = np.where(completed, t1 - arrival, np.nan)
        tpot = np.where(completed & (out > 1), (fin - t1) / (out - 1), np.nan)
        e2e = np.where(completed, fin - arrival, np.nan)
        ttt2 = np.where(completed, _np(table, "token2_s") - arrival, np.nan)
    table = (table.append_column("ttft_s", pa.array(ttft)).append_column("tpot_s", pa.array(tpot))
             .append_column("ttt2_s", pa.array(ttt2)).append_column("e2e_s", pa.array(e2e)))
    if slo is not None:
        table = table.append_column("meets_slo", pa.array(meets_slo(table, slo)))
    return table


def _is(status: Any, value: str) -> np.ndarray:
    """Per request: ``status == value`` (bool numpy)."""
    return np.asarray(pc.equal(status, value).to_numpy(zero_copy_only=False), dtype=bool)


def _np(table: Columns, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def meets_slo(table: pa.Table, slo: SLO) -> np.ndarray:
    """Per request: completed, TTFT <= SLO and TPOT <= SLO (no TPOT for one-token outputs)."""
    ttft = _np(table, "ttft_s")
    tpot = _np(table, "tpot_s")
    completed = ~np.isnan(ttft)
    ok_tpot = np.isnan(tpot) | (tpot <= slo.tpot_s)
    return completed & (np.nan_to_num(ttft, nan=math.inf) <= slo.ttft_s) & ok_tpot


def attainment(table: pa.Table, slo: SLO) -> float:
    """Share of all requests (rejections included, as misses) meeting both SLOs."""
    n = table.num_rows
    return float(meets_slo(table, slo).sum()) / n if n else 0.0


def _pcts(values: np.ndarray) -> dict[str, Optional[float]]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


@dataclass(frozen=True)
class GroupUsage:
    """What a group cost and how busy — and how full — it was, for the summary.

    Busy time alone misleads: a decode group running batches of 2 is as "busy" as one running
    batches of 200. Batch and KV occupancy say how much of the group the busy time used.
    """

    name: str
    device: str
    role: str
    busy_s: float
    dollars_per_hour: float
    decode_seq_s: Optional[float] = None
    """Σ decode batch size × span time (None: not reported)."""
    kv_block_s: Optional[float] = None
    """Σ KV blocks in use × time (None: not reported)."""
    max_num_seqs: Optional[int] = None
    kv_blocks: Optional[int] = None
    """The group's KV blocks for requests (the prefix cache's share excluded)."""

    def row(self, makespan_s: float) -> dict[str, Any]:
        """The summary's entry: busy share, mean decode batch and its share of ``max_num_seqs``,
        mean share of KV blocks in use — each over the run's length."""
        decodes = self.decode_seq_s is not None and (self.role != "prefill" or self.decode_seq_s > 0)
        batch = self.decode_seq_s / makespan_s if decodes and self.decode_seq_s is not None else None
        kv = (self.kv_block_s / (makespan_s * self.kv_blocks)
              if self.kv_block_s is not None and self.kv_blocks else None)
        return {"name": self.name, "device": self.device, "role": self.role,
                "utilization": self.busy_s / makespan_s, "mean_decode_batch": batch,
                "batch_occupancy": batch / self.max_num_seqs if batch is not None and self.max_num_seqs else None,
                "kv_occupancy": kv, "dollars_per_hour": self.dollars_per_hour}


class Columns(Protocol):
    """What a summary reads of a records table: a :class:`pyarrow.Table`, or a streamed run's
    Parquet file read a column at a time (:class:`~hetero_sched.runstream.ParquetColumns`)."""

    num_rows: int
    column_names: list[str]

    def column(self, name: str) -> Any: ...


def summarize(table: Columns, slo: SLO, groups: Sequence[GroupUsage] = ()) -> dict:
    """The run summary: counts, latency percentiles, attainment, throughput, utilization, $.

    Column-wise (no Python object per request): it reads a ten-million-row file as well."""
    n = table.num_rows
    status = table.column("status")
    done = _is(status, "completed")
    completed = int(done.sum())
    arrival = _np(table, "arrival_s")
    fin = _np(table, "finish_s")
    start = float(arrival.min()) if n else 0.0
    end = float(np.nanmax(fin)) if n else 0.0
    makespan = max(end - start, 1e-12)
    out_tokens = int(_np(table, "output_tokens")[done].sum()) if n else 0
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    missed = pa.array(np.flatnonzero(~done))
    codes = table.column("reason_code").take(missed).to_pylist() if "reason_code" in table.column_names \
        else [None] * len(missed)
    for code, reason in zip(codes, table.column("reason").take(missed).to_pylist()):
        key = code or "unknown"
        counts[key] = counts.get(key, 0) + 1
        examples.setdefault(key, reason or "")
    by_count = sorted(counts, key=lambda k: (-counts[k], k))
    prompt = _np(table, "prompt_tokens")[done]
    cached = _np(table, "cached_tokens")[done]
    dollars_per_hour = sum(g.dollars_per_hour for g in groups)
    cost = dollars_per_hour * makespan / 3600
    span = float(arrival.max() - start) if n > 1 else 0.0
    warning = (short_trace_warning(n, (n - 1) / span, slo, float(_np(table, "output_tokens").mean()))
               if span > 0 else None)
    return {
        "requests": n,
        "completed": completed,
        "rejected": int(_is(status, "rejected").sum()),
        "cancelled": int(_is(status, "cancelled").sum()),
        "reject_reasons": {k: counts[k] for k in by_count},
        "reject_examples": {k: examples[k] for k in by_count},
        "slo": {"name": slo.name, "ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "slo_attainment": attainment(table, slo),
        "ttft_s": _pcts(_np(table, "ttft_s")),
        "tpot_s": _pcts(_np(table, "tpot_s")),
        "time_to_token2_s": _pcts(_np(table, "ttt2_s")),
        "max_gap_s": _pcts(np.where(done, _np(table, "max_gap_s"), np.nan)),
        "e2e_s": _pcts(_np(table, "e2e_s")),
        "makespan_s": makespan,
        "throughput_rps": completed / makespan,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / makespan,
        "preemptions": int(_np(table, "preemptions").sum()) if n else 0,
        "prefix_cached_tokens": int(_np(table, "cached_tokens").sum()) if n else 0,
        "prefix_cache": {"hit_tokens": int(cached.sum()), "prompt_tokens": int(prompt.sum()),
                         "token_hit_rate": float(cached.sum() / prompt.sum()) if prompt.sum() else 0.0,
                         "requests_with_hit": int((cached > 0).sum()),
                         "request_hit_rate": float((cached > 0).mean()) if cached.size else 0.0},
        "cluster_dollars_per_hour": dollars_per_hour,
        "dollars_per_million_output_tokens": (cost / out_tokens * 1e6) if out_tokens else None,
        "groups": [g.row(makespan) for g in groups],
        "warnings": [warning] if warning else [],
    }


STABLE_TRACE_DEADLINES = 6.0
"""A trace should last at least this many SLO deadlines at the rate it is replayed at. On a
shorter one, work spills past the last arrival into the drain and attainment (so goodput)
reads high: the shipped experiment's standard-tier goodput is 89 / 66 / 63 / 55 / 55 / 54 / 53
req/s at 400 / 1,000 / 2,000 / 5,000 / 10,000 / 20,000 / 50,000 requests (README)."""


def short_trace_warning(num_requests: int, rate_per_s: float, slo: SLO,
                        mean_output_tokens: Optional[float]) -> Optional[str]:
    """A warning when ``num_requests`` at ``rate_per_s`` last less than
    :data:`STABLE_TRACE_DEADLINES` times a mean request's SLO deadline (TTFT + TPOT per later
    output token), with the number of requests a stable figure needs; else None."""
    if not rate_per_s > 0 or not num_requests:
        return None
    deadline_s = slo.ttft_s + slo.tpot_s * max((mean_output_tokens or 1.0) - 1.0, 0.0)
    span_s = num_requests / rate_per_s
    if span_s >= STABLE_TRACE_DEADLINES * deadline_s:
        return None
    need = math.ceil(STABLE_TRACE_DEADLINES * deadline_s * rate_per_s)
    return (f"{num_requests:,} requests last {span_s:,.1f} s at {rate_per_s:,.2f} req/s, under "
            f"{STABLE_TRACE_DEADLINES:g}x the {deadline_s:,.1f} s a request may take within the {slo.name} SLO: "
            f"work spills past the last arrival and attainment reads high; use at least {need:,} requests")


@dataclass(frozen=True)
class Goodput:
    """Result of a goodput search: the rate, and every point tried (rate → attainment)."""

    rate_per_s: float
    points: tuple[tuple[float, float], ...] = field(default=())
    capped: bool = False
    """True if even the highest grid rate met the target (goodput is at least ``rate_per_s``)."""


def goodput_search(attainment_at: Callable[[float], float], rates: Sequence[float],
                   target: float = 0.9, rel_tol: float = 0.02) -> Goodput:
    """Highest rate with attainment >= ``target``: scan ``rates`` (ascending), then bisect.

    The scan takes the highest passing grid rate; bisection then runs between it and the next
    grid rate (which fails), keeping the highest passing rate seen.
    """
    rates = sorted(rates)
    points: list[tuple[float, float]] = []

    def measure(rate: float) -> bool:
        a = attainment_at(rate)
        points.append((rate, a))
        return a >= target

    passing = [measure(r) for r in rates]
    if not any(passing):
        return Goodput(0.0, tuple(points))
    i = max(k for k, ok in enumerate(passing) if ok)
    if i == len(rates) - 1:
        return Goodput(rates[i], tuple(points), capped=True)
    lo, hi = rates[i], rates[i + 1]
    while (hi - lo) > rel_tol * lo:
        mid = (lo + hi) / 2
        if measure(mid):
            lo = mid
        else:
            hi = mid
    return Goodput(lo, tuple(points))
