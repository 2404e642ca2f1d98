"""Each policy of issue 7 on a small hand-checkable case, in the simulator (no Ray)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

import hetero_sched as hs
from hetero_sched.core.events import DecisionKind as D
from hetero_sched.core.group import Role
from hetero_sched.errors import UserError
from hetero_sched.experiment import build_groups, parse_experiment
from hetero_sched.policies import GroupView, Placement, RequestInfo, RoleSwitch, make_policy
from hetero_sched.policies.adaptive import Adaptive
from hetero_sched.policies.disagg import Disagg
from hetero_sched.policies.disagg_prefix import DisaggPrefix
from hetero_sched.workload import Workload

from helpers import colocated_experiment, disagg_experiment


def _workload(arrivals, prompts, outputs, hashes=None, block=512) -> Workload:
    return Workload("hand", np.asarray(arrivals, dtype=float), np.asarray(prompts, dtype=np.int64),
                    np.asarray(outputs, dtype=np.int64), prefix_hashes=hashes, prefix_block_tokens=block)


def _one_each(**group_over) -> dict:
    """One trn2 prefill group, one CS-3 decode group, Llama-3.1-8B, true lengths."""
    exp = disagg_experiment(oracle=True)
    exp["groups"] = [dict({"name": "p", "device": "trn2", "count": 4, "tp": 16, "role": "prefill"},
                          **group_over),
                     {"name": "d", "device": "cs3", "count": 1, "role": "decode"}]
    return exp


def _groups(exp: dict):
    return build_groups(parse_experiment(exp), Path.cwd())


def _rows(result) -> dict[int, dict]:
    return {row["request_id"]: row for row in result.records.to_pylist()}


def _view(gid, role, *, queued=0, free=1000, total=1000, load=0, probe=None, pool="", cost=None,
          max_batch_tokens=16384, max_num_seqs=256, block_size=16) -> GroupView:
    v = GroupView(gid, f"g{gid}", "trn2", pool or role.value, role, cost, total, block_size=block_size,
                  max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs, prefix_probe=probe)
    v.prefill_queued_tokens = queued
    v.kv_blocks_free = free
    v.num_decoding = load
    return v


# --- disagg-slo (Mooncake's Conductor) ----------------------------------------------------------
def test_request_info_and_placement_behave_as_the_named_tuples_they_were():
    """Compiled classes now (made on the hot path); to a policy they read, compare, hash, print and
    ``_replace`` as the NamedTuples they replaced."""
    from typing import NamedTuple, Optional

    class Info(NamedTuple):                     # the old RequestInfo
        request_id: int
        arrival_s: float
        prompt_tokens: int
        predicted_output: int
        prefix_hashes: Optional[tuple[int, ...]] = None
        prefix_block_tokens: int = 512
        prefill_group: Optional[int] = None
        generated: int = 0

    class Place(NamedTuple):                    # the old Placement
        prefill_group: int
        decode_group: Optional[int] = None

    for args, kwargs in [((3, 0.5, 100, 20), {}), ((4, 1.0, 64, 8, (1, 2), 16), {"prefill_group": 2, "generated": 5})]:
        info, old = RequestInfo(*args, **kwargs), Info(*args, **kwargs)
        assert [getattr(info, f) for f in Info._fields] == list(old)
        assert repr(info) == repr(old).replace("Info(", "RequestInfo(")
        assert info == RequestInfo(*args, **kwargs) and hash(info) == hash(RequestInfo(*args, **kwargs))
        assert info != info._replace(generated=old.generated + 1)
        changed = info._replace(prefix_hashes=None, prefill_group=7)
        assert [getattr(changed, f) for f in Info._fields] == list(old._replace(prefix_hashes=None, prefill_group=7))
    for args in [(1,), (2, 3), ("trn2-0",)]:
        p, old = Placement(*args), Place(*args)
        assert (p.prefill_group, p.decode_group) == tuple(old) and repr(p) == repr(old).replace("Place(", "Placement(")
        assert p == Placement(*args) and hash(p) == hash(Placement(*args)) and p != Placement(9, 9)
    assert Placement(1)._replace(decode_group=2) == Placement(1, 2)
    with pytest.raises(ValueError, match="unexpected field names"):
        RequestInfo(0, 0.0, 1, 1)._replace(prompt=3)


def test_disagg_slo_rejects_exactly_the_requests_no_placement_serves_in_time():
    prompt = 2048
    exp = _one_each(max_batch_tokens=prompt)                   # each prompt runs alone
    t_prefill = _groups(exp)[0].cost.prefill_time_s([prompt], [0])
    slo = {"ttft_s": 3.5 * t_prefill, "tpot_s": 0.05}
    burst = _workload([0.0] * 10, [prompt] * 10, [20] * 10)    # request i would wait i prefills
    plain = hs.simulate(dict(exp, slo=slo), workload=burst)
    late = {rid for rid, row in _rows(plain).items() if row["token1_s"] > slo["ttft_s"]}
    assert late == set(range(3, 10))                           # by hand: TTFT_i = (i + 1)·t
    r = hs.simulate(dict(exp, slo=slo, policy="disagg-slo"), workload=burst)
    rows = _rows(r)
    rejected = {rid for rid, row in rows.items() if row["status"] == "rejected"}
    assert rejected == late
    assert all("TTFT" in rows[rid]["reason"] for rid in rejected)
    assert all(rows[rid]["token1_s"] <= slo["ttft_s"] for rid in rows if rid not in rejected)
    assert r.summary["slo_attainment"] == pytest.approx(0.3)
    # rejected at arrival, before any work: only the three accepted prompts were prefilled
    assert [d[4][0] for d in r.decisions if d[1] == D.PREFILL] == [1, 1, 1]


def test_disagg_slo_rejects_when_no_decode_group_meets_tpot():
    exp = _one_each()
    r = hs.simulate(dict(exp, slo={"ttft_s": 2.0, "tpot_s": 1e-6}, policy="disagg-slo"),
                    workload=_workload([0.0, 0.1], [500, 500], [10, 10]))
    assert r.summary["rejected"] == 2
    assert all("TPOT" in row["reason"] for row in r.records.to_pylist())


def test_disagg_slo_prefers_the_prefill_group_with_the_lower_predicted_ttft():
    exp = _one_each()
    exp["groups"].insert(1, {"name": "slow", "device": "trn2", "count": 1, "tp": 4, "role": "prefill"})
    # one request queued ahead at the fast group still beats an idle but 4x smaller group
    w = _workload([0.0, 0.0], [4000, 4000], [10, 10])
    r = hs.simulate(dict(exp, policy="disagg-slo"), workload=w)
    assert [row["prefill_group"] for row in r.records.to_pylist()] == [0, 0]
    plain = hs.simulate(exp, workload=w)                       # least-loaded spreads them
    assert sorted(row["prefill_group"] for row in plain.records.to_pylist()) == [0, 1]
    assert max(_rows(r)[i]["token1_s"] for i in (0, 1)) < max(_rows(plain)[i]["token1_s"] for i in (0, 1))


def test_disagg_slo_fastest_prefill_is_the_scan_over_every_prefill_group_of_the_kind():
    """The least-queued group that does not hold the first prefix block, or a holder: exactly the
    lowest (predicted TTFT, id) over every prefill group (ties, holders, none holding)."""
    from hetero_sched.core.fleet import Fleet
    from hetero_sched.policies.disagg_slo import fastest_prefill, predicted_ttft_s

    cost = _groups(_one_each())[0].cost
    rng = random.Random(7)
    for trial in range(200):
        held = {gid: rng.choice([0, 0, 0, 1, 2, 3]) for gid in range(12)}     # leading blocks cached
        views = [_view(gid, Role.PREFILL if rng.random() < 0.8 else Role.DECODE, cost=cost,
                       queued=rng.randrange(4) * 4096, probe=lambda hashes, n=held[gid]: n)
                 for gid in range(12)]
        request = RequestInfo(trial, 0.0, rng.choice([600, 2048, 5000]), 50,
                              prefix_hashes=(11, 12, 13) if rng.random() < 0.7 else None, prefix_block_tokens=512)
        scan = min(((predicted_ttft_s(request, v), v.group_id) for v in views if v.can_prefill), default=None)
        assert fastest_prefill(request, Fleet(views, scan_limit=0), 0) == scan, trial


def test_disagg_slo_asks_its_groups_cost_model_each_question_once(monkeypatch):
    """disagg-slo predicts two prefill times and a decode step per candidate and decision; a
    view answers from the memo its group fills (shared by the groups of one cost model), so
    the cost model hears each one-prompt prefill and each batch size's decode lines once."""
    exp = disagg_experiment(policy="disagg-slo", oracle=True)   # two prefill groups, one cost model
    asked: list[tuple] = []
    for cls in {type(g.cost) for g in _groups(exp)}:
        for name in ("prefill_time_s", "decode_step_lines"):
            def counted(self, *args, _real=getattr(cls, name), _name=name):
                if _name == "decode_step_lines" or len(args[0]) == 1:    # batches of prompts: not kept
                    asked.append((id(self), _name, repr(args)))
                return _real(self, *args)
            monkeypatch.setattr(cls, name, counted)
    w = _workload(np.arange(60) * 0.05, [512, 1024, 2048] * 20, [8, 16] * 30)
    r = hs.simulate(exp, workload=w)
    assert r.summary["completed"] == 60
    assert {a[1] for a in asked} == {"prefill_time_s", "decode_step_lines"}
    assert len(asked) == len(set(asked))
    assert len(asked) < 60                 # without the memo: several per decision


