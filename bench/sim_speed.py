"""How fast the simulator runs: simulated requests per wall second, and peak memory.

    python bench/sim_speed.py --workload azure-conv      # the whole Azure 2023 conversation trace
    python bench/sim_speed.py --workload synthetic-1m    # 1,000,000 synthetic requests
    python bench/sim_speed.py --workload azure-conv --experiment my.yaml

Prints one JSON object last: {"workload", "experiment", "requests", "wall_s", "requests_per_s",
"peak_rss_mb", ...}. ``wall_s`` times the simulation itself — the event loop from the first
arrival to the last completion — excluding trace loading, scheduler construction and the
metrics computed afterwards (reported separately as ``metrics_s``). The process is pinned to
one core; the simulation runs ``--repeat`` times (fresh scheduler each time, identical
results) and ``wall_s`` is the median, with every run's figure in ``requests_per_s_runs`` —
this VM's speed varies by ±25% between identical runs. ``peak_rss_mb`` is the
process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``), which includes the
interpreter, the loaded workload and everything else the process held at any point.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from hetero_sched.experiment import load_experiment
from hetero_sched.engine.assembly import build_scheduler, finish_run
from hetero_sched.engine.loop import run_events
from hetero_sched.workload import load_trace, synthetic

AZURE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure2023_conv.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["azure-conv", "synthetic-1m"], default="azure-conv")
    ap.add_argument("--experiment", default=None, help="experiment YAML (default: the shipped Trn2 -> CS-3 one)")
    ap.add_argument("--trace", default=str(AZURE), help="path of the Azure 2023 conversation CSV")
    ap.add_argument("--rate", type=float, default=4.0, help="synthetic-1m arrival rate (req/s)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    exp, base = load_experiment(args.experiment)
    if args.workload == "azure-conv":
        if not Path(args.trace).is_file():
            sys.exit(f"error: Azure trace not found at {args.trace} (pass --trace)")
        w = load_trace(args.trace, fmt="azure")
    else:
        w = synthetic(1_000_000, args.rate, prompt="azure-conv", output="azure-conv", seed=exp.seed)
    walls = []
    for _ in range(args.repeat):
        sched = build_scheduler(exp, w, base)
        t0 = time.perf_counter()
        run_events(sched, w.requests())
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    t1 = time.perf_counter()
    result = finish_run(exp, sched, w, "simulated")
    metrics_s = time.perf_counter() - t1
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "workload": args.workload, "experiment": exp.name, "requests": len(w),
        "wall_s": round(wall, 3), "requests_per_s": round(len(w) / wall, 1),
        "requests_per_s_runs": [round(len(w) / x) for x in walls],
        "peak_rss_mb": round(peak_mb, 1), "metrics_s": round(metrics_s, 3),
        "decisions": len(sched.decisions), "completed": result.summary["completed"],
        "slo_attainment": round(result.summary["slo_attainment"], 4),
    }))


if __name__ == "__main__":
    main()
