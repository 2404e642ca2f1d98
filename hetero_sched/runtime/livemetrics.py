"""Live metrics of a running experiment, through Ray's metrics API (``ray.util.metrics``).

The scheduler actor updates these gauges from the core's state at most every
``interval_s`` wall seconds; Ray's metrics agent on its node serves them in Prometheus format
(names get Ray's ``ray_`` prefix), next to Ray's own metrics, so a Prometheus/Grafana set up
for Ray picks them up with no extra configuration. Names and tags (README "Live metrics"):

====================================  =====================  =========================================
``hetero_queue_depth``                group, queue           requests waiting for prefill / for decode
                                                             admission, and decoding (``running``)
``hetero_kv_blocks``                  group, state           KV blocks ``used`` / ``free``
``hetero_link_backlog_bytes``         group                  modeled KV bytes still to leave the group
``hetero_inflight_requests``          —                      accepted, not yet completed or rejected
``hetero_finished_requests``          status                 completed / rejected so far
``hetero_ttft_seconds``               quantile               rolling p50/p90 over the last ``window``
``hetero_tpot_seconds``               quantile               same, for TPOT
``hetero_slo_attainment``             —                      rolling share meeting both SLOs
====================================  =====================  =========================================

Times are the scheduler's clock (virtual seconds; scaled wall seconds on the wall clock).
"""

from __future__ import annotations

import time
import numpy as np
from ray.util.metrics import Gauge

from hetero_sched.core.scheduler import Scheduler
from hetero_sched.metrics import SLO, meets_slo, records_table


class LiveMetrics:
    """Gauges fed from a :class:`Scheduler`; call :meth:`update` often, it rate-limits itself."""

    def __init__(self, scheduler: Scheduler, slo: SLO, *, experiment: str, interval_s: float = 0.5,
                 window: int = 200) -> None:
        self.scheduler = scheduler
        self.slo = slo
        self.interval_s = interval_s
        self.window = window
        self._last = -float("inf")
        self._counted = 0                                   # records already counted by status
        self._finished = {"completed": 0, "rejected": 0}
        self._defaults = {"experiment": experiment}
        keys = ("experiment",)
        self.queue_depth = Gauge("hetero_queue_depth", "Requests per queue of a device group",
                                 tag_keys=(*keys, "group", "queue"))
        self.kv_blocks = Gauge("hetero_kv_blocks", "KV blocks of a device group, used or free",
                               tag_keys=(*keys, "group", "state"))
        self.link_backlog = Gauge("hetero_link_backlog_bytes", "Modeled KV bytes still to leave a group",
                                  tag_keys=(*keys, "group"))
        self.inflight = Gauge("hetero_inflight_requests", "Requests accepted and not yet finished",
                              tag_keys=keys)
        self.finished = Gauge("hetero_finished_requests", "Requests finished so far, by status",
                              tag_keys=(*keys, "status"))
        self.ttft = Gauge("hetero_ttft_seconds", "Rolling TTFT quantiles over recent requests",
                          tag_keys=(*keys, "quantile"))
        self.tpot = Gauge("hetero_tpot_seconds", "Rolling TPOT quantiles over recent requests",
                          tag_keys=(*keys, "quantile"))
        self.attainment = Gauge("hetero_slo_attainment", "Rolling share of recent requests meeting both SLOs",
                                tag_keys=keys)
        for g in (self.queue_depth, self.kv_blocks, self.link_backlog, self.inflight, self.finished,
                  self.ttft, self.tpot, self.attainment):
            g.set_default_tags(self._defaults)

    def update(self, force: bool = False) -> bool:
        """Refresh every gauge if ``interval_s`` passed since the last refresh (or ``force``)."""
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return False
        self._last = now
        s = self.scheduler
        for g in s.groups:
            tags = {"group": g.name}
            self.queue_depth.set(g.num_pending_prefill, {**tags, "queue": "prefill"})
            self.queue_depth.set(len(g.decode_queue), {**tags, "queue": "decode"})
            self.queue_depth.set(g.num_decoding, {**tags, "queue": "running"})
            self.kv_blocks.set(g.kv.num_blocks - g.kv.num_free, {**tags, "state": "used"})
            self.kv_blocks.set(g.kv.num_free, {**tags, "state": "free"})
            self.link_backlog.set(s.network.backlog_bytes(g.group_id), tags)
        self.inflight.set(s.num_active)
        for r in s.records[self._counted:]:                # only the new ones: runs can be long
            self._finished[r[6]] += 1
        self._counted = len(s.records)
        for status, n in self._finished.items():
            self.finished.set(n, {"status": status})
        recent = s.records[-self.window:]
        if recent:
            table = records_table(recent, None)
            for gauge, column in ((self.ttft, "ttft_s"), (self.tpot, "tpot_s")):
                values = table.column(column).to_numpy(zero_copy_only=False).astype(float)
                values = values[~np.isnan(values)]
                if values.size:
                    p50, p90 = np.percentile(values, [50, 90])
                    gauge.set(float(p50), {"quantile": "p50"})
                    gauge.set(float(p90), {"quantile": "p90"})
            self.attainment.set(float(meets_slo(table, self.slo).mean()))
        return True

