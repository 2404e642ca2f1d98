"""How the simulator's speed holds as the cluster grows: simulated requests per wall second by size.

    python bench/sim_scale.py                      # 5, 20, 80, 320, 1280 groups; 20,000 requests each
    python bench/sim_scale.py --sizes 5,1280 --requests 50000 --repeat 5 --processes 5
    python bench/sim_scale.py --sizes 5,1280 --policy disagg-slo   # another policy (YAML, as `policy:`)

The shipped experiment (four trn2.48xlarge prefill groups, one four-CS-3 decode group: five
groups) with every group's ``replicas`` multiplied by ``k`` (k = groups / 5), and a synthetic
Azure-conversation workload (the shipped fitted length distributions) arriving at
``--rate-per-group`` × groups requests per second, so each group sees the same load at every size.

Each size runs in ``--processes`` fresh subprocesses, the sizes taking turns (one process of
each size per round, so that a drift in the VM's speed meets every size alike; ``peak_rss_mb`` is
that size's own peak resident set, ``getrusage(RUSAGE_SELF).ru_maxrss``: interpreter, workload,
scheduler and all — the largest of its processes), pinned to one core. ``requests_per_s`` is
measured as ``bench/sim_speed.py`` measures it: the event loop alone, from the first arrival to
the last completion, excluding workload generation, scheduler construction and metrics; the
median of every run (``--repeat`` per process, a fresh scheduler each), every run's figure in
``requests_per_s_runs``. (A process's memory layout moves its figure by a few percent on this
VM: the median over several processes says more than any one.) ``vs_smallest`` is a size's
``requests_per_s`` over the smallest size's, and ``vs_smallest_rounds`` the same ratio within
each round, from that round's processes' medians (how far the ratio moves from one round to the
next). Prints a progress line per process to stderr, one JSON object per size once all rounds
are done, then one JSON list of every size last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from importlib import resources
from typing import Any

import yaml

from hetero_sched.engine.assembly import build_scheduler, resolve
from hetero_sched.engine.loop import run_events
from hetero_sched.errors import UserError
from hetero_sched.workload import synthetic

BASE_GROUPS = 5
"""Groups in the shipped experiment (4 prefill replicas + 1 decode group): size 5 is k = 1."""


def scaled_experiment(k: int, rate_per_s: float, num_requests: int, policy: Any = None) -> dict[str, Any]:
    """The shipped experiment as a mapping, every group's replicas × ``k`` (and ``policy`` as its
    ``policy:`` value, if given)."""
    data = yaml.safe_load(resources.files("hetero_sched").joinpath("data", "experiment_default.yaml").read_text())
    if policy is not None:
        data["policy"] = policy
    for g in data["groups"]:
        g["replicas"] = int(g.get("replicas", 1)) * k
    data["workload"] = dict(data["workload"], num_requests=num_requests, rate_per_s=rate_per_s)
    return data


def measure(groups: int, requests: int, rate_per_group: float, repeat: int, policy: Any = None) -> dict[str, Any]:
    """One size, in this process: every run's wall time."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    exp, base = resolve(scaled_experiment(groups // BASE_GROUPS, rate_per_group * groups, requests, policy))
    w = synthetic(requests, rate_per_group * groups, prompt="azure-conv", output="azure-conv", seed=exp.seed)
    walls = []
    sched = None
    for _ in range(repeat):
        sched = build_scheduler(exp, w, base)
        t0 = time.perf_counter()
        run_events(sched, w.requests())
        walls.append(time.perf_counter() - t0)
    assert sched is not None
    completed = sum(1 for r in sched.records if r[6] == "completed")
    return {
        "groups": len(sched.groups), "requests": len(w), "rate_per_s": rate_per_group * groups, "walls_s": walls,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "completed": completed, "decisions": len(sched.decisions),
    }


def combine(children: list[dict[str, Any]]) -> dict[str, Any]:
    """One size's row from its processes' measurements: the median of all their runs."""
    first = children[0]
    walls = [x for c in children for x in c["walls_s"]]
    wall = statistics.median(walls)
    n = first["requests"]
    return {
        "groups": first["groups"], "requests": n, "rate_per_s": first["rate_per_s"],
        "wall_s": round(wall, 3), "requests_per_s": round(n / wall, 1),
        "requests_per_s_runs": [round(n / x) for x in walls],
        "peak_rss_mb": max(c["peak_rss_mb"] for c in children),
        "completed": first["completed"], "decisions": first["decisions"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5,20,80,320,1280", help="cluster sizes in groups (multiples of 5)")
    ap.add_argument("--requests", type=int, default=20_000, help="requests per size (>= 20,000 for the issue's figure)")
    ap.add_argument("--rate-per-group", type=float, default=3.2,
                    help="arrival rate per group, req/s (3.2: 16 req/s for the 5-group experiment)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per process; the median of all runs is reported")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per size, one after the other")
    ap.add_argument("--policy", default=None,
                    help="the policy, as the experiment's `policy:` value in YAML: a name (disagg-slo) or "
                         "'{name: disagg, params: {choices: 2}}' (default: the shipped experiment's, disagg)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)   # a child: one size
    args = ap.parse_args()
    for name in ("requests", "repeat", "processes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if not args.rate_per_group > 0:
        ap.error(f"--rate-per-group must be positive (got {args.rate_per_group})")
    policy = None
    if args.policy is not None:
        try:
            policy = yaml.safe_load(args.policy)
            exp, base = resolve(scaled_experiment(1, args.rate_per_group, 10, policy))
            build_scheduler(exp, synthetic(10, args.rate_per_group, prompt="azure-conv", output="azure-conv"), base)
        except (yaml.YAMLError, UserError) as exc:
            ap.error(f"--policy: {' '.join(str(exc).split())}")
    if args.one is not None:
        print(json.dumps(measure(args.one, args.requests, args.rate_per_group, args.repeat, policy)))
        return
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes must be comma-separated integers (got {args.sizes!r})")
    if any(size < BASE_GROUPS or size % BASE_GROUPS for size in sizes):
        ap.error(f"--sizes must be multiples of {BASE_GROUPS} (got {args.sizes})")
    children: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    for round_ in range(args.processes):
        for size in sizes:
            out = subprocess.run([sys.executable, __file__, "--one", str(size), "--requests", str(args.requests),
                                  "--rate-per-group", str(args.rate_per_group), "--repeat", str(args.repeat),
                                  *(["--policy", args.policy] if args.policy is not None else [])],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"error: size {size} failed (exit {out.returncode})")
            child = json.loads(out.stdout.strip().splitlines()[-1])
            children[size].append(child)
            runs = ", ".join(f"{child['requests'] / w:,.0f}" for w in child["walls_s"])
            print(f"round {round_ + 1}/{args.processes}, {size} groups: {runs} req/s", file=sys.stderr, flush=True)
    rows = [combine(children[size]) for size in sizes]
    for size, row in zip(sizes, rows):
        row["vs_smallest"] = round(row["requests_per_s"] / rows[0]["requests_per_s"], 3)
        row["vs_smallest_rounds"] = [round(statistics.median(a["walls_s"]) / statistics.median(b["walls_s"]), 3)
                                     for a, b in zip(children[sizes[0]], children[size])]
        print(json.dumps(row), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
