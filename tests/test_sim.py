"""The simulator end to end: determinism, event order, conservation, prefix cache, user policies."""

from __future__ import annotations

import heapq
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import hetero_sched as hs
from hetero_sched.core.events import ORDER_BITS, ORDER_MASK, EventQueue, Kind
from hetero_sched.core.group import GroupLimits, GroupState, Role
from hetero_sched.core.scheduler import Scheduler
from hetero_sched.costmodel import FittedCost
from hetero_sched.errors import UserError
from hetero_sched.metrics import GroupUsage
from hetero_sched.policies import make_policy
from hetero_sched.engine.assembly import build_scheduler, resolve
from hetero_sched.engine.devices import Devices
from hetero_sched.engine.loop import run_events
from hetero_sched.experiment import build_workload
from hetero_sched.workload import Request, Workload

from helpers import colocated_experiment, disagg_experiment


def test_same_config_and_seed_give_identical_results(tmp_path):
    a = hs.simulate(disagg_experiment()).write(tmp_path / "a")
    b = hs.simulate(disagg_experiment()).write(tmp_path / "b")
    assert (a / "requests.parquet").read_bytes() == (b / "requests.parquet").read_bytes()
    assert (a / "decisions.parquet").read_bytes() == (b / "decisions.parquet").read_bytes()
    c = hs.simulate(disagg_experiment(seed=4))
    assert c.records.column("arrival_s").to_pylist() != hs.simulate(disagg_experiment()).records.column("arrival_s").to_pylist()


def test_event_queue_same_time_order():
    q = EventQueue()
    q.push(1.0, Kind.ARRIVAL, "arrival")
    q.push(1.0, Kind.KV_ARRIVAL, "kv")
    q.push(1.0, Kind.SPAN_END, "completion")
    q.push(0.5, Kind.ARRIVAL, "early")
    q.push(1.0, Kind.ARRIVAL, "arrival-2")
    assert [q.pop().payload for _ in range(5)] == ["early", "completion", "kv", "arrival", "arrival-2"]


def popped(q: EventQueue) -> tuple:
    """The queue's earliest event, removed, as ``(time_s, priority, seq, kind, payload)`` (read
    at once: the event object is reused by the next push)."""
    e = q.pop()
    return e.time_s, e.order >> ORDER_BITS, e.order & ORDER_MASK, e.kind, e.payload


def test_event_queue_pops_in_time_priority_seq_order_under_random_use():
    # against heapq over (time, priority, seq) tuples, pushes and pops interleaved, ties frequent
    # (a few repeated times), reserved places (a span's report pushed later, sorting as if
    # pushed at dispatch) and moves (a cut span's end re-timed: as a new push with the old one
    # dropped) and removes
    rng = np.random.default_rng(7)
    priority = {Kind.SPAN_END: 0, Kind.TRANSFER: 1, Kind.KV_ARRIVAL: 1, Kind.ARRIVAL: 2}
    moves = removes = 0
    for _ in range(50):
        q, ref, seq, got, want, reserved = EventQueue(), [], 0, [], [], []
        pending: dict[int, tuple] = {}     # seq -> (event, kind): pushed, not popped
        dropped: set[int] = set()

        def pop_ref():
            while True:
                e = heapq.heappop(ref)
                if e[2] not in dropped:
                    pending.pop(e[2], None)
                    return e

        for i in range(int(rng.integers(1, 300))):
            step = rng.random()
            t = float(rng.choice([0.5, 1.0, 2.0, rng.random() * 3]))
            if len(q) and step < 0.35:
                got.append(popped(q))
                want.append(pop_ref())
                continue
            if pending and step < 0.42:
                old = sorted(pending)[int(rng.integers(len(pending)))]
                event, kind = pending.pop(old)
                dropped.add(old)
                q.move(event, t, ("moved", i))
                seq += 1
                heapq.heappush(ref, (t, priority[kind], seq, kind, ("moved", i)))
                pending[seq] = (event, kind)
                moves += 1
                continue
            if pending and step < 0.46:     # its owner went away (a transfer pair left the network)
                old = sorted(pending)[int(rng.integers(len(pending)))]
                event, _ = pending.pop(old)
                dropped.add(old)
                q.remove(event)
                removes += 1
                continue
            kind = int(rng.choice([Kind.SPAN_END, Kind.TRANSFER, Kind.KV_ARRIVAL, Kind.ARRIVAL]))
            if step < 0.5:
                reserved.append((q.reserve(), kind, i))
                seq += 1
                continue
            if reserved and step < 0.6:
                s, kind, payload = reserved.pop(0)
                q.push_reserved(t, kind, payload, s)
                heapq.heappush(ref, (t, priority[kind], s, kind, payload))
                continue
            seq += 1
            pending[seq] = (q.push(t, kind, i), kind)
            heapq.heappush(ref, (t, priority[kind], seq, kind, i))
        while len(q):
            got.append(popped(q))
            want.append(pop_ref())
        assert got == want and q.peek_time() is None and all(e[2] in dropped for e in ref)
    assert moves > 500 and removes > 200