# --- disagg-prefix (Dynamo's KV router) ---------------------------------------------------------
def test_disagg_prefix_sends_a_request_to_the_group_holding_its_prefix():
    block = 64
    fam_x, fam_y = tuple(range(100, 108)), tuple(range(200, 208))
    # A (x) and B (y) warm one group each; later D (y) arrives just before C (x)
    w = _workload([0.0, 0.0, 5.0, 5.001], [8 * block] * 4, [10] * 4, [fam_x, fam_y, fam_y, fam_x], block)
    exp = disagg_experiment(groups=[
        {"name": "p", "device": "trn2", "count": 4, "tp": 16, "replicas": 2, "role": "prefill"},
        {"name": "d", "device": "cs3", "count": 1, "role": "decode"}])
    r = _rows(hs.simulate(dict(exp, policy="disagg-prefix"), workload=w))
    assert [r[i]["prefill_group"] for i in range(4)] == [0, 1, 1, 0]
    assert r[2]["cached_tokens"] == r[3]["cached_tokens"] == 8 * block - 1   # one token is computed
    plain = _rows(hs.simulate(exp, workload=w))                # least-loaded: D takes the idle group 0
    assert [plain[i]["prefill_group"] for i in range(4)] == [0, 1, 0, 1]
    assert plain[2]["cached_tokens"] == plain[3]["cached_tokens"] == 0


