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
from hetero_sched.core.events import DecisionLog
from hetero_sched.errors import UserError


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
        """The decision log as an Arrow table (time_s, kind, group_id, request_id, detail)."""
        cols = self.decisions.columns()
        return pa.table({
            "time_s": pa.array(cols["time_s"], pa.float64()),
            "kind": pa.array(cols["kind"], pa.string()),
            "group_id": pa.array(cols["group_id"], pa.int64()),
            "request_id": pa.array(cols["request_id"], pa.int64()),
            "detail": pa.array(cols["detail"], pa.string()),
        })

    def write(self, out_dir: str | Path) -> Path:
        """Write ``requests.parquet``, ``decisions.parquet`` and ``summary.json`` into ``out_dir``."""
        out = Path(out_dir)
        doc = {"summary": self.summary, "experiment": self.experiment, "stamp": self.stamp}
        try:
            out.mkdir(parents=True, exist_ok=True)
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
