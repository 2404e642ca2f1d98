"""The scheduler's durable journal: accepted-but-unfinished requests survive a scheduler crash.

An append-only file of msgpack records, each framed as ``<u32 length><u32 crc32c> payload``
(little-endian; crc32c of the payload), after an 8-byte header ``b"HSJRNL"`` + u16 version.
A payload is ``[kind, request_id, time_s, data]``: ``accepted`` carries the request's fields,
milestones (``placed``, ``prefilled``, ``transferred``) what was decided, ``delivered`` tokens a
request handed out (accumulated), ``finished`` the status and reason (and the request's result
row), ``run`` (request id -1) facts about the run itself, such as its wall-clock origin, and
``decisions`` (request id -1) the next slice of the run's decision log, as packed columns.
:func:`replay` folds the records into the unfinished requests and their last known state, which
is what a restarted scheduler resumes from, and the finished ones.

**Group commit.** :meth:`Journal.append` only encodes into a buffer; :meth:`Journal.commit`
writes the whole buffer with one ``write`` and then applies the fsync policy, so one
scheduling step's records cost one system call (and at most one fsync), not one each.

**fsync policies** (what a *committed* record survives):

- ``always``: fdatasync before ``commit`` returns — survives a process crash and a machine
  crash or power loss. Costs one disk flush per commit.
- ``interval`` (default, ``fsync_interval_ms`` = 10): a commit is in the kernel's page cache
  when ``commit`` returns, so it survives the scheduler process dying (``ray.kill``, SIGKILL,
  OOM); a commit fsyncs if the last fsync is older than the interval, so a machine crash loses
  at most the commits of the last interval while commits keep coming (call :meth:`sync` when
  going idle; :meth:`close` syncs).
- ``never``: survives a process crash; a machine crash loses what the kernel had not yet
  written back (Linux: typically up to ~30 s).

**Crash-safe reading.** A crash mid-write leaves at most the last commit partly written (a
prefix of its records may survive; records are in order, so that is a consistent state): a
bad frame with no valid frame after it is a *torn tail*, ignored and counted
(:attr:`JournalScan.torn_bytes`), and truncated when the journal is reopened for appending. A
bad frame followed by a valid one is corruption in the middle: :class:`JournalCorruptionError`
names its offset. Compaction rewrites only the unfinished requests' records to a temporary file
and renames it over the journal (atomic; the directory is fsynced).
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import google_crc32c
import msgpack

from hetero_sched.workload import Request

log = logging.getLogger(__name__)

MAGIC = b"HSJRNL"
VERSION = 1
HEADER = MAGIC + struct.pack("<H", VERSION)
_FRAME = struct.Struct("<II")
MAX_RECORD_BYTES = 16 << 20
"""A frame claiming more is not a record (a request's fields and hashes are far smaller)."""


class JournalError(Exception):
    """The journal cannot be used (not a journal, unknown version, inconsistent records)."""


class JournalCorruptionError(JournalError):
    """A bad record with valid records after it: the file was damaged, not torn by a crash."""


class RecordKind(Enum):
    """What a record states; the value is its code on disk."""

    ACCEPTED = 0
    PLACED = 1
    PREFILLED = 2
    TRANSFERRED = 3
    FINISHED = 4
    DELIVERED = 5
    RUN = 6
    DECISIONS = 7


class FsyncPolicy(Enum):
    """When a commit is flushed to the disk (see the module doc for what each survives)."""

    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


@dataclass(frozen=True)
class JournalRecord:
    """One journaled fact about a request at scheduler time ``time_s``."""

    kind: RecordKind
    request_id: int
    time_s: float
    data: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def accepted(cls, request: Request, time_s: float) -> "JournalRecord":
        """The scheduler took ``request``; its fields are enough to serve it again."""
        fields = request._asdict()
        if fields["prefix_hashes"] is not None:
            fields["prefix_hashes"] = list(fields["prefix_hashes"])
        return cls(RecordKind.ACCEPTED, request.request_id, time_s, fields)

    @classmethod
    def milestone(cls, kind: RecordKind, request_id: int, time_s: float, **data: Any) -> "JournalRecord":
        """``placed``/``prefilled``/``transferred`` with what was decided (e.g. ``group_id``)."""
        if kind in (RecordKind.ACCEPTED, RecordKind.FINISHED):
            raise ValueError(f"{kind.name.lower()} is not a milestone")
        return cls(kind, request_id, time_s, data)

    @classmethod
    def finished(cls, request_id: int, time_s: float, status: str, reason: str = "",
                 row: Optional[Sequence[Any]] = None) -> "JournalRecord":
        """The request ended (completed, rejected or failed, with the reason; ``row``: its result)."""
        data: dict[str, Any] = {"status": status, "reason": reason}
        if row is not None:
            data["row"] = list(row)
        return cls(RecordKind.FINISHED, request_id, time_s, data)

    @classmethod
    def delivered(cls, request_id: int, time_s: float, tokens: Sequence[int]) -> "JournalRecord":
        """Tokens the request handed out at ``time_s``, after those already journaled."""
        return cls(RecordKind.DELIVERED, request_id, time_s, {"tokens": list(tokens)})

    @classmethod
    def run(cls, time_s: float, **facts: Any) -> "JournalRecord":
        """A fact about the whole run (e.g. its wall-clock origin); later ones win."""
        return cls(RecordKind.RUN, -1, time_s, facts)

    @classmethod
    def decisions(cls, time_s: float, columns: Sequence[bytes], reasons: Mapping[int, str],
                  **more: Any) -> "JournalRecord":
        """The decision log's next rows: each column's packed bytes, rejection reasons by row."""
        return cls(RecordKind.DECISIONS, -1, time_s, {"columns": list(columns), "reasons": dict(reasons), **more})

    def encode(self) -> bytes:
        """The framed record: length, crc32c, msgpack payload."""
        payload = msgpack.packb([self.kind.value, self.request_id, self.time_s, dict(self.data)],
                                use_bin_type=True)
        return _FRAME.pack(len(payload), google_crc32c.value(payload)) + payload


@dataclass(frozen=True)
class PendingRequest:
    """An accepted, unfinished request as the journal last saw it."""

    request: Request
    stage: RecordKind
    """The last milestone (``ACCEPTED`` if none yet)."""
    time_s: float
    """Scheduler time of that milestone."""
    state: Mapping[str, Any]
    """Every milestone's data merged, later ones winning (e.g. ``group_id``, ``decode_group_id``);
    delivered tokens accumulate in ``tokens``, with ``first_s``/``second_s``/``last_s`` the times
    the first, second and latest of them were journaled."""


@dataclass(frozen=True)
class JournalScan:
    """The valid records of a journal file and what was ignored at its end."""

    records: list[JournalRecord]
    offsets: list[int]
    end_offset: int
    """Where the valid records end (the torn tail, if any, starts here)."""
    torn_bytes: int
    """Bytes of a torn last commit ignored (0: the file ended cleanly)."""

    @property
    def torn_records(self) -> int:
        """The warning count: 1 if a torn tail was ignored, else 0."""
        return int(self.torn_bytes > 0)


@dataclass(frozen=True)
class Replay:
    """The unfinished requests (by id, in acceptance order) and how the read went."""

    pending: dict[int, PendingRequest]
    num_records: int
    num_finished: int
    torn_records: int
    finished: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    """The finished requests' ``finished`` data (status, reason, result row; ``tokens`` delivered), by id."""
    run: Mapping[str, Any] = field(default_factory=dict)
    """The run's facts (``run`` records merged)."""
    decisions: list[Mapping[str, Any]] = field(default_factory=list)
    """The decision log's slices (``decisions`` records), in order."""


PathLike = Union[str, Path]


def _decode(payload: bytes, offset: int, path: PathLike) -> JournalRecord:
    try:
        obj = msgpack.unpackb(payload, raw=False)
        kind_code, request_id, time_s, data = obj
        kind = RecordKind(kind_code)
        if not (isinstance(request_id, int) and isinstance(time_s, (int, float)) and isinstance(data, dict)):
            raise TypeError
    except (ValueError, TypeError, msgpack.UnpackException):
        raise JournalCorruptionError(f"{path}: record at offset {offset} has a valid checksum but "
                                     f"is not a journal record (written by another version?)") from None
    return JournalRecord(kind, request_id, float(time_s), data)


def _frame_at(buf: memoryview, offset: int) -> Optional[int]:
    """The end offset of a valid frame starting at ``offset``, else None."""
    if offset + _FRAME.size > len(buf):
        return None
    length, crc = _FRAME.unpack_from(buf, offset)
    end = offset + _FRAME.size + length
    if length == 0 or length > MAX_RECORD_BYTES or end > len(buf):
        return None
    return end if google_crc32c.value(bytes(buf[offset + _FRAME.size:end])) == crc else None


def scan(path: PathLike) -> JournalScan:
    """Read every valid record; ignore a torn tail; raise on a bad header or mid-file damage."""
    data = Path(path).read_bytes()
    if len(data) < len(HEADER):
        if HEADER.startswith(data):  # a crash while creating the file
            return JournalScan([], [], 0, len(data))
        raise JournalError(f"{path}: not a scheduler journal (no {MAGIC!r} header)")
    if data[:len(MAGIC)] != MAGIC:
        raise JournalError(f"{path}: not a scheduler journal (no {MAGIC!r} header)")
    version = struct.unpack_from("<H", data, len(MAGIC))[0]
    if version != VERSION:
        raise JournalError(f"{path}: journal version {version}; this reader knows {VERSION}")
    buf = memoryview(data)
    records: list[JournalRecord] = []
    offsets: list[int] = []
    offset = len(HEADER)
    while offset < len(buf):
        end = _frame_at(buf, offset)
        if end is None:
            # Torn tail (a crash mid-commit) only if nothing valid follows; else real damage.
            later = next((o for o in range(offset + 1, len(buf) - _FRAME.size) if _frame_at(buf, o)), None)
            if later is not None:
                raise JournalCorruptionError(f"{path}: corrupt record at offset {offset} "
                                             f"(valid records follow at offset {later})")
            log.warning("%s: ignoring a torn last commit (%d bytes at offset %d)", path, len(buf) - offset, offset)
            return JournalScan(records, offsets, offset, len(buf) - offset)
        records.append(_decode(bytes(buf[offset + _FRAME.size:end]), offset, path))
        offsets.append(offset)
        offset = end
    return JournalScan(records, offsets, offset, 0)


@dataclass(frozen=True)
class Folded:
    """What the records say, applied in order."""

    pending: dict[int, PendingRequest]
    finished: dict[int, Mapping[str, Any]]
    run: dict[str, Any]
    decisions: list[Mapping[str, Any]]


def fold(records: Sequence[JournalRecord], offsets: Optional[Sequence[int]] = None,
         path: PathLike = "journal") -> Folded:
    """Apply records in order: the unfinished requests, the finished ones, the run's facts.

    A milestone or finish for a request never accepted (or already finished), or a second
    acceptance of one still pending, is a :class:`JournalError` naming the record's offset.
    """
    pending: dict[int, PendingRequest] = {}
    finished: dict[int, Mapping[str, Any]] = {}
    run: dict[str, Any] = {}
    decisions: list[Mapping[str, Any]] = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}" + (f" (offset {offsets[i]})" if offsets is not None else "")
        if rec.kind is RecordKind.RUN:
            run.update(rec.data)
            continue
        if rec.kind is RecordKind.DECISIONS:
            decisions.append(rec.data)
            continue
        current = pending.get(rec.request_id)
        if rec.kind is RecordKind.ACCEPTED:
            if current is not None:
                raise JournalError(f"{where}: request {rec.request_id} accepted twice")
            fields = dict(rec.data)
            if fields.get("prefix_hashes") is not None:
                fields["prefix_hashes"] = tuple(fields["prefix_hashes"])
            try:
                request = Request(**fields)
            except TypeError:
                raise JournalError(f"{where}: accepted record without a request's fields") from None
            pending[rec.request_id] = PendingRequest(request, RecordKind.ACCEPTED, rec.time_s, {})
        elif current is None:
            raise JournalError(f"{where}: {rec.kind.name.lower()} for request {rec.request_id}, "
                               f"which is not pending")
        elif rec.kind is RecordKind.FINISHED:
            del pending[rec.request_id]
            tokens = current.state.get("tokens")
            finished[rec.request_id] = rec.data if tokens is None else {**rec.data, "tokens": tokens}
        elif rec.kind is RecordKind.DELIVERED:
            state = dict(current.state)
            tokens = [*state.get("tokens", ()), *rec.data.get("tokens", ())]
            if "first_s" not in state and tokens:
                state["first_s"] = rec.time_s
            if "second_s" not in state and len(tokens) >= 2:
                state["second_s"] = rec.time_s
            state.update(tokens=tokens, last_s=rec.time_s)
            pending[rec.request_id] = PendingRequest(current.request, current.stage, current.time_s, state)
        else:
            pending[rec.request_id] = PendingRequest(current.request, rec.kind, rec.time_s,
                                                     {**current.state, **rec.data})
    return Folded(pending, finished, run, decisions)


