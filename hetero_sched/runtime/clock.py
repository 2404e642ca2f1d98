"""The wall clock: the live runtime's time, as opposed to the simulator's virtual time.

Run time ``t`` (seconds) is ``t × time_scale`` wall seconds after the run's origin. The event
loop asks the clock for "now" before applying a timer planned at ``t`` (an arrival, a modeled
KV transfer's end): the clock sleeps until then and returns the time it really is. Spans are
not timers on this clock: devices hold them on their own clocks and report when they ended
(``runtime/devices.py``), and the devices' ``wait`` sleeps until the next timer or report.
Whatever makes the loop late — actor calls, KV bytes through the object store, the loop's
own work — shows as lateness, and the core sees it, as a real scheduler would.
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

    def now(self) -> float:
        """The run time it is now (anchoring the clock here if unset)."""
        if self._t0 is None:
            self._t0 = time.monotonic()
        return (time.monotonic() - self._t0) / self.time_scale

    def seconds_until(self, t_s: float) -> float:
        """Wall seconds from now until run time ``t_s`` (negative: past)."""
        if self._t0 is None:
            self._t0 = time.monotonic() - t_s * self.time_scale
        return self._t0 + t_s * self.time_scale - time.monotonic()

    def __call__(self, planned_s: float) -> float:
        if self._t0 is None:
            self._t0 = time.monotonic() - planned_s * self.time_scale
        wait = self._t0 + planned_s * self.time_scale - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = (time.monotonic() - self._t0) / self.time_scale
        self.lateness_s.append(now - planned_s)
        return max(now, planned_s)
