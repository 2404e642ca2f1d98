"""Closed-form spans against a token-by-token reference stepper (DESIGN contract §1).

The reference below is written independently of the core: it advances one prefill iteration
or one decode step at a time, checking arrivals at every step boundary, and applies the same
batching, reservation, extension and LIFO preemption rules. The core must give the same
token times while planning whole spans that end at completions, memory boundaries, the
roofline kink and interruptions.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest

from hetero_sched.core.group import GroupLimits, GroupState, Role
from hetero_sched.core.spans import active_line, decode_span_duration, steps_until
from hetero_sched.core.scheduler import Scheduler
from hetero_sched.policies import make_policy
from hetero_sched.engine.loop import run_events
from hetero_sched.workload import Request


@dataclass(frozen=True)
class KinkCost:
    """A cost with a memory line and a steeper compute line: the kink sits inside the test's range."""

    kv_capacity_tokens: int
    kv_bytes_per_token: int = 1000
    transfer_bytes_per_token: int = 1000
    egress_bytes_per_s: float = 1e12
    ingress_bytes_per_s: float = 1e12
    message_cost_s: float = 0.0
    dollars_per_hour: float = 1.0

    def prefill_time_s(self, new_tokens, cached_tokens) -> float:
        return 0.002 + 1e-5 * sum(new_tokens) + 1e-9 * sum(n * n for n in new_tokens)

    def decode_step_lines(self, batch_size: int):
        return ((0.004 + 1e-4 * batch_size, 1e-7), (0.001, 2e-6))