def replay(path: PathLike) -> Replay:
    """The unfinished requests of a journal with their last known state (a missing file: none)."""
    if not Path(path).exists():
        return Replay({}, 0, 0, 0)
    s = scan(path)
    f = fold(s.records, s.offsets, path)
    return Replay(f.pending, len(s.records), len(f.finished), s.torn_records, f.finished, f.run, f.decisions)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class Journal:
    """An open journal for appending with group commit (see the module doc).

    Opening an existing journal checks it and truncates a torn tail (else the next commit
    would turn it into mid-file damage); :attr:`recovered` is that scan. Not thread-safe: the
    scheduler's loop is its only writer.
    """

    def __init__(self, path: PathLike, *, fsync: Union[FsyncPolicy, str] = FsyncPolicy.INTERVAL,
                 fsync_interval_ms: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.policy = FsyncPolicy(fsync)
        if not fsync_interval_ms >= 0:
            raise ValueError(f"fsync_interval_ms must be >= 0, got {fsync_interval_ms}")
        self._interval_s = fsync_interval_ms / 1e3
        self._clock = clock
        self._buffer = bytearray()
        self._pending_records = 0
        self._unsynced = False
        self.num_records = 0
        self.num_commits = 0
        self.num_fsyncs = 0
        self.bytes_written = 0
        self.recovered = self._open()
        self._last_sync_s = self._clock()

    def _open(self) -> JournalScan:
        if self.path.exists():
            found = scan(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            if found.torn_bytes:
                os.ftruncate(self._fd, found.end_offset)
                if found.end_offset == 0:
                    os.write(self._fd, HEADER)
                os.fsync(self._fd)
            return found
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, HEADER)
        os.fsync(self._fd)
        _fsync_dir(self.path)  # the file's existence is durable too
        return JournalScan([], [], len(HEADER), 0)

    def append(self, record: JournalRecord) -> None:
        """Buffer a record; it is durable (per the policy) once :meth:`commit` returns."""
        self._buffer += record.encode()
        self._pending_records += 1

    def commit(self) -> None:
        """Write the buffered records with one write, then fsync as the policy says."""
        if self._buffer:
            view = memoryview(self._buffer)
            while view:
                view = view[os.write(self._fd, view):]
            self.bytes_written += len(self._buffer)
            self.num_records += self._pending_records
            self.num_commits += 1
            self._buffer = bytearray()
            self._pending_records = 0
            self._unsynced = True
        if self._unsynced and (self.policy is FsyncPolicy.ALWAYS or (
                self.policy is FsyncPolicy.INTERVAL and self._clock() - self._last_sync_s >= self._interval_s)):
            self.sync()

    def sync(self) -> None:
        """Flush everything committed to the disk now (any policy)."""
        _datasync(self._fd)
        self._unsynced = False
        self.num_fsyncs += 1
        self._last_sync_s = self._clock()

    def compact(self) -> Replay:
        """Rewrite the journal keeping only the unfinished requests' records (atomic rename)."""
        self.commit()
        os.close(self._fd)
        result = compact(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return result

    def close(self) -> None:
        """Commit, sync and close."""
        if self._fd >= 0:
            self.commit()
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compact(path: PathLike) -> Replay:
    """Rewrite a (closed) journal with only the records of unfinished requests (and the run's), in order.

    Replaying the result gives the same pending requests. The new file is written and fsynced
    under a temporary name, renamed over the old one, and the directory fsynced: a crash leaves
    either the old journal or the new one, never a mix.
    """
    path = Path(path)
    s = scan(path)
    pending = fold(s.records, s.offsets, path).pending
    keep = [r for r in s.records if r.request_id in pending or r.kind in (RecordKind.RUN, RecordKind.DECISIONS)]
    tmp = path.with_name(path.name + ".compact")
    with open(tmp, "wb") as f:
        f.write(HEADER + b"".join(r.encode() for r in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path)
    kept = fold(keep)
    return Replay(pending, len(keep), 0, s.torn_records, {}, kept.run, kept.decisions)
