"""The placement question and its answer: :class:`RequestInfo` (what a policy may know about a
request) and :class:`Placement` (where it goes).

Compiled with the core (re-exported by :mod:`hetero_sched.policies`). Both are made on the hot
path — two RequestInfo and one Placement per request — and were NamedTuples: a tuple subclass
is made through ``tuple.__new__`` and its own interpreted ``__new__``, ~1,700 instructions each,
and with the policy's call around them they were a sixth of a run. As compiled classes the
scheduler builds a RequestInfo as a plain store of its fields, and reads a Placement's fields
without unpacking a tuple. They compare, hash and print as the NamedTuples did; they are
read-only by contract (no policy writes to them), not by enforcement.
"""

from __future__ import annotations

from typing import Any, Final, Optional

_INFO_FIELDS: Final = ("request_id", "arrival_s", "prompt_tokens", "predicted_output", "prefix_hashes",
                       "prefix_block_tokens", "prefill_group", "generated")
_PLACEMENT_FIELDS: Final = ("prefill_group", "decode_group")


class RequestInfo:
    """What a policy may know about a request (made twice per request, by the scheduler)."""

    __slots__ = ("request_id", "arrival_s", "prompt_tokens", "predicted_output", "prefix_hashes",
                 "prefix_block_tokens", "prefill_group", "generated")

    def __init__(self, request_id: int, arrival_s: float, prompt_tokens: int, predicted_output: int,
                 prefix_hashes: Optional[tuple[int, ...]] = None, prefix_block_tokens: int = 512,
                 prefill_group: Optional[int] = None, generated: int = 0) -> None:
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        """Tokens to prefill (after a preemption: prompt plus tokens already generated)."""
        self.predicted_output = predicted_output
        self.prefix_hashes = prefix_hashes
        self.prefix_block_tokens = prefix_block_tokens
        self.prefill_group = prefill_group
        """Where it was prefilled (set when :meth:`Policy.place_decode` is asked)."""
        self.generated = generated
        """Tokens it had generated before this prefill (after a preemption; part of ``prompt_tokens``)."""

    def fields(self) -> tuple[Any, ...]:
        """Its values, in the constructor's order."""
        return (self.request_id, self.arrival_s, self.prompt_tokens, self.predicted_output, self.prefix_hashes,
                self.prefix_block_tokens, self.prefill_group, self.generated)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestInfo):
            return NotImplemented
        return self.fields() == other.fields()

    def __hash__(self) -> int:
        return hash(self.fields())

    def __repr__(self) -> str:
        return _repr("RequestInfo", _INFO_FIELDS, self.fields())

    def _replace(self, **changes: Any) -> RequestInfo:
        """A copy with ``changes`` (as a NamedTuple's ``_replace``)."""
        return RequestInfo(**_changed(_INFO_FIELDS, self.fields(), changes))


class Placement:
    """Where a request prefills, and (optionally, now) where it decodes.

    The fields are untyped on purpose: a policy may return anything, and the scheduler checks
    that they are group ids (a one-line error naming the policy, not a TypeError inside it).
    """

    __slots__ = ("prefill_group", "decode_group")

    def __init__(self, prefill_group: Any, decode_group: Any = None) -> None:
        self.prefill_group: Any = prefill_group
        self.decode_group: Any = decode_group
        """None: decided when prefill finishes (:meth:`Policy.place_decode`)."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self.prefill_group == other.prefill_group and self.decode_group == other.decode_group

    def __hash__(self) -> int:
        return hash((self.prefill_group, self.decode_group))

    def __repr__(self) -> str:
        return _repr("Placement", _PLACEMENT_FIELDS, (self.prefill_group, self.decode_group))

    def _replace(self, **changes: Any) -> Placement:
        """A copy with ``changes`` (as a NamedTuple's ``_replace``)."""
        return Placement(**_changed(_PLACEMENT_FIELDS, (self.prefill_group, self.decode_group), changes))


def _repr(name: str, names: tuple[str, ...], values: tuple[Any, ...]) -> str:
    """``Name(field=value, ...)``, as a NamedTuple prints."""
    return f"{name}({', '.join(f'{n}={v!r}' for n, v in zip(names, values))})"


def _changed(names: tuple[str, ...], values: tuple[Any, ...], changes: dict[str, Any]) -> dict[str, Any]:
    """The fields ``names`` with ``values``, ``changes`` applied (ValueError for an unknown name)."""
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise ValueError(f"Got unexpected field names: {unknown!r}")
    return {**dict(zip(names, values)), **changes}