def test_groups_with_one_cost_model_share_its_memo_and_get_its_answers():
    exp, base = resolve(disagg_experiment())
    sched = build_scheduler(exp, build_workload(exp.workload, exp.seed, base), base)
    by_cost: dict[int, list[GroupState]] = {}
    for g in sched.groups:
        by_cost.setdefault(id(g.cost), []).append(g)
    assert any(len(gs) > 1 for gs in by_cost.values())
    rng = np.random.default_rng(3)
    for gs in by_cost.values():
        assert len({id(g._memo) for g in gs}) == 1          # one memo per cost model
        for _ in range(200):
            g = gs[int(rng.integers(len(gs)))]
            new, cached = int(rng.integers(1, 3000)), int(rng.integers(0, 2000))
            assert g.prefill_s([new], [cached]) == g.cost.prefill_time_s([new], [cached])
            assert g.prefill_s([new, 5], [cached, 0]) == g.cost.prefill_time_s([new, 5], [cached, 0])
        assert gs[0]._memo.prefill_s                         # it remembered


def _exact_cost(capacity: int) -> FittedCost:
    # prefill 0.5 s, decode step 0.25 s: exact binary fractions, so events can coincide exactly
    return FittedCost(0.5, 0.0, 0.0, ((1 << 30, 0.25, 0.0, 0.0),), capacity, 100, 100, 1e12, 1e12)


def test_completion_runs_before_a_same_time_arrival_and_decisions_after_both():
    g = GroupState(0, "g", Role.BOTH, _exact_cost(10_000), GroupLimits(max_num_seqs=1, prefix_cache_fraction=0.0))
    sched = Scheduler([g], make_policy("colocated", {}), [3, 3])
    # A: prefill [0, 0.5], decode 2 steps -> completes at exactly 1.0, when B arrives
    run_events(sched, [Request(0, 0.0, 10, 3), Request(1, 1.0, 10, 3)])
    at_one = [(kind, rid) for t, kind, _, rid, _ in sched.decisions if t == 1.0]
    assert at_one[:3] == [("complete", 0), ("place", 1), ("prefill", None)]
    rows = {r[0]: r for r in sched.records}
    assert rows[1][10] == 1.5          # B's token 1: prefill started at 1.0, right after A left


def _check_conservation(result, n):
    t = result.records
    ids = t.column("request_id").to_pylist()
    assert sorted(ids) == list(range(n)), "every request appears exactly once"
    status = t.column("status").to_pylist()
    assert set(status) <= {"completed", "rejected"}
    for s, reason, gen, out in zip(status, t.column("reason").to_pylist(), t.column("generated").to_pylist(),
                                   t.column("output_tokens").to_pylist()):
        if s == "completed":
            assert gen == out, "tokens out = tokens asked"
        else:
            assert reason, "a rejection carries its reason"


