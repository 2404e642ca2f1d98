"""KV cache tiers and a cluster KV store on public prefix-hashed traces: hit rate, TTFT, goodput.

    python bench/prefix_tiers.py                         # the shipped Mooncake conversation trace (+ any found below)
    python bench/prefix_tiers.py --trace other.jsonl --requests 4000

Cluster: Llama-3.1-70B on four trn2.48xlarge prefill groups (TP64) feeding one CS-3 decode group
(four systems, pp4), ``disagg-prefix`` routing (Dynamo's KV-router cost, which sees each prefix's
tier and fetch cost), the standard SLO tier. Four configurations of its KV cache:

- ``hbm``: the device-memory prefix cache only (``prefix_cache_fraction`` of each group's KV);
- ``dram``: + host DRAM (half of a trn2.48xlarge's 2 TiB) on every prefill group;
- ``ssd``: + local NVMe (90% of its 4 x 1.92 TB);
- ``store``: + a cluster KV store of four x2iedn memory nodes (4 TiB, 100 Gbps each).

Traces: ``--trace`` (repeatable) or, by default, ``../shared/traces/mooncake_conversation.jsonl``
plus every ``*.jsonl`` in ``~/.cache/hetero-sched/traces/`` (e.g. Mooncake's synthetic trace:
``curl -o ~/.cache/hetero-sched/traces/mooncake_synthetic.jsonl https://raw.githubusercontent.com/kvcache-ai/Mooncake/main/FAST25-release/traces/synthetic_trace.jsonl``).
Without ``../shared`` and nothing else given the bench says so on stderr and prints ``[]``.

Per trace and configuration: ``hit_rate`` (prompt tokens not recomputed / all prompt tokens), the
TTFT percentiles and SLO attainment of a replay at the trace's own rate (``trace_rate_per_s``),
``ideal_hit_rate`` (an unlimited cache, arrival order), ``goodput_rps`` (the highest rescaled rate
at which >= 90% of requests meet the standard SLO: TTFT 2 s, TPOT 50 ms), and per tier the hit rate
and bytes moved. Every figure is simulated (deterministic), so the bench needs no benchmark lock. Prints a line per row as it goes, then
one JSON list last: a row per configuration with ``config``, ``trace``, ``hit_rate``,
``ideal_hit_rate``, ``ttft_p50_s``, ``ttft_p90_s``, ``goodput_rps`` and more.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hetero_sched.experiment import build_workload, parse_experiment
from hetero_sched.goodput import measure_goodput
from hetero_sched.sim import simulate
from hetero_sched.workload import mean_rate_per_s

GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0, 1.25)
"""Goodput search rates as fractions of the bound: finer at the bottom than the default grid, since
on long-prompt traces a small prefix cache passes the SLO only at a small share of the bound."""

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT.parent / "shared" / "traces" / "mooncake_conversation.jsonl"
FOUND = Path.home() / ".cache" / "hetero-sched" / "traces"
GROUPS = [{"name": "trn2-prefill", "device": "trn2", "count": 16, "tp": 64, "replicas": 4, "role": "prefill"},
          {"name": "cs3-decode", "device": "cs3", "count": 4, "pp": 4, "role": "decode"}]
CONFIGS: dict[str, dict[str, Any] | None] = {
    "hbm": None,
    "dram": {"dram": {}},
    "ssd": {"dram": {}, "ssd": {}},
    "store": {"dram": {}, "ssd": {}, "store": {"node": "x2iedn", "nodes": 4}},
}


def experiment(trace: Path, requests: int | None, kv: dict[str, Any] | None, policy: str) -> dict[str, Any]:
    """The bench's experiment for one trace and KV configuration."""
    workload: dict[str, Any] = {"kind": "trace", "path": str(trace)}
    if requests:
        workload["num_requests"] = requests
    exp: dict[str, Any] = {"name": "prefix-tiers", "model": "llama-3.1-70b", "groups": GROUPS, "policy": policy,
                           "workload": workload, "slo": "standard"}
    if kv is not None:
        exp["kv_cache"] = kv
    return exp


def measure(trace: Path, config: str, requests: int | None, policy: str, rel_tol: float) -> dict[str, Any]:
    """One row: the replay at the trace's own rate, and the goodput search."""
    exp = parse_experiment(experiment(trace, requests, CONFIGS[config], policy))
    workload = build_workload(exp.workload, exp.seed, Path.cwd())
    t0 = time.perf_counter()
    run = simulate(exp, workload=workload)
    kv = run.summary["kv_cache"]
    good = measure_goodput(exp, workload, "standard", rel_tol=rel_tol, fractions=GRID)
    row: dict[str, Any] = {
        "config": config, "trace": trace.name, "requests": len(workload), "policy": policy,
        "hit_rate": kv["hit_rate"], "ideal_hit_rate": kv["ideal_hit_rate"],
        "pct_of_ideal": 100.0 * kv["hit_rate"] / kv["ideal_hit_rate"] if kv["ideal_hit_rate"] else None,
        "request_hit_rate": kv["request_hit_rate"],
        "ttft_p50_s": run.summary["ttft_s"]["p50"], "ttft_p90_s": run.summary["ttft_s"]["p90"],
        "slo_attainment": run.summary["slo_attainment"], "trace_rate_per_s": mean_rate_per_s(workload),
        "goodput_rps": good.rate_per_s, "goodput_capped": good.capped, "bound_rps": good.bound.rate_per_s,
        "compute_saved_s": kv["compute_saved_s"], "recomputed_tokens": kv["recomputed_tokens"],
        "tiers": {name: {k: t[k] for k in ("hit_rate", "request_hit_rate", "read_bytes", "written_bytes")}
                  for name, t in kv["tiers"].items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", action="append", type=Path, help="a Mooncake-format JSONL trace (repeatable)")
    ap.add_argument("--requests", type=int, default=None, help="the first N requests of each trace (default: all)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--policy", default="disagg-prefix")
    ap.add_argument("--rel-tol", type=float, default=0.03, help="goodput search tolerance")
    args = ap.parse_args()
    traces: list[Path] = args.trace or []
    if not traces:
        if SHIPPED.is_file():
            traces.append(SHIPPED)
        traces.extend(sorted(FOUND.glob("*.jsonl")) if FOUND.is_dir() else [])
    if not traces:
        print(f"prefix_tiers: skipped: no trace ({SHIPPED} is missing: this bench needs the shared traces "
              "folder beside the project, or --trace PATH)", file=sys.stderr)
        print(json.dumps([]))
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"prefix_tiers: unknown config {unknown[0]!r} (known: {', '.join(CONFIGS)})", file=sys.stderr)
        sys.exit(2)
    rows = []
    for trace in traces:
        for config in configs:
            row = measure(trace, config, args.requests, args.policy, args.rel_tol)
            rows.append(row)
            print(f"{row['trace']:32s} {config:6s} hit {row['hit_rate']:.3f} (ideal {row['ideal_hit_rate']:.3f}, "
                  f"{row['pct_of_ideal']:.0f}%)  TTFT p50 {row['ttft_p50_s']:.3f} s p90 {row['ttft_p90_s']:.3f} s  "
                  f"goodput {row['goodput_rps']:.2f} req/s  ({row['wall_s']} s)", file=sys.stderr, flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