@pytest.mark.parametrize("queued_blocks,weight,expected", [(7, 1.0, 0), (9, 1.0, 1), (9, 2.0, 0), (17, 2.0, 1)])
def test_disagg_prefix_leaves_the_prefix_holder_when_its_load_outweighs_the_hit(queued_blocks, weight, expected):
    block = 64
    req = RequestInfo(0, 0.0, 8 * block, 10, tuple(range(8)), block)
    holder = _view(0, Role.PREFILL, queued=queued_blocks * block, probe=lambda h: 8)
    idle = _view(1, Role.PREFILL, probe=lambda h: 0)
    # cost = weight × blocks to compute + blocks in use: holder queued_blocks, idle 8 × weight
    assert DisaggPrefix(overlap_weight=weight).place(req, [holder, idle], 0.0) == Placement(expected)


# --- colocated-chunked (Sarathi-Serve) ----------------------------------------------------------
def test_chunked_prefill_keeps_decode_going_while_a_long_prompt_prefills():
    exp = colocated_experiment(oracle=True, groups=[
        {"name": "h", "device": "h100", "count": 1, "tp": 1, "role": "both"}])
    long_prompt, budget = 16000, 512
    w = _workload([0.0, 0.05], [100, long_prompt], [400, 5])
    cost = _groups(exp)[0].cost
    whole = _rows(hs.simulate(exp, workload=w))
    chunked = hs.simulate(dict(exp, policy={"name": "colocated-chunked", "params": {"token_budget": budget}}),
                          workload=w)
    rows = _rows(chunked)
    assert chunked.summary["completed"] == 2 and rows[1]["generated"] == 5
    # whole-prompt prefill stalls the running request for the entire long prefill
    assert whole[0]["max_gap_s"] >= cost.prefill_time_s([long_prompt], [0])
    # chunked: a gap is at most one decode step plus one chunk (attending to the whole prompt)
    bound = cost.prefill_time_s([budget - 1], [long_prompt]) + max(a + s * 20000 for a, s in cost.decode_step_lines(2))
    assert rows[0]["max_gap_s"] <= bound < whole[0]["max_gap_s"] / 10
    chunks = [d for d in chunked.decisions if d[1] == D.CHUNK]
    # request 0's prompt is one chunk; then the running request takes one token of each budget
    assert len(chunks) == 1 + math.ceil(long_prompt / (budget - 1))
    assert sum(d[4][2] for d in chunks) == 100 + long_prompt
    assert rows[1]["token1_s"] > whole[1]["token1_s"]         # the price: the long prompt's TTFT