@pytest.mark.parametrize("make", [disagg_experiment, colocated_experiment])
def test_every_request_completes_or_is_rejected_with_a_reason(make):
    # overloaded, with too-short predictions: reservations run out and requests are preempted
    exp = make(predictor={"kind": "constant", "tokens": 8})
    exp["groups"][-1] = dict(exp["groups"][-1], max_num_seqs=128)
    exp["workload"] = dict(exp["workload"], rate_per_s=20.0, prompt={"kind": "uniform", "low": 2000, "high": 4000},
                           output={"kind": "uniform", "low": 1000, "high": 3000})
    r = hs.simulate(exp)
    _check_conservation(r, 400)
    assert r.summary["preemptions"] > 0


@pytest.mark.parametrize("seed", [6, 9, 19, 28])
def test_a_request_grown_to_the_kv_capacity_never_stalls_a_colocated_group(seed):
    """Chunked prefill on one small colocated group, predictions far too short: requests are
    preempted over and over and prefilled again with what they generated. One that grows to
    exactly the group's KV capacity used to be prefilled again with no room for a decode step,
    and the group planned a span of zero steps (found by a sensitivity sweep). A placement now
    needs room for the prefill's token *and* a decode step, so such a request is rejected with
    its reason."""
    exp = colocated_experiment(policy="colocated-chunked", predictor={"kind": "constant", "tokens": 4}, seed=seed)
    exp["groups"][0] = dict(exp["groups"][0], kv_capacity_tokens=1400, replicas=1, max_num_seqs=8)
    exp["workload"] = dict(exp["workload"], num_requests=150, rate_per_s=30.0,
                           prompt={"kind": "uniform", "low": 100, "high": 600},
                           output={"kind": "uniform", "low": 50, "high": 400})
    r = hs.simulate(exp)
    _check_conservation(r, 150)
    assert r.summary["preemptions"] > 100


def _seventy_b(**over):
    """Llama-3.1-70B on one trn2.48xlarge prefill group and a 4-CS-3 decode group (52,768 KV tokens)."""
    return disagg_experiment(model="llama-3.1-70b", groups=[
        {"name": "p", "device": "trn2", "count": 16, "tp": 64, "role": "prefill"},
        {"name": "d", "device": "cs3", "count": 4, "pp": 4, "role": "decode"}], **over)


def test_requests_no_group_can_ever_serve_are_rejected_at_arrival_without_prefill():
    """A prompt beyond the model's context window, or more KV than the largest decode group
    holds, is rejected when it arrives — not prefilled first and rejected after (issue 16)."""
    prompts = np.array([1000, 140_000, 60_000, 52_000, 1000])   # ok, > 131,072 window, > 52,768 KV, fits, ok
    outputs = np.array([20, 20, 20, 20, 20])
    w = Workload("long", np.arange(5, dtype=float), prompts, outputs)
    r = hs.simulate(_seventy_b(oracle=True), workload=w)
    _check_conservation(r, 5)
    rows = {row["request_id"]: row for row in r.records.to_pylist()}
    assert [rows[i]["reason_code"] for i in range(5)] == [None, "context_too_long", "kv_capacity", None, None]
    assert "131,072-token context window" in rows[1]["reason"] and "d, 52,768 tokens" in rows[2]["reason"]
    for i in (1, 2):
        assert rows[i]["finish_s"] == rows[i]["arrival_s"] and rows[i]["prefill_group"] is None
    prefilled = {rid for t, kind, _, rid, _ in r.decisions if kind == "place"}
    assert prefilled == {0, 3, 4}
    # the prompt plus *predicted* output is what a decode group must hold: 52,000 + 1,000 does not fit
    r = hs.simulate(_seventy_b(predictor={"kind": "constant", "tokens": 1000}), workload=w)
    assert r.records.column("reason_code").to_pylist()[3] == "kv_capacity"
    # a policy that may decode on the prefill group (fallback) can hold 60,000 tokens there
    fallback = _seventy_b(oracle=True, policy={"name": "disagg", "params": {"fallback": True}})
    assert hs.simulate(fallback, workload=w).records.column("status").to_pylist()[2] == "completed"


