"""Run on a cluster's head by `ray submit` (tests/launcher): a short live run of an experiment.

``python hetero_sched_probe.py EXPERIMENT.yaml N`` replays the first N requests on the virtual
clock on the cluster at ``auto`` and prints, as its last line, one JSON object: requests
completed, the node labels of every group's actor (``RunResult.stamp["placement"]``) and the
interpreter (``sys.prefix``) of this script and of a Ray worker of the cluster.
"""

from __future__ import annotations

import json
import sys

import ray

from hetero_sched import workload as wl
from hetero_sched.experiment import build_workload
from hetero_sched.runtime.live import run_live
from hetero_sched.engine.assembly import resolve


def main() -> None:
    """Run and print the JSON line."""
    exp, base = resolve(sys.argv[1])
    work = wl.head(build_workload(exp.workload, exp.seed, base), int(sys.argv[2]))
    result = run_live(exp, address="auto", clock="virtual", workload=work)
    if not ray.is_initialized():
        ray.init(address="auto")
    worker_prefix = ray.get(ray.remote(num_cpus=0)(_prefix).remote())
    print(json.dumps({"requests": result.summary["requests"], "completed": result.summary["completed"],
                      "placement": result.stamp["placement"], "python_prefix": sys.prefix,
                      "worker_prefix": worker_prefix}))


def _prefix() -> str:
    return sys.prefix


if __name__ == "__main__":
    main()
