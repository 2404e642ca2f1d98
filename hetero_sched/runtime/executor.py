"""The scheduler actor's executor: the core's decisions → batched calls to device-group actors.

The core (in the scheduler actor) tells this object what it planned — spans, cuts, transfers,
departures — and the event loop calls it at three points: before a span's end is applied
(the group's actor runs the span and reports: prefill tokens, decode tokens), before a KV
arrival is applied (the decode actor reads the Arrow blocks by ref and verifies their
checksums), and after each plan (prefill actors export KV for the transfers that started,
groups forget requests that left). One call per span or per batch of requests, never one
per token. ObjectRefs travel as call arguments; msgpack carries the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import ray

from hetero_sched.core.group import Span, SpanKind
from hetero_sched.core.request import RequestState
from hetero_sched.runtime.messages import pack, unpack


@dataclass
class _PlannedSpan:
    token: int
    kind: SpanKind
    payload: list[dict[str, Any]]
    steps: int


@dataclass
class ExecutorStats:
    """What the executor did, for the run summary and the benchmarks."""

    actor_calls: int = 0
    transfers: int = 0
    bytes_moved: int = 0
    import_s: float = 0.0
    min_margin: Optional[float] = None
    call_s: list[float] = field(default_factory=list)


class LiveExecutor:
    """Implements the core's ``ExecutorHooks`` and the engine's ``DriverHooks`` with Ray actors."""

    def __init__(self, actors: list[Any], real_tokens: bool) -> None:
        self.actors = actors
        self.real_tokens = real_tokens
        self.tokens: dict[int, list[int]] = {}
        self.stats = ExecutorStats()
        self._spans: dict[int, _PlannedSpan] = {}
        self._exports: dict[int, list[tuple[int, int, int]]] = {}   # src group -> [(transfer, request, bytes)]
        self._transfers: dict[int, tuple[int, int]] = {}            # transfer -> (request, dst group)
        self._refs: dict[int, ray.ObjectRef] = {}                    # transfer -> Arrow KV in the object store
        self._forget: dict[int, list[int]] = {}
        self._pending: list[ray.ObjectRef] = []

    # --- core hooks ---------------------------------------------------------------------------
    def span_planned(self, group_id: int, span: Span) -> None:
        if span.kind is SpanKind.PREFILL:
            payload = [self._prefill_item(rs) for rs in span.batch]
        else:
            payload = [{"id": rs.request_id, "last": self.tokens[rs.request_id][-1] if self.real_tokens else 0}
                       for rs in span.batch]
        self._spans[group_id] = _PlannedSpan(span.token, span.kind, payload, span.steps)

    def span_cut(self, group_id: int, span: Span) -> None:
        planned = self._spans[group_id]
        planned.token = span.token
        planned.steps = span.steps

    def transfer_started(self, transfer_id: int, rs: RequestState, src: int, dst: int, num_bytes: int) -> None:
        self._exports.setdefault(src, []).append((transfer_id, rs.request_id, num_bytes))
        self._transfers[transfer_id] = (rs.request_id, dst)

    def kv_landed(self, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        self._forget.setdefault(src, []).append(rs.request_id)

    def request_left(self, group_id: int, rs: RequestState, how: str) -> None:
        self._forget.setdefault(group_id, []).append(rs.request_id)

    # --- driver hooks -------------------------------------------------------------------------
    def before_span_end(self, now_s: float, group_id: int, token: int) -> None:
        planned = self._spans.get(group_id)
        if planned is None or planned.token != token:
            return                                              # a stale end: the span was cut
        del self._spans[group_id]
        actor = self.actors[group_id]
        if planned.kind is SpanKind.PREFILL:
            ref = actor.prefill.remote(pack("prefill", span=token, requests=planned.payload))
            report = unpack(self._get(ref), "prefill_report")
        else:
            ref = actor.decode.remote(pack("decode", span=token, steps=planned.steps, joiners=planned.payload))
            report = unpack(self._get(ref), "decode_report")
        for rid, toks in report["tokens"].items():
            self.tokens.setdefault(int(rid), []).extend(toks)
        for m in report["margins"].values():
            if self.stats.min_margin is None or m < self.stats.min_margin:
                self.stats.min_margin = m

    def before_kv_arrival(self, now_s: float, transfer_id: int) -> None:
        rid, dst = self._transfers.pop(transfer_id)
        ref = self._refs.pop(transfer_id)
        msg = pack("import", requests=[{"id": rid, "transfer": transfer_id}])
        report = unpack(self._get(self.actors[dst].import_kv.remote(msg, [ref])), "import_report")
        self.stats.transfers += 1
        self.stats.bytes_moved += report["bytes"]
        self.stats.import_s += report["decode_s"]
        del ref                                                 # the scheduler's reference goes now

    def after_plan(self, now_s: float) -> None:
        for src, items in self._exports.items():
            msg = pack("export", requests=[{"id": rid, "true_bytes": int(nbytes)} for _, rid, nbytes in items])
            refs = self._get(self.actors[src].export_kv.remote(msg))
            for (tid, _, _), ref in zip(items, refs):
                self._refs[tid] = ref
        self._exports.clear()
        for gid, ids in self._forget.items():
            self._pending.append(self.actors[gid].forget.remote(pack("forget", ids=ids)))
            self.stats.actor_calls += 1
        self._forget.clear()
        if len(self._pending) > 64:
            ray.get(self._pending)
            self._pending.clear()

    def finish(self) -> None:
        """Wait for every outstanding call; afterwards no actor should hold any request."""
        self.after_plan(0.0)
        ray.get(self._pending)
        self._pending.clear()

    def _prefill_item(self, rs: RequestState) -> dict[str, Any]:
        r = rs.request
        return {"id": rs.request_id, "prompt": r.prompt_tokens, "cached": rs.cached_tokens,
                "generated": list(self.tokens.get(rs.request_id, ())) if self.real_tokens else [],
                "hashes": list(r.prefix_hashes) if r.prefix_hashes else None, "block": r.prefix_block_tokens}

    def _get(self, ref: ray.ObjectRef) -> Any:
        t0 = time.perf_counter()
        out = ray.get(ref)
        self.stats.call_s.append(time.perf_counter() - t0)
        self.stats.actor_calls += 1
        return out