def test_summary_groups_rejections_by_code_and_keeps_each_reason():
    prompts = np.array([140_000 + i for i in range(30)] + [60_000 + i for i in range(20)])
    w = Workload("long", np.arange(50, dtype=float), prompts, np.full(50, 10))
    r = hs.simulate(_seventy_b(oracle=True), workload=w)
    assert r.summary["reject_reasons"] == {"context_too_long": 30, "kv_capacity": 20}
    assert set(r.summary["reject_examples"]) == {"context_too_long", "kv_capacity"}
    assert len(set(r.records.column("reason").to_pylist())) == 50     # the detail stays per request


def test_occupancy_beside_busy_time_by_hand():
    """One group decoding two requests together, then one: busy time, mean decode batch and KV
    occupancy are exactly what a hand count of the spans gives."""
    g = GroupState(0, "g", Role.BOTH, _exact_cost(10_000), GroupLimits(max_num_seqs=4, block_size=10,
                                                                       prefix_cache_fraction=0.0))
    sched = Scheduler([g], make_policy("colocated", {}), [3, 5])
    # A and B arrive together: one prefill of both [0, 0.5] (token 1 each); decode steps of 0.25 s:
    # both for 2 steps -> A done at 1.0 (3 tokens); B alone for 2 more -> done at 1.5 (5 tokens)
    run_events(sched, [Request(0, 0.0, 10, 3), Request(1, 0.0, 10, 5)])
    assert [r[12] for r in sorted(sched.records)] == [1.0, 1.5]
    assert g.busy_s == 1.5 and g.decode_seq_s == 2 * 0.5 + 1 * 0.5
    # KV: reservations of 10 + 3 and 10 + 5 tokens = 2 blocks each, held from 0 to their finish
    assert g.kv_block_s == 2 * 1.0 + 2 * 1.5
    row = GroupUsage("g", "x", "both", g.busy_s, 1.0, g.decode_seq_s, g.kv_block_s, 4, g.kv.num_blocks).row(1.5)
    assert row["mean_decode_batch"] == 1.0 and row["batch_occupancy"] == 0.25
    assert row["kv_occupancy"] == pytest.approx(5.0 / (1.5 * g.kv.num_blocks))


def test_span_rows_name_their_requests():
    r = hs.simulate(disagg_experiment(oracle=True))
    t = r.decisions_table().to_pylist()
    prefilled = [rid for row in t if row["kind"] == "prefill" for rid in row["request_ids"]]
    assert sorted(prefilled) == list(range(400))                      # each prompt in exactly one prefill span
    assert all(len(row["request_ids"]) == row["num_requests"] for row in t if row["kind"] == "prefill")
    joined = [rid for row in t if row["kind"] == "decode" and row["request_ids"] for rid in row["request_ids"]]
    decoding = [row["request_id"] for row in r.records.to_pylist() if row["output_tokens"] > 1]
    assert sorted(joined) == sorted(decoding)                         # each joins a decode batch once
    assert all(row["request_ids"] is None for row in t if row["kind"] not in ("prefill", "decode", "chunk"))


def test_short_traces_are_flagged_long_ones_not():
    short = hs.simulate(disagg_experiment(workload={"kind": "synthetic", "num_requests": 100, "rate_per_s": 20.0}))
    assert short.summary["warnings"] and "use at least" in short.summary["warnings"][0]
    long = hs.simulate(disagg_experiment(workload={"kind": "synthetic", "num_requests": 1000, "rate_per_s": 5.0}))
    assert long.summary["warnings"] == []


