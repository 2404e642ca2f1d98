"""A tracer provider per process, and a span processor that never drops a span silently.

The SDK's ``BatchSpanProcessor`` drops spans when its queue (2,048) is full — and the
simulator ends spans far faster than any collector takes them. :class:`CountingSpanProcessor`
instead applies *backpressure*: when ``max_queued`` batches wait for the exporter, ``on_end``
blocks until one is sent. Every span is counted as exported or dropped (a failed export), and
a collector that is down costs one bounded wait, a warning, and counted drops — never a hang.

Each process (driver, scheduler actor, every device-group actor) builds its own provider from
the same :class:`~hetero_sched.tracing.settings.TraceSettings`; nothing is global, so tests and
several runs in one process do not interfere.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Tracer

from hetero_sched.tracing.settings import TraceSettings

log = logging.getLogger(__name__)

INSTRUMENTATION = "hetero_sched"


@dataclass(frozen=True)
class ExportCounts:
    """What one process's provider did with its spans."""

    ended: int = 0
    exported: int = 0
    dropped: int = 0

    def __add__(self, other: "ExportCounts") -> "ExportCounts":
        return ExportCounts(self.ended + other.ended, self.exported + other.exported,
                            self.dropped + other.dropped)


class CountingSpanProcessor(SpanProcessor):
    """Batches ended spans to an exporter on a worker thread, blocking when it falls behind."""

    def __init__(self, exporter: SpanExporter, max_batch: int = 512, max_queued: int = 4) -> None:
        self._exporter = exporter
        self._max_batch = max_batch
        self._batch: list[ReadableSpan] = []
        self._queue: queue.Queue[Optional[list[ReadableSpan]]] = queue.Queue(maxsize=max_queued)
        self._lock = threading.Lock()
        self.ended = 0
        self.exported = 0
        self.dropped = 0
        self.collector_down = False
        self._worker = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._worker.start()

    def on_start(self, span: object, parent_context: object = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        with self._lock:
            self.ended += 1
            self._batch.append(span)
            if len(self._batch) < self._max_batch:
                return
            batch, self._batch = self._batch, []
        self._queue.put(batch)              # blocks while max_queued batches wait: backpressure

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                if self.collector_down:
                    self.dropped += len(batch)
                    continue
                try:
                    ok = self._exporter.export(batch) is SpanExportResult.SUCCESS
                except Exception as exc:                     # noqa: BLE001 - an exporter bug must not kill the thread
                    log.warning("span export raised %s", exc)
                    ok = False
                if ok:
                    self.exported += len(batch)
                else:
                    # One failed batch (after the exporter's own retries, within its timeout) marks
                    # the collector down for the rest of the run: drop fast and count, never stall.
                    self.collector_down = True
                    self.dropped += len(batch)
                    log.warning("trace collector unreachable: dropping spans from now on (counted)")
            finally:
                self._queue.task_done()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything ended so far; False if the deadline passed first."""
        with self._lock:
            batch, self._batch = self._batch, []
        deadline = time.monotonic() + timeout_millis / 1000.0
        if batch:
            try:
                self._queue.put(batch, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                return False
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def shutdown(self) -> None:
        self.force_flush()
        self._queue.put(None)
        self._worker.join(timeout=5.0)
        self._exporter.shutdown()

    def counts(self) -> ExportCounts:
        return ExportCounts(self.ended, self.exported, self.dropped)


class ProcessTracing:
    """One process's tracer provider, its counting processor, and a tracer."""

    def __init__(self, settings: TraceSettings, instance: str,
                 exporter: Optional[SpanExporter] = None) -> None:
        self.settings = settings
        resource = Resource.create({
            "service.name": settings.service_name,
            "service.instance.id": instance,       # scheduler / simulator / one device group
            "process.pid": os.getpid(),
            "host.name": socket.gethostname(),
        })
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        self.processor = CountingSpanProcessor(
            exporter or OTLPSpanExporter(endpoint=settings.traces_url, timeout=settings.export_timeout_s))
        self.provider.add_span_processor(self.processor)
        self.tracer: Tracer = self.provider.get_tracer(INSTRUMENTATION)

    def flush(self, timeout_s: float = 30.0) -> ExportCounts:
        """Export what is pending (bounded wait; warns if spans are still pending after it)."""
        if not self.processor.force_flush(int(timeout_s * 1000)):
            log.warning("trace export did not finish within %.0f s: some spans may be missing", timeout_s)
        return self.processor.counts()

    def shutdown(self) -> ExportCounts:
        counts = self.flush()
        self.provider.shutdown()
        return counts


def total(counts: Sequence[ExportCounts]) -> ExportCounts:
    out = ExportCounts()
    for c in counts:
        out = out + c
    return out
