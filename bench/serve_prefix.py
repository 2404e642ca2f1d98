"""What prefix caching gives served requests: a chat workload whose requests share a system prompt.

    RAY_AUTH_MODE=disabled flock /tmp/hetero-bench.lock python bench/serve_prefix.py \\
        [--requests 40] [--system-tokens 4000] [--question-tokens 200] [--output-tokens 16] [--block-tokens 16,0]

Starts ``hetero-sched serve``'s server (the shipped Trn2 -> CS-3 experiment, modeled backend, a
private local cluster of labelled nodes) once per ``--block-tokens`` value (the server's
``--prefix-block-tokens``; 0: prompts carry no hashes, nothing is cached), and sends
``--requests`` streamed ``/v1/completions`` with the official ``openai`` client, one after the
other: each prompt is the same ``--system-tokens`` bytes of text (one token per byte: the
shipped byte tokenizer) followed by a question of its own. Reported per setting: the share of
prompt tokens the server says were cached (``usage.prompt_tokens_details.cached_tokens``) and
client TTFT (request sent -> first token) p50/p90 over the requests after the first (the first
fills the cache). Prints one JSON list last, one object per setting.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import openai  # noqa: E402

from hetero_sched.engine.assembly import resolve  # noqa: E402
from hetero_sched.runtime.cluster import LocalCluster, connect, nodes_for  # noqa: E402
from hetero_sched.runtime.live import with_absolute_paths  # noqa: E402
from hetero_sched.serve import ServeOptions, start_ingress  # noqa: E402
from hetero_sched.serve.engine import EngineCore, EngineOptions  # noqa: E402

WORDS = "the a cluster prefill decode token cache group request model trainium wafer scheduler".split()


def text(rng: random.Random, n: int) -> str:
    """``n`` bytes of words (ASCII: ``n`` tokens of the byte tokenizer)."""
    out = ""
    while len(out) < n:
        out += rng.choice(WORDS) + " "
    return out[:n]


def one_setting(url: str, model: str, block: int, args: argparse.Namespace) -> dict:
    rng = random.Random(1)
    system = text(rng, args.system_tokens)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    ttfts, cached, prompt = [], 0, 0
    for i in range(args.requests):
        t0 = time.perf_counter()
        first = None
        stream = client.completions.create(model=model, prompt=system + text(rng, args.question_tokens),
                                           max_tokens=args.output_tokens, stream=True,
                                           stream_options={"include_usage": True})
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                cached += chunk.usage.prompt_tokens_details.cached_tokens
                prompt += chunk.usage.prompt_tokens
        if first is None:
            sys.exit(f"error: request {i} streamed no token")
        if i:
            ttfts.append(first * 1e3)
    q = statistics.quantiles(ttfts, n=10)
    return {"prefix_block_tokens": block, "requests": args.requests, "cached_token_share": round(cached / prompt, 4),
            "ttft_ms_p50": round(statistics.median(ttfts), 2), "ttft_ms_p90": round(q[8], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--system-tokens", type=int, default=4000)
    ap.add_argument("--question-tokens", type=int, default=200)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--block-tokens", default="16,0", help="the server's --prefix-block-tokens values to compare")
    args = ap.parse_args()
    try:
        blocks = [int(b) for b in args.block_tokens.split(",")]
    except ValueError:
        ap.error(f"--block-tokens must be comma-separated integers (got {args.block_tokens!r})")
    if args.requests < 3 or min(args.system_tokens, args.question_tokens, args.output_tokens) < 1 or min(blocks) < 0:
        ap.error("--requests must be >= 3, the token counts >= 1, --block-tokens >= 0")
    exp, base = resolve(None)
    rows = []
    with LocalCluster(nodes_for(exp)) as cluster:
        connect(cluster.address)
        for block in blocks:
            factory = functools.partial(EngineCore, with_absolute_paths(exp, base),
                                        EngineOptions(prefix_block_tokens=block))
            ingress = start_ingress(factory, ServeOptions(port=0))      # a fresh server (and devices) each
            try:
                rows.append(one_setting(ingress.url, exp.model, block, args))
            finally:
                ingress.stop()
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