def test_prefix_cache_hits_save_prefill_compute():
    n = 50
    arrivals = np.arange(n, dtype=float) * 0.5
    prompts = np.full(n, 4096)
    shared = tuple(range(6))                            # 6 x 512 tokens shared by everyone
    hashes = [shared + (1000 + 2 * i, 1001 + 2 * i) for i in range(n)]
    w = Workload("prefix", arrivals, prompts, np.full(n, 8), prefix_hashes=hashes)
    exp = disagg_experiment()
    exp["groups"][0] = dict(exp["groups"][0], replicas=1)
    r = hs.simulate(exp, workload=w)
    cached = r.records.column("cached_tokens").to_pylist()
    assert cached[0] == 0 and all(c == 6 * 512 for c in cached[1:])
    hit = r.summary["prefix_cache"]            # the summary says so: 49 of 50 requests, 6 blocks each
    assert hit["requests_with_hit"] == 49 and hit["request_hit_rate"] == 49 / 50
    assert hit["hit_tokens"] == 49 * 6 * 512 and hit["token_hit_rate"] == pytest.approx(49 * 6 * 512 / (50 * 4096))
    no_cache = disagg_experiment()
    no_cache["groups"][0] = dict(no_cache["groups"][0], replicas=1, prefix_cache_fraction=0.0)
    r0 = hs.simulate(no_cache, workload=w)
    assert r.summary["ttft_s"]["mean"] < r0.summary["ttft_s"]["mean"]


RECORDING_POLICY = textwrap.dedent('''
    from hetero_sched.policies import Placement, Policy

    SEEN = []
    """What the policy was shown: one entry per placement asked for."""

    class LastPrefill(Policy):
        """Always the highest-numbered prefill group; records every request it is shown."""
        def __init__(self, note: str = ""):
            self.note = note
        def place(self, request, groups, now_s):
            SEEN.append(request)
            return Placement(max(g.group_id for g in groups if g.can_prefill))
''')


