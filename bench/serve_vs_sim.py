"""Does a served run agree with the simulator? A third-party load generator against the OpenAI front door.

    RAY_AUTH_MODE=disabled flock /tmp/hetero-bench.lock python bench/serve_vs_sim.py \\
        [--requests 1000] [--rate 4] [--prompt-tokens 1024] [--output-tokens 256] [--aiperf PATH]

1. Starts ``hetero-sched serve``'s server -- the Ray ingress actor with the live engine
   (``hetero_sched.serve.EngineCore``: the shipped Trn2 -> CS-3 experiment, modeled backend,
   device actors on a private local cluster of labelled nodes) on a free loopback port. The
   rate must leave the busiest group <= 60% busy: checked in the simulator first (exits if not).
2. Drives it with **aiperf** (NVIDIA's load generator, from PyPI; installed on first use into
   ``~/.cache/hetero-sched/aiperf-<version>``, its own venv, because it pins versions the project
   does not share), fully offline: ``HF_HUB_OFFLINE=1`` with the shipped byte tokenizer filed
   in a private Hugging Face cache (``hetero-sched tokenizer DIR --hf-cache``), streaming
   ``/v1/completions``, Poisson arrivals at ``--rate``, ``--requests`` requests with fixed prompt
   and output lengths (``ignore_eos``, ``min_tokens`` = ``max_tokens``).
3. Reads aiperf's per-request records (``profile_export.jsonl``): each request's start time,
   TTFT and ITL (aiperf's ITL is per request: (latency - TTFT) / (output tokens - 1), the
   project's TPOT), and takes p50/p90/p99 over requests.
4. Does it twice, for ``jitter_rel`` (the largest relative difference between the two runs).
5. Simulates the same arrivals (each request's client start, relative to the first) and lengths
   with ``hetero-sched simulate`` (a generic CSV trace), and compares: client TTFT with the
   simulated TTFT, client ITL with the simulated TPOT, p50/p90/p99 over requests. The simulator
   is given the control plane's latency the server measured in the *second* run (its mean
   dispatch and report delays, ``/metrics`` ``hetero:control_plane_delay_seconds``; experiment
   field ``control_plane``): the scheduler's messages to and from its device actors take
   milliseconds, which the plain simulator does not model. ``*_rel_err_ideal`` compares with
   the plain (zero-latency) simulator.

Prints one JSON object last: ``generator``, ``generator_version``, ``requests``, client
``ttft_ms_*`` / ``itl_ms_*`` (p50/p90/p99), the simulator's (``*_sim``), the relative errors
``ttft_p50_rel_err`` ... ``itl_p99_rel_err`` (the only ``_rel_err`` keys) and ``jitter_rel``.
Goal (issue 14): every error <= max(5%, 3 x jitter_rel), HTTP and streaming included.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402

import hetero_sched as hs  # noqa: E402
from hetero_sched.engine.assembly import resolve  # noqa: E402
from hetero_sched.runtime.cluster import LocalCluster, connect, nodes_for  # noqa: E402
from hetero_sched.runtime.live import with_absolute_paths  # noqa: E402
from hetero_sched.serve import ServeOptions, start_ingress  # noqa: E402
from hetero_sched.serve.engine import EngineCore, EngineOptions  # noqa: E402
from hetero_sched.serve.tokenizer import write_hf_cache  # noqa: E402
from hetero_sched.workload import Workload  # noqa: E402

GENERATOR = "aiperf"
GENERATOR_VERSION = "0.13.0"
QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class ClientRecord:
    """One request as the load generator measured it (seconds)."""

    start_s: float
    """When the generator sent it (Unix seconds)."""
    ttft_s: float
    itl_s: float
    latency_s: float
    prompt_tokens: int
    output_tokens: int


def aiperf_executable(requested: Optional[str]) -> Path:
    """The aiperf CLI: ``--aiperf``, else a private venv under ~/.cache (created on first use)."""
    if requested:
        return Path(requested)
    venv = Path.home() / ".cache" / "hetero-sched" / f"aiperf-{GENERATOR_VERSION}"
    exe = venv / "bin" / "aiperf"
    if not exe.exists():
        print(f"installing aiperf {GENERATOR_VERSION} into {venv} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"aiperf=={GENERATOR_VERSION}"], check=True)
    return exe


def run_aiperf(exe: Path, url: str, hf_cache: Path, repo_id: str, out: Path, args: argparse.Namespace,
               model: str) -> list[ClientRecord]:
    """One aiperf run against ``url``; its per-request records."""
    cmd = [str(exe), "profile", "--model", model, "--url", url, "--endpoint-type", "completions", "--streaming",
           "--tokenizer", repo_id,
           "--prompt-input-tokens-mean", str(args.prompt_tokens), "--prompt-input-tokens-stddev", "0",
           "--prompt-output-tokens-mean", str(args.output_tokens), "--prompt-output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{args.output_tokens}",
           "--request-rate", str(args.rate), "--arrival-pattern", "poisson", "--request-count", str(args.requests),
           "--random-seed", str(args.seed), "--artifact-dir", str(out), "--ui", "none", "--no-gpu-telemetry"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache)}
    print("$ " + " ".join(cmd), file=sys.stderr)
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    return read_records(out / "profile_export.jsonl")


def read_records(path: Path) -> list[ClientRecord]:
    """aiperf's ``profile_export.jsonl``: one JSON object per request (``metadata``, ``metrics`` in ms)."""
    records = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        m = row["metrics"]
        if row.get("error") or "time_to_first_token" not in m:
            raise RuntimeError(f"{path}: a request failed: {line[:300]}")
        records.append(ClientRecord(row["metadata"]["request_start_ns"] / 1e9, m["time_to_first_token"]["value"] / 1e3,
                                    m["inter_token_latency"]["value"] / 1e3, m["request_latency"]["value"] / 1e3,
                                    int(m["input_sequence_length"]["value"]), int(m["output_sequence_length"]["value"])))
    return records


