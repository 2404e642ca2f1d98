"""How fast the simulator runs: simulated requests per wall second, and peak memory.

    python bench/sim_speed.py --workload azure-conv      # the whole Azure 2023 conversation trace
    python bench/sim_speed.py --workload synthetic-1m    # 1,000,000 synthetic requests
    python bench/sim_speed.py --workload synthetic-10m   # 10,000,000, streamed to a run folder
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

``synthetic-10m`` is a whole streamed run, as ``hetero-sched simulate`` makes it: records and
decisions go to Parquet in a temporary run folder (``--out`` to keep it) while the run goes,
and the summary is read back from the files. Its ``wall_s`` is that whole run — event loop,
Parquet writes and summary (``stream_s``: the event loop's time spent handing chunks to the
writer thread or waiting for it, ``finish_s``: the last chunks, the summary read back and
summary.json) — run once, not pinned to a core (the writer thread uses the second one);
``generate_s`` is making the 10M-request workload.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hetero_sched.experiment import Experiment, load_experiment
from hetero_sched.engine.assembly import build_scheduler, finish_run
from hetero_sched.engine.loop import run_events
from hetero_sched.runstream import RunStream
from hetero_sched.workload import Workload, load_trace, synthetic

AZURE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure2023_conv.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["azure-conv", "synthetic-1m", "synthetic-10m"], default="azure-conv")
    ap.add_argument("--experiment", default=None, help="experiment YAML (default: the shipped Trn2 -> CS-3 one)")
    ap.add_argument("--trace", default=str(AZURE), help="path of the Azure 2023 conversation CSV")
    ap.add_argument("--rate", type=float, default=4.0, help="synthetic-1m/-10m arrival rate (req/s)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="synthetic-10m: keep the run folder here (default: a temporary one)")
    args = ap.parse_args()
    if args.workload == "synthetic-10m":   # not pinned: the run folder's writer thread takes the other core
        exp, base = load_experiment(args.experiment)
        t0 = time.perf_counter()
        w = synthetic(10_000_000, args.rate, prompt="azure-conv", output="azure-conv", seed=exp.seed)
        generate_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="sim-speed-") as tmp:
            print(json.dumps({"generate_s": round(generate_s, 3), **streamed_run(exp, base, w, Path(args.out or tmp))}))
        return
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


def streamed_run(exp: Experiment, base: Path, w: Workload, folder: Path) -> dict:
    """One streamed run of ``w`` into ``folder``: what simulate(out=...) does, timed by part."""
    sched = build_scheduler(exp, w, base)
    stream = RunStream(folder, sched, exp.slo_target)
    stream_s = 0.0

    def take(_: int) -> None:
        nonlocal stream_s
        t = time.perf_counter()
        stream.progress_fn(_)
        stream_s += time.perf_counter() - t

    t0 = time.perf_counter()
    run_events(sched, w.requests(), take)
    t1 = time.perf_counter()
    result = finish_run(exp, sched, w, "simulated", stream)
    result.write(folder)
    t2 = time.perf_counter()
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"workload": "synthetic-10m", "experiment": exp.name, "requests": len(w),
            "wall_s": round(t2 - t0, 1), "event_loop_s": round(t1 - t0 - stream_s, 1),
            "stream_s": round(stream_s, 1), "finish_s": round(t2 - t1, 1),
            "requests_per_s": round(len(w) / (t2 - t0), 1), "peak_rss_mb": round(peak_mb, 1),
            "run_folder_mb": round(size_mb, 1), "decisions": stream.decisions_written,
            "completed": result.summary["completed"], "slo_attainment": round(result.summary["slo_attainment"], 4)}


if __name__ == "__main__":
    main()
