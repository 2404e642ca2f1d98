"""The scheduler journal: round trip, torn tails (truncated files, SIGKILLed writers), damage in
the middle, compaction, fsync policies and byte-for-byte determinism."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hetero_sched.runtime.journal import (HEADER, FsyncPolicy, Journal, JournalCorruptionError, JournalError,
                                          JournalRecord, RecordKind, compact, fold, replay, scan)
from hetero_sched.workload import Request

ROOT = Path(__file__).resolve().parents[1]


def history(n: int, seed: int = 0) -> list[JournalRecord]:
    """A seeded interleaving of ``n`` requests' lives; about a third never finish."""
    rng = random.Random(seed)
    stages = (RecordKind.PLACED, RecordKind.PREFILLED, RecordKind.TRANSFERRED)
    lives: list[list[JournalRecord]] = []
    for i in range(n):
        t = i * 0.01
        hashes = tuple(rng.randrange(2**63) for _ in range(rng.randrange(4))) or None
        life = [JournalRecord.accepted(Request(i, t, rng.randrange(1, 9000), rng.randrange(1, 900), hashes), t)]
        for k, kind in enumerate(stages[:rng.randrange(4)], 1):
            life.append(JournalRecord.milestone(kind, i, t + k, group_id=rng.randrange(8)))
        if rng.random() < 0.66:
            life.append(JournalRecord.finished(i, t + 9, rng.choice(["completed", "rejected", "failed"]), "why"))
        lives.append(life)
    out: list[JournalRecord] = []
    while lives:  # interleave, keeping each life in order
        life = lives[rng.randrange(min(len(lives), 5))]
        out.append(life.pop(0))
        if not life:
            lives.remove(life)
    return out


def write(path: Path, records: list[JournalRecord], batch: int = 16, **kw) -> None:
    with Journal(path, **kw) as j:
        for i, r in enumerate(records, 1):
            j.append(r)
            if i % batch == 0:
                j.commit()


def test_round_trip(tmp_path):
    records = history(300)
    write(tmp_path / "j", records)
    s = scan(tmp_path / "j")
    assert s.records == records and s.torn_bytes == 0
    r = replay(tmp_path / "j")
    folded = fold(records)
    assert r.pending == folded.pending and r.num_finished == len(folded.finished) and r.torn_records == 0
    assert r.finished == folded.finished and {d["status"] for d in r.finished.values()} <= {"completed", "rejected", "failed"}
    accepted_order = [x.request_id for x in records if x.kind is RecordKind.ACCEPTED and x.request_id in r.pending]
    assert 0 < len(r.pending) < 300 and list(r.pending) == accepted_order
    some = next(p for p in r.pending.values() if p.stage is RecordKind.TRANSFERRED)
    assert some.state["group_id"] in range(8) and some.request.request_id in r.pending
    assert any(p.request.prefix_hashes for p in r.pending.values())  # tuples survive msgpack


def test_delivered_tokens_accumulate_and_run_facts_merge(tmp_path):
    req = Request(7, 1.0, 30, 5)
    records = [JournalRecord.run(0.0, origin_unix_s=123.5), JournalRecord.accepted(req, 1.0),
               JournalRecord.delivered(7, 2.0, [11]), JournalRecord.delivered(7, 3.0, [12, 13]),
               JournalRecord.accepted(Request(8, 1.5, 4, 1), 1.5),
               JournalRecord.finished(8, 2.5, "completed", row=[8, 1.5, "x"]),
               JournalRecord.run(4.0, recoveries=1)]
    write(tmp_path / "j", records, batch=3)
    r = replay(tmp_path / "j")
    state = r.pending[7].state
    assert state["tokens"] == [11, 12, 13] and (state["first_s"], state["second_s"], state["last_s"]) == (2.0, 3.0, 3.0)
    assert r.finished == {8: {"status": "completed", "reason": "", "row": [8, 1.5, "x"]}}
    assert dict(r.run) == {"origin_unix_s": 123.5, "recoveries": 1}
    assert dict(compact(tmp_path / "j").run) == dict(r.run)       # compaction keeps the run's facts
    with pytest.raises(JournalError, match="not pending"):
        fold([JournalRecord.delivered(9, 1.0, [1])])


