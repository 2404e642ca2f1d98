"""A run's results and its run folder: per-request Parquet, decision log, stamped summary JSON.

Every summary is stamped with the resolved assumptions, the package version and the git
revision (DESIGN contract §10), so a number found in a folder can be traced to what made it.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

import hetero_sched
from hetero_sched.core.events import DETAIL_COLUMNS, TABLE_COLUMNS, DecisionLog
from hetero_sched.errors import UserError


_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string()}


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


def git_revision() -> Optional[str]:
    """The git revision of the package's checkout (None when not in one)."""
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
    records: pa.Table
    decisions: DecisionLog = field(default_factory=DecisionLog)
    stamp: dict[str, Any] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    """Generated token ids per request (live runs with the numpy backend)."""

    def decisions_table(self) -> pa.Table:
        """The decision log as an Arrow table: ``time_s, kind, group_id, request_id,
        request_ids`` (a span's requests), one typed column per detail field (null where the
        kind has none; see ``DETAIL_FIELDS``), and a rejection's ``reason_code`` beside its
        ``reason`` (from the request's record)."""
        cols = self.decisions.columns()
        arrow = {"time_s": pa.float64(), "kind": pa.string(), "group_id": pa.int64(), "request_id": pa.int64(),
                 "request_ids": pa.list_(pa.int64())}
        arrow.update({name: _ARROW[typ] for name, typ in DETAIL_COLUMNS.items()})
        table = pa.table({name: pa.array(cols[name], arrow[name]) for name in TABLE_COLUMNS})
        codes = dict(zip(self.records.column("request_id").to_pylist(), self.records.column("reason_code").to_pylist())) \
            if "reason_code" in self.records.column_names else {}
        rejected = [codes.get(r) if k == "reject" else None for k, r in zip(cols["kind"], cols["request_id"])]
        at = table.column_names.index("reason") + 1
        return table.add_column(at, "reason_code", pa.array(rejected, pa.string()))

    def write(self, out_dir: str | Path) -> Path:
        """Write ``requests.parquet``, ``decisions.parquet`` and ``summary.json`` into ``out_dir``."""
        out = ensure_folder(out_dir, "run folder")
        doc = {"summary": self.summary, "experiment": self.experiment, "stamp": self.stamp}
        try:
            for name, table in (("requests.parquet", self.records), ("decisions.parquet", self.decisions_table())):
                with open(out / name, "wb") as f:  # a file, not a path: pyarrow reads "A:/x" as a URI
                    pq.write_table(table, f)
            (out / "summary.json").write_text(json.dumps(doc, indent=2, default=str))
        except OSError as exc:
            raise UserError(f"{out}: cannot write the run folder ({exc.strerror or exc})") from None
        return out


def make_stamp(assumptions: dict[str, Any], workload_source: dict[str, Any], clock: str) -> dict[str, Any]:
    """What a result was made with: package version, git revision, clock, workload, assumptions."""
    return {"package": "hetero-sched", "version": hetero_sched.__version__, "git_revision": git_revision(),
            "clock": clock, "workload": workload_source, "assumptions": assumptions}
