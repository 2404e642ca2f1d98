"""End-to-end capacity of the live runtime: scheduler + prefill + decode actors, near-zero work.

    RAY_AUTH_MODE=disabled python bench/sched_capacity.py [--requests 20000] [--rate 1000]

Device groups get fitted-coefficient profiles of 1 µs per prefill iteration and per decode
step, so the time measured is the runtime's own: the core, the batched actor calls, the KV
hand-off (1 KiB of real Arrow bytes per request through the object store).

- ``max_rate_rps``: ``--requests`` arriving in one burst, run on the virtual clock (the loop
  never waits): requests / wall seconds of the scheduler actor's loop.
- ``overhead_us_p50/p99``: the same cluster on the wall clock at ``--rate`` req/s: per request,
  live end-to-end latency minus the simulator's for the same request — what the runtime adds.

Prints one JSON object last: {"max_rate_rps", "overhead_us_p50", "overhead_us_p99", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import hetero_sched as hs  # noqa: E402
from hetero_sched.catalog.profiles import Profile, save_profile  # noqa: E402
from hetero_sched.experiment import parse_experiment  # noqa: E402
from hetero_sched.runtime.cluster import LocalCluster, connect, nodes_for  # noqa: E402
from hetero_sched.runtime.live import run_live  # noqa: E402


def _profile(folder: Path, device: str, tp: int, count: int) -> str:
    path = folder / f"{device}.json"
    save_profile(Profile("fitted", device, device, "tiny", tp, 1, count,
                         {"prefill": [1e-6, 0.0, 0.0], "decode_pieces": [[1 << 30, 1e-6, 0.0, 0.0]]},
                         source="bench/sched_capacity.py: near-zero work"), path)
    return str(path)


def experiment(folder: Path, n: int, rate: float) -> dict:
    return {
        "name": "sched-capacity", "seed": 0, "model": "tiny",
        "groups": [
            {"name": "p", "device": "trn2", "count": 4, "tp": 16, "role": "prefill",
             "cost_profile": _profile(folder, "trn2", 16, 4), "max_prefill_seqs": 1024,
             "max_batch_tokens": 1 << 20},
            {"name": "d", "device": "cs3", "count": 1, "role": "decode",
             "cost_profile": _profile(folder, "cs3", 1, 1), "max_num_seqs": 4096},
        ],
        "policy": "disagg",
        "workload": {"kind": "synthetic", "num_requests": n, "rate_per_s": rate, "prompt": 64, "output": 4},
        "predictor": {"kind": "oracle"},
        "overrides": {"cost.trn2.message_cost_s": 0.0, "cost.cs3.message_cost_s": 0.0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=1000.0, help="wall-clock run's arrival rate (req/s)")
    ap.add_argument("--wall-requests", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        burst = experiment(folder, args.requests, 1e7)
        with LocalCluster(nodes_for(parse_experiment(burst))) as cluster:
            connect(cluster.address)
            print(f"cluster up in {cluster.bring_up_s:.1f} s; load {os.getloadavg()}", file=sys.stderr)
            live = run_live(burst, address=cluster.address, clock="virtual", bytes_scale=1e-9)
            rt = live.summary["runtime"]
            assert live.summary["completed"] == args.requests
            max_rate = args.requests / rt["wall_s"]
            print(f"burst: {args.requests} requests in {rt['wall_s']:.2f} s, {rt['actor_calls']} calls, "
                  f"{rt['span_reports']} span reports", file=sys.stderr)

            paced = experiment(folder, args.wall_requests, args.rate)
            wall = run_live(paced, address=cluster.address, clock="wall", bytes_scale=1e-9)
            sim = hs.simulate(paced)
            e2e_live = np.array(wall.records.column("e2e_s").to_pylist())
            e2e_sim = np.array(sim.records.column("e2e_s").to_pylist())
            overhead_us = (e2e_live - e2e_sim) * 1e6
            print(f"wall run at {args.rate:g} req/s: {wall.summary['runtime']['actor_calls']} calls; "
                  f"load {os.getloadavg()}", file=sys.stderr)
    print(json.dumps({
        "max_rate_rps": round(max_rate, 1),
        "overhead_us_p50": round(float(np.percentile(overhead_us, 50)), 1),
        "overhead_us_p99": round(float(np.percentile(overhead_us, 99)), 1),
        "burst_requests": args.requests, "burst_wall_s": round(rt["wall_s"], 3),
        "burst_actor_calls": rt["actor_calls"], "burst_span_reports": rt["span_reports"],
        "wall_rate_rps": args.rate, "wall_requests": args.wall_requests,
        "wall_completed": wall.summary["completed"],
    }))


if __name__ == "__main__":
    main()
