"""Scheduler journal throughput: appends/s per fsync policy, group commit vs a commit per record.

    python bench/journal_throughput.py [--batch 64] [--seconds 2] [--dir DIR]

Each request journals its whole life: accepted (with its fields and 8 prefix hashes), placed,
prefilled, transferred, finished — 5 records. "Group commit" commits every ``--batch`` records
(one scheduling step's worth); "per record" commits after each. Each configuration runs for
about ``--seconds`` on a fresh journal in ``--dir`` (default: a temp folder; put it on the disk
the scheduler would use — tmpfs makes fsync free).

Prints one JSON object last: {"<policy>_<batch|per_record>": {"records_per_s",
"requests_per_s", "fsyncs", "commits"}, ..., "sched_decisions_per_s_to_sustain": 6000}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from hetero_sched.runtime.journal import Journal, JournalRecord, RecordKind
from hetero_sched.workload import Request

SCHED_CAPACITY_RPS = 6000
"""Decisions/s the live runtime sustains (bench/sched_capacity.py); journaling must not cap it."""
_MILESTONES = (RecordKind.PLACED, RecordKind.PREFILLED, RecordKind.TRANSFERRED)


def lifecycle(i: int) -> list[JournalRecord]:
    """The 5 records of request ``i``."""
    t = i * 1e-3
    req = Request(i, t, 1000 + i % 4000, 200 + i % 300, tuple(range(i, i + 8)), 512, None)
    return [JournalRecord.accepted(req, t),
            *(JournalRecord.milestone(k, i, t + n * 1e-3, group_id=n) for n, k in enumerate(_MILESTONES, 1)),
            JournalRecord.finished(i, t + 0.5, "completed")]


def measure(folder: Path, policy: str, batch: int, seconds: float) -> dict[str, float]:
    """Append lifecycles for about ``seconds``, committing every ``batch`` records."""
    path = folder / f"{policy}-{batch}.journal"
    records = [r for i in range(2000) for r in lifecycle(i)]  # encoded per append, as live
    n = 0
    with Journal(path, fsync=policy) as j:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for r in records[n % len(records):n % len(records) + batch]:
                j.append(r)
                n += 1
            j.commit()
        elapsed = time.perf_counter() - start
        fsyncs, commits = j.num_fsyncs, j.num_commits
    path.unlink()
    return {"records_per_s": round(n / elapsed), "requests_per_s": round(n / elapsed / 5),
            "fsyncs": fsyncs, "commits": commits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out: dict[str, object] = {}
        for policy in ("always", "interval", "never"):
            for label, batch in (("batch", args.batch), ("per_record", 1)):
                out[f"{policy}_{label}"] = res = measure(Path(tmp), policy, batch, args.seconds)
                print(f"{policy:8s} {label:10s} {res['records_per_s']:>10,} records/s "
                      f"({res['requests_per_s']:,} requests/s), {res['fsyncs']:,} fsyncs", flush=True)
    out.update(batch=args.batch, records_per_request=5, sched_decisions_per_s_to_sustain=SCHED_CAPACITY_RPS)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
