"""Does a served run agree with the simulator? A third-party load generator against the OpenAI front door.

    RAY_AUTH_MODE=disabled flock /tmp/hetero-bench.lock python bench/serve_vs_sim.py \\
        [--requests 1000] [--rate 20] [--prompt-tokens 128] [--output-tokens 64] [--aiperf PATH]

1. Starts the server -- the Ray ingress actor (``hetero_sched.serve.start_ingress``) on a free
   loopback port, on a private local Ray.
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
5. Compares with the reference: **today the FakeCore's nominal timing** (TTFT ``--fake-ttft-ms``,
   ITL ``--fake-itl-ms``), which measures what HTTP, streaming and the client add; once the
   engine is plugged in, the simulator on the same arrivals and lengths (see ``LEAD:`` marks).

Prints one JSON object last: ``generator``, ``generator_version``, ``requests``, client
``ttft_ms_*`` / ``itl_ms_*`` (p50/p90/p99), the reference's, ``*_rel_err`` and ``jitter_rel``.
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

import ray  # noqa: E402

from hetero_sched.serve import ServeOptions, start_ingress  # noqa: E402
from hetero_sched.serve.fakecore import FakeCore, FakeCoreConfig  # noqa: E402
from hetero_sched.serve.tokenizer import write_hf_cache  # noqa: E402

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


def reference_stats(records: Sequence[ClientRecord], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """What the client should have seen, to compare with.

    LEAD: plug the simulator here -- simulate the experiment with these requests' arrivals
    (``r.start_s - records[0].start_s``), prompt and output lengths (``r.prompt_tokens``,
    ``r.output_tokens``) and return its TTFT and TPOT percentiles in the same shape. Today: the
    FakeCore's nominal timing, identical for every request.
    """
    flat = lambda v: {f"p{q}": v for q in QUANTILES}  # noqa: E731
    return {"ttft": flat(args.fake_ttft_ms), "itl": flat(args.fake_itl_ms)}


def core_factory(args: argparse.Namespace) -> functools.partial:
    """What the server serves.

    LEAD: plug the engine here -- a picklable factory of the ServeCore over the experiment's
    scheduler actor (modeled backend, the shipped experiment). Today: the FakeCore.
    """
    return functools.partial(FakeCore, FakeCoreConfig(model_id="tiny", max_model_len=4096,
                                                      ttft_s=args.fake_ttft_ms / 1e3, itl_s=args.fake_itl_ms / 1e3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=20.0, help="Poisson arrival rate, requests/s")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=2, help="identical served runs (>= 2 for jitter_rel)")
    ap.add_argument("--aiperf", default=None, help="aiperf executable (default: a private venv, installed once)")
    ap.add_argument("--fake-ttft-ms", type=float, default=20.0, help="FakeCore: time to first token")
    ap.add_argument("--fake-itl-ms", type=float, default=2.0, help="FakeCore: time between tokens")
    ap.add_argument("--out", default=None, help="keep aiperf's artifacts here (default: a temporary folder)")
    args = ap.parse_args()
    exe = aiperf_executable(args.aiperf)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="serve-vs-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    repo_id = write_hf_cache(work / "hf-cache")
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    runs = []
    try:
        for i in range(args.runs):
            ingress = start_ingress(core_factory(args), ServeOptions(port=0))  # a fresh server per run
            try:
                t0 = time.monotonic()
                records = run_aiperf(exe, ingress.url, work / "hf-cache", repo_id, work / f"run{i}", args, "tiny")
                print(f"run {i}: {len(records)} requests in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            finally:
                ingress.stop()
            if len(records) < args.requests:
                sys.exit(f"error: run {i}: {len(records)} of {args.requests} requests recorded")
            runs.append(records)
    finally:
        ray.shutdown()
    first = client_stats(runs[0])
    ref = reference_stats(runs[0], args)
    out: dict = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "requests": len(runs[0]),
                 "rate_per_s": args.rate, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                 "reference": "fakecore-nominal"}
    for metric in ("ttft", "itl"):
        for q in QUANTILES:
            out[f"{metric}_ms_p{q}"] = round(first[metric][f"p{q}"], 3)
            out[f"{metric}_ms_p{q}_reference"] = round(ref[metric][f"p{q}"], 3)
    for metric in ("ttft", "itl"):
        for q in QUANTILES:
            out[f"{metric}_p{q}_rel_err"] = round(abs(first[metric][f"p{q}"] / ref[metric][f"p{q}"] - 1), 4)
    if len(runs) > 1:
        second = client_stats(runs[1])
        out["jitter_rel"] = round(max(abs(second[m][k] / first[m][k] - 1) for m in first for k in first[m]), 4)
    out["artifacts"] = str(work)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
