"""The planner's search space at scale: time and memory to bound and rank thousands of candidates.

    flock /tmp/hetero-bench.lock python bench/plan_scale.py [--replicas 2 4 8] [--requests 300]

A plan offering trn2 (64 chips: prefill or colocated), CS-3 (16 systems: decode or colocated)
and H100 (64 GPUs: any role) for Llama-3.1-70B, with ``max_replicas`` from ``--replicas``:
every shape of every device times 1..max_replicas groups per role gives thousands of
candidates. For each size it times :func:`bounded_candidates` (every candidate's bound, ranked
— what `hetero-sched plan` does before its first simulation; the simulations after it are
capped by ``max_evaluations``, not by the space), then repeats it under ``tracemalloc`` for the
peak Python memory. Linear work shows as a flat ``us_per_candidate``.

Prints one JSON list last, one row per size: max_replicas, candidates, bound_s,
us_per_candidate, peak_mb, bytes_per_candidate.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

from hetero_sched.bound import workload_work
from hetero_sched.experiment import build_workload
from hetero_sched.metrics import SLO_TIERS
from hetero_sched.planner import PlanFile, bounded_candidates


def big_plan(max_replicas: int, requests: int) -> PlanFile:
    """Three device kinds, every role each can take, ``max_replicas`` groups per role at most."""
    return PlanFile.model_validate({
        "name": "plan-scale", "model": "llama-3.1-70b", "seed": 1, "slo": "standard",
        "workload": {"kind": "synthetic", "num_requests": requests, "rate_per_s": 10.0},
        "devices": {"trn2": {"max_chips": 64, "roles": ["prefill", "both"]},
                    "cs3": {"max_chips": 16, "roles": ["decode", "both"]},
                    "h100": {"max_chips": 64, "roles": ["prefill", "decode", "both"]}},
        "max_replicas": max_replicas})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--requests", type=int, default=300, help="requests in the plan's trace")
    args = ap.parse_args()
    rows = []
    for r in args.replicas:
        plan = big_plan(r, args.requests)
        work = workload_work(build_workload(plan.workload, plan.seed, Path.cwd()))
        slo = SLO_TIERS["standard"]
        t0 = time.perf_counter()
        n = len(bounded_candidates(plan, work, slo))
        bound_s = time.perf_counter() - t0
        tracemalloc.start()
        bounded_candidates(plan, work, slo)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append({"max_replicas": r, "candidates": n, "bound_s": round(bound_s, 2),
                     "us_per_candidate": round(bound_s / n * 1e6), "peak_mb": round(peak / 2**20, 1),
                     "bytes_per_candidate": round(peak / n)})
        print(rows[-1], flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