def percentiles_ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 of seconds, in ms."""
    return {f"p{q}": float(np.percentile(np.asarray(values) * 1e3, q)) for q in QUANTILES}


def client_stats(records: Sequence[ClientRecord]) -> dict[str, dict[str, float]]:
    """TTFT and ITL percentiles over requests."""
    return {"ttft": percentiles_ms([r.ttft_s for r in records]), "itl": percentiles_ms([r.itl_s for r in records])}


def experiment() -> dict:
    """The shipped experiment (Trn2 prefill -> CS-3 decode, Llama-3.1-70B), as a mapping."""
    exp, base = resolve(None)
    return with_absolute_paths(exp, base).model_dump(mode="json")


def simulated(records: Sequence[ClientRecord], work: Path, name: str,
              control_plane: Optional[dict[str, float]] = None) -> dict[str, dict[str, float]]:
    """``hetero-sched simulate`` on the client's arrivals and lengths (and a control plane's
    latency, if given): TTFT and TPOT percentiles (ms)."""
    t0 = min(r.start_s for r in records)
    trace = work / "served-arrivals.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(
        f"{r.start_s - t0!r},{r.prompt_tokens},{r.output_tokens}\n" for r in sorted(records, key=lambda r: r.start_s)))
    exp = {**experiment(), "workload": {"kind": "trace", "path": str(trace)}}
    if control_plane is not None:
        exp["control_plane"] = control_plane
    (work / f"{name}.yaml").write_text(yaml.safe_dump(exp))
    out = work / name
    subprocess.run(["hetero-sched", "simulate", str(work / f"{name}.yaml"), "--out", str(out), "-q"], check=True,
                   stdout=subprocess.DEVNULL)
    t = pq.read_table(out / "requests.parquet")
    return {"ttft": percentiles_ms(t.column("ttft_s").to_pylist()), "itl": percentiles_ms(t.column("tpot_s").to_pylist())}


def busiest_utilization(args: argparse.Namespace) -> float:
    """The simulator's busiest group at the planned Poisson rate and lengths (the same seed aiperf uses)."""
    rng = np.random.default_rng(args.seed)
    n = args.requests
    w = Workload("plan", np.cumsum(rng.exponential(1 / args.rate, n)), np.full(n, args.prompt_tokens),
                 np.full(n, args.output_tokens))
    return max(g["utilization"] for g in hs.simulate(experiment(), workload=w).summary["groups"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=2, help="identical served runs (>= 2 for jitter_rel)")
    ap.add_argument("--aiperf", default=None, help="aiperf executable (default: a private venv, installed once)")
    ap.add_argument("--progress-interval-ms", type=float, default=2.0, help="devices stream tokens this often")
    ap.add_argument("--out", default=None, help="keep aiperf's artifacts here (default: a temporary folder)")
    args = ap.parse_args()
    util = busiest_utilization(args)
    print(f"simulated: busiest group {util:.1%} busy at {args.rate:g} req/s", file=sys.stderr)
    if util > 0.6:
        sys.exit(f"error: the busiest group is {util:.1%} busy (> 60%): lower --rate")
    exe = aiperf_executable(args.aiperf)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="serve-vs-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    repo_id = write_hf_cache(work / "hf-cache")
    exp, base = resolve(None)
    # no prefix hashes: the simulated trace (lengths only) has none, so the two see the same work
    options = EngineOptions(progress_interval_s=args.progress_interval_ms / 1e3, prefix_block_tokens=0)
    runs, control = [], []
    with LocalCluster(nodes_for(exp)) as cluster:
        connect(cluster.address)
        for i in range(args.runs):
            factory = functools.partial(EngineCore, with_absolute_paths(exp, base), options)
            ingress = start_ingress(factory, ServeOptions(port=0))  # a fresh server (and devices) per run
            try:
                t0 = time.monotonic()
                records = run_aiperf(exe, ingress.url, work / "hf-cache", repo_id, work / f"run{i}", args, exp.model)
                print(f"run {i}: {len(records)} requests in {time.monotonic() - t0:.0f} s", file=sys.stderr)
                status = ray.get(ingress.actor.status.remote(), timeout=60)   # its measured control plane
                control.append({"dispatch_ms": round(status.dispatch_delay_s * 1e3, 3),
                                "report_ms": round(status.report_delay_s * 1e3, 3)})
            finally:
                ingress.stop()
            if len(records) < args.requests:
                sys.exit(f"error: run {i}: {len(records)} of {args.requests} requests recorded")
            runs.append(records)
    first = client_stats(runs[0])
    measured = control[-1]      # the last run's control plane (the other run's, when there are two)
    sim = simulated(runs[0], work, "sim", measured)
    ideal = simulated(runs[0], work, "sim-ideal")
    out: dict = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "requests": len(runs[0]),
                 "rate_per_s": args.rate, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                 "experiment": exp.name, "busiest_utilization_sim": round(util, 3), "control_plane": measured,
                 "control_plane_runs": control}
    for metric in ("ttft", "itl"):
        for q in QUANTILES:
            out[f"{metric}_ms_p{q}"] = round(first[metric][f"p{q}"], 3)
            out[f"{metric}_ms_p{q}_sim"] = round(sim[metric][f"p{q}"], 3)
            out[f"{metric}_ms_p{q}_sim_ideal"] = round(ideal[metric][f"p{q}"], 3)
    for metric in ("ttft", "itl"):
        for q in QUANTILES:
            out[f"{metric}_p{q}_rel_err"] = round(first[metric][f"p{q}"] / sim[metric][f"p{q}"] - 1, 4)
    for metric in ("ttft", "itl"):
        for q in QUANTILES:
            out[f"{metric}_p{q}_rel_err_ideal"] = round(first[metric][f"p{q}"] / ideal[metric][f"p{q}"] - 1, 4)
    if len(runs) > 1:
        second = client_stats(runs[1])
        out["jitter_rel"] = round(max(abs(second[m][k] / first[m][k] - 1) for m in first for k in first[m]), 4)
    errors = [abs(v) for k, v in out.items() if k.endswith("_rel_err")]
    out["goal_met"] = max(errors) <= max(0.05, 3 * out.get("jitter_rel", 0.0))
    out["artifacts"] = str(work)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
