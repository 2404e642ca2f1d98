"""The discrete-event driver: the simulator's executor is virtual time itself.

It feeds the scheduler events in the contract's order and sets the timers its plans return;
a span is one event, a transfer's progress one event per rate change. Arrivals are pulled from
the workload one at a time, so a million-request run never holds a million events.
"""

from __future__ import annotations

import gc
from typing import Callable, Iterable, Optional, Protocol

from hetero_sched.core.events import EventQueue, Kind
from hetero_sched.core.scheduler import Scheduler
from hetero_sched.workload import Request

ProgressFn = Callable[[int], None]
"""Called with the number of requests finished so far (every few thousand events)."""


class DriverHooks(Protocol):
    """Where a live driver does real work in virtual time (the simulator passes none).

    ``before_span_end`` runs the span on its actor (which reports instead of sleeping);
    ``before_kv_arrival`` makes sure the KV bytes really landed — or returns a later time to be
    asked again then, when their check is still under way (the arrival waits, the loop goes on);
    ``after_plan`` flushes the batched calls a plan produced. Stale span ends are passed too: the
    hooks ignore them.
    """

    def before_span_end(self, now_s: float, group_id: int, token: int) -> None: ...
    def before_kv_arrival(self, now_s: float, transfer_id: int) -> Optional[float]: ...
    def after_plan(self, now_s: float) -> None: ...


def run_events(scheduler: Scheduler, requests: Iterable[Request],
               progress: Optional[ProgressFn] = None, progress_every: int = 20000,
               hooks: Optional[DriverHooks] = None,
               clock: Optional[Callable[[float], float]] = None) -> float:
    """Run the workload to the end; returns the time of the last event.

    ``clock`` (the live runtime's wall clock) maps an event's planned time to the time it is
    applied at; without one, time is virtual and every event is applied at its planned time.

    Raises RuntimeError if requests remain unfinished when no event is left (a core bug: the
    contract says every request ends completed or rejected).
    """
    # The loop allocates millions of short-lived tuples but builds no reference cycles, so
    # the cyclic collector only costs time here (~20%); refcounting frees everything anyway.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _loop(scheduler, requests, progress, progress_every, hooks, clock)
    finally:
        if gc_was_enabled:
            gc.enable()


def _loop(scheduler: Scheduler, requests: Iterable[Request], progress: Optional[ProgressFn],
          progress_every: int, hooks: Optional[DriverHooks],
          clock: Optional[Callable[[float], float]]) -> float:
    queue = EventQueue()
    it = iter(requests)
    nxt = next(it, None)
    if nxt is not None:
        queue.push(nxt.arrival_s, Kind.ARRIVAL, nxt)
    now = 0.0
    events = 0
    on_arrival, on_span_end = scheduler.on_arrival, scheduler.on_span_end
    on_transfer, on_kv_arrival, plan = scheduler.on_transfer, scheduler.on_kv_arrival, scheduler.plan
    while len(queue):
        now, _, _, kind, payload = queue.pop()
        if clock is not None:
            now = clock(now)
        if kind == Kind.SPAN_END:
            if hooks is not None:
                hooks.before_span_end(now, payload[0], payload[1])
            on_span_end(now, payload[0], payload[1])
        elif kind == Kind.ARRIVAL:
            on_arrival(now, payload)
            nxt = next(it, None)
            if nxt is not None:
                queue.push(nxt.arrival_s, Kind.ARRIVAL, nxt)
        elif kind == Kind.KV_ARRIVAL:
            again = hooks.before_kv_arrival(now, payload) if hooks is not None else None
            if again is None:
                on_kv_arrival(now, payload)
            else:
                queue.push(again, Kind.KV_ARRIVAL, payload)
        else:
            for t, k, p in on_transfer(now, payload):
                queue.push(t, k, p)
        next_time = queue.peek_time()
        if next_time is None or next_time > now:   # decisions run after every event of a time
            for t, k, p in plan(now):
                queue.push(t, k, p)
            if hooks is not None:
                hooks.after_plan(now)
                while scheduler.needs_plan():       # a hook reported news (an actor died)
                    for t, k, p in plan(now):
                        queue.push(t, k, p)
                    hooks.after_plan(now)
        events += 1
        if progress is not None and events % progress_every == 0:
            progress(len(scheduler.records))
    if scheduler.num_active:
        stuck = scheduler.num_active
        where = "; ".join(f"{rid}: {at}" for rid, at in sorted(scheduler.whereabouts().items())[:5])
        raise RuntimeError(f"simulation ended with {stuck} unfinished request(s): core bug ({where or 'held nowhere'})")
    if progress is not None:
        progress(len(scheduler.records))
    return now
