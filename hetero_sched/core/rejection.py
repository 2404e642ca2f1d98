"""Why a request is turned away: short reason codes, and what no group can ever serve.

A rejection keeps a sentence for a person (``requests.parquet``, the decision log, the trace)
and a short code (:class:`~hetero_sched.policies.base.RejectCode`), so a summary groups thousands of distinct sentences
("prompt of 191,040 tokens ...", one per token count) into a handful of kinds with counts.

:func:`infeasible` is the arrival check (vLLM rejects a prompt longer than the model's window
before scheduling it): a request that no group could ever hold — beyond the model's context
window, or more KV than the largest group of a role holds even when empty — is rejected at
once, instead of being prefilled and only then found not to fit anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from hetero_sched.core.group import GroupState
from hetero_sched.policies.base import RejectCode


@dataclass(frozen=True)
class Capacity:
    """The most a request may hold anywhere, fixed for a run: the model's context window and,
    per role, the largest KV (tokens) of a group that may take that role."""

    max_context_tokens: Optional[int]
    prefill_tokens: int
    prefill_group: str
    decode_tokens: int
    decode_group: str


def capacity(groups: Sequence[GroupState], any_role: bool, max_context_tokens: Optional[int]) -> Capacity:
    """Largest KV per role over ``groups`` (every group for both roles if ``any_role``: a
    policy that switches roles or falls back may use any group for either)."""
    prefill = [g for g in groups if any_role or g.role.can_prefill]
    decode = [g for g in groups if any_role or g.role.can_decode]
    p = max(prefill, key=_kv_tokens, default=None)
    d = max(decode, key=_kv_tokens, default=None)
    return Capacity(max_context_tokens, 0 if p is None else _kv_tokens(p), "" if p is None else p.name,
                    0 if d is None else _kv_tokens(d), "" if d is None else d.name)


def _kv_tokens(g: GroupState) -> int:
    return g.kv.num_blocks * g.limits.block_size


def infeasible(cap: Capacity, prompt_tokens: int, predicted_output: int,
               max_tokens: Optional[int]) -> Optional[tuple[str, str]]:
    """``(code, reason)`` if no group could ever serve this request, else None.

    The context window must hold the prompt and one generated token (and the request's
    ``max_tokens``, if it states one, as vLLM checks); a prefill group must hold the prompt's
    KV; a decode group must hold the reservation it would make — prompt plus predicted output.
    """
    window = cap.max_context_tokens
    if window is not None:
        if prompt_tokens + 1 > window:
            return (RejectCode.CONTEXT_TOO_LONG, f"prompt of {prompt_tokens:,} tokens does not fit the model's "
                                                 f"{window:,}-token context window")
        if max_tokens is not None and prompt_tokens + max_tokens > window:
            return (RejectCode.CONTEXT_TOO_LONG, f"prompt of {prompt_tokens:,} tokens plus max_tokens {max_tokens:,} "
                                                 f"exceeds the model's {window:,}-token context window")
    if prompt_tokens + 1 > cap.prefill_tokens:
        return (RejectCode.KV_CAPACITY, f"prompt of {prompt_tokens:,} tokens exceeds the KV capacity of every "
                                        f"group that can prefill (largest: {cap.prefill_group}, "
                                        f"{cap.prefill_tokens:,} tokens)")
    need = prompt_tokens + max(predicted_output, 1)
    if need > cap.decode_tokens:
        return (RejectCode.KV_CAPACITY, f"prompt of {prompt_tokens:,} tokens plus {predicted_output:,} predicted "
                                        f"output tokens exceed the KV capacity of every group that can decode "
                                        f"(largest: {cap.decode_group}, {cap.decode_tokens:,} tokens)")
    return None