# --- disagg with power-of-two choices -----------------------------------------------------------
def test_power_of_two_choices_samples_two_and_takes_the_less_loaded():
    loads = [400, 100, 300, 200]
    views = [_view(i, Role.PREFILL, queued=q) for i, q in enumerate(loads)] + [_view(4, Role.DECODE)]
    policy = Disagg(choices=2, seed=11)
    rng = random.Random(11)
    picks = []
    for _ in range(30):
        sample = rng.sample(views[:4], 2)
        expected = min(sample, key=lambda g: g.prefill_queued_tokens).group_id
        picks.append(policy.place(RequestInfo(0, 0.0, 10, 10), views, 0.0).prefill_group)
        assert picks[-1] == expected
    assert set(picks) == {1, 2, 3}        # never the most loaded; not always the least loaded
    with pytest.raises(UserError, match="choices must be at least 1"):
        make_policy("disagg", {"choices": 0})


# --- heterogeneous fallback ---------------------------------------------------------------------
def test_fallback_decodes_on_the_prefill_group_only_when_the_decode_pool_is_saturated():
    req = RequestInfo(0, 0.0, 100, 50, prefill_group=0)
    pre, dec = _view(0, Role.PREFILL), _view(1, Role.DECODE, max_num_seqs=4)
    on, off = Disagg(fallback=True), Disagg()
    assert on.place_decode(req, [pre, dec], 0.0) == 1          # room at the decode group
    dec.num_decoding = 4                                       # slots full
    assert on.place_decode(req, [pre, dec], 0.0) == 0
    assert off.place_decode(req, [pre, dec], 0.0) == 1         # not allowed: wait for decode
    dec.num_decoding, dec.kv_blocks_free = 0, 5                # no KV for the 10-block reservation
    assert on.place_decode(req, [pre, dec], 0.0) == 0
    pre.kv_blocks_free = 5                                     # nor at the prefill group: wait
    assert on.place_decode(req, [pre, dec], 0.0) == 1
    # and a CS-3 prefills (and decodes) only when every prefill group is backed up
    dec.kv_blocks_free = 1000
    assert on.place(req, [pre, dec], 0.0) == Placement(0)
    pre.prefill_queued_tokens = 4 * pre.max_batch_tokens
    assert on.place(req, [pre, dec], 0.0) == Placement(1, 1)
    assert off.place(req, [pre, dec], 0.0) == Placement(0)