def written(tmp_path: Path, n: int = 40) -> tuple[Path, list[JournalRecord], bytes, list[int]]:
    """A journal of ``history(n)``: its path, records, bytes and record offsets."""
    records = history(n)
    path = tmp_path / "j"
    write(path, records)
    return path, records, path.read_bytes(), scan(path).offsets


def test_torn_tail_of_a_truncated_file_is_ignored_and_repaired(tmp_path):
    path, records, full, offsets = written(tmp_path)
    last = offsets[-1]
    for cut in [*range(last + 1, len(full)), *range(1, len(HEADER))]:  # every tear of the last record
        path.write_bytes(full[:cut])
        r = replay(path)
        assert r.torn_records == 1
        assert r.pending == fold(records[:-1] if cut > last else []).pending
    path.write_bytes(full[:last + 3])
    with Journal(path) as j:  # reopening truncates the tear, so appending cannot bury it
        assert j.recovered.torn_bytes == 3
        j.append(records[-1])
    assert scan(path).records == records and replay(path).torn_records == 0


def test_mid_file_damage_is_an_error_naming_the_offset(tmp_path):
    path, records, full, offsets = written(tmp_path)
    for k in (0, 7, len(records) - 2):
        for at in (offsets[k], offsets[k] + 5, offsets[k + 1] - 1):  # length, crc... payload
            bad = bytearray(full)
            bad[at] ^= 0x40
            path.write_bytes(bytes(bad))
            with pytest.raises(JournalCorruptionError, match=f"corrupt record at offset {offsets[k]} "):
                replay(path)
    path.write_bytes(b"NOTJRNL\x00" + full[8:])
    with pytest.raises(JournalError, match="not a scheduler journal"):
        replay(path)


def test_inconsistent_records_are_errors(tmp_path):
    req = Request(1, 0.0, 10, 10)
    for records, message in (([JournalRecord.finished(1, 0.0, "completed")], "not pending"),
                             ([JournalRecord.accepted(req, 0.0)] * 2, "accepted twice")):
        write(tmp_path / "j", records)
        with pytest.raises(JournalError, match=message):
            replay(tmp_path / "j")
        (tmp_path / "j").unlink()


def test_compaction_keeps_exactly_the_unfinished(tmp_path):
    records = history(500, seed=1)
    path = tmp_path / "j"
    with Journal(path) as j:
        for r in records:
            j.append(r)
        j.commit()
        before = replay(path)
        size = path.stat().st_size
        after = j.compact()
        assert after.pending == before.pending
        assert replay(path).pending == before.pending and replay(path).num_finished == 0
        assert path.stat().st_size < size / 2
        assert {r.request_id for r in scan(path).records} == set(before.pending)
        victim = next(iter(before.pending))
        j.append(JournalRecord.finished(victim, 99.0, "completed"))  # appending goes on after compaction
    assert victim not in replay(path).pending and len(replay(path).pending) == len(before.pending) - 1
    assert not (tmp_path / "j.compact").exists()
    assert compact(path).pending == replay(path).pending  # idempotent


def test_fsync_policies(tmp_path):
    now = [0.0]
    records = history(50)[:50]
    counts = {}
    for policy in FsyncPolicy:
        j = Journal(tmp_path / policy.value, fsync=policy, fsync_interval_ms=10, clock=lambda: now[0])
        for i, r in enumerate(records):
            j.append(r)
            if i % 5 == 4:
                j.commit()
                now[0] += 0.004  # a commit every 4 ms: interval fsyncs every third commit
        counts[policy] = (j.num_commits, j.num_fsyncs)
        j.commit()  # nothing new: no extra fsync
        assert j.num_fsyncs == counts[policy][1]
        j.close()
        assert scan(tmp_path / policy.value).records == records
    assert counts[FsyncPolicy.ALWAYS] == (10, 10)
    assert counts[FsyncPolicy.INTERVAL] == (10, 3)
    assert counts[FsyncPolicy.NEVER] == (10, 0)
    with pytest.raises(ValueError):
        Journal(tmp_path / "x", fsync="sometimes")