@pytest.fixture
def recording_policy(tmp_path, monkeypatch):
    """A user policy module (``my_policies:LastPrefill``) and the list of requests it was shown."""
    (tmp_path / "my_policies.py").write_text(RECORDING_POLICY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_policies", raising=False)
    return importlib.import_module("my_policies").SEEN


def test_user_policy_by_dotted_path(recording_policy):
    r = hs.simulate(disagg_experiment(policy={"name": "my_policies:LastPrefill", "params": {"note": "x"}}))
    assert set(r.records.column("prefill_group").to_pylist()) == {1}
    assert len(recording_policy) == 400
    # what a policy receives carries no true output length (only the prediction)
    assert not any(hasattr(seen, "output_tokens") for seen in recording_policy)
    with pytest.raises(UserError, match="unknown parameter"):
        hs.simulate(disagg_experiment(policy={"name": "my_policies:LastPrefill", "params": {"nope": 1}}))


def test_policies_see_predictions_not_true_lengths(recording_policy):
    """What the policy was *shown* is the prediction, and differs from the truth; with
    ``oracle: true`` it is the truth."""
    r = hs.simulate(disagg_experiment(policy="my_policies:LastPrefill", predictor={"kind": "noisy", "sigma": 0.5}))
    shown = {seen.request_id: seen.predicted_output for seen in recording_policy}
    rows = {row["request_id"]: row for row in r.records.to_pylist()}
    assert len(shown) == 400 and all(shown[i] == rows[i]["predicted_output"] for i in shown)
    assert np.mean([shown[i] != rows[i]["output_tokens"] for i in shown]) > 0.5
    recording_policy.clear()
    r2 = hs.simulate(disagg_experiment(policy="my_policies:LastPrefill", oracle=True))
    true = {row["request_id"]: row["output_tokens"] for row in r2.records.to_pylist()}
    assert {seen.request_id: seen.predicted_output for seen in recording_policy} == true


def test_stale_reports_change_routing():
    fresh = hs.simulate(disagg_experiment(report_interval_s=0.0))
    stale = hs.simulate(disagg_experiment(report_interval_s=5.0))
    # with views refreshed at most every 5 s, least-loaded routing works from old queue lengths
    moved = sum(a != b for a, b in zip(fresh.records.column("prefill_group").to_pylist(),
                                       stale.records.column("prefill_group").to_pylist()))
    assert moved > 40
    assert stale.summary["ttft_s"]["p99"] > fresh.summary["ttft_s"]["p99"]


def test_decision_log_round_trips_and_compares():
    from hetero_sched.core.events import NO_ID, DecisionCode as C, DecisionLog
    log = DecisionLog()
    log.add(0.5, C.PLACE, 1, 7)
    log.add(0.5, C.PREFILL, 1, NO_ID, 2, 900, 0, 0.125)
    log.add_ids([7, 9])
    log.add_reject(0.75, 8, "no capacity")
    assert list(log) == [(0.5, "place", 1, 7, (None,)), (0.5, "prefill", 1, None, (2, 900, 0, 0.125)),
                         (0.75, "reject", None, 8, ("no capacity",))]
    again = DecisionLog.from_state(log.state())
    assert again == log
    again.add(1.0, C.COMPLETE, 1, 7)
    assert again != log
    other = DecisionLog.from_state(log.state())
    other.span_ids[1] = 10                                  # span ids take part in equality
    assert other != log
    cols = log.columns()
    # one typed column per detail field, None where the kind has no such field
    assert cols["request_ids"] == [None, [7, 9], None]
    assert cols["decode_group"] == [None, None, None] and cols["num_requests"] == [None, 2, None]
    assert cols["prefill_tokens"] == [None, 900, None] and cols["duration_s"] == [None, 0.125, None]
    assert cols["reason"] == [None, None, "no capacity"] and "detail" not in cols


def test_decision_codes_are_the_kinds_indexes_in_the_log():
    """The scheduler logs codes; each must read back as its kind's name (a code out of step with
    KIND_NAMES would write every such decision under another kind)."""
    from hetero_sched.core.events import KIND_NAMES, DecisionCode, DecisionKind, DecisionLog
    names = [n for n in vars(DecisionKind) if n.isupper()]
    assert sorted(names) == sorted(n for n in vars(DecisionCode) if n.isupper())
    assert len(KIND_NAMES) == len(names)
    for name in names:
        code = getattr(DecisionCode, name)
        assert KIND_NAMES[code] == getattr(DecisionKind, name), name
        log = DecisionLog()
        log.add(1.0, code, 0, 1)
        assert list(log)[0][1] == getattr(DecisionKind, name)


def test_decision_log_reads_the_same_across_its_packed_chunks():
    # thousands of decisions (several packed chunks, read back partly packed, partly pending),
    # span ids and reasons among them, against plain Python lists
    from hetero_sched.core.events import NO_ID, PENDING_DECISIONS, DecisionCode as C, DecisionLog
    rng = np.random.default_rng(3)
    log, want_rows, want_ids = DecisionLog(), [], []
    for i in range(3 * PENDING_DECISIONS + 77):
        if i % 5 == 0:
            log.add_reject(i / 10, i, f"reason {i}")
            want_rows.append((i / 10, "reject", None, i, (f"reason {i}",)))
            want_ids.append(None)
        elif i % 5 == 1:
            ids = [int(x) for x in rng.integers(0, 10**6, int(rng.integers(1, 6)))]
            log.add(i / 10, C.DECODE, i % 300, NO_ID, len(ids), 4, 0.5)
            log.add_ids(ids)
            want_rows.append((i / 10, "decode", i % 300, None, (len(ids), 4, 0.5)))
            want_ids.append(ids)
        else:
            log.add(i / 10, C.PLACE, i % 300, i)
            want_rows.append((i / 10, "place", i % 300, i, (None,)))
            want_ids.append(None)
        assert len(log) == i + 1
    assert list(log) == want_rows and log.columns()["request_ids"] == want_ids
    assert DecisionLog.from_state(log.state()) == log


def test_step_heap_pops_due_pairs_in_order():
    # the finish and exhaust heaps: pop_due hands out exactly the (step, request id) pairs whose
    # step is due, in pair order, however pushes and pops interleave (duplicates included: a
    # request that joined twice; steps past 2**31 and ids past 2**32 included); head_step is the
    # earliest step left; an id the core cannot hold unboxed is refused, not silently wrapped
    from hetero_sched.core.request import MAX_REQUEST_ID, RequestState, StepHeap
    rng = np.random.default_rng(11)
    for base in (0, 2**40):
        heap, pending, steps_done = StepHeap(), [], base
        for _ in range(3000):
            if rng.random() < 0.55:
                step = steps_done + int(rng.integers(0, 50))
                rid = int(rng.integers(0, 40)) if rng.random() < 0.8 else int(rng.integers(0, 2**40))
                heap.push(step, rid)
                pending.append((step, rid))
            else:
                steps_done += int(rng.integers(0, 4))
                got = []
                while (rid := heap.pop_due(steps_done)) >= 0:
                    got.append((heap.popped_step, rid))
                assert got == sorted(p for p in pending if p[0] <= steps_done)
                pending = [p for p in pending if p[0] > steps_done]
            assert len(heap) == len(pending)
            if pending:
                assert heap.head_step() == min(pending)[0]
        heap.clear()
        assert len(heap) == 0 and heap.pop_due(2**62) == -1
    with pytest.raises(ValueError, match=f"request id {MAX_REQUEST_ID + 1} is outside"):
        RequestState(Request(MAX_REQUEST_ID + 1, 0.0, 10, 10), 10)


class _CountNetworkEvents(Devices):
    """Virtual devices that look into the queue before every event: the most ``TRANSFER``
    events pending at once, and the most transfers in flight."""

    def __init__(self, scheduler):
        self.scheduler, self.most_pending, self.most_in_flight = scheduler, 0, 0

    def wait(self, queue):
        pending = sum(1 for e in queue._heap if e.kind == Kind.TRANSFER)
        self.most_pending = max(self.most_pending, pending)
        self.most_in_flight = max(self.most_in_flight, self.scheduler.network.num_active)
        return None


def test_one_transfer_event_is_pending_however_many_transfers_are_in_flight():
    """A transfer starting while others are in flight moves the network's pending event rather
    than leaving it behind stale: one ``TRANSFER`` event is pending at most (and watching the
    queue does not change the run)."""
    exp = disagg_experiment(groups=[
        {"name": "p", "device": "trn2", "count": 4, "tp": 16, "replicas": 8, "role": "prefill"},
        {"name": "d", "device": "cs3", "count": 1, "role": "decode", "replicas": 4, "max_num_seqs": 64}],
        workload={"kind": "synthetic", "num_requests": 600, "rate_per_s": 240.0})
    e, base = resolve(exp)
    work = build_workload(e.workload, e.seed, base)
    scheduler = build_scheduler(e, work, base)
    devices = _CountNetworkEvents(scheduler)
    run_events(scheduler, work.requests(), devices=devices)
    assert devices.most_in_flight >= 4                      # transfers overlapped
    assert devices.most_pending == 1
    plain = build_scheduler(e, work, base)
    run_events(plain, work.requests())
    assert scheduler.decisions == plain.decisions and scheduler.records == plain.records


class _CancelAt(Devices):
    """Virtual devices through which clients give up: request ``rid`` at time ``t``."""

    def __init__(self, scheduler, cancels):
        self.scheduler, self.cancels = scheduler, sorted(cancels)

    def after_plan(self, now_s):
        changed = False
        while self.cancels and self.cancels[0][0] <= now_s:
            _, rid = self.cancels.pop(0)
            changed |= self.scheduler.cancel(now_s, rid)
        return changed


@pytest.mark.parametrize("make,rate,frac", [(disagg_experiment, 40.0, 1.0), (disagg_experiment, 60.0, 0.5),
                                            (disagg_experiment, 80.0, 0.3), (colocated_experiment, 40.0, 1.0)])
def test_a_cancelled_request_frees_everything_it_held_wherever_it_was(make, rate, frac):
    """Clients giving up at random times — queued, prefilling, waiting for decode, in transfer,
    decoding (the cases reach every phase): each such request ends ``cancelled`` and, at the
    end, no group holds any KV or queue place; the others complete."""
    exp = make(workload={"kind": "synthetic", "num_requests": 300, "rate_per_s": rate})
    e, base = resolve(exp)
    work = build_workload(e.workload, e.seed, base)
    plain = hs.simulate(exp)
    rows = {r["request_id"]: r for r in plain.records.to_pylist()}
    rng = np.random.default_rng(1)
    picked = sorted(int(i) for i in rng.choice(300, 60, replace=False))
    cancels = [(float(rows[i]["arrival_s"] + rng.uniform(0, frac) * (rows[i]["finish_s"] - rows[i]["arrival_s"])), i)
               for i in picked]
    scheduler = build_scheduler(e, work, base)
    run_events(scheduler, work.requests(), devices=_CancelAt(scheduler, cancels))
    status = {r[0]: r[6] for r in scheduler.records}
    assert sorted(status) == list(range(300))
    cancelled = {i for i, s in status.items() if s == "cancelled"}
    assert len(cancelled) >= 40 and cancelled <= set(picked)       # some finished before their client left
    assert {s for i, s in status.items() if i not in cancelled} == {"completed"}
    kinds = {d[1] for d in scheduler.decisions}
    assert "cancel" in kinds
    for g in scheduler.groups:
        assert g.kv.num_free == g.kv.num_blocks and g.in_transit == 0 and not g.prefill_queue
        assert not g.decode_queue and not g.batch.running
    assert scheduler.num_active == 0


def test_bench_sim_scale_prints_one_row_per_size_last_and_refuses_bad_flags():
    bench = Path(__file__).resolve().parents[1] / "bench" / "sim_scale.py"
    proc = subprocess.run([sys.executable, str(bench), "--sizes", "5,10", "--requests", "300", "--repeat", "1",
                           "--processes", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["groups"] for r in rows] == [5, 10]
    for r in rows:
        assert r["completed"] == 300 and r["requests_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert len(r["requests_per_s_runs"]) == 2 and len(r["vs_smallest_rounds"]) == 2
    assert rows[0]["vs_smallest"] == 1.0 and rows[0]["vs_smallest_rounds"] == [1.0, 1.0]
    assert rows[1]["vs_smallest"] == round(rows[1]["requests_per_s"] / rows[0]["requests_per_s"], 3)
    bad = subprocess.run([sys.executable, str(bench), "--sizes", "7"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "multiples of 5" in bad.stderr and "Traceback" not in bad.stderr
    # --policy reaches the measured runs: an SLO no placement meets rejects every request
    slo = subprocess.run([sys.executable, str(bench), "--sizes", "10", "--requests", "200", "--repeat", "1",
                          "--processes", "1", "--policy", "{name: disagg-slo, params: {ttft_slo_s: 1.0e-9}}"],
                         capture_output=True, text=True, timeout=300)
    assert slo.returncode == 0, slo.stderr
    (row,) = json.loads(slo.stdout.strip().splitlines()[-1])
    assert row["groups"] == 10 and row["completed"] == 0
    bad = subprocess.run([sys.executable, str(bench), "--policy", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown policy 'nope'" in bad.stderr and "Traceback" not in bad.stderr
