"""Small experiment builders shared by tests."""

from __future__ import annotations

from typing import Any


def disagg_experiment(**over: Any) -> dict:
    """Two trn2 prefill groups and one CS-3 decode group serving Llama-3.1-8B."""
    exp = {
        "name": "t-disagg", "seed": 3, "model": "llama-3.1-8b",
        "groups": [
            {"name": "p", "device": "trn2", "count": 4, "tp": 16, "replicas": 2, "role": "prefill"},
            {"name": "d", "device": "cs3", "count": 1, "role": "decode", "max_num_seqs": 16},
        ],
        "policy": "disagg",
        "workload": {"kind": "synthetic", "num_requests": 400, "rate_per_s": 20.0},
        "slo": "standard",
    }
    exp.update(over)
    return exp


def colocated_experiment(**over: Any) -> dict:
    """Two H100 groups doing prefill and decode of Llama-3.1-8B."""
    exp = {
        "name": "t-colo", "seed": 5, "model": "llama-3.1-8b",
        "groups": [{"name": "h", "device": "h100", "count": 1, "tp": 1, "replicas": 2, "role": "both"}],
        "policy": "colocated",
        "workload": {"kind": "synthetic", "num_requests": 400, "rate_per_s": 15.0},
        "slo": "standard",
    }
    exp.update(over)
    return exp


def reference_tokens(result, seed, hashes=None, block=512):
    """Check a numpy-backend run's tokens against the tiny model generating each request alone
    (no batching, no prefix cache, no KV moved); returns the smallest top-1 margin seen."""
    from hetero_sched.catalog import get_model
    from hetero_sched.tinylm import TinyLM, prompt_token_ids

    lm = TinyLM("tiny", seed)
    vocab = get_model("tiny").vocab_size
    margins = []
    for row in result.records.to_pylist():
        rid = row["request_id"]
        ids = prompt_token_ids(rid, row["prompt_tokens"], vocab, hashes[rid] if hashes else None, block, seed)
        toks, margin = lm.generate(ids, row["output_tokens"])
        margins.append(margin)
        assert result.tokens[rid] == toks, f"request {rid}"
    return min(margins)


def prefix_families(rng, n: int, block: int, shared: int = 4, take: tuple[int, int] = (1, 5),
                    own: tuple[int, int] = (0, 3), trim: tuple[int, int] = (0, 16)):
    """Prompts of three families sharing up to ``shared`` prefix blocks (each takes
    ``rng.integers(*take)`` of them, plus ``rng.integers(*own)`` blocks of its own), each
    ``rng.integers(*trim)`` tokens short of its last block: ``(hashes, prompt lengths)``."""
    families = [tuple(int(x) for x in rng.integers(0, 1 << 40, shared)) for _ in range(3)]
    hashes, prompts = [], []
    for i in range(n):
        mine = tuple(int(x) for x in rng.integers(0, 1 << 40, int(rng.integers(*own))))
        h = families[i % 3][: int(rng.integers(*take))] + mine
        hashes.append(h)
        prompts.append(len(h) * block - int(rng.integers(*trim)))
    return hashes, prompts