def test_bytes_are_deterministic_whatever_the_batching(tmp_path):
    records = history(200, seed=5)
    write(tmp_path / "a", records, batch=1)
    write(tmp_path / "b", records, batch=64, fsync="never")
    write(tmp_path / "c", history(200, seed=5), batch=7, fsync="always")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == (tmp_path / "c").read_bytes()


_WRITER = textwrap.dedent("""
    import sys
    from hetero_sched.runtime.journal import Journal, JournalRecord, RecordKind
    from hetero_sched.workload import Request
    blob = bytes(256 << 10)  # cheap to encode, slow to write: a kill often lands inside the write
    with Journal(sys.argv[1], fsync="never") as j:
        i = 0
        while True:
            for _ in range(32):
                j.append(JournalRecord.accepted(Request(i, i * 1e-3, 100, 10), i * 1e-3))
                j.append(JournalRecord.milestone(RecordKind.PLACED, i, i * 1e-3, group_id=0, blob=blob))
                i += 1
            j.commit()
            print(i, flush=True)
""")


def test_sigkill_mid_append_loses_no_committed_record(tmp_path):
    rng = random.Random(8)
    torn = 0
    for attempt in range(4):
        path = tmp_path / f"j{attempt}"
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        committed = 0
        try:
            while committed < 64:
                committed = int(child.stdout.readline())
            time.sleep(rng.uniform(0, 0.02))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        acknowledged = max([committed, *(int(x) for x in child.stdout.read().split())])
        s = scan(path)
        ids = [r.request_id for r in s.records if r.kind is RecordKind.ACCEPTED]
        assert ids == list(range(len(ids)))            # a prefix, in order, nothing invented
        assert len(ids) >= acknowledged                # every acknowledged commit is there
        assert fold(s.records).pending.keys() == set(ids)
        torn += s.torn_records
        with Journal(path) as j:                       # and the journal is usable again
            assert j.recovered.records == s.records
    print(f"torn tails seen: {torn} of 4 kills")


def test_a_run_journal_gives_a_restarted_scheduler_the_whole_decision_log_and_busy_time(tmp_path):
    """What ``RunJournal`` commits slice by slice, a restart reads back whole; the next life's log
    and busy time are added to it (rejection reasons and span request ids keep their rows)."""
    from hetero_sched.core.events import NO_ID, DecisionCode as D, DecisionLog
    from hetero_sched.runtime.recovery import RunJournal

    log = DecisionLog()
    j = RunJournal(tmp_path / "run.journal")
    assert not j.is_restart
    j.started(1000.0)
    for i in range(30):
        log.add(i * 0.1, D.PLACE, i % 3, i, 2)
        if i % 7 == 0:
            log.add_reject(i * 0.1, i, f"reason {i}")
        if i % 5 == 0:
            log.add(i * 0.1, D.PREFILL, 0, NO_ID, 2, 100, 0, 0.5)
            log.add_ids(list(range(i, i + 1 + i % 3)))
        if i % 4 == 0:
            j.commit(i * 0.1, log, [i * 0.01, 0.0])
    j.commit(3.0, log, [0.3, 0.1])
    j.journal.close()                                         # the process dies here

    again = RunJournal(tmp_path / "run.journal")
    assert again.is_restart and again.recovered.origin_unix_s == 1000.0
    assert again.recovered.decisions == log and again.recovered.busy_s == [0.3, 0.1]
    second = DecisionLog()
    second.add(5.0, D.PREEMPT, NO_ID, 3, 1)
    second.add_reject(5.5, 4, "later")
    second.add(6.0, D.DECODE, 1, NO_ID, 2, 10, 0.25)
    second.add_ids([40, 41])
    whole = again.recovered.whole_log(second)
    assert list(whole) == [*log, *second]
    ids = log.columns()["request_ids"] + second.columns()["request_ids"]
    assert whole.columns()["request_ids"] == ids and [40, 41] in ids and [25, 26] in ids
    assert again.total_busy([1.0, 2.0]) == [1.3, 2.1]
