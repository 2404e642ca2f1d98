"""The cluster KV store on a real Ray cluster (the session fixture): store actors hold prefix
blocks as Arrow objects, prefill actors read them by ref and prefill from them token-exact."""

from __future__ import annotations

import numpy as np
import pytest

import hetero_sched as hs
from hetero_sched.runtime.live import run_live
from hetero_sched.workload import Workload

from helpers import prefix_families, reference_tokens

pytestmark = pytest.mark.ray


def store_workload(n: int = 60, block: int = 32) -> tuple[Workload, list[tuple[int, ...]]]:
    """Three prefix families. The first 12 requests arrive one by one (all prefilled by the first
    group, which writes their blocks to the store); the rest arrive in one burst that the router
    spreads over both groups, so the second reads the families' blocks from the store."""
    rng = np.random.default_rng(7)
    hashes, prompts = prefix_families(rng, n, block, trim=(0, block // 2))
    arrival = np.where(np.arange(n) < 12, np.arange(n) * 0.1, 3.0)
    w = Workload("store", arrival, np.array(prompts), rng.integers(8, 40, n), prefix_hashes=hashes,
                 prefix_block_tokens=block)
    return w, hashes


def store_experiment(**over) -> dict:
    # Llama-3.1-8B's cost model (prefill is worth skipping; the numpy backend computes the tiny model)
    exp = {"name": "kvstore", "seed": 1, "model": "llama-3.1-8b",
           "groups": [{"name": "p", "device": "trn2", "count": 4, "tp": 16, "replicas": 2, "role": "prefill"},
                      {"name": "d", "device": "cs3", "count": 1, "role": "decode"}],
           "policy": "disagg", "kv_cache": {"store": {"nodes": 2}},
           "workload": {"kind": "synthetic", "num_requests": 60, "rate_per_s": 50.0}}
    exp.update(over)
    return exp


def test_prefill_from_store_blocks_is_token_exact(ray_cluster):
    """Blocks one prefill actor computed reach the other through the store actors (Arrow objects,
    read by ref, checksums verified), and prefills that reuse them make exactly the tokens of
    recomputing everything; the run is the simulator's, decision for decision."""
    w, hashes = store_workload()
    exp = store_experiment()
    live = run_live(exp, address=ray_cluster.address, clock="virtual", backend="numpy", workload=w)
    sim = hs.simulate(exp, workload=w)
    assert live.decisions == sim.decisions
    assert live.summary["completed"] == 60
    store = live.summary["kv_cache"]["tiers"]["store"]
    assert store["hit_tokens"] > 0 and store["hit_requests"] > 0, "prefills must reuse blocks read from the store"
    rt = live.summary["runtime"]
    assert rt["store_actors"] == 2
    assert rt["store_reads"] == store["reads"] > 0
    assert rt["store_puts"] > 0 and rt["store_put_bytes"] > 0 and rt["store_read_bytes"] > 0
    assert rt["store_blocks_held_after_run"] > 0
    reference_tokens(live, seed=1, hashes=hashes, block=32)


def test_store_on_the_wall_clock_with_the_modeled_backend(ray_cluster):
    """Wall clock, modeled backend: synthetic blocks (scaled) move through the store actors; every
    request completes and reads wait for the writes they need."""
    w, _ = store_workload()
    live = run_live(store_experiment(), address=ray_cluster.address, clock="wall", workload=w, bytes_scale=1e-3)
    assert live.summary["completed"] == 60
    rt = live.summary["runtime"]
    assert rt["store_reads"] > 0 and rt["store_read_bytes"] > 0 and rt["kv_held_after_run"] == 0
