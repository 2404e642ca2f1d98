"""A 1,000-point sweep on a laptop-style Ray cluster: points per minute and the driver's CPU share.

    flock /tmp/hetero-bench.lock python bench/sweep_scale.py [--rates 10 --seeds 10 --replicas 10]
        [--requests 40] [--nodes 3] [--points-per-task N] [--save-runs] [--out DIR]

Starts its own ``LocalCluster`` (a head with 2 CPUs and ``--nodes`` worker nodes of 1 CPU, on
random free ports), connects this process to it as the driver, and runs ``run_sweep`` — what
``hetero-sched sweep --address`` runs — over the shipped experiment with a short synthetic trace
(``--requests`` each, so a point takes a fraction of a second) and three axes:
``workload.rate_per_s`` x ``seed`` x ``groups.1.replicas`` (decode groups), 10 x 10 x 10 by
default. Then it runs the sweep again on the same folder (a resume with every point finished).

The driver's CPU share is this process's CPU time (user + system, ``getrusage``; Ray's driver
threads included) over the wall time of the sweep, expanding the grid and writing the table
included. Every figure is wall time on a shared machine: run it under the bench lock.

Prints one JSON object last: points, computed, wall_s (the whole run_sweep call), run_s (running
points), points_per_min (points / wall_s), expand_s, driver_cpu_s, driver_cpu_share, resume_s,
cluster_cpus, points_per_task, tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from hetero_sched.runtime.cluster import HEAD_NODE, LocalCluster, NodeSpec, connect  # noqa: E402
from hetero_sched.sweep import batch_size, expand, parse_sweep, run_sweep  # noqa: E402


def cpu_s() -> float:
    """This process's CPU time so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sweep_doc(rates: int, seeds: int, replicas: int, requests: int, save_runs: bool) -> dict:
    """The shipped experiment over rate x seed x decode groups, each point a short trace."""
    return {"name": "sweep-scale", "save_runs": save_runs,
            "set": {"workload.num_requests": requests},
            "axes": {"workload.rate_per_s": [round(2.0 + 2.0 * i, 1) for i in range(rates)],
                     "seed": list(range(seeds)),
                     "groups.1.replicas": list(range(1, replicas + 1))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--replicas", type=int, default=10, help="decode group counts 1..N")
    ap.add_argument("--requests", type=int, default=40, help="requests per point's trace")
    ap.add_argument("--nodes", type=int, default=3, help="worker nodes (1 CPU each) besides the head (2 CPUs)")
    ap.add_argument("--points-per-task", type=int, default=None)
    ap.add_argument("--save-runs", action="store_true", help="also write each point's run folder")
    ap.add_argument("--out", type=Path, default=None, help="sweep folder to keep (default: a temp folder, removed)")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="sweep-scale-"))
    sweep = parse_sweep(sweep_doc(args.rates, args.seeds, args.replicas, args.requests, args.save_runs), Path.cwd())
    workers = [NodeSpec(f"sweep-worker-{i}") for i in range(args.nodes)]
    try:
        with LocalCluster(workers) as cluster:
            connect(cluster.address)
            cpus = HEAD_NODE.num_cpus + sum(w.num_cpus for w in workers)
            cpu0, t0 = cpu_s(), time.monotonic()
            points = expand(sweep)
            expand_s = time.monotonic() - t0
            outcome = run_sweep(sweep, out, points=points, points_per_task=args.points_per_task)
            wall_s = time.monotonic() - t0
            driver_cpu = cpu_s() - cpu0
            t1 = time.monotonic()
            again = run_sweep(sweep, out, points=points)
            resume_s = time.monotonic() - t1
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    assert again.computed == 0 and again.reused == len(points), "the resume ran points again"
    failed = sum(r.get("status") != "ok" for r in outcome.rows)
    size = args.points_per_task or batch_size(len(points), cpus)
    print(json.dumps({
        "points": len(points), "computed": outcome.computed, "failed": failed,
        "wall_s": round(wall_s, 2), "run_s": round(outcome.run_s, 2),
        "points_per_min": round(len(points) * 60 / wall_s, 1), "expand_s": round(expand_s, 2),
        "driver_cpu_s": round(driver_cpu, 2), "driver_cpu_share": round(driver_cpu / wall_s, 4),
        "resume_s": round(resume_s, 2), "cluster_cpus": cpus, "points_per_task": size,
        "tasks": -(-len(points) // size), "requests_per_point": args.requests, "save_runs": args.save_runs,
    }))


if __name__ == "__main__":
    main()
