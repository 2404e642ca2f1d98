"""KV tiers below device memory and the cluster KV store in the core and the simulator: the maths
against hand-checked numbers, eviction / write-back / promotion, the fetch-vs-recompute decision,
the store sharing endpoint bandwidth with KV transfers, metrics, spans, policies, config errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import hetero_sched as hs
from hetero_sched.core.eviction import LFUBlocks, LRUBlocks
from hetero_sched.core.events import DecisionKind as D
from hetero_sched.core.kvtiers import DRAM, FREE, HBM, SSD, STORE, KVTiers, TierSpec, overlap_s, plan_prefix, read_s
from hetero_sched.engine.assembly import build_scheduler, resolve
from hetero_sched.engine.devices import Devices
from hetero_sched.engine.loop import run_events
from hetero_sched.errors import UserError
from hetero_sched.policies.base import RequestInfo
from hetero_sched.policies.disagg_prefix import DisaggPrefix
from hetero_sched.tracing import ProcessTracing, TraceSettings, attach_tracer
from hetero_sched.workload import Workload

from helpers import prefix_families
from test_cli import run_cli

BLOCK = 512
BPT_8B = 131072
"""Llama-3.1-8B's unique KV bytes per token (32 layers x 8 KV heads x 128 x K,V x 2 bytes)."""
LINEAR = staticmethod(lambda new, cached: new * 1e-3)   # 1 ms per computed token


def experiment(kv_cache: Any = None, **over: Any) -> dict[str, Any]:
    """Two trn2 prefill groups (4 chips each) -> one CS-3, Llama-3.1-8B, the given KV cache."""
    exp: dict[str, Any] = {
        "name": "tiers", "seed": 3, "model": "llama-3.1-8b",
        "groups": [{"name": "p", "device": "trn2", "count": 4, "tp": 16, "replicas": 2, "role": "prefill"},
                   {"name": "d", "device": "cs3", "count": 1, "role": "decode", "max_num_seqs": 64}],
        "policy": "disagg",
        "workload": {"kind": "synthetic", "num_requests": 10, "rate_per_s": 1.0},
    }
    if kv_cache is not None:
        exp["kv_cache"] = kv_cache
    exp.update(over)
    return exp


def workload(prompts: list[int], hashes: list[tuple[int, ...]], arrival: list[float], output: int = 4) -> Workload:
    n = len(prompts)
    return Workload("w", np.array(arrival, dtype=float), np.array(prompts), np.full(n, output),
                    prefix_hashes=hashes, prefix_block_tokens=BLOCK)