def test_fallback_in_a_run_serves_on_both_kinds_only_under_saturation():
    exp = disagg_experiment(groups=[
        {"name": "p", "device": "trn2", "count": 4, "tp": 16, "role": "prefill", "max_batch_tokens": 2048},
        {"name": "d", "device": "cs3", "count": 1, "role": "decode", "max_num_seqs": 2}])
    burst = _workload([0.0] * 40, [1500] * 40, [200] * 40)
    on = hs.simulate(dict(exp, policy={"name": "disagg", "params": {"fallback": True}}), workload=burst)
    rows = on.records.to_pylist()
    assert on.summary["completed"] == 40
    trn_decoded = [r for r in rows if r["prefill_group"] == r["decode_group"] == 0]
    cs3_prefilled = [r for r in rows if r["prefill_group"] == r["decode_group"] == 1]
    assert trn_decoded and cs3_prefilled
    # a local decode moves no KV: one transfer per request decoded elsewhere
    transfers = sum(1 for d in on.decisions if d[1] == D.TRANSFER)
    assert transfers == 40 - len(trn_decoded) - len(cs3_prefilled)
    off = hs.simulate(exp, workload=burst)
    assert all(r["prefill_group"] == 0 and r["decode_group"] == 1 for r in off.records.to_pylist())
    calm = _workload(np.arange(20) * 2.0, [1500] * 20, [50] * 20)   # the decode pool never fills
    quiet = hs.simulate(dict(exp, policy={"name": "disagg", "params": {"fallback": True}}), workload=calm)
    assert all(r["prefill_group"] == 0 and r["decode_group"] == 1 for r in quiet.records.to_pylist())


# --- layer-wise KV streaming (Splitwise) --------------------------------------------------------
@pytest.mark.parametrize("message_share", [None, 2.0])
def test_layerwise_streaming_lands_kv_earlier_by_the_overlap_less_the_message_costs(message_share):
    exp = _one_each()
    prompt = 3000
    w = _workload([0.0], [prompt], [10])
    src, dst = _groups(exp)
    layers = 32                                               # Llama-3.1-8B
    nbytes = (prompt + 1) * src.cost.transfer_bytes_per_token
    rate = min(src.cost.egress_bytes_per_s, dst.cost.ingress_bytes_per_s)
    t = src.cost.prefill_time_s([prompt], [0])
    # the sender's own message cost, or per-layer messages costing twice a layer's prefill time
    layer_message_s = None if message_share is None else message_share * t / layers
    c = src.cost.message_cost_s if layer_message_s is None else layer_message_s

    def landing_after_token1(result) -> float:
        kv = next(d[0] for d in result.decisions if d[1] == D.KV_ARRIVED)
        return kv - _rows(result)[0]["token1_s"]

    after = landing_after_token1(hs.simulate(exp, workload=w))
    streamed = hs.simulate(dict(exp, transfer={"mode": "layerwise", "layer_message_s": layer_message_s}),
                           workload=w)
    assert after == pytest.approx(nbytes / rate + src.cost.message_cost_s, rel=1e-9)
    # the last layer lands at max(T + x, T/L + L·x), x = one layer's bytes + its message
    x = nbytes / layers / rate + c
    expected = max(t + x, t / layers + layers * x) - t
    assert landing_after_token1(streamed) == pytest.approx(expected, rel=1e-9)
    if layer_message_s is None:
        assert expected < after                               # cheap messages: the overlap wins
    else:
        assert expected > after                               # costly messages: it loses


# --- adaptive (role switching with hysteresis) --------------------------------------------------
def test_adaptive_switches_when_the_backlog_ratio_crosses_and_not_back_inside_the_band():
    policy = Adaptive(to_prefill_ratio=4.0, to_decode_ratio=0.5, min_load=0.0)
    p = _view(0, Role.PREFILL, max_batch_tokens=1000)
    m = _view(1, Role.DECODE, pool="mixed", max_num_seqs=10, max_batch_tokens=1000)
    d = _view(2, Role.DECODE, max_num_seqs=10)
    views = [p, m, d]
    d.num_decoding = m.num_decoding = 2                       # D = 4/20 = 0.2
    p.prefill_queued_tokens = 700                             # P = 0.7: ratio 3.5 < 4, no switch
    assert policy.rebalance(views, 0.0) == ()
    p.prefill_queued_tokens = 800                             # ratio 4.0: switch the mixed group
    assert policy.rebalance(views, 0.0) == (RoleSwitch(1, "prefill"),)
    m.role, m.can_prefill, m.can_decode, m.num_decoding = Role.PREFILL, True, False, 0
    # now P = 800/2000 = 0.4, D = 2/10 = 0.2: ratio 2 is inside the band, it stays a prefill group
    assert policy.rebalance(views, 0.0) == ()
    d.num_decoding = 8                                        # ratio 0.4/0.8 = 0.5: back to decode
    assert policy.rebalance(views, 0.0) == (RoleSwitch(1, "decode"),)
    p.can_prefill = False                                     # a group draining: one switch at a time
    p.can_decode = False
    assert policy.rebalance(views, 0.0) == ()
    with pytest.raises(UserError, match="hysteresis"):
        make_policy("adaptive", {"to_prefill_ratio": 1.0, "to_decode_ratio": 2.0})


