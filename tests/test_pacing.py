"""A modeled device's timeline and the earliest end the engine may count on (engine/pacing.py).

The live runtime's virtual clock runs ahead of the devices' reports up to each span's earliest
possible end (:func:`earliest_end`); a bound that is too late would make the engine apply a
report after its time has passed, so it is checked here against the device's own timeline.
"""

from __future__ import annotations

import math

import numpy as np

from hetero_sched.core.spans import Span, SpanKind
from hetero_sched.engine.pacing import DevicePace, Timeline, earliest_end


def _span(rng: np.random.Generator, kind: SpanKind) -> Span:
    steps = int(rng.integers(1, 40)) if kind is SpanKind.DECODE else 1
    line = (float(rng.uniform(1e-4, 3e-2)), float(rng.uniform(0.0, 1e-6)))
    start = float(rng.uniform(0.0, 100.0))
    return Span(0, int(rng.integers(1 << 20)), kind, start, float(rng.uniform(1e-6, 2.0)), steps, [],
                line=line, batch_size=int(rng.integers(1, 256)), context0=int(rng.integers(0, 50_000)))


def _device_end(span: Span, factor: float, short_steps: int, cut_at_s: float | None) -> float:
    """Where the device actor's span ends: its timeline at its factor, cut as the actor cuts."""
    msg = {"kind": span.kind.value, "steps": span.planned_steps, "duration_s": span.duration_s,
           "line": list(span.line), "context0": span.context0, "batch_size": span.batch_size}
    tl = Timeline.of(msg, span.start_s, factor, short_steps)
    steps = tl.steps if cut_at_s is None else min(tl.steps, tl.stop_at(cut_at_s))
    return tl.end_s(steps)


def test_no_device_reports_a_span_before_its_earliest_end():
    """Random spans, devices anywhere in their declared factor range (jittered ones unbounded
    above), stopping short or cut anywhere: the report never precedes the bound."""
    rng = np.random.default_rng(13)
    for _ in range(4000):
        kind = SpanKind.DECODE if rng.random() < 0.8 else SpanKind.PREFILL
        span = _span(rng, kind)
        pace = DevicePace(speed=float(rng.uniform(0.3, 3.0)), jitter=float(rng.choice([0.0, 0.2, 0.5])),
                          seed=int(rng.integers(100)), short_steps=int(rng.choice([0, 0, 1, 3])))
        lo, hi = pace.bounds()
        factor = pace.factor(0, span.span_id)
        assert lo <= factor <= hi
        if rng.random() < 0.3:          # any device promising a finite range (a real engine's)
            lo, hi = factor * float(rng.uniform(0.5, 1.0)), factor / float(rng.uniform(0.5, 1.0))
        planned = Timeline.of_span(span, span.start_s).end_s()
        cut = None if rng.random() < 0.4 else float(rng.uniform(span.start_s - 1.0, planned + 1.0))
        bound = earliest_end(span, lo, hi, pace.short_steps, cut_at_s=cut)
        assert _device_end(span, factor, pace.short_steps, cut) >= bound


def test_the_bound_is_the_end_itself_for_a_device_without_jitter():
    """No jitter: the device runs the model scaled by a known factor, so the engine knows each
    report's time exactly and waits for nothing earlier (the lookahead is the whole span)."""
    rng = np.random.default_rng(14)
    for _ in range(2000):
        span = _span(rng, SpanKind.DECODE if rng.random() < 0.8 else SpanKind.PREFILL)
        lo, hi = DevicePace(speed=float(rng.uniform(0.3, 3.0))).bounds()
        assert lo == hi
        cut = None if rng.random() < 0.5 else float(rng.uniform(span.start_s, span.end_s + 0.5))
        assert earliest_end(span, lo, hi, 0, cut_at_s=cut) == _device_end(span, lo, 0, cut)


def test_a_jittered_device_promises_a_floor_only():
    lo, hi = DevicePace(speed=0.5, jitter=0.3).bounds()
    assert lo == 2.0 * 0.05 and math.isinf(hi)
