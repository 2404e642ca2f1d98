"""Goodput of every registered policy on Trn2+CS-3 mixes and a colocated H100 baseline at equal cost.

Llama-3.1-70B; the first ``--requests`` requests (default 2,000) of the Azure 2023 conversation
trace and of the Mooncake conversation trace, each replayed at the rates a goodput search needs
(burst pattern kept); both SLO tiers. Clusters:

- ``trn2x4+cs3x4``: four trn2.48xlarge prefill groups (TP64) -> one CS-3 decode group (4 systems, pp4),
  $587.92/h at the catalog's assumed $100/h per CS-3 (the disaggregated policies);
- ``cs3x4-own-prefill``: the same four CS-3 systems as one group doing its own prefill, $400/h
  (the colocated policies);
- ``h100x6``: six p5.48xlarge (48 H100, TP8 groups) colocated, $589.92/h ~ the mix's cost.

Runs as a sweep (Ray tasks, one CPU each; resumable in ``--out``) and prints one JSON list of
rows {workload, tier, policy, cluster, goodput_rps, goodput_tokens_per_s, goodput_per_dollar
(SLO-meeting output tokens per dollar), pct_of_bound}, plus the breakeven CS-3 $/h and the bound.
Needs the traces in ../shared/traces. Run under the Ray lock:
    RAY_AUTH_MODE=disabled flock /tmp/hetero-ray.lock python bench/policy_goodput.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from hetero_sched.errors import UserError
from hetero_sched.policies import POLICIES, policy_class
from hetero_sched.sweep import parse_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
TRN2 = {"name": "trn2-prefill", "device": "trn2", "count": 16, "tp": 64, "replicas": 4, "role": "prefill"}
CS3_DECODE = {"name": "cs3-decode", "device": "cs3", "count": 4, "pp": 4, "role": "decode"}
CLUSTERS = {
    "trn2x4+cs3x4": [TRN2, CS3_DECODE],
    "cs3x4-own-prefill": [{"name": "cs3", "device": "cs3", "count": 4, "pp": 4, "role": "both"}],
    "h100x6": [{"name": "h100", "device": "h100", "count": 8, "tp": 8, "replicas": 6, "role": "both"}],
}
ADAPTIVE = [{**TRN2, "pool": "mixed"}, CS3_DECODE]   # Trainium groups may switch to decode


def setups() -> dict[str, dict]:
    """Every registered policy on the clusters it can run on (colocated ones on both colocated clusters)."""
    from hetero_sched.policies.colocated import Colocated

    out = {}
    for name in sorted(POLICIES):
        if issubclass(policy_class(name), Colocated):
            for cluster in ("cs3x4-own-prefill", "h100x6"):
                out[f"{name}@{cluster}"] = {"policy.name": name, "groups": CLUSTERS[cluster]}
        else:
            groups = ADAPTIVE if name == "adaptive" else CLUSTERS["trn2x4+cs3x4"]
            out[f"{name}@trn2x4+cs3x4"] = {"policy.name": name, "groups": groups}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-policy-goodput"))
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    if not TRACES.is_dir():
        raise SystemExit(f"traces not found at {TRACES}")
    workloads = {w: {"kind": "trace", "path": str(TRACES / f), "num_requests": args.requests}
                 for w, f in (("azure-conv", "azure2023_conv.csv"), ("mooncake-conv", "mooncake_conversation.jsonl"))}
    doc = {"name": "policy-goodput",
           "experiment": {"name": "policy-goodput", "model": "llama-3.1-70b", "groups": CLUSTERS["trn2x4+cs3x4"],
                          "policy": "disagg", "workload": workloads["azure-conv"], "slo": "standard"},
           "axes": {"workload": workloads, "setup": setups()},
           "goodput": {"tiers": ["standard", "high-speed"], "rel_tol": 0.03}, "save_runs": False}
    t0 = time.perf_counter()
    outcome = run_sweep(parse_sweep(doc, ROOT), args.out, use_ray=not args.no_ray,
                        progress=lambda d, n: print(f"  {d}/{n} points", file=sys.stderr, flush=True))
    rows = []
    for r in outcome.rows:
        policy, cluster = r["setup"].split("@")
        for tier in ("standard", "high-speed"):
            k = tier.replace("-", "_")
            if r["status"] != "ok":
                rows.append({"workload": r["workload"], "tier": tier, "policy": policy, "cluster": cluster,
                             "error": r["error"]})
                continue
            rows.append({"workload": r["workload"], "tier": tier, "policy": policy, "cluster": cluster,
                         "goodput_rps": round(r[f"goodput_rps_{k}"], 3),
                         "goodput_tokens_per_s": round(r[f"goodput_tokens_per_s_{k}"], 1),
                         "goodput_per_dollar": round(r[f"goodput_tokens_per_dollar_{k}"], 1),
                         "pct_of_bound": None if r[f"pct_of_bound_{k}"] is None else round(r[f"pct_of_bound_{k}"], 1),
                         "bound_rps": round(r[f"bound_rps_{k}"], 3) if math.isfinite(r[f"bound_rps_{k}"]) else None, "bound_bottleneck": r[f"bound_bottleneck_{k}"],
                         "dollars_per_hour": round(r["cluster_dollars_per_hour"], 2),
                         "breakeven_cs3_dollars_per_hour": None if r.get(f"breakeven_cs3_dollars_per_hour_{k}") is None
                         else round(r[f"breakeven_cs3_dollars_per_hour_{k}"], 1)})
    print(f"{len(outcome.rows)} points ({outcome.computed} run now, {outcome.reused} reused) in "
          f"{time.perf_counter() - t0:.0f} s; policies registered: {', '.join(sorted(POLICIES))}", file=sys.stderr)
    print(json.dumps(rows))


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        raise SystemExit(f"error: {exc}")
