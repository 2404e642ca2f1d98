"""A run streamed to its folder: records and decisions go to Parquet in chunks as the run goes.

A ten-million-request run finishes ten million records (~350 bytes each as tuples) and makes
~90 million decisions (~60 bytes each in the log's columns): kept until the end they would take
gigabytes. :class:`RunStream` takes them out of the scheduler every few thousand events and
writes them as Parquet row groups, so memory holds what is in flight plus one chunk, whatever
the run's length. The files are the same tables an in-memory run writes (records sorted by
request id, decisions in order), row for row: records finish out of order, so they wait in a
small list until every lower id has finished — a window as wide as the requests in flight.

Tables are made and written by one writer thread, chunk after chunk in order, while the event
loop goes on (Parquet encoding and numpy release the GIL: on a second core the writing costs
the run little). At most :data:`MAX_QUEUED` chunks wait for it; then the run waits. While a
stream is open the interpreter switches threads every :data:`SWITCH_INTERVAL_S`.
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from hetero_sched.core.scheduler import RECORD_COLUMNS, Scheduler
from hetero_sched.errors import UserError
from hetero_sched.metrics import SLO, records_table
from hetero_sched.results import arrow_file, decisions_table, ensure_folder

REQUESTS_FILE = "requests.parquet"
DECISIONS_FILE = "decisions.parquet"
RECORD_CHUNK = 65536
"""Records per Parquet row group (~25 MB as tuples while they wait)."""
DECISION_CHUNK = 262144
"""Decisions per Parquet row group (~16 MB in the log's columns)."""
MAX_QUEUED = 4
"""Chunks handed to the writer thread and not yet written, at most (memory stays bounded)."""
SWITCH_INTERVAL_S = 0.0005
"""How often, while a stream is open, the event loop's thread offers the GIL (Python's default:
every 5 ms). The writer thread's numpy and Parquet calls release and retake the GIL hundreds of
times a chunk, and each retake waits for the loop to offer it: at 5 ms the writer fell behind
and the loop waited on it (47 s of a 377 s ten-million-request run)."""
_CODE = RECORD_COLUMNS.index("reason_code")
_DICTIONARY = ["kind", "status", "reason", "reason_code"]
"""Columns Parquet dictionary-encodes (few distinct strings); numbers are written plain, twice as fast."""


class RunStream:
    """Moves a running scheduler's records and decisions into ``folder`` as Parquet.

    Call :meth:`take` now and then during the run (it is the event loop's progress callback:
    :meth:`progress_fn`), :meth:`close` once the run has ended.
    """

    def __init__(self, folder: str | Path, scheduler: Scheduler, slo: SLO,
                 progress: Optional[Callable[[int], None]] = None,
                 record_chunk: int = RECORD_CHUNK, decision_chunk: int = DECISION_CHUNK) -> None:
        self.folder = ensure_folder(folder, "run folder")
        self.scheduler = scheduler
        self.slo = slo
        self.progress = progress
        self.record_chunk = record_chunk
        self.decision_chunk = decision_chunk
        self.finished = 0
        """Records taken from the scheduler so far (the requests finished)."""
        self.records_written = 0
        self.decisions_written = 0
        self._waiting: list[tuple] = []           # records not yet in id order with all lower ids
        self._next_id = 0
        self._ready: list[tuple] = []             # records in id order, not yet written
        self._codes: dict[int, Optional[str]] = {}  # rejected ids -> reason_code, until their decision is written
        self._writers: dict[str, tuple[pa.OSFile, pq.ParquetWriter]] = {}   # the writer thread's
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-stream")
        self._queued: deque[Future] = deque()
        self._switch_interval = sys.getswitchinterval()     # restored by close()
        sys.setswitchinterval(SWITCH_INTERVAL_S)

    def progress_fn(self, _pending: int) -> None:
        """The event loop's progress callback: take what finished, report the count onward."""
        self.take()
        if self.progress is not None:
            self.progress(self.finished)

    def take(self, final: bool = False) -> None:
        """Take the scheduler's finished records and (a chunk's worth of) decisions; write full chunks.

        ``final``: the run has ended — write everything, whatever the chunk sizes.
        """
        records = self.scheduler.records
        for row in records:
            if row[_CODE] is not None:             # a reason_code: the decisions table shows it
                self._codes[row[0]] = row[_CODE]
        self.finished += len(records)
        self._waiting.extend(records)
        records.clear()
        if len(self._waiting) >= self.record_chunk or final:
            self._order(final)
        if len(self._ready) >= self.record_chunk or (final and self._ready):
            self._submit(REQUESTS_FILE, partial(records_table, self._ready, self.slo))
            self.records_written += len(self._ready)
            self._ready = []
        if len(self.scheduler.decisions) >= self.decision_chunk or final:
            chunk = self.scheduler.decisions.drain()
            if len(chunk) or not self.decisions_written:
                self._submit(DECISIONS_FILE, partial(decisions_table, chunk, self._codes))
            self.decisions_written += len(chunk)
            self._codes = {}

    def _order(self, final: bool) -> None:
        """Move the waiting records whose ids run on from the last one moved (all, when
        ``final``) to the ready list, in id order."""
        waiting = self._waiting
        waiting.sort(key=itemgetter(0))            # nearly sorted already: finishing follows arrival
        # ids are unique, so id - position never decreases: the run continues up to the first
        # place it exceeds the next id expected
        n = len(waiting) if final else bisect_right(range(len(waiting)), self._next_id, key=lambda i: waiting[i][0] - i)
        if n:
            self._ready.extend(waiting[:n])
            self._next_id = waiting[n - 1][0] + 1
            del waiting[:n]

    def close(self) -> Path:
        """Write what is left and close the files (both exist, even for an empty run); the folder."""
        self.take(final=True)
        if not self.records_written:
            self._submit(REQUESTS_FILE, partial(records_table, [], self.slo))
        try:
            while self._queued:
                self._queued.popleft().result()
        finally:
            self._pool.shutdown()
            sys.setswitchinterval(self._switch_interval)
        try:
            for f, writer in self._writers.values():
                writer.close()
                f.close()
        except OSError as exc:
            raise UserError(f"{self.folder}: cannot write the run folder ({exc.strerror or exc})") from None
        self._writers = {}
        return self.folder

    def _submit(self, name: str, make: Callable[[], pa.Table]) -> None:
        """Have the writer thread make a chunk's table and append it to ``name`` (after the
        chunks before it); wait while :data:`MAX_QUEUED` are queued. A write's error surfaces here."""
        while len(self._queued) >= MAX_QUEUED or (self._queued and self._queued[0].done()):
            self._queued.popleft().result()
        self._queued.append(self._pool.submit(self._write, name, make))

    def _write(self, name: str, make: Callable[[], pa.Table]) -> None:
        table = make()
        try:
            if name not in self._writers:
                f = arrow_file(self.folder / name, "wb")
                self._writers[name] = (f, pq.ParquetWriter(f, table.schema, use_dictionary=_DICTIONARY))
            self._writers[name][1].write_table(table)
        except OSError as exc:
            raise UserError(f"{self.folder}: cannot write the run folder ({exc.strerror or exc})") from None


class ParquetColumns:
    """A Parquet file read one column at a time — what a summary asks of a records table,
    without holding the whole table."""

    def __init__(self, path: str | Path) -> None:
        self._file = pq.ParquetFile(arrow_file(path, "rb"))
        self.num_rows = self._file.metadata.num_rows
        self.column_names = self._file.schema_arrow.names

    def column(self, name: str) -> pa.ChunkedArray:
        """One column, read from the file."""
        return self._file.read(columns=[name]).column(0)