def families(n: int = 120, seed: int = 7) -> Workload:
    """Three prompt families sharing up to 8 blocks, plus own blocks; one request every 0.2 s."""
    hashes, prompts = prefix_families(np.random.default_rng(seed), n, BLOCK, shared=8, take=(2, 9), own=(1, 4),
                                      trim=(1, BLOCK // 2))
    return workload(prompts, hashes, list(np.arange(n) * 0.2))


def simulate(exp: dict[str, Any], w: Workload) -> Any:
    return hs.simulate(exp, workload=w)


# --- the maths, by hand -----------------------------------------------------------------------
def test_overlap_and_read_times_by_hand() -> None:
    assert overlap_s(2.0, 8.0, 1) == 10.0                       # read, then prefill
    assert overlap_s(2.0, 8.0, 4) == max(2.0 + 2.0, 0.5 + 8.0) == 8.5
    assert overlap_s(8.0, 2.0, 4) == max(8.0 + 0.5, 2.0 + 2.0) == 8.5
    assert read_s(1e9, 1e9, 1e-3, 1) == pytest.approx(1.001)
    assert read_s(1e9, 1e9, 1e-3, 4) == pytest.approx(1.004)    # one message per layer
    assert read_s(0.0, 1e9, 1e-3, 1) == 0.0 and read_s(5.0, FREE, 1.0, 1) == 0.0


def _plan(locations: list[int], dram_bps: float, layers: int = 1, prompt: int = 450) -> Any:
    # blocks of 100 tokens, 1,000 bytes each; prefill costs 1 ms per computed token
    return plan_prefix(locations, 100, prompt, prompt, 1000.0, [FREE, dram_bps, 1e5, FREE], [0.0, 0.0, 0.0, 0.0],
                       layers, lambda new, cached: new * 1e-3)


def test_fetch_or_recompute_is_decided_by_cost_and_flips_with_bandwidth() -> None:
    fast = _plan([HBM, HBM, DRAM, DRAM], dram_bps=1e6)      # 2,000 B in 2 ms, saves 200 ms of prefill
    assert (fast.blocks, fast.cached_tokens, fast.tier_tokens) == (4, 400, (200, 200, 0, 0))
    assert fast.tier_bytes[DRAM] == 2000.0 and fast.tier_s[DRAM] == pytest.approx(0.002)
    assert fast.cost_s == pytest.approx(0.002 + 0.050)
    tie = _plan([HBM, HBM, DRAM, DRAM], dram_bps=1e4)       # 200 ms to read = 200 ms to recompute: read less
    assert (tie.blocks, tie.cached_tokens, tie.tier_bytes[DRAM]) == (2, 200, 0.0)
    slow = _plan([HBM, HBM, DRAM, DRAM], dram_bps=1e3)      # 2 s to read: recompute
    assert (slow.blocks, slow.cached_tokens, slow.held_tokens) == (2, 200, 400)
    assert slow.cost_s == pytest.approx(0.250)
    # layer by layer the same slow-ish read hides under the prefill of the rest: fetching wins again
    streamed = _plan([HBM, HBM, DRAM, DRAM], dram_bps=1e4, layers=4)
    assert streamed.blocks == 4 and streamed.cost_s == pytest.approx(max(0.2 + 0.05 / 4, 0.2 / 4 + 0.05))
    none = _plan([DRAM, DRAM], dram_bps=1e3)                 # nothing in device memory: no reuse at all
    assert (none.blocks, none.cached_tokens) == (0, 0)


def test_a_capped_hit_counts_its_tokens_to_the_right_tier() -> None:
    plan = _plan([HBM, HBM, DRAM, DRAM], dram_bps=1e6, prompt=350)
    # the hit never covers the last prompt token: 349 of 350, 200 from device memory, 149 from DRAM
    assert (plan.cached_tokens, plan.tier_tokens) == (349, (200, 149, 0, 0))


# --- eviction, write-back, promotion -------------------------------------------------------------
def test_lru_and_lfu_evict_different_blocks() -> None:
    lru, lfu = LRUBlocks(2), LFUBlocks(2)
    for s in (lru, lfu):
        s.add(1)
        s.touch(1)
        s.add(2)
        s.add(3)
    assert lru.victims() == [1]                               # least recently used
    assert lfu.victims() == [2]                               # least frequently used (then least recent)
    assert 1 in lfu and 2 not in lfu and 3 in lfu


def _tiers(policy: str = "lru") -> KVTiers:
    # blocks of 100 tokens x 10 bytes = 1,000 bytes: device memory 2 blocks, DRAM 2, SSD 1
    t = KVTiers(200, policy, [TierSpec(DRAM, 2000.0, 1e6, 5e5, 1e-3, policy), TierSpec(SSD, 1000.0, 1e5, 1e5, 0.0, policy)],
                10, 1, lambda new, cached: new * 1e-3)
    t.sized(100)
    return t


def test_evictions_are_written_back_down_and_a_hit_is_promoted() -> None:
    t = _tiers()
    t.use([1, 2, 3])                                          # device memory holds 2 and 3; 1 goes to DRAM
    assert [t.tier_of(h) for h in (1, 2, 3)] == [DRAM, HBM, HBM]
    assert t.stats.written_bytes[DRAM] == 1000.0 and t.stats.write_s[DRAM] == pytest.approx(1000 / 5e5 + 1e-3)
    t.use([4, 5])                                             # 2, 3 down to DRAM, which pushes 1 to SSD
    assert [t.tier_of(h) for h in (1, 2, 3, 4, 5)] == [SSD, DRAM, DRAM, HBM, HBM]
    t.use([6])                                                # 4 to DRAM, 2 to SSD, 1 falls off the end
    assert [t.tier_of(h) for h in (1, 2, 3, 4, 6)] == [None, SSD, DRAM, DRAM, HBM]
    assert t.stats.evicted_blocks[SSD] == 1 and t.stats.written_bytes[SSD] == 2000.0
    assert t.locate([3, 4, 6, 1]) == [DRAM, DRAM, HBM]        # the leading run held anywhere
    t.use([3])                                                # a hit in DRAM: promoted, not copied
    assert t.tier_of(3) == HBM and 3 not in t.sets[DRAM]
    assert sum(t.resident(x) for x in (HBM, DRAM, SSD)) == 5  # exclusive: each block in one tier


def test_hbm_only_tiers_decide_exactly_as_the_plain_prefix_cache(shared_traces: Path) -> None:
    """kv_cache with no tier below device memory runs the LRU prefix cache through the tier code:
    the same decisions and records as without kv_cache (tiers cost nothing they do not add)."""
    exp = experiment(policy="disagg-prefix", workload={"kind": "trace", "num_requests": 300, "rate_per_s": 2.0,
                                                       "path": str(shared_traces / "mooncake_conversation.jsonl")})
    plain = hs.simulate(exp)
    tiered = hs.simulate({**exp, "kv_cache": {}})
    assert tiered.decisions == plain.decisions
    assert repr(tiered.records.to_pylist()) == repr(plain.records.to_pylist())      # NaN-safe, bit for bit
    assert tiered.summary["kv_cache"]["hit_rate"] == plain.summary["kv_cache"]["hit_rate"] > 0


# --- the simulator: a hit in a lower tier costs its read -------------------------------------------
DRAM_FAST = {"device.trn2.host_bytes_per_s": 10e9, "cost.trn2.host_message_s": 1e-4}


def _two_requests() -> Workload:
    # the second request shares its first two blocks with the first, 10 s later
    return workload([1100, 1200], [(11, 12, 13), (11, 12, 14)], [0.0, 10.0])


@pytest.mark.parametrize("mode", ["after_prefill", "layerwise"])
def test_a_dram_hit_costs_its_read_in_the_prefill_span(mode: str) -> None:
    """Device memory holds no prefix (fraction 0), so the first prompt's blocks go to DRAM and the
    second reads two of them back: 2 x 512 x 131,072 B at 4 chips x 10 GB/s plus 0.1 ms per
    message (one, or one per layer when streaming), before or under its prefill."""
    exp = experiment({"dram": {}}, overrides=DRAM_FAST, transfer={"mode": mode})
    exp["groups"][0] = dict(exp["groups"][0], replicas=1, prefix_cache_fraction=0.0)
    r = simulate(exp, _two_requests())
    (fetch,) = [d for d in r.decisions if d[1] == D.FETCH]
    layers = 32 if mode == "layerwise" else 1
    read = 2 * BLOCK * BPT_8B / 40e9 + layers * 1e-4
    assert fetch[3] == 1 and fetch[4][:3] == (DRAM, 2 * BLOCK, 2 * BLOCK * BPT_8B)
    assert fetch[4][3] == pytest.approx(read)
    cost = build_scheduler(*_resolved(exp)).groups[0].cost
    compute = cost.prefill_time_s([1200 - 1024], [1024])
    (second,) = [d for d in r.decisions if d[1] == D.PREFILL and d[0] >= 10.0]
    assert second[4][2] == 1024                               # cached tokens
    assert second[4][3] == pytest.approx(overlap_s(read, compute, layers), rel=1e-12)
    tiers = r.summary["kv_cache"]["tiers"]
    assert tiers["dram"]["hit_tokens"] == 1024 and tiers["dram"]["read_bytes"] == 2 * BLOCK * BPT_8B
    assert tiers["dram"]["written_bytes"] == 4 * BLOCK * BPT_8B       # both prompts' full blocks, evicted


def _resolved(exp: dict[str, Any]) -> tuple[Any, Any, Any]:
    e, base = resolve(exp)
    return e, _two_requests(), base


def test_the_simulator_recomputes_when_the_tier_is_slow() -> None:
    """The same run with a DRAM channel of 1 kB/s: reading would take days, so the core recomputes
    what DRAM holds (no fetch, fewer cached tokens, the held tokens counted as recomputed)."""
    w = families()
    exp = experiment({"dram": {}}, policy="disagg-prefix")
    exp["groups"][0] = dict(exp["groups"][0], prefix_cache_fraction=0.001)
    fast = simulate(exp, w)
    slow = simulate({**exp, "overrides": {"device.trn2.host_bytes_per_s": 1e3}}, w)
    f, s = fast.summary["kv_cache"], slow.summary["kv_cache"]
    assert f["tiers"]["dram"]["hit_tokens"] > 0 and f["recomputed_tokens"] == 0
    assert any(d[1] == D.FETCH for d in fast.decisions)
    assert s["tiers"]["dram"]["hit_tokens"] == 0 and s["recomputed_tokens"] > 0
    assert not any(d[1] == D.FETCH for d in slow.decisions)
    assert f["hit_rate"] > s["hit_rate"] and f["compute_saved_s"] > s["compute_saved_s"]


# --- the cluster store ---------------------------------------------------------------------------
def test_a_store_write_shares_the_prefill_groups_egress_with_its_kv_transfer() -> None:
    """At the prefill's end its KV transfer to decode and its write of two new blocks to the store
    leave the prefill group together: max-min fair, each gets half its 4 GB/s egress until the
    write (134 MB) is done, then the transfer has it all — by hand, and later than without a store."""
    over = {"device.trn2.network_bytes_per_s": 1e9, "memory.x2iedn.network_bytes_per_s": 1e12}
    w = workload([1100], [(1, 2, 3)], [0.0])
    exp = experiment(None, overrides=over)
    exp["groups"][0] = dict(exp["groups"][0], replicas=1)
    plain = simulate(exp, w)
    stored = simulate({**exp, "kv_cache": {"store": {"nodes": 1}}}, w)

    def transfer(r: Any) -> tuple[float, float]:
        (start,) = [d[0] for d in r.decisions if d[1] == D.TRANSFER]
        (landed,) = [d[0] for d in r.decisions if d[1] == D.KV_ARRIVED]
        return start, landed

    x, y = 1101 * BPT_8B, 2 * BLOCK * BPT_8B                 # the transfer's and the write's bytes
    start, landed = transfer(plain)
    assert landed - start == pytest.approx(x / 4e9 + 50e-6, rel=1e-9)
    start, landed = transfer(stored)
    (write,) = [d for d in stored.decisions if d[1] == D.STORE_WRITE]
    assert write[0] == start and write[4] == (2, y)
    assert landed - start == pytest.approx(y / 2e9 + (x - y) / 4e9 + 50e-6, rel=1e-9)


def test_the_store_serves_a_prefix_computed_on_another_group() -> None:
    """One group prefills a prompt and writes its blocks to the store; a later request with the
    same prefix placed on the other group fetches them (a flow store -> group), waits for them,
    and prefills with them in device memory: a store hit, fetched before the prefill."""
    w = workload([1100, 50, 1200], [(21, 22, 23), (99,), (21, 22, 24)], [0.0, 5.0, 5.0])
    exp = experiment({"store": {"nodes": 2}})
    r = simulate(exp, w)
    places = {d[3]: d[2] for d in r.decisions if d[1] == D.PLACE}
    assert places[0] == 0 and places[2] == 1                    # request 1 keeps group 0 busy at t = 5
    (fetch,) = [d for d in r.decisions if d[1] == D.FETCH]
    assert fetch[2:4] == (1, 2) and fetch[4][:3] == (STORE, 2 * BLOCK, 2 * BLOCK * BPT_8B)
    store = r.summary["kv_cache"]["tiers"]["store"]
    assert store["hit_tokens"] == 2 * BLOCK and store["hit_requests"] == 1 and store["reads"] == 1
    assert store["written_bytes"] == 2 * BLOCK * BPT_8B       # its two full blocks, once (then deduplicated)
    (prefill,) = [d for d in r.decisions if d[1] == D.PREFILL and d[2] == 1]
    assert prefill[0] > fetch[0] and prefill[4][2] == 2 * BLOCK
    assert r.records.to_pylist()[2]["cached_tokens"] == 2 * BLOCK


class _FailAt(Devices):
    """Virtual devices that fail a group at a given time (its device died)."""

    def __init__(self, scheduler: Any, group: int, at_s: float) -> None:
        self.scheduler, self.group, self.at_s, self.failed = scheduler, group, at_s, False

    def after_plan(self, now_s: float) -> bool:
        if not self.failed and now_s >= self.at_s and self.scheduler.store.flows:
            self.failed = True
            self.scheduler.fail_group(now_s, self.group, restarted=True)
            return True
        return False


def test_a_group_failing_with_store_flows_in_flight_loses_no_request() -> None:
    w = families(90)
    exp = experiment({"dram": {}, "store": {"nodes": 1}}, overrides={"memory.x2iedn.network_bytes_per_s": 1e8})
    e, base = resolve(exp)
    scheduler = build_scheduler(e, w, base)
    devices = _FailAt(scheduler, 0, 3.0)
    run_events(scheduler, w.requests(), devices=devices)
    assert devices.failed
    assert sorted(r[0] for r in scheduler.records) == list(range(90))
    assert {r[6] for r in scheduler.records} == {"completed"}
    assert not scheduler.store.flows and not any(g.fetching for g in scheduler.groups)


def test_the_store_brings_the_hit_rate_near_the_ideal(shared_traces: Path) -> None:
    """On the Mooncake trace, with least-loaded routing spreading each conversation over four
    groups, local tiers miss what other groups computed; the store serves it."""
    exp = experiment(policy="disagg", workload={"kind": "trace", "num_requests": 1500, "rate_per_s": 3.0,
                                                "path": str(shared_traces / "mooncake_conversation.jsonl")})
    exp["groups"][0] = dict(exp["groups"][0], replicas=4)
    rates = {}
    for name, kv in (("hbm", None), ("dram", {"dram": {}}), ("store", {"dram": {}, "store": {}})):
        rates[name] = hs.simulate({**exp, **({"kv_cache": kv} if kv else {})}).summary["kv_cache"]
    ideal = rates["hbm"]["ideal_hit_rate"]
    assert rates["hbm"]["hit_rate"] < rates["dram"]["hit_rate"] < rates["store"]["hit_rate"]
    assert rates["store"]["hit_rate"] >= 0.8 * ideal


# --- what policies see ---------------------------------------------------------------------------
def test_group_views_show_where_a_prefix_lives_and_what_it_costs_and_the_router_uses_it() -> None:
    exp = experiment({"dram": {}, "store": {"nodes": 1}}, policy="disagg-prefix", overrides=DRAM_FAST)
    e, base = resolve(exp)
    scheduler = build_scheduler(e, _two_requests(), base)
    g0, g1 = scheduler.groups[0], scheduler.groups[1]
    for g in (g0, g1):
        g.memory.tiers.sized(BLOCK)
    for h in (1, 2, 3):
        g0.memory.tiers.sets[DRAM].add(h)                       # group 0 has the prefix in host DRAM
    scheduler.store.sized(BLOCK)
    for h in (1, 2):
        scheduler.store.blocks.add(h)                          # the store has its first two blocks
    info = RequestInfo(7, 0.0, 1700, 10, (1, 2, 3, 4), BLOCK)
    v0, v1 = scheduler.views[0], scheduler.views[1]
    p0, p1 = v0.prefix_plan(info), v1.prefix_plan(info)
    assert p0.tier_tokens == (0, 3 * BLOCK, 0, 0)
    assert p0.fetch_s == pytest.approx(3 * BLOCK * BPT_8B / 40e9 + 1e-4)
    store_bps = min(12.5e9, g1.cost.ingress_bytes_per_s)             # one x2iedn node
    assert p1.tier_tokens == (0, 0, 0, 2 * BLOCK)
    assert p1.fetch_s == pytest.approx(2 * BLOCK * BPT_8B / store_bps + 50e-6)
    assert v0.cached_prefix_blocks(info.prefix_hashes) == 0    # device memory holds none of it
    assert DisaggPrefix().place(info, scheduler.views, 0.0).prefill_group == 0
    assert v0.prefix_plan(info._replace(prefix_hashes=None)) is None


# --- traces -----------------------------------------------------------------------------------
def test_tier_and_store_reads_are_kv_fetch_spans() -> None:
    w = workload([1100, 50, 1200, 1150], [(21, 22, 23), (99,), (21, 22, 24), (21, 22, 25)], [0.0, 5.0, 5.0, 9.0])
    exp = experiment({"dram": {}, "store": {"nodes": 2}}, overrides=DRAM_FAST)
    exp["groups"][0] = dict(exp["groups"][0], prefix_cache_fraction=0.0)
    e, base = resolve(exp)
    scheduler = build_scheduler(e, w, base)
    exporter = InMemorySpanExporter()
    tracing = ProcessTracing(TraceSettings("http://unused/v1/traces"), "test", exporter=exporter)
    attach_tracer(scheduler, tracing, model=e.model, epoch_ns=10**18)
    run_events(scheduler, w.requests())
    tracing.shutdown()
    spans = list(exporter.get_finished_spans())
    names = {s.context.span_id: s.name for s in spans}
    fetches = [s for s in spans if s.name == "kv.fetch"]
    by_tier = {s.attributes["hetero.kv.tier"]: s for s in fetches}
    assert set(by_tier) == {"store", "dram"}
    assert names[by_tier["store"].parent.span_id] == "queue.prefill"     # fetched while it waited
    assert names[by_tier["dram"].parent.span_id] == "prefill"            # read as its prefill starts
    for tier, s in by_tier.items():
        fetch = [d for d in scheduler.decisions if d[1] == D.FETCH and d[4][0] == (STORE if tier == "store" else DRAM)]
        assert s.attributes["hetero.kv.bytes"] == fetch[0][4][2] and s.attributes["hetero.kv.tokens"] > 0
        assert (s.end_time - s.start_time) / 1e9 > 0


# --- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv,needle", [
    ({"dram": {}}, "device h100 has no dram tier in the catalog"),
    ({"ssd": {"policy": "fifo"}}, "kv_cache.ssd.policy"),
    ({"store": {"node": "cxl-box"}}, "kv_cache.store.node: unknown memory node 'cxl-box'"),
    ({"dram": {"capacity_fraction": 1.5}}, "kv_cache.dram.capacity_fraction"),
    ({"nvme": {}}, "kv_cache.nvme"),
])
def test_bad_kv_cache_configs_give_one_line_and_exit_2(kv: dict, needle: str, tmp_path: Path, monkeypatch: Any,
                                                       capsys: Any) -> None:
    exp = {"name": "bad", "model": "llama-3.1-8b",
           "groups": [{"name": "h", "device": "h100", "count": 1, "tp": 1, "role": "both"}],
           "policy": "colocated", "workload": {"kind": "synthetic", "num_requests": 5, "rate_per_s": 1.0},
           "kv_cache": kv}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    code, out, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q", "--out", str(tmp_path / "run"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_a_device_without_tier_numbers_gets_them_from_overrides() -> None:
    exp = {"name": "ok", "model": "llama-3.1-8b",
           "groups": [{"name": "h", "device": "h100", "count": 1, "tp": 1, "role": "both"}],
           "policy": "colocated", "workload": {"kind": "synthetic", "num_requests": 5, "rate_per_s": 1.0},
           "kv_cache": {"dram": {"capacity_fraction": 0.25}}}
    with pytest.raises(UserError, match="no dram tier"):
        hs.simulate(exp, workload=_two_requests())
    exp["overrides"] = {"device.h100.host_memory_bytes": 256e9, "device.h100.host_bytes_per_s": 50e9}
    tiers = hs.simulate(exp, workload=_two_requests()).summary["kv_cache"]["tiers"]
    assert tiers["dram"]["capacity_blocks"] == math.floor(0.25 * 256e9 / (BLOCK * BPT_8B)) == 953
