"""What the scheduling core asks of a device group's cost model.

The core never computes a time itself: it asks a :class:`GroupCost` (one per device group,
already bound to a model and a parallelism) and gets closed-form answers, so a whole *span* of
decode steps can be timed without stepping token by token (DESIGN contract §1).

The decode step time of a batch of ``b`` sequences holding ``C`` context tokens in all is
``max(a_i + s_i * C for (a_i, s_i) in decode_step_lines(b))``: a maximum of lines in ``C``
(compute roof, memory roof, fixed latencies are all linear in ``C`` for a fixed batch). Where
the maximum switches line is the roofline *kink*; a span ends there so that inside a span the
step time is one line and its sum is an arithmetic series.

Two kinds implement it: :class:`RooflineCost` (physics from the catalog, calibrated on
published figures) and :class:`FittedCost` (per-group coefficients, as profiling-based
simulators use them). :func:`build_group_cost` makes either from a :class:`GroupSpec`, a model,
experiment overrides and optionally a profile written by ``hetero-sched calibrate``.
See ``docs/costmodel.md`` for the equations and the calibration results.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from hetero_sched.catalog import Catalog, ShippedKey, resolve_catalog, resolve_shipped, shipped_key
from hetero_sched.catalog.costparams import CostParams
from hetero_sched.catalog.datafile import CatalogData
from hetero_sched.catalog.groups import GroupSpec
from hetero_sched.catalog.models import ModelSpec
from hetero_sched.catalog.profiles import Profile, load_profile
from hetero_sched.catalog.sources import Source, Status
from hetero_sched.costlines import GroupCost, Line, step_time_s, upper_envelope  # noqa: F401 (step_time_s: re-exported)
from hetero_sched.errors import UserError
from hetero_sched.speculation import Speculation, SpeculativeCost, speculative_capacity

@dataclass(frozen=True)
class FittedCost:
    """Per-(model, device, parallelism) fitted coefficients, as Vidur/DistServe-style simulators use.

    prefill: ``a + b·Σn + c·Σn(n + 2h)``; decode: ``a + b·Σ(context + offset) + c·batch``,
    optionally piecewise by batch size (``decode_pieces``: ``(max_batch, a, b, c)`` sorted by
    ``max_batch``; the first piece whose ``max_batch >= batch`` applies, the last covers anything
    larger). On top, the overhead terms peer simulators add outside their fitted polynomials:
    ``per_step_s`` (every forward pass), ``prefill_per_stage_s`` / ``decode_per_stage_s`` (× ``pp``
    pipeline stages) and ``per_context_token_s`` (× each request's known tokens: the prompt for a
    prefill, prompt + generated for a decode step — DistServe's Ray overhead).

    Context convention: this project's decode context of a sequence is its prompt plus the tokens
    generated so far, i.e. the KV it holds plus the token being decoded — DistServe's
    ``current_context_len + 1``. ``decode_context_offset`` adapts another convention (−1: a peer
    that fitted on the KV length alone).
    """

    prefill_a_s: float
    prefill_b_s_per_token: float
    prefill_c_s_per_token2: float
    decode_pieces: tuple[tuple[int, float, float, float], ...]
    kv_capacity_tokens: int
    kv_bytes_per_token: int
    transfer_bytes_per_token: int
    egress_bytes_per_s: float
    ingress_bytes_per_s: float
    message_cost_s: float = 0.0
    dollars_per_hour: float = 0.0
    per_step_s: float = 0.0
    pp: int = 1
    prefill_per_stage_s: float = 0.0
    decode_per_stage_s: float = 0.0
    per_context_token_s: float = 0.0
    decode_context_offset: float = 0.0

    def prefill_time_s(self, new_tokens: Sequence[int], cached_tokens: Sequence[int]) -> float:
        """``a + b·Σn + c·Σn(n+2h)`` plus overheads — cached prefix tokens ``h`` add attention work."""
        total = sum(new_tokens)
        quad = sum(n * (n + 2 * h) for n, h in zip(new_tokens, cached_tokens))
        known = total + sum(cached_tokens)
        return (self.per_step_s + self.prefill_per_stage_s * self.pp + self.prefill_a_s
                + self.prefill_b_s_per_token * total + self.prefill_c_s_per_token2 * quad
                + self.per_context_token_s * known)

    def decode_step_lines(self, batch_size: int, tokens_per_seq: int = 1) -> tuple[Line, ...]:
        """One line (the fitted decode model has no kink); a verification step of ``q`` tokens per
        sequence costs the per-sequence term ``q`` times (the context is read once)."""
        piece = self.decode_pieces[-1]
        for candidate in self.decode_pieces:
            if batch_size <= candidate[0]:
                piece = candidate
                break
        _, a, b, c = piece
        intercept = (self.per_step_s + self.decode_per_stage_s * self.pp + a
                     + (c * tokens_per_seq + b * self.decode_context_offset - self.per_context_token_s) * batch_size)
        return ((intercept, b + self.per_context_token_s),)


ACTIVATION_BYTES = 2.0
"""Bytes per activation element in TP all-reduces and pipeline hops (16-bit)."""


@dataclass(frozen=True)
class RooflineCost:
    """Roofline timing of one group: compute roof vs memory roof, plus fixed latencies.

    Built by :func:`build_group_cost`; all rates are already *effective* (peak × efficiency)
    and per pipeline stage. Every term is per layer so a stage's time is proportional to its
    layer count, which keeps pipeline sums and maxima a max of lines in ``C``.
    """

    model: ModelSpec
    num_layers: int
    pp: int
    stage_layers_max: int
    stage_flops_per_s: float
    stage_bytes_per_s: float
    kv_read_bytes_per_token: float
    """KV bytes read per context token per step: the group-held bytes (TP replicas included)."""
    stage_kv_bytes_per_s: float
    """Effective stage bandwidth of decode-time KV reads (peak × kv_read_efficiency)."""
    layer_latency_s: float
    allreduce_s_per_token_layer: float
    """TP all-reduce time per token per layer (two all-reduces; zero on one chip per stage)."""
    step_overhead_s: float
    prefill_overhead_s: float
    pp_hop_s: float
    half_speed_batch: Optional[float]
    kv_capacity_tokens: int
    kv_bytes_per_token: int
    transfer_bytes_per_token: int
    egress_bytes_per_s: float
    ingress_bytes_per_s: float
    message_cost_s: float
    dollars_per_hour: float

    def prefill_time_s(self, new_tokens: Sequence[int], cached_tokens: Sequence[int]) -> float:
        """One prefill iteration: ``max(FLOPs/F, bytes/B) + L·(λ + allreduce·N) + overhead + hops``.

        FLOPs = ``2·active·N + 2·L·heads·head_dim·Σ n(n + 2h)`` (causal attention over the new
        tokens and the ``h`` cached ones, which are read, not recomputed). With ``pp`` stages a
        batch crosses every stage in turn (the latency path; prefill is not micro-batched here).
        """
        n_total = quad = cached = 0
        for n, h in zip(new_tokens, cached_tokens):
            n_total += n
            quad += n * (n + 2 * h)
            cached += h
        if n_total <= 0:
            return 0.0
        flops = self.model.flops_per_token * n_total + 0.5 * self.model.attn_flops_per_context_token * quad
        read = self.model.weight_bytes_read(n_total) + self.kv_read_bytes_per_token * cached
        roof = max(flops / self.stage_flops_per_s, read / self.stage_bytes_per_s)
        fixed = self.num_layers * (self.layer_latency_s + self.allreduce_s_per_token_layer * n_total)
        return roof + fixed + self.step_overhead_s + self.prefill_overhead_s + self.pp_hop_s * (self.pp - 1)

    def _layer_lines(self, seqs: float, tokens_per_seq: int = 1) -> tuple[Line, Line]:
        """Per-layer (compute, memory) lines of a micro-batch of ``seqs`` sequences, each running
        ``tokens_per_seq`` tokens (a speculative verification step), in its context."""
        tokens = seqs * tokens_per_seq
        common = self.layer_latency_s + self.allreduce_s_per_token_layer * tokens
        f, b, n = self.stage_flops_per_s, self.stage_bytes_per_s, self.num_layers
        compute = (tokens * self.model.flops_per_token / n / f + common,
                   tokens_per_seq * self.model.attn_flops_per_context_token / n / f)
        memory = (self.model.weight_bytes_read(tokens) / n / b + common,
                  self.kv_read_bytes_per_token / n / self.stage_kv_bytes_per_s)
        return compute, memory

    def _lines_no_penalty(self, batch_size: int, tokens_per_seq: int = 1) -> list[Line]:
        micro = min(self.pp, batch_size)
        seqs = batch_size / micro
        hops = self.pp_hop_s * self.pp if self.pp > 1 else 0.0
        lines = []
        for a, s in self._layer_lines(seqs, tokens_per_seq):
            # Latency path: a token crosses all stages (sum of stage times) plus the hops.
            lines.append((self.num_layers * a + hops + self.step_overhead_s, self.num_layers * s / micro))
            if self.pp > 1:
                # Throughput bound: `micro` micro-batches share the slowest stage.
                lines.append((micro * self.stage_layers_max * a + self.step_overhead_s, self.stage_layers_max * s))
        return lines

    def decode_step_lines(self, batch_size: int, tokens_per_seq: int = 1) -> tuple[Line, ...]:
        """Step time of ``batch_size`` sequences as a max of lines in their total context ``C``.

        Lines: compute roof and memory roof (each with the per-layer latency), and with
        ``pp > 1`` also the throughput bound of ``min(pp, batch)`` micro-batches on the slowest
        stage. ``half_speed_batch`` adds the stated per-user slowdown ``(b − 1)·t1/half``.
        ``tokens_per_seq`` tokens per sequence: a speculative verification step.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lines = self._lines_no_penalty(batch_size, tokens_per_seq)
        if self.half_speed_batch is not None and batch_size > 1:
            t1 = max(a for a, _ in self._lines_no_penalty(1))
            extra = (batch_size - 1) * t1 / self.half_speed_batch
            lines = [(a + extra, s) for a, s in lines]
        return tuple(upper_envelope(lines))


def kink_contexts(lines: tuple[Line, ...]) -> tuple[float, ...]:
    """Total-context values ``C > 0`` where the maximum switches from one line to the next."""
    env = sorted(lines, key=lambda l: (l[1], l[0]))
    kinks: list[float] = []
    c, cur = 0.0, max(env, key=lambda l: (l[0], l[1]))
    while True:
        best: Optional[tuple[float, Line]] = None
        for line in env:
            if line[1] > cur[1]:
                x = (cur[0] - line[0]) / (line[1] - cur[1])
                if x > c and (best is None or x < best[0]):
                    best = (x, line)
        if best is None:
            return tuple(kinks)
        c, cur = best
        kinks.append(c)


def decode_time_s(cost: GroupCost, batch_size: int, context_tokens: float, steps: int) -> float:
    """Time of ``steps`` decode steps of a fixed batch whose total context starts at
    ``context_tokens`` and grows by ``batch_size`` per step (what a span sums)."""
    (a, s), *rest = cost.decode_step_lines(batch_size)
    cs = _span_contexts(context_tokens, batch_size, steps)
    times = a + s * cs
    for a, s in rest:                       # the max of the lines in place: a calibration asks ~100,000 times
        np.maximum(times, a + s * cs, out=times)
    return float(times.sum())


@functools.lru_cache(maxsize=256)
def _span_contexts(context_tokens: float, batch_size: int, steps: int) -> np.ndarray:
    """The total context at each step of a span (read-only: shared by every cost asked about it)."""
    cs = context_tokens + batch_size * np.arange(steps, dtype=np.float64)
    cs.flags.writeable = False
    return cs


def _held_kv_replication(model: ModelSpec, tp: int) -> float:
    """How many copies of each KV head a TP group holds (TP64 over 8 KV heads: 8)."""
    return tp * math.ceil(model.num_kv_heads / tp) / model.num_kv_heads


def _apply_profile(cost: CostParams, profile: Profile, path: str | Path) -> CostParams:
    changes: dict[str, Any] = {}
    sources = dict(cost.sources)
    for name, value in profile.params.items():
        if name not in CostParams.__dataclass_fields__ or name in ("device", "sources"):
            raise UserError(f"profile {path}: unknown cost parameter {name!r}")
        if sources.get(name, Source(Status.ASSUMED, "")).status is Status.OVERRIDE:
            continue  # the experiment's explicit override wins over the profile
        changes[name] = float(value)
        forced = f"; written with --force past: {'; '.join(profile.forced)}" if profile.forced else ""
        sources[name] = Source(Status.CALIBRATED, f"profile {path} ({profile.source}{forced})")
    return replace(cost, **changes, sources=sources)


def _roofline(group: GroupSpec, spec: ModelSpec, dev: Any, cost: CostParams, pp: int, held_per_token: float,
              shared: Mapping[str, Any]) -> RooflineCost:
    stage_chips = group.count // pp
    if stage_chips > 1:
        ring = 2.0 * (stage_chips - 1) / stage_chips
        allreduce = 2 * ring * spec.hidden_size * ACTIVATION_BYTES / (dev.scale_up_bytes_per_s * cost.link_efficiency)
    else:
        allreduce = 0.0
    return RooflineCost(
        model=spec, num_layers=spec.num_layers, pp=pp,
        stage_layers_max=math.ceil(spec.num_layers / pp),
        stage_flops_per_s=dev.flops_per_s(spec.weight_dtype) * stage_chips * cost.compute_efficiency,
        stage_bytes_per_s=dev.memory_bytes_per_s * stage_chips * cost.memory_efficiency,
        stage_kv_bytes_per_s=dev.memory_bytes_per_s * stage_chips * (cost.kv_read_efficiency or cost.memory_efficiency),
        kv_read_bytes_per_token=held_per_token,
        layer_latency_s=cost.layer_latency_s,
        allreduce_s_per_token_layer=allreduce,
        step_overhead_s=cost.step_overhead_s,
        prefill_overhead_s=cost.prefill_overhead_s,
        pp_hop_s=cost.pp_hop_s,
        half_speed_batch=cost.half_speed_batch,
        **shared,
    )


def build_group_cost(group: GroupSpec, model: ModelSpec | str,
                     overrides: Optional[Mapping[str, Any]] = None,
                     profile: Optional[str | Path] = None, *,
                     extra: CatalogData = CatalogData(),
                     speculation: Optional[Speculation] = None,
                     kv_capacity_tokens: Optional[int] = None) -> GroupCost:
    """The cost model of ``group`` serving ``model``: a :class:`RooflineCost`, or a
    :class:`FittedCost` when ``profile`` is a fitted-coefficient profile; wrapped in a
    :class:`~hetero_sched.speculation.SpeculativeCost` when ``speculation`` is given.

    Overrides are resolved against the catalog plus the experiment's own entries ``extra``
    (:func:`hetero_sched.catalog.resolve_catalog`); a roofline profile's parameters replace the
    catalog's (explicit overrides still win). ``kv_capacity_tokens`` sets the group's KV capacity
    directly instead of deriving it from memory (a peer's measured figure, say). A model whose
    weights do not fit raises UserError saying how many devices it needs.

    Costs of the shipped catalog (no ``profile``, no ``extra``) are remembered per arguments (the
    last 256): a calibration asks for a figure's cost at every fit step, and the figures of one
    group and model share it (~140,000 asks, half of them repeats). A cost is read-only.
    """
    key = shipped_key(overrides, extra) if profile is None else None
    if key is not None:                     # (the other arguments are frozen records: hashable)
        return _build_shipped(group, model, key, speculation, kv_capacity_tokens)
    return _build(resolve_catalog(overrides, extra), group, model, profile, speculation, kv_capacity_tokens)


@functools.lru_cache(maxsize=256)
def _build_shipped(group: GroupSpec, model: ModelSpec | str, key: ShippedKey,
                   speculation: Optional[Speculation], kv_capacity_tokens: Optional[int]) -> GroupCost:
    return _build(resolve_shipped(key), group, model, None, speculation, kv_capacity_tokens)


def _build(cat: Catalog, group: GroupSpec, model: ModelSpec | str, profile: Optional[str | Path],
           speculation: Optional[Speculation], kv_capacity_tokens: Optional[int]) -> GroupCost:
    dev = cat.device(group.device)
    cost = cat.cost(group.device)
    spec = cat.model(model) if isinstance(model, str) else model
    prof = load_profile(profile) if profile is not None else None
    if prof is not None:
        if prof.base_device != group.device:
            raise UserError(f"profile {profile}: calibrated on device {prof.base_device!r}, "
                            f"but the group is {group.device!r}")
        if prof.kind == "roofline":
            cost = _apply_profile(cost, prof, str(profile))

    usable = dev.memory_bytes * group.count * (1.0 - cost.kv_reserve_fraction)
    replication = _held_kv_replication(spec, group.tp)
    held_per_token = spec.kv_bytes_per_token() * replication
    kv_tokens = int((usable - spec.weight_bytes) // held_per_token)
    if kv_tokens < 1 and kv_capacity_tokens is None:
        need = spec.num_devices_for(dev.memory_bytes, cost.kv_reserve_fraction)
        raise UserError(
            f"{spec.name} ({spec.weight_dtype}, {spec.weight_bytes / 1e9:.0f} GB of weights) does not fit in "
            f"{group.count} x {group.device} ({dev.memory_bytes * group.count / 1e9:.0f} GB {dev.memory_kind}, "
            f"{cost.kv_reserve_fraction:.0%} reserved): it needs at least {need} {group.device}")
    shared: dict[str, Any] = dict(
        kv_capacity_tokens=kv_capacity_tokens if kv_capacity_tokens is not None else kv_tokens,
        kv_bytes_per_token=int(round(held_per_token)),
        transfer_bytes_per_token=int(round(spec.kv_bytes_per_token())),
        egress_bytes_per_s=dev.network_bytes_per_s * group.count,
        ingress_bytes_per_s=dev.network_bytes_per_s * group.count,
        message_cost_s=cost.message_cost_s,
        dollars_per_hour=cost.dollars_per_hour * group.count,
    )
    target: GroupCost
    if prof is not None and prof.kind == "fitted":
        if prof.model != spec.name or prof.tp != group.tp or prof.pp != group.pp:
            raise UserError(f"profile {profile}: fitted for {prof.model} tp={prof.tp} pp={prof.pp}, "
                            f"not {spec.name} tp={group.tp} pp={group.pp}")
        target = fitted_cost(prof, str(profile), shared)
    else:
        target = _roofline(group, spec, dev, cost, group.pp, held_per_token, shared)
    if speculation is None:
        return target
    draft: Optional[GroupCost] = None
    capacity = shared["kv_capacity_tokens"]
    transfer = shared["transfer_bytes_per_token"]
    held = shared["kv_bytes_per_token"]
    if speculation.draft_model is not None:
        dspec = cat.model(speculation.draft_model)
        dheld = dspec.kv_bytes_per_token() * _held_kv_replication(dspec, group.tp)
        # The draft lives on one pipeline stage (a small model is not split across systems).
        draft = _roofline(group, dspec, dev, cost, 1, dheld, shared)
        if kv_capacity_tokens is None:
            capacity = speculative_capacity(capacity, held_per_token, dheld, dspec.weight_bytes)
            if capacity < 1:
                raise UserError(f"{spec.name} with draft {dspec.name} does not fit in {group.count} x {group.device}")
        transfer += int(round(dspec.kv_bytes_per_token()))
        held += int(round(dheld))
    return SpeculativeCost(target, speculation, draft, kv_capacity_tokens=capacity, kv_bytes_per_token=held,
                           transfer_bytes_per_token=transfer)


FITTED_TERMS = ("per_step_s", "prefill_per_stage_s", "decode_per_stage_s", "per_context_token_s",
                "decode_context_offset")
"""Optional overhead terms of a fitted profile (see :class:`FittedCost`)."""


def fitted_cost(prof: Profile, where: str, shared: Mapping[str, Any]) -> FittedCost:
    """A :class:`FittedCost` from a fitted profile's parameters (UserError naming a bad one)."""
    params = dict(prof.params)
    try:
        a, b, c = (float(x) for x in params.pop("prefill"))
        pieces = tuple((int(p[0]), float(p[1]), float(p[2]), float(p[3])) for p in params.pop("decode_pieces"))
        terms: dict[str, Any] = {name: float(params.pop(name)) for name in FITTED_TERMS if name in params}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"profile {where}: bad or missing fitted parameter ({exc})") from None
    if params:
        raise UserError(f"profile {where}: unknown fitted parameter {sorted(params)[0]!r}; known: prefill, "
                        f"decode_pieces, {', '.join(FITTED_TERMS)}")
    if not pieces or any(v < 0 for k, v in terms.items() if k != "decode_context_offset"):
        raise UserError(f"profile {where}: needs decode_pieces and non-negative overhead terms")
    cost = FittedCost(prefill_a_s=a, prefill_b_s_per_token=b, prefill_c_s_per_token2=c, decode_pieces=pieces,
                      pp=prof.pp, **shared)
    return replace(cost, **terms)