def test_adaptive_drains_a_group_before_it_takes_its_new_role():
    exp = disagg_experiment(oracle=True, policy={"name": "adaptive", "params": {"min_load": 0.5}}, groups=[
        {"name": "p", "device": "trn2", "count": 4, "tp": 16, "role": "prefill", "max_batch_tokens": 2048},
        {"name": "m", "device": "trn2", "count": 4, "tp": 16, "role": "decode", "pool": "mixed", "max_num_seqs": 8},
        {"name": "d", "device": "cs3", "count": 1, "role": "decode", "max_num_seqs": 8}])
    # a few long decodes first (some land on m), a burst of long prompts, then prompts in pairs
    pairs = np.repeat(1.0 + 0.5 * np.arange(120), 2)
    w = _workload([0.0] * 4 + [0.5] * 30 + list(pairs), [200] * 4 + [2000] * 30 + [500] * 240,
                  [3000] * 4 + [5] * 270)
    r = hs.simulate(exp, workload=w)
    assert r.summary["completed"] == 274
    log = list(r.decisions)
    drains = [(t, g, det) for t, k, g, _, det in log if k == D.DRAIN]
    roles = [(t, g, det) for t, k, g, _, det in log if k == D.ROLE]
    assert drains and drains[0][1] == 1 and drains[0][2] == (Role.PREFILL.code,)
    t_drain, t_role = drains[0][0], roles[0][0]
    assert roles[0][1] == 1 and roles[0][2] == (Role.PREFILL.code, pytest.approx(t_role - t_drain))
    held = [row for row in r.records.to_pylist() if row["decode_group"] == 1]
    assert held, "the mixed group held decode requests when asked to switch"
    # the drain lasts until the last request it held has finished; nothing new went there meanwhile
    assert t_role == max(row["finish_s"] for row in held) > t_drain
    assert not [d for d in log if t_drain <= d[0] < t_role and d[2] == 1 and d[1] in (D.PLACE, D.ADMIT)]
    assert [d for d in log if d[0] >= t_role and d[2] == 1 and d[1] == D.PLACE]   # then it prefills


# --- every new policy: determinism, config, registry -------------------------------------------
NEW_POLICIES = [("disagg-slo", {}), ("disagg-prefix", {"overlap_weight": 2.0}),
                ("disagg", {"choices": 2, "fallback": True}), ("adaptive", {}),
                ("colocated-chunked", {"token_budget": 256})]


@pytest.mark.parametrize("name,params", NEW_POLICIES)
def test_same_config_and_seed_give_the_same_decision_log(name, params):
    make = colocated_experiment if name.startswith("colocated") else disagg_experiment
    exp = make(policy={"name": name, "params": params}, workload={"kind": "synthetic", "num_requests": 150,
                                                                  "rate_per_s": 30.0})
    a, b = hs.simulate(exp), hs.simulate(exp)
    assert a.decisions == b.decisions and len(a.decisions) > 150
    assert a.records.equals(b.records)
    assert a.summary["completed"] + a.summary["rejected"] == 150


def test_bad_policy_parameters_and_transfer_options_are_one_line_errors():
    with pytest.raises(UserError, match="token_budget must be at least 1"):
        make_policy("colocated-chunked", {"token_budget": 0})
    with pytest.raises(UserError, match="unknown parameter"):
        make_policy("disagg-slo", {"ttft": 1.0})
    with pytest.raises(UserError, match="transfer.mode"):
        parse_experiment(disagg_experiment(transfer={"mode": "sideways"}))


def test_a_role_switch_to_an_unknown_role_is_a_one_line_user_error() -> None:
    from hetero_sched.errors import UserError

    with pytest.raises(UserError, match="switch to role 'both'"):
        RoleSwitch(1, "both")
