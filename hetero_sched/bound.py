"""An upper bound on goodput: the cluster's fluid capacity for a workload, over the attainment target.

Every goodput figure reads as "% of the bound", so a policy can be judged against what the
hardware could do at best, and no simulated goodput may exceed it (a test checks this; if
one ever does, the bound or the simulator is wrong).

The fluid model (issue 7): the workload's *mean* work per request on each resource —

- **prefill**: each request's prompt minus what a *perfect* prefix cache would hold (every
  full hash block of an earlier-arriving request), computed in a batch of identical prompts
  that fills the group's token budget (``max_batch_tokens``, ``max_prefill_seqs``), per
  request: fixed per-iteration costs are amortized as far as batching allows;
- **KV transfer**: the whole prompt's unique KV bytes (a prefix hit saves no bytes) through
  the prefill group's egress and the decode group's ingress;
- **decode**: ``output − 1`` tokens at the group's best decode throughput over batch sizes its
  KV memory, ``max_num_seqs`` and the TPOT SLO allow, at the workload's token-weighted mean
  context (step time is convex in context, so by Jensen the mean context gives the most
  tokens/s);

— then the largest arrival rate the groups can absorb (an exact small LP: groups that may take
either role split their time by comparative advantage), divided by the attainment target
(only 90% of requests need to be served): ``capacity_per_s / 0.9``, the long-trace bound.

A finite trace can beat that: work spills past the last arrival, as far as the SLO lets a
request wait (TPOT 50 ms × 200 tokens is 10 s). So the bound replays the trace's own arrival
pattern at rate λ and gives every request its SLO deadline — prefill by arrival + TTFT,
transfer and decode by arrival + TTFT + TPOT·(output − 1) — and requires, per stage (prefill,
transfer, decode, and the whole cluster when groups share roles), that for every deadline ``t``
the work due by ``t`` fits in ``capacity·t``, less the work of the 10% of requests that may
miss (taken as the largest works, so no choice of which requests to drop can beat it). The
largest such λ is the bound (``rate_per_s``). ``steady_rate_per_s`` is the issue's long-trace
figure, capacity / 0.9; the two differ by the trace's length, its bursts, and how unequal its
requests are (dropping the 10% largest saves more than 10% of the work).
Not modelled, so the bound stays loose there: queueing, stalls of decode behind prefill on
shared groups, the TTFT of a prompt longer than the SLO allows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

from hetero_sched.core.group import GroupLimits, GroupState
from hetero_sched.costmodel import GroupCost, step_time_s
from hetero_sched.experiment import Experiment, build_groups
from hetero_sched.metrics import SLO
from hetero_sched.workload import Workload

ATTAINMENT_TARGET = 0.9
"""Share of all requests that must meet the SLO at the goodput rate (DESIGN contract §5)."""

Roles = Literal["configured", "any"]
"""``configured``: groups keep their roles; ``any``: every group may prefill and decode
(the bound for policies that switch roles or let groups fall back to the other role)."""


@dataclass(frozen=True)
class WorkloadWork:
    """What a workload asks of a cluster, per request on average (the bound's input)."""

    num_requests: int
    new_tokens: np.ndarray
    """Distinct (new, cached) prompt-token pairs after a perfect prefix cache, and their counts."""
    cached_tokens: np.ndarray
    counts: np.ndarray
    mean_prompt_tokens: float
    mean_output_tokens: float
    mean_decode_tokens: float
    """Output tokens made by decode steps (token 1 comes from prefill)."""
    mean_decode_context: float
    """Context tokens per sequence per decode step, averaged over every decode step."""
    cached_fraction: float
    arrival_unit: np.ndarray
    """Arrival times rescaled to a mean rate of 1 req/s (at rate λ, request i arrives at ``arrival_unit[i] / λ``)."""
    decode_tokens: np.ndarray
    """Per request: output − 1 (its TPOT deadline is ``TPOT × decode_tokens`` after token 1)."""
    pair_index: np.ndarray
    """Per request: its row in ``new_tokens``/``cached_tokens``."""
    prompt_tokens: np.ndarray


def perfect_cache_hits(w: Workload) -> np.ndarray:
    """Prompt tokens a perfect prefix cache holds per request: the leading hash blocks seen in
    any earlier-arriving request's full blocks (at least one token is always computed)."""
    prompts = w.prompt_tokens
    cached = np.zeros(len(w), dtype=np.int64)
    if w.prefix_hashes is None:
        return cached
    block = w.prefix_block_tokens
    seen: set[int] = set()
    for i, hashes in enumerate(w.prefix_hashes):
        prompt = int(prompts[i])
        matched = 0
        for h in hashes:
            if h not in seen:
                break
            matched += 1
        cached[i] = min(matched * block, prompt - 1)
        seen.update(hashes[:prompt // block])
    return cached


def workload_work(w: Workload) -> WorkloadWork:
    """The mean work of a workload: prefill tokens after a perfect cache, decode tokens, context."""
    prompt = w.prompt_tokens.astype(np.int64)
    output = w.output_tokens.astype(np.int64)
    cached = perfect_cache_hits(w)
    new = prompt - cached
    pairs, inverse, counts = np.unique(np.stack([new, cached], axis=1), axis=0, return_inverse=True,
                                       return_counts=True)
    steps = output - 1
    total_steps = float(steps.sum())
    # decode step j (1-based) of a request sees its prompt plus j tokens generated so far
    context_sum = float((steps * prompt + steps * (steps + 1) / 2).sum())
    arrivals = w.arrival_s - w.arrival_s[0]
    unit = arrivals * ((len(w) - 1) / arrivals[-1]) if len(w) > 1 and arrivals[-1] > 0 else np.zeros(len(w))
    return WorkloadWork(
        num_requests=len(w), new_tokens=pairs[:, 0], cached_tokens=pairs[:, 1], counts=counts,
        mean_prompt_tokens=float(prompt.mean()), mean_output_tokens=float(output.mean()),
        mean_decode_tokens=total_steps / len(w),
        mean_decode_context=context_sum / total_steps if total_steps else float(prompt.mean()),
        cached_fraction=float(cached.sum() / prompt.sum()), arrival_unit=unit, decode_tokens=steps,
        pair_index=inverse.reshape(-1), prompt_tokens=prompt)


@dataclass(frozen=True)
class GroupCapacity:
    """One group's fluid rates for a workload (``inf`` work = the group cannot do that)."""

    name: str
    device: str
    role: str
    prefill_s_per_request: float
    decode_s_per_request: float
    decode_batch: int
    """Batch size at the best SLO-feasible decode throughput (0: none meets the TPOT SLO)."""
    decode_tokens_per_s: float
    egress_requests_per_s: float
    ingress_requests_per_s: float
    dollars_per_hour: float


def prefill_pair_s(cost: GroupCost, limits: GroupLimits, work: WorkloadWork) -> np.ndarray:
    """Prefill time per request of each (new, cached) pair, batched with copies of itself up to
    the group's limits (fixed per-iteration costs amortized as far as batching allows)."""
    out = np.empty(len(work.new_tokens))
    for i, (new, cached) in enumerate(zip(work.new_tokens.tolist(), work.cached_tokens.tolist())):
        k = max(1, min(limits.max_prefill_seqs, limits.max_batch_tokens // new))
        out[i] = cost.prefill_time_s([new] * k, [cached] * k) / k
    return out


def prefill_s_per_request(cost: GroupCost, limits: GroupLimits, work: WorkloadWork) -> float:
    """Mean prefill time per request (see :func:`prefill_pair_s`)."""
    return float((prefill_pair_s(cost, limits, work) * work.counts).sum() / work.num_requests)


def decode_throughput(cost: GroupCost, max_seqs: int, kv_tokens: int, context: float,
                      tpot_s: Optional[float]) -> tuple[float, int]:
    """Best decode tokens/s (and its batch) over batches that fit the KV and meet ``tpot_s``."""
    cap = min(max_seqs, int(kv_tokens // max(context, 1.0)))
    best = (0.0, 0)
    for b in range(1, cap + 1):
        step = step_time_s(cost.decode_step_lines(b), b * context)
        if tpot_s is not None and step > tpot_s:
            continue
        if b / step > best[0]:
            best = (b / step, b)
    return best


def group_capacity(g: GroupState, work: WorkloadWork, tpot_s: Optional[float], any_role: bool) -> GroupCapacity:
    """A core group's fluid rates for ``work`` under a TPOT SLO."""
    can_prefill = any_role or g.can_prefill
    can_decode = any_role or g.can_decode
    prefill = prefill_s_per_request(g.cost, g.limits, work) if can_prefill else math.inf
    tokens_per_s, batch = 0.0, 0
    if can_decode:
        kv_tokens = g.kv.num_blocks * g.limits.block_size
        tokens_per_s, batch = decode_throughput(g.cost, g.limits.max_num_seqs, kv_tokens,
                                                work.mean_decode_context, tpot_s)
    if not can_decode or (tokens_per_s == 0.0 and work.mean_decode_tokens > 0):
        decode = math.inf
    else:
        decode = work.mean_decode_tokens / tokens_per_s if work.mean_decode_tokens > 0 else 0.0
    kv_bytes = work.mean_prompt_tokens * g.cost.transfer_bytes_per_token
    return GroupCapacity(g.name, g.device, "both" if any_role else g.role.value, prefill, decode, batch,
                         tokens_per_s, g.cost.egress_bytes_per_s / kv_bytes, g.cost.ingress_bytes_per_s / kv_bytes,
                         g.cost.dollars_per_hour)


def _rate(seconds: float) -> float:
    return 0.0 if math.isinf(seconds) else (math.inf if seconds == 0 else 1.0 / seconds)


def fluid_capacity(groups: Sequence[GroupCapacity]) -> float:
    """Largest request rate the groups can prefill and decode (exact for this LP).

    Prefill-only groups add ``min(1/prefill, egress)``, decode-only ones ``min(1/decode,
    ingress)``; a group that may do both splits its time, the groups that give up the least
    decode per unit of prefill prefilling first (a fractional knapsack, so greedy is optimal),
    and keeps its KV local (no transfer cap).
    """
    fixed_p = sum(min(_rate(g.prefill_s_per_request), g.egress_requests_per_s) for g in groups if g.role == "prefill")
    fixed_d = sum(min(_rate(g.decode_s_per_request), g.ingress_requests_per_s) for g in groups if g.role == "decode")
    flex = [g for g in groups if g.role == "both"]
    if any(g.decode_s_per_request == 0 for g in flex):   # no decode work at all (one-token outputs)
        return fixed_p + sum(_rate(g.prefill_s_per_request) for g in flex)
    flex.sort(key=lambda g: g.prefill_s_per_request / g.decode_s_per_request
              if not math.isinf(g.decode_s_per_request) else 0.0)
    hi = min(fixed_p + sum(_rate(g.prefill_s_per_request) for g in flex),
             fixed_d + sum(_rate(g.decode_s_per_request) for g in flex))
    if not flex or hi <= 0:
        return max(hi, 0.0)
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _feasible(mid, fixed_p, fixed_d, flex):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return lo


def _feasible(rate: float, fixed_p: float, fixed_d: float, flex: Sequence[GroupCapacity]) -> bool:
    need_p = max(0.0, rate - fixed_p)
    decode = 0.0
    for g in flex:
        left = 1.0
        if need_p > 0 and not math.isinf(g.prefill_s_per_request):
            used = min(1.0, need_p * g.prefill_s_per_request)
            need_p = max(0.0, need_p - used / g.prefill_s_per_request)
            left -= used
        decode += left * _rate(g.decode_s_per_request)
    return need_p <= 1e-12 * rate and decode + fixed_d >= rate


def horizon_rate(arrival_unit: np.ndarray, deadline_s: np.ndarray, work: np.ndarray, capacity_per_s: float,
                 target: float = ATTAINMENT_TARGET) -> float:
    """Largest rate λ at which, for every deadline ``t``, the work of the requests due by ``t``
    (arrival/λ + ``deadline_s``), less the largest works of the ``1 − target`` share that may
    miss, fits in ``capacity_per_s · t``. ``work`` is in mean requests (its mean is 1)."""
    n = len(work)
    if capacity_per_s <= 0 or n == 0:
        return 0.0
    if math.isinf(capacity_per_s):
        return math.inf
    may_miss = n - math.ceil(target * n - 1e-9)
    dropped = float(np.sort(work)[n - may_miss:].sum()) if may_miss else 0.0

    def feasible(rate: float) -> bool:
        due = arrival_unit / rate + deadline_s
        order = np.argsort(due, kind="stable")
        need = np.cumsum(work[order]) - dropped
        return bool(np.all(need <= capacity_per_s * due[order] * (1 + 1e-12)))

    lo, hi = 0.0, capacity_per_s / target
    while feasible(hi):
        lo, hi = hi, hi * 2
        if hi > 1e6 * capacity_per_s:
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    return lo


class RateCost:
    """A request rate read as tokens/s and per dollar (the bound and goodput share these)."""

    rate_per_s: float
    mean_output_tokens: float
    dollars_per_hour: float

    @property
    def tokens_per_s(self) -> float:
        """Output tokens/s at this rate."""
        return self.rate_per_s * self.mean_output_tokens

    @property
    def requests_per_dollar(self) -> float:
        """Requests per dollar of cluster time."""
        return self.rate_per_s * 3600.0 / self.dollars_per_hour if self.dollars_per_hour else math.inf

    @property
    def tokens_per_dollar(self) -> float:
        """Output tokens per dollar of cluster time."""
        return self.requests_per_dollar * self.mean_output_tokens


@dataclass(frozen=True)
class Bound(RateCost):
    """The goodput bound of a cluster for a workload and SLO, and what limits it."""

    rate_per_s: float
    """Upper bound on goodput (req/s) for this trace (see the module docstring)."""
    steady_rate_per_s: float
    """The long-trace bound: fluid capacity over the attainment target."""
    capacity_per_s: float
    attainment_target: float
    stages: dict[str, float]
    """Per stage (prefill, KV transfer, decode, cluster): its fluid capacity in req/s."""
    stage_bounds: dict[str, float]
    """Per stage: the bound it alone sets on this trace."""
    bottleneck: str
    mean_output_tokens: float
    dollars_per_hour: float
    groups: tuple[GroupCapacity, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for JSON and Parquet)."""
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        d["requests_per_dollar"] = self.requests_per_dollar
        return d


STAGE_NAMES = {"prefill": "prefill compute", "transfer": "KV transfer",
               "decode": "decode (batch within KV and TPOT)", "cluster": "prefill and decode sharing groups"}


class BoundMaker:
    """Bounds for one workload and SLO over many clusters (the planner's inner loop): a stage's
    bound depends only on its capacity, so it is computed once per distinct capacity.

    ``prefill_pair_s`` (from :func:`prefill_pair_s` on a prefill-capable group) weights each
    request's prefill work; without it, work is proportional to the tokens computed.
    """

    def __init__(self, work: WorkloadWork, slo: Optional[SLO], prefill_pair_s: Optional[np.ndarray] = None,
                 target: float = ATTAINMENT_TARGET) -> None:
        self.work = work
        self.target = target
        ttft = slo.ttft_s if slo is not None else math.inf
        tpot = slo.tpot_s if slo is not None else math.inf
        n = work.num_requests
        pair = prefill_pair_s if prefill_pair_s is not None else work.new_tokens.astype(np.float64)
        prefill = pair[work.pair_index]
        decode = work.decode_tokens.astype(np.float64)
        prompt = work.prompt_tokens.astype(np.float64)
        self._prefill, self._decode, self._transfer = (_unit(prefill), _unit(decode), _unit(prompt))
        self._deadline = {"prefill": np.full(n, ttft), "decode": ttft + tpot * decode}
        self._memo: dict[tuple[str, float, float], float] = {}

    def _stage_work(self, stage: str, prefill_share: float) -> np.ndarray:
        if stage == "prefill":
            return self._prefill
        if stage == "transfer":
            return self._transfer
        if stage == "decode":
            return self._decode
        return prefill_share * self._prefill + (1 - prefill_share) * self._decode

    def stage_bound(self, stage: str, capacity_per_s: float, prefill_share: float = 0.5) -> float:
        """The bound one stage of ``capacity_per_s`` (mean requests/s) sets on this trace."""
        key = (stage, capacity_per_s, prefill_share if stage == "cluster" else 0.0)
        if key not in self._memo:
            deadline = self._deadline["prefill" if stage == "prefill" else "decode"]
            if np.isinf(deadline).any():
                self._memo[key] = capacity_per_s / self.target
            else:
                self._memo[key] = horizon_rate(self.work.arrival_unit, deadline,
                                               self._stage_work(stage, prefill_share), capacity_per_s, self.target)
        return self._memo[key]

    def bound(self, caps: Sequence[GroupCapacity]) -> Bound:
        """Combine group capacities into the cluster's bound."""
        capacity = fluid_capacity(caps)
        pure_p = [c for c in caps if c.role == "prefill"]
        pure_d = [c for c in caps if c.role == "decode"]
        stages = {
            "prefill": sum(_rate(c.prefill_s_per_request) for c in caps),
            "transfer": (min(sum(c.egress_requests_per_s for c in pure_p), sum(c.ingress_requests_per_s for c in pure_d))
                         if pure_p and pure_d else math.inf),
            "decode": sum(_rate(c.decode_s_per_request) for c in caps),
            "cluster": capacity,
        }
        p, d = stages["prefill"], stages["decode"]
        share = (1 / p) / (1 / p + 1 / d) if 0 < p < math.inf and 0 < d < math.inf else 0.5
        stage_bounds = {name: self.stage_bound(name, cap, share) for name, cap in stages.items()}
        name = min(stage_bounds, key=lambda k: (stage_bounds[k], k == "cluster"))
        if name == "cluster":   # the LP binds: name the stage whose capacity it equals, if one does
            equal = [k for k in ("prefill", "transfer", "decode") if stages[k] <= capacity * (1 + 1e-9)]
            name = equal[0] if equal else name
        return Bound(rate_per_s=min(stage_bounds.values()), steady_rate_per_s=capacity / self.target,
                     capacity_per_s=capacity, attainment_target=self.target, stages=stages,
                     stage_bounds=stage_bounds, bottleneck=STAGE_NAMES[name],
                     mean_output_tokens=self.work.mean_output_tokens,
                     dollars_per_hour=sum(c.dollars_per_hour for c in caps), groups=tuple(caps))


def _unit(x: np.ndarray) -> np.ndarray:
    """Work in mean requests (mean 1; all zeros stay zeros)."""
    mean = float(x.mean()) if len(x) else 0.0
    return x / mean if mean > 0 else np.zeros_like(x)


def group_capacities(groups: Sequence[GroupState], work: WorkloadWork, slo: Optional[SLO],
                     roles: Roles = "configured") -> list[GroupCapacity]:
    """Fluid rates of core groups (replicas that share a cost model are computed once)."""
    any_role = roles == "any"
    tpot = slo.tpot_s if slo is not None else None
    memo: dict[tuple[int, GroupLimits, str], GroupCapacity] = {}
    caps = []
    for g in groups:
        key = (id(g.cost), g.limits, g.role.value)
        if key not in memo:
            memo[key] = group_capacity(g, work, tpot, any_role)
        caps.append(memo[key])
    return caps


def upper_bound(exp: Experiment, workload: Workload, slo: Optional[SLO] = None,
                base_dir: Optional[Path] = None, roles: Roles = "configured") -> Bound:
    """The goodput bound of an experiment's cluster for ``workload`` (SLO: the experiment's)."""
    slo = slo or exp.slo_target
    work = workload_work(workload)
    groups = build_groups(exp, base_dir or Path.cwd())
    caps = group_capacities(groups, work, slo, roles)
    first = next((g for g in groups if g.can_prefill or roles == "any"), None)
    pair = prefill_pair_s(first.cost, first.limits, work) if first is not None else None
    return BoundMaker(work, slo, pair).bound(caps)
