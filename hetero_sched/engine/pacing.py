"""The modeled device's own timeline: how long it holds a span, and where a cut stops it.

A modeled device is the cost model run by the device itself: a decode step takes the
model's ``a + s·context`` seconds, times the device's own factor — ``1 / device_speed``, and a
seeded per-span jitter — so a device can be slower or noisier than the model the core plans
with (for tests, benchmarks and what-if runs). Scaling the step-time line keeps every span in
closed form, with the core's own functions (``core/spans.py``): at factor 1 the device's
timeline is the core's plan to the bit, which is what makes a virtual-clock live run equal
the simulator *through the devices' reports*.

The Ray device actors (``runtime/actors.py``) run it on the wall or virtual clock; the
simulator's lagged virtual devices (``engine/lagged.py``) run it behind a modeled control plane.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from hetero_sched.core.spans import Span, SpanKind, SpanReport, decode_span_duration, steps_until


MIN_JITTER_FACTOR = 0.05
"""A jittered span takes at least this fraction of its modeled time (a normal draw is unbounded)."""


@dataclass(frozen=True)
class DevicePace:
    """How a modeled device departs from the cost model: ``speed`` (0.8: 20% slower), ``jitter``
    (relative standard deviation of each span's duration, seeded), and injected faults."""

    speed: float = 1.0
    jitter: float = 0.0
    seed: int = 0
    short_steps: int = 0
    """Fault injection: every decode span of two or more steps stops this many steps short."""

    def bounds(self) -> tuple[float, float]:
        """The least and the most seconds the device takes per modeled second, over all spans
        (``inf``: unbounded). A report is never earlier than the least allows: the engine need
        not wait for a span's report before that (virtual clock)."""
        f = 1.0 / self.speed
        return (f * MIN_JITTER_FACTOR, math.inf) if self.jitter > 0 else (f, f)

    def factor(self, group_id: int, span_id: int) -> float:
        """Seconds the device takes per modeled second, for one span."""
        f = 1.0 / self.speed
        if self.jitter > 0:
            rng = np.random.default_rng([self.seed, group_id, span_id, zlib.crc32(b"jitter")])
            f *= max(MIN_JITTER_FACTOR, 1.0 + self.jitter * float(rng.standard_normal()))
        return f


def device_steps(planned: int, short_steps: int) -> int:
    """Decode steps a device makes of ``planned`` when it stops ``short_steps`` short (a fault
    injected into spans of two or more steps)."""
    return max(1, planned - short_steps) if short_steps and planned >= 2 else planned


@dataclass
class Timeline:
    """One span on a device's clock: when it started, its scaled step-time line, its steps."""

    kind: str
    start_s: float
    steps: int
    line: tuple[float, float] = (0.0, 0.0)
    context0: int = 0
    batch_size: int = 0
    duration_s: float = 0.0
    """Prefill and mixed spans: the whole span's (scaled) duration."""

    @staticmethod
    def of(span: dict[str, Any], start_s: float, factor: float, short_steps: int = 0) -> "Timeline":
        """The timeline of a span message on a device that takes ``factor`` s per modeled s."""
        if span["kind"] != "decode":
            return Timeline(span["kind"], start_s, span["steps"], duration_s=span["duration_s"] * factor)
        a, s = span["line"]
        return Timeline("decode", start_s, device_steps(span["steps"], short_steps), (a * factor, s * factor),
                        span["context0"], span["batch_size"])

    @staticmethod
    def of_span(span: Span, start_s: float, factor: float = 1.0, short_steps: int = 0) -> "Timeline":
        """The timeline of a core's span on a device that takes ``factor`` s per modeled s (at 1.0:
        runs it as modeled), from ``start_s``."""
        if span.kind is not SpanKind.DECODE:
            return Timeline(span.kind.value, start_s, span.planned_steps, duration_s=span.duration_s * factor)
        a, s = span.line
        return Timeline("decode", start_s, device_steps(span.planned_steps, short_steps), (a * factor, s * factor),
                        span.context0, span.batch_size)

    def end_s(self, steps: Optional[int] = None) -> float:
        """When step ``steps`` (default: the last) ends."""
        if self.kind != "decode":
            return self.start_s + self.duration_s
        k = self.steps if steps is None else steps
        return self.start_s + decode_span_duration(self.line, self.context0, self.batch_size, k)

    def step_end_s(self, j: int) -> float:
        """When decode step ``j`` (1-based) ends."""
        return self.start_s + decode_span_duration(self.line, self.context0, self.batch_size, j)

    def steps_done_by(self, t_s: float) -> int:
        """Decode steps whose end is at or before ``t_s`` (a streaming device reports those)."""
        if self.kind != "decode" or t_s < self.step_end_s(1):
            return 0
        j = min(self.steps, steps_until(self.line, self.context0, self.batch_size, t_s - self.start_s))
        return j if self.step_end_s(j) <= t_s else j - 1

    def stop_at(self, at_s: float) -> int:
        """The first step boundary at or after ``at_s`` (a cut): the steps the span then makes."""
        if self.kind != "decode" or at_s <= self.start_s:
            return min(self.steps, 1) if self.kind == "decode" else self.steps
        return min(self.steps, steps_until(self.line, self.context0, self.batch_size, at_s - self.start_s))

    def report(self, steps: int, end_s: Optional[float] = None) -> dict[str, float]:
        """The span report's times after ``steps`` steps (``end_s``: measured, when not modeled)."""
        end = self.end_s(steps) if end_s is None else end_s
        if self.kind != "decode":
            return {"start_s": self.start_s, "end_s": end, "steps": steps,
                    "first_step_end_s": end, "max_step_s": end - self.start_s}
        a, s = self.line
        c0 = self.context0
        return {"start_s": self.start_s, "end_s": end, "steps": steps,
                "first_step_end_s": self.start_s + a + s * c0,
                "max_step_s": max(a + s * c0, a + s * (c0 + self.batch_size * (steps - 1)))}


def earliest_end(span: Span, factor_lo: float, factor_hi: float, short_steps: int = 0,
                 cut_at_s: Optional[float] = None) -> float:
    """The earliest a device whose factor lies in ``[factor_lo, factor_hi]`` can report ``span``
    ending (cut at ``cut_at_s``, if cut; ``short_steps``: it may stop that many decode steps
    short). Exact when the two factors are equal: such a device runs the model scaled."""
    fastest = Timeline.of_span(span, span.start_s, factor_lo, short_steps)
    if cut_at_s is None or span.kind is not SpanKind.DECODE:
        return fastest.end_s()
    # the first boundary at or after the cut: the slowest device reaches it in the fewest steps
    fewest = 1 if math.isinf(factor_hi) else \
        Timeline.of_span(span, span.start_s, factor_hi, short_steps).stop_at(cut_at_s)
    return fastest.end_s(min(fastest.steps, fewest))


def span_report(span: Span, times: dict[str, float]) -> SpanReport:
    """``span``'s :class:`SpanReport` from a report's times (:meth:`Timeline.report`)."""
    return SpanReport(span.group_id, span.span_id, float(times["start_s"]), float(times["end_s"]),
                      int(times["steps"]), float(times["first_step_end_s"]), float(times["max_step_s"]))


def measured_report(start_s: float, step_ends_s: list[float], kind: str) -> dict[str, float]:
    """A span report from the times a real backend measured (one end per step)."""
    end = step_ends_s[-1] if step_ends_s else start_s
    if kind != "decode":
        return {"start_s": start_s, "end_s": end, "steps": 1, "first_step_end_s": end, "max_step_s": end - start_s}
    gaps = np.diff([start_s, *step_ends_s])
    return {"start_s": start_s, "end_s": end, "steps": len(step_ends_s),
            "first_step_end_s": step_ends_s[0], "max_step_s": float(gaps.max()) if len(gaps) else 0.0}


def finite_positive(value: float, what: str) -> float:
    """``value`` if finite and > 0 (a device knob), else ValueError naming ``what``."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be finite and > 0, got {value}")
    return value
