"""The Fleet's indexes answer as a scan of every group would (issue 15), and the shipped
datacenter experiment loads and simulates a slice."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

import hetero_sched as hs
from hetero_sched.core.fleet import BOTH, CRITERIA, DECODE, DECODE_SLOT, FILTERS, PREFILL, Fleet, sample_positions
from hetero_sched.core.view import GroupView
from hetero_sched.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]
DATACENTER = ROOT / "clusters" / "experiments" / "datacenter-trn2-cs3.yaml"


def random_view(gid: int, rng: random.Random, cost: object) -> GroupView:
    """A group's view with random numbers (what the Fleet reads), made as the scheduler makes one."""
    role = SimpleNamespace(can_prefill=rng.random() < 0.6, can_decode=rng.random() < 0.6)
    v = GroupView(gid, f"g{gid}", "x", "pool", role, cost, 100, block_size=16, max_batch_tokens=1000,  # type: ignore[arg-type]
                  max_num_seqs=4)
    v.prefill_queued_tokens = rng.randrange(5) * 100
    v.num_decode_queued = rng.randrange(3)
    v.num_decoding = rng.randrange(3)
    v.kv_blocks_free = rng.randrange(4) * 10
    return v


def member(v: GroupView, among: str) -> bool:
    if among == PREFILL:
        return v.can_prefill
    if among == DECODE:
        return v.can_decode
    if among == BOTH:
        return v.can_prefill and v.can_decode
    slot = v.can_decode and v.decode_load < v.max_num_seqs
    return slot if among == DECODE_SLOT else slot and not v.can_prefill


def key(v: GroupView, criterion: str, weight: float) -> tuple[float, float]:
    tokens, load, free = v.prefill_queued_tokens, v.decode_load, v.kv_blocks_free
    return {"prefill_tokens": (tokens, 0.0), "decode_load": (load, -free), "free_kv": (-free, 0.0),
            "kv_in_use": (tokens + (v.kv_blocks_total - free) * v.block_size, 0.0),
            "pending_work": (tokens + weight * load, 0.0)}[criterion]


def scan(views: list[GroupView], criterion: str, among: str, kind: set[int], weight: float) -> int:
    best = min(((key(v, criterion, weight), v.group_id) for v in views if v.group_id in kind and member(v, among)),
               default=None)
    return -1 if best is None else best[1]


def test_best_and_ordered_equal_a_scan_through_random_changes() -> None:
    rng = random.Random(3)
    for scan_limit in (0, 16):                  # trees, and the small-fleet scan
        costs = [object(), object()]
        views = [random_view(g, rng, costs[g % 2]) for g in range(40)]
        fleet = Fleet(views, scan_limit=scan_limit)
        for step in range(400):
            g = rng.randrange(len(views))
            op = rng.random()
            if op < 0.3:
                fleet.placed(g, rng.randrange(1, 4) * 100)
            elif op < 0.5:
                fleet.routed_decode(g, rng.choice([1, -1]) if views[g].num_decode_queued else 1)
            elif op < 0.9:
                fleet.report(g, step, rng.randrange(4) * 10, 0, rng.randrange(5) * 100, rng.randrange(3), rng.randrange(3))
            else:
                fleet.set_roles(g, rng.random() < 0.6, rng.random() < 0.6)
            criterion, among = rng.choice(CRITERIA), rng.choice(FILTERS)
            kind = rng.randrange(-1, fleet.num_kinds)
            ids = set(range(len(views))) if kind < 0 else set(fleet.kind_members(kind))
            weight = 10.0 if criterion == "pending_work" else 0.0
            got = fleet.best(criterion, among, kind, weight)
            assert (-1 if got is None else got.group_id) == scan(views, criterion, among, ids, weight), \
                (step, criterion, among, kind)
            order = [v.group_id for v in fleet.ordered(criterion, among, kind, weight)]
            want = sorted((key(v, criterion, weight), v.group_id) for v in views if v.group_id in ids and member(v, among))
            assert order == [gid for _, gid in want]
        assert fleet.prefill_tokens == sum(v.prefill_queued_tokens for v in views if v.can_prefill)
        assert fleet.decode_load == sum(v.decode_load for v in views if v.can_decode)
        assert fleet.num_prefill == sum(v.can_prefill for v in views)


def test_sample_draws_as_rng_sample_over_the_role_list() -> None:
    rng = random.Random(5)
    views = [random_view(g, rng, None) for g in range(30)]
    fleet = Fleet(views)
    a, b = random.Random(9), random.Random(9)
    for _ in range(50):
        pool = [v for v in views if v.can_decode]
        assert [v.group_id for v in fleet.sample(a, False, 2)] == [v.group_id for v in b.sample(pool, 2)]


class _OwnRandom(random.Random):
    """A generator with its own ``random()``: random.sample draws through it, not getrandbits."""

    def random(self) -> float:
        return super().random() ** 2


@pytest.mark.parametrize("make", [random.Random, _OwnRandom])
def test_sample_positions_are_rng_sample_of_a_range_for_every_pool_and_k(make) -> None:
    """Both of random.sample's ways (a list below ~21 + 4^⌈log4 3k⌉ items, a set above), k from
    one to the pool, the generator left in the same state."""
    for seed in range(40):
        a, b = make(seed), make(seed)
        for n in (1, 2, 3, 7, 21, 22, 40, 90, 700, 1300):
            for k in (1, 2, 3, 5, 6, 12, 40, n):
                if k <= n:
                    assert sample_positions(a, n, k) == b.sample(range(n), k), (seed, n, k)
        assert a.getrandbits(64) == b.getrandbits(64)


def test_custom_ranking_follows_changes() -> None:
    rng = random.Random(1)
    views = [random_view(g, rng, None) for g in range(20)]
    fleet = Fleet(views)
    r = fleet.ranking("most-decoding", lambda v: -v.num_decoding, lambda v: v.can_decode)
    for step in range(100):
        fleet.report(rng.randrange(20), step, 10, 0, 0, 0, rng.randrange(5))
        got = fleet.best_of(r)
        want = min(((-v.num_decoding, v.group_id) for v in views if v.can_decode), default=None)
        assert (None if got is None else got.group_id) == (None if want is None else want[1])


def test_datacenter_experiment_loads_and_simulates_a_slice() -> None:
    exp, _ = load_experiment(DATACENTER, sets=[("workload.num_requests", 3000)])
    result = hs.simulate(exp)
    groups = result.summary["groups"]
    assert len(groups) == 320
    assert sum(g["role"] == "prefill" for g in groups) == 256 and sum(g["role"] == "decode" for g in groups) == 64
    assert result.summary["completed"] == 3000
    assert len({g["name"] for g in groups if g["utilization"] > 0}) > 200     # the load spreads over the fleet
