"""The wall clock: the live runtime's time, as opposed to the simulator's virtual time.

The event loop asks the clock for "now" before applying an event planned at virtual time
``t``: the wall clock sleeps until ``t × time_scale`` wall seconds after the start, then
returns the time it really is (in virtual seconds). Everything the loop and the actors do —
actor calls, numpy compute, KV bytes through the object store — makes that later than
``t``: that lateness is the runtime's overhead, and the core sees it, as a real scheduler
would. A span is thus one interruptible sleep (a cut simply moves its end).
"""

from __future__ import annotations

import time


class WallClock:
    """``clock(t_virtual) -> now_virtual`` that paces the loop in real time."""

    def __init__(self, time_scale: float = 1.0, origin_unix_s: float | None = None) -> None:
        """``origin_unix_s``: the Unix time of virtual time 0 (a restarted scheduler keeps its
        run's timeline); None: the first event's planned time is when it is first asked."""
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.time_scale = time_scale
        self._t0: float | None = None if origin_unix_s is None else time.monotonic() - (time.time() - origin_unix_s)
        self.lateness_s: list[float] = []
        """Virtual seconds each event was applied after its planned time."""

    def origin_unix_s(self, first_planned_s: float) -> float:
        """The Unix time of virtual time 0, anchoring the clock (``first_planned_s`` is now) if unset."""
        if self._t0 is None:
            self._t0 = time.monotonic() - first_planned_s * self.time_scale
        return time.time() - (time.monotonic() - self._t0)

    def __call__(self, planned_s: float) -> float:
        if self._t0 is None:
            self._t0 = time.monotonic() - planned_s * self.time_scale
        wait = self._t0 + planned_s * self.time_scale - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = (time.monotonic() - self._t0) / self.time_scale
        self.lateness_s.append(now - planned_s)
        return max(now, planned_s)
