"""A run's results and its run folder: per-request Parquet, decision log, stamped summary JSON.

Every summary is stamped with the resolved assumptions, the package version and the git
revision (DESIGN contract §10), so a number found in a folder can be traced to what made it.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq

import hetero_sched
from hetero_sched.core.events import DETAIL_COLUMNS, DETAIL_FIELDS, KIND_NAMES, DecisionKind, DecisionLog
from hetero_sched.errors import UserError


_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string()}


def arrow_file(path: str | Path, mode: str) -> pa.OSFile:
    """A run-folder file for Parquet, opened natively: not a path string (pyarrow reads "A:/x" as
    a URI) and not a Python file object (every page written through one takes the GIL, so a
    streamed run's writer thread waited on the event loop page after page)."""
    return pa.OSFile(str(path), mode)


def ensure_folder(path: str | Path, what: str) -> Path:
    """``path`` as a folder to write into, created if missing; a file in the way or a folder that
    cannot be made is one line naming ``what`` (a flag), before any work is done."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p}: is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what} {p}: cannot create the folder ({exc.strerror or exc})") from None
    return p


@functools.cache
def git_revision() -> Optional[str]:
    """The git revision of the package's checkout (None when not in one).

    Asked once per process: the code running is what was imported then, and a sweep, a plan or a
    goodput search stamps hundreds of runs (a ``git`` process each was ~15% of a small run)."""
    root = Path(hetero_sched.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class RunResult:
    """What one run produced (simulated or live)."""

    experiment: dict[str, Any]
    summary: dict[str, Any]
    records: Optional[pa.Table]
    """One row per request; None for a streamed run (they are in ``folder``/requests.parquet)."""
    decisions: Optional[DecisionLog] = field(default_factory=DecisionLog)
    """The decision log; None for a streamed run (it is in ``folder``/decisions.parquet)."""
    stamp: dict[str, Any] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    """Generated token ids per request (live runs with the numpy backend)."""
    folder: Optional[Path] = None
    """The run folder a streamed run wrote its records and decisions to as it went."""

    def decisions_table(self) -> pa.Table:
        """The decision log as an Arrow table: ``time_s, kind, group_id, request_id,
        request_ids`` (a span's requests), one typed column per detail field (null where the
        kind has none; see ``DETAIL_FIELDS``), and a rejection's ``reason_code`` beside its
        ``reason`` (from the request's record). A streamed run's is read from its folder."""
        if self.decisions is None:
            return self._read("decisions.parquet")
        records = self.records if self.records is not None else self._read("requests.parquet")
        codes = dict(zip(records.column("request_id").to_pylist(), records.column("reason_code").to_pylist())) \
            if "reason_code" in records.column_names else {}
        return decisions_table(self.decisions, codes)

    def requests_table(self) -> pa.Table:
        """The per-request records (a streamed run's are read from its folder)."""
        return self.records if self.records is not None else self._read("requests.parquet")

    def _read(self, name: str) -> pa.Table:
        if self.folder is None:
            raise ValueError(f"this result keeps no {name}: neither in memory nor in a run folder")
        with arrow_file(self.folder / name, "rb") as f:
            return pq.read_table(f)

    def write(self, out_dir: str | Path) -> Path:
        """Write ``requests.parquet``, ``decisions.parquet`` and ``summary.json`` into ``out_dir``
        (a streamed run's Parquet files are already in its folder: copied if ``out_dir`` is another)."""
        out = ensure_folder(out_dir, "run folder")
        doc = {"summary": self.summary, "experiment": self.experiment, "stamp": self.stamp}
        try:
            if self.folder is not None and self.records is None:
                if out.resolve() != self.folder.resolve():
                    for name in ("requests.parquet", "decisions.parquet"):
                        shutil.copyfile(self.folder / name, out / name)
            else:
                for name, table in (("requests.parquet", self.records), ("decisions.parquet", self.decisions_table())):
                    with arrow_file(out / name, "wb") as f:
                        pq.write_table(table, f)
            (out / "summary.json").write_text(json.dumps(doc, indent=2, default=str))
        except OSError as exc:
            raise UserError(f"{out}: cannot write the run folder ({exc.strerror or exc})") from None
        return out


DECISIONS_SCHEMA = pa.schema([("time_s", pa.float64()), ("kind", pa.string()), ("group_id", pa.int64()),
                              ("request_id", pa.int64()), ("request_ids", pa.list_(pa.int64())),
                              *((name, _ARROW[typ]) for name, typ in DETAIL_COLUMNS.items())])
"""``decisions.parquet`` without its ``reason_code`` (which :func:`decisions_table` adds after ``reason``)."""


def decisions_table(log: DecisionLog, reason_codes: Mapping[int, Optional[str]]) -> pa.Table:
    """A decision log as an Arrow table (see :meth:`RunResult.decisions_table`), built column by
    column from the log's typed arrays: a run's tens of millions of decisions never become
    Python tuples. ``reason_codes`` maps a rejected request's id to its ``reason_code``."""
    cols = log.state()                              # (packs the pending decisions)
    n = len(log)
    kind = _numbers(cols["kind"], np.int8)
    group = _ints(cols["group_id"])
    request = _ints(cols["request_id"])
    rows = _ints(cols["span_rows"])
    ends = _ints(cols["span_ends"])
    counts = np.zeros(n, dtype=np.int64)
    counts[rows] = np.diff(ends, prepend=0)
    no_span = np.ones(n, dtype=bool)
    no_span[rows] = False
    arrays: dict[str, pa.Array] = {
        "time_s": pa.array(_numbers(cols["time_s"], np.float64)),
        "kind": pa.array(KIND_NAMES, pa.string()).take(pa.array(kind.astype(np.int32))),
        "group_id": pa.array(group, pa.int64(), mask=group < 0),
        "request_id": pa.array(request, pa.int64(), mask=request < 0),
        "request_ids": pa.ListArray.from_arrays(pa.array(np.concatenate(([0], np.cumsum(counts))), pa.int32()),
                                                pa.array(_ints(cols["span_ids"]), pa.int64()),
                                                mask=pa.array(no_span)),
    }
    # Each detail column is filled from the kinds present that have it (most chunks hold a few
    # kinds, and a column none of them has is all null): one masked copy per (kind, field), not
    # a pass of every column over every row
    details = [_numbers(c, np.float64) for c in cols["details"]]
    missing = [np.isnan(d) for d in details]
    rows_of = {code: kind == code for code in np.flatnonzero(np.bincount(kind, minlength=len(KIND_NAMES))).tolist()}
    for name, typ in DETAIL_COLUMNS.items():
        if typ is str:
            arrays[name] = _sparse_texts(n, cols["reasons"])
            continue
        values = np.zeros(n, dtype=np.int64 if typ is int else np.float64)
        valid = np.zeros(n, dtype=bool)
        for code, at in rows_of.items():
            for j, (field, _) in enumerate(DETAIL_FIELDS[KIND_NAMES[code]]):
                if field == name:
                    here = at & ~missing[j]
                    np.copyto(values, details[j], where=here, casting="unsafe")   # (ints: truncated)
                    valid |= here
        arrays[name] = pa.array(values, _ARROW[typ], mask=~valid) if valid.any() else pa.nulls(n, _ARROW[typ])
    rejected = {i: reason_codes.get(int(request[i]))
                for i in np.flatnonzero(kind == KIND_NAMES.index(DecisionKind.REJECT)).tolist()}
    table = pa.Table.from_arrays(list(arrays.values()), schema=DECISIONS_SCHEMA)
    return table.add_column(table.column_names.index("reason") + 1, "reason_code", _sparse_texts(n, rejected))


def _sparse_texts(n: int, texts: Mapping[int, Optional[str]]) -> pa.Array:
    """A string column of ``n`` rows, null but at the few rows ``texts`` gives (no list of n Nones)."""
    if not texts:
        return pa.nulls(n, pa.string())
    at = np.full(n, len(texts), dtype=np.int64)          # the null past the texts
    at[np.fromiter(texts.keys(), dtype=np.int64, count=len(texts))] = np.arange(len(texts))
    return pa.array([*texts.values(), None], pa.string()).take(pa.array(at))


def _ints(column: Any) -> np.ndarray:
    return _numbers(column, np.int64)


def _numbers(column: Any, dtype: Any) -> np.ndarray:
    """An ``array`` column as numpy — a copy: a view would keep the array from growing."""
    return np.frombuffer(column, dtype=dtype).copy() if len(column) else np.zeros(0, dtype=dtype)


def make_stamp(assumptions: dict[str, Any], workload_source: dict[str, Any], clock: str) -> dict[str, Any]:
    """What a result was made with: package version, git revision, clock, workload, assumptions."""
    return {"package": "hetero-sched", "version": hetero_sched.__version__, "git_revision": git_revision(),
            "clock": clock, "workload": workload_source, "assumptions": assumptions}