def _blocks(tokens: int, bs: int) -> int:
    return -(-tokens // bs)


def reference(requests: list[Request], predicted: list[int], cost: KinkCost, lim: GroupLimits) -> dict[int, dict]:
    """One BOTH group, vLLM-style prefill-first, stepped token by token."""
    bs = lim.block_size
    cap_blocks = cost.kv_capacity_tokens // bs - int(cost.kv_capacity_tokens // bs * lim.prefix_cache_fraction)
    pending = deque(sorted(requests, key=lambda r: (r.arrival_s, r.request_id)))
    waiting: deque = deque()
    running: list = []
    used = 0
    out: dict[int, dict] = {}
    t = 0.0

    def reservation(s) -> int:   # taken before the prefill, which makes one more token
        return min(s["prompt"] + max(s["pred"], s["gen"] + 2), cap_blocks * bs)

    def token(s, now) -> None:
        s["gen"] += 1
        if s["gen"] == 1:
            s["t1"] = now
        else:
            if s["gen"] == 2:
                s["t2"] = now
            s["gap"] = max(s["gap"], now - s["last"])
        s["last"] = now

    while pending or waiting or running:
        while pending and pending[0].arrival_s <= t:
            r = pending.popleft()
            waiting.append({"id": r.request_id, "prompt": r.prompt_tokens, "out": r.output_tokens,
                            "pred": predicted[r.request_id], "gen": 0, "gap": 0.0, "last": 0.0,
                            "blocks": 0, "res": 0, "pre": 0})
        batch, total = [], 0
        while waiting and len(batch) < lim.max_prefill_seqs:
            s = waiting[0]
            new = s["prompt"] + s["gen"]
            if batch and total + new > lim.max_batch_tokens:
                break
            res = reservation(s)
            if len(running) + len(batch) >= lim.max_num_seqs or used + _blocks(res, bs) > cap_blocks:
                break
            waiting.popleft()
            s["res"], s["blocks"] = res, _blocks(res, bs)
            used += s["blocks"]
            batch.append(s)
            total += new
        if batch:
            t += cost.prefill_time_s([s["prompt"] + s["gen"] for s in batch], [0] * len(batch))
            for s in batch:
                token(s, t)
                if s["gen"] >= s["out"]:
                    used -= s["blocks"]
                    out[s["id"]] = s | {"fin": t}
                else:
                    running.append(s)
            continue
        if running:
            ctx = sum(s["prompt"] + s["gen"] for s in running)
            t += max(a + k * ctx for a, k in cost.decode_step_lines(len(running)))
            for s in running:
                token(s, t)
            for s in sorted((s for s in running if s["gen"] >= s["out"]), key=lambda s: s["id"]):
                running.remove(s)
                used -= s["blocks"]
                out[s["id"]] = s | {"fin": t}
            for s in sorted((s for s in running if s["prompt"] + s["gen"] >= s["res"]), key=lambda s: s["id"]):
                if s not in running:
                    continue
                new_res = s["res"] + lim.extend_tokens
                need = _blocks(new_res, bs) - s["blocks"]
                while used + need > cap_blocks and s in running:
                    victim = running.pop()
                    used -= victim["blocks"]
                    victim["blocks"] = victim["res"] = 0
                    victim["pre"] += 1
                    waiting.appendleft(victim)
                if s in running:
                    used += need
                    s["blocks"] += need
                    s["res"] = new_res
            continue
        t = max(t, pending[0].arrival_s)
    return out


def _run_core(requests, predicted, cost, lim):
    g = GroupState(0, "g0", Role.BOTH, cost, lim)
    sched = Scheduler([g], make_policy("colocated", {}), predicted)
    run_events(sched, requests)
    return {row[0]: row for row in sched.records}, sched


@pytest.mark.parametrize("seed", [1, 2, 4, 5, 6, 7])
def test_spans_match_token_by_token_reference(seed):
    rng = np.random.default_rng(seed)
    n = 60
    arrivals = np.cumsum(rng.exponential(0.03, n))
    prompts = rng.integers(50, 600, n)
    outputs = rng.integers(2, 200, n)
    # predictions too short for a third of the requests: reservations run out -> extension/preemption
    predicted = [int(o if rng.random() < 0.66 else max(1, o // 3)) for o in outputs]
    requests = [Request(i, float(arrivals[i]), int(prompts[i]), int(outputs[i])) for i in range(n)]
    cost = KinkCost(kv_capacity_tokens=2000)
    lim = GroupLimits(max_batch_tokens=1200, max_num_seqs=8, max_prefill_seqs=4, block_size=16,
                      extend_tokens=16, prefix_cache_fraction=0.0)
    ref = reference(requests, predicted, cost, lim)
    core, sched = _run_core(requests, predicted, cost, lim)
    assert set(core) == set(ref) == set(range(n))
    kinds = [d[1] for d in sched.decisions]
    assert kinds.count("preempt") > 0, "the case must exercise the memory boundary"
    assert kinds.count("cut") > 0, "the case must exercise arrival interruptions"
    cols = {name: i for i, name in enumerate(("request_id", "arrival_s", "prompt_tokens", "output_tokens",
            "predicted_output", "cached_tokens", "status", "reason", "prefill_group", "decode_group",
            "token1_s", "token2_s", "finish_s", "max_gap_s", "preemptions", "generated"))}
    for rid, r in ref.items():
        row = core[rid]
        assert row[cols["status"]] == "completed"
        assert row[cols["generated"]] == r["out"]
        assert row[cols["preemptions"]] == r["pre"], rid
        for key, col in (("t1", "token1_s"), ("t2", "token2_s"), ("fin", "finish_s"), ("gap", "max_gap_s")):
            if key in r:
                assert math.isclose(row[cols[col]], r[key], rel_tol=1e-9, abs_tol=1e-12), (rid, key, row[cols[col]], r[key])


def test_kink_ends_span_where_the_steeper_line_takes_over():
    lines = ((1.0, 0.001), (0.0, 0.002))     # equal at C = 1000
    line, k = active_line(lines, context=900, batch_size=30)
    assert line == (1.0, 0.001)
    # contexts 900, 930, 960, 990 stay on the flat line; 1020 is past the kink
    assert k == 4
    line2, k2 = active_line(lines, context=1020, batch_size=30)
    assert line2 == (0.0, 0.002) and k2 is None


def test_steps_until_finds_the_next_step_boundary():
    line, c0, b = (0.01, 1e-5), 100, 4
    bounds = np.cumsum([line[0] + line[1] * (c0 + b * i) for i in range(50)])
    for j, end in enumerate(bounds, start=1):
        assert math.isclose(decode_span_duration(line, c0, b, j), end, rel_tol=1e-12)
        assert steps_until(line, c0, b, end - 1e-9) == j
        assert steps_until(line, c0, b, end + 1e-9) == j + 1
