"""The event loop shared by the simulator and the live runtime.

It feeds the scheduler events in the contract's order (§2), hands the spans it plans to the
devices, and applies what the devices report. Transfers are modeled in the core (one event per
rate change); arrivals are pulled from the workload one at a time, so a million-request run
never holds a million events. With virtual devices (the simulator) a span is one event at its
planned end; with Ray devices (the runtime) a span ends when its device says so.
"""

from __future__ import annotations

import gc
from typing import Callable, Iterable, Optional

from hetero_sched.core.events import Event, EventQueue, Kind
from hetero_sched.core.request import Request
from hetero_sched.core.scheduler import Scheduler
from hetero_sched.engine.devices import Devices

ProgressFn = Callable[[int], None]
"""Called with the number of requests finished so far (every few thousand events)."""


def run_events(scheduler: Scheduler, requests: Iterable[Request], progress: Optional[ProgressFn] = None,
               progress_every: int = 20000, devices: Optional[Devices] = None,
               clock: Optional[Callable[[float], float]] = None) -> float:
    """Run the workload to the end on ``devices`` (default: virtual); returns the last event's time.

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
        return _loop(scheduler, requests, progress, progress_every,
                     devices if devices is not None else Devices(), clock)
    finally:
        if gc_was_enabled:
            gc.enable()


def _loop(scheduler: Scheduler, requests: Iterable[Request], progress: Optional[ProgressFn],
          progress_every: int, devices: Devices, clock: Optional[Callable[[float], float]]) -> float:
    queue = EventQueue()
    it = iter(requests)
    nxt = next(it, None)
    if nxt is not None:
        queue.push(nxt.arrival_s, Kind.ARRIVAL, nxt)
    now = 0.0
    events = 0
    network: Optional[Event] = None     # the pending TRANSFER event (at most one is kept)
    while True:
        changed = devices.wait(queue)
        if changed is not None:                     # a device failed meanwhile: decide again
            now = max(now, changed)
            network = _plan(now, scheduler, devices, queue, network)
            continue
        if not len(queue):
            break
        event = queue.pop()                         # (reused by the next push: read it now)
        now = event.time_s
        kind = event.kind
        payload = event.payload
        if clock is not None:
            now = clock(now)
        if kind == Kind.SPAN_END:
            report = devices.report(now, payload)
            if report is not None:
                scheduler.on_span_end(now, report)
        elif kind == Kind.ARRIVAL:
            scheduler.on_arrival(now, payload)
            nxt = next(it, None)
            if nxt is not None:
                queue.push(nxt.arrival_s, Kind.ARRIVAL, nxt)
        elif kind == Kind.KV_ARRIVAL:
            if devices.kv_ready(now, payload):
                scheduler.on_kv_arrival(now, payload)
        else:
            network = None
            for t, k, p in scheduler.on_transfer(now, payload):
                queue.push(t, k, p)
        if not queue.due_by(now):                  # decisions run after every event of a time
            network = _plan(now, scheduler, devices, queue, network)
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


def _plan(now: float, scheduler: Scheduler, devices: Devices, queue: EventQueue,
          network: Optional[Event]) -> Optional[Event]:
    """The decisions of ``now``: spans go to their devices, other timers into the queue (again
    while a device reports news as the decisions go out: an actor found dead).

    ``network`` is the pending ``TRANSFER`` event, if any; returns the one pending after. The
    network's next change supersedes the pending one, which is moved rather than left stale
    (with hundreds of transfers in flight a new one starts before the last change is due: a
    stale event per transfer, popped for nothing, and hundreds of them deepening the heap).
    """
    while True:
        for t, k, p in scheduler.plan(now):
            if k == Kind.SPAN_END:
                devices.dispatch(now, p, queue)
            elif k == Kind.TRANSFER:
                network = queue.push_or_move(network, t, k, p)
            else:
                queue.push(t, k, p)
        if not devices.after_plan(now) or not scheduler.needs_plan():
            return network
