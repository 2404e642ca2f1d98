"""Prefix reuse in a run's summary: hit rates per tier, bytes moved per tier, prefill compute saved.

``summary["kv_cache"]`` (simulated and live runs of a workload with prefix hashes, or of an
experiment with ``kv_cache:``):

- ``hit_rate`` — prompt tokens not recomputed / all prompt tokens (from the records: every
  tier's hits, the cluster store's included); ``request_hit_rate`` — requests with any;
- ``ideal_hit_rate`` — the same with an unlimited cache that holds every full prefix block of
  every earlier request (arrival order): what no eviction and no routing could beat;
- ``compute_saved_s`` — prefill compute the hits saved: each prompt alone on its prefill group,
  without and with its cached tokens (the cost model's prefill time);
- ``tiers`` — per tier (``hbm``, ``dram``, ``ssd``, ``store``): ``hit_tokens`` / ``hit_rate``
  (over all prompt tokens), ``hit_requests`` / ``request_hit_rate``, ``read_bytes`` (into device
  memory), ``written_bytes`` (write-backs into it; the store: writes from prefill groups),
  ``write_busy_s`` (its write channels' busy time), ``evicted_blocks`` (dropped, no tier below),
  ``capacity_blocks`` (over all groups); the store also ``reads``, ``fetch_s`` percentiles (start
  to landing, network queueing included), ``nodes`` and ``dollars_per_hour``;
- ``recomputed_tokens`` — tokens a tier held but the core recomputed, fetching costing more.

Tier counts are per prefill planned (a preempted request prefilled again counts again); without
``kv_cache`` the device-memory prefix cache is the only tier and its figures come from the records.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

from hetero_sched.core.group import GroupState
from hetero_sched.core.kvmemory import prefix_hit_tokens
from hetero_sched.core.kvstore import ClusterKVStore
from hetero_sched.core.kvtiers import DRAM, HBM, SSD, STORE, TIER_NAMES
from hetero_sched.workload import Workload


def ideal_hit_rate(workload: Workload) -> Optional[float]:
    """Prompt tokens an unlimited prefix cache would serve, over all prompt tokens (None without
    prefix hashes): every full block of every earlier request is cached, in arrival order."""
    hashes = workload.prefix_hashes
    if hashes is None or not len(workload):
        return None
    block = workload.prefix_block_tokens
    seen: set[int] = set()
    hit = 0
    prompts = workload.prompt_tokens.tolist()
    for h, prompt in zip(hashes, prompts):
        matched = 0
        for x in h:
            if x not in seen:
                break
            matched += 1
        if matched:
            hit += prefix_hit_tokens(matched, block, prompt, prompt)
        seen.update(h[:prompt // block])
    total = sum(prompts)
    return hit / total if total else 0.0


def compute_saved_s(table: pa.Table, groups: Sequence[GroupState]) -> float:
    """Prefill seconds the recorded prefix hits saved: each hit prompt alone on its prefill group,
    its prefill time without minus with its cached tokens."""
    saved = 0.0
    for prompt, cached, gid in zip(table.column("prompt_tokens").to_pylist(), table.column("cached_tokens").to_pylist(),
                                   table.column("prefill_group").to_pylist()):
        if cached and gid is not None:
            cost = groups[gid].cost
            saved += cost.prefill_time_s([prompt], [0]) - cost.prefill_time_s([prompt - cached], [cached])
    return saved


def _pcts(values: list[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


def kv_summary(table: pa.Table, groups: Sequence[GroupState], store: Optional[ClusterKVStore],
               workload: Workload) -> Optional[dict[str, Any]]:
    """``summary["kv_cache"]`` of a finished run (None: no prefix hashes and no KV tiers)."""
    tiered = [g.memory.tiers for g in groups if g.memory.tiers is not None]
    if workload.prefix_hashes is None and not tiered:
        return None
    prompts = table.column("prompt_tokens").to_pylist()
    cached = table.column("cached_tokens").to_pylist()
    total = sum(prompts) or 1
    n = len(prompts) or 1
    tiers: dict[str, dict[str, Any]] = {}
    if not tiered:
        hits = sum(cached)
        requests = sum(1 for c in cached if c)
        tiers["hbm"] = {"hit_tokens": hits, "hit_rate": hits / total, "hit_requests": requests,
                        "request_hit_rate": requests / n, "read_bytes": 0.0, "written_bytes": 0.0,
                        "write_busy_s": 0.0, "evicted_blocks": None,
                        "capacity_blocks": sum(0 if g.memory.prefix_cache is None else g.memory.prefix_cache.capacity_blocks
                                               for g in groups)}
    else:
        present = [HBM, STORE] + [t for t in (DRAM, SSD) if any(t in tv.specs for tv in tiered)]
        for t in sorted(present):
            if t == STORE and store is None:
                continue
            hit_tokens = sum(tv.stats.hit_tokens[t] for tv in tiered)
            hit_requests = sum(tv.stats.hit_requests[t] for tv in tiered)
            tiers[TIER_NAMES[t]] = {
                "hit_tokens": hit_tokens, "hit_rate": hit_tokens / total,
                "hit_requests": hit_requests, "request_hit_rate": hit_requests / n,
                "read_bytes": sum(tv.stats.read_bytes[t] for tv in tiered),
                "written_bytes": sum(tv.stats.written_bytes[t] for tv in tiered),
                "write_busy_s": sum(tv.stats.write_s[t] for tv in tiered),
                "evicted_blocks": sum(tv.stats.evicted_blocks[t] for tv in tiered),
                "capacity_blocks": sum(tv.capacity_blocks(t) for tv in tiered),
            }
        if store is not None:
            st = store.stats
            tiers["store"].update({
                "read_bytes": st.read_bytes, "written_bytes": st.written_bytes, "evicted_blocks": st.evicted_blocks,
                "capacity_blocks": store.capacity_blocks, "reads": st.reads, "writes": st.writes,
                "fetch_s": _pcts(st.read_s), "nodes": store.num_nodes, "node": store.node,
                "dollars_per_hour": store.dollars_per_hour})
    hits = sum(cached)
    return {
        "hit_rate": hits / total,
        "request_hit_rate": sum(1 for c in cached if c) / n,
        "ideal_hit_rate": ideal_hit_rate(workload),
        "cached_tokens": hits,
        "prompt_tokens": sum(prompts),
        "compute_saved_s": compute_saved_s(table, groups),
        "recomputed_tokens": sum(tv.stats.recomputed_tokens for tv in tiered),
        "tiers": tiers,
    }
