"""Streamed runs: records and decisions written in chunks equal the in-memory run's, row for row."""

from __future__ import annotations

import sys
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetero_sched.core.events import DETAIL_COLUMNS, DETAIL_FIELDS, NO_ID, DecisionCode, DecisionLog
from hetero_sched.engine.assembly import build_scheduler, finish_run, resolve
from hetero_sched.engine.loop import run_events
from hetero_sched.experiment import build_workload
from hetero_sched.results import decisions_table
from hetero_sched.runstream import RunStream
from hetero_sched.sim import simulate
from hetero_sched.workload import synthetic


def _experiment(**admission) -> dict:
    """The shipped experiment, 1,500 requests at a rate that overloads it (rejections, preemptions)."""
    exp, _ = resolve(None)
    doc = exp.model_dump(mode="json")
    doc["workload"] = dict(doc["workload"], num_requests=1500, rate_per_s=120.0)
    doc["admission"] = admission
    return doc


def same(a: pa.Table, b: pa.Table) -> bool:
    """Tables equal bit for bit (Arrow's ``equals`` calls NaN unequal to itself): schema, nulls,
    and each value's bytes."""
    if a.schema != b.schema or a.num_rows != b.num_rows:
        return False
    for x, y in zip(a.columns, b.columns):
        if x.is_null().to_pylist() != y.is_null().to_pylist():
            return False
        if pa.types.is_floating(x.type):
            bits = [c.fill_null(0.0).to_numpy().view(np.int64) for c in (x, y)]
            if not np.array_equal(*bits):
                return False
        elif x.to_pylist() != y.to_pylist():
            return False
    return True


def _streamed(doc: dict, folder, record_chunk: int, decision_chunk: int, progress=None):
    exp, base = resolve(doc)
    workload = build_workload(exp.workload, exp.seed, base)
    scheduler = build_scheduler(exp, workload, base)
    stream = RunStream(folder, scheduler, exp.slo_target, progress, record_chunk, decision_chunk)
    run_events(scheduler, workload.requests(), stream.progress_fn, progress_every=97)
    return finish_run(exp, scheduler, workload, "simulated", stream), stream


@pytest.mark.parametrize("chunks", [(7, 50), (1000, 4096)])
def test_streamed_run_equals_in_memory_run(tmp_path, chunks):
    """Same config and seed: requests.parquet, decisions.parquet and the summary are the in-memory
    run's, whatever the chunk sizes (a dropped, repeated or reordered chunk breaks equality)."""
    doc = _experiment(max_inflight=60)
    memory = simulate(doc)
    seen: list[int] = []
    interval = sys.getswitchinterval()
    streamed, stream = _streamed(doc, tmp_path / "run", *chunks, progress=seen.append)
    assert sys.getswitchinterval() == interval                                 # close() restored it
    records = pq.read_table(tmp_path / "run" / "requests.parquet")
    decisions = pq.read_table(tmp_path / "run" / "decisions.parquet")
    assert records.num_rows == 1500 and memory.summary["rejected"] > 0 and memory.summary["completed"] > 0
    assert same(records, memory.records)
    assert decisions.num_rows == len(memory.decisions) and same(decisions, memory.decisions_table())
    assert stream.records_written == 1500 and stream.decisions_written == len(memory.decisions)
    assert pq.ParquetFile(tmp_path / "run" / "decisions.parquet").num_row_groups > 1
    assert streamed.summary == memory.summary and streamed.records is None and streamed.decisions is None
    assert seen == sorted(seen) and seen[-1] == 1500 and len(seen) > 3          # progress counts every finished request
    assert same(streamed.requests_table(), memory.records)


def test_simulate_out_writes_the_run_folder_an_in_memory_run_writes(tmp_path):
    """``simulate(out=...)`` streams and leaves the usual run folder; ``write`` of an in-memory
    result gives the same files (read back as tables) and summary."""
    doc = _experiment()
    streamed = simulate(doc, out=tmp_path / "streamed")
    simulate(doc).write(tmp_path / "memory")
    for name in ("requests.parquet", "decisions.parquet"):
        assert same(pq.read_table(tmp_path / "streamed" / name), pq.read_table(tmp_path / "memory" / name)), name
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("streamed", "memory"))
    assert a["summary"] == b["summary"] and a["experiment"] == b["experiment"]
    streamed.write(tmp_path / "copy")                     # a streamed result copies its files elsewhere
    assert same(pq.read_table(tmp_path / "copy" / "requests.parquet"), pq.read_table(tmp_path / "memory" / "requests.parquet"))


def test_decisions_table_matches_the_logs_decision_tuples():
    """The column-wise decisions table says what iterating the log says, decision by decision
    (the log's own reading of itself), including rejection reasons and their codes."""
    result = simulate(_experiment(max_inflight=60))
    table = result.decisions_table().to_pydict()
    codes = dict(zip(result.records.column("request_id").to_pylist(), result.records.column("reason_code").to_pylist()))
    assert "reject" in table["kind"]
    for i, (time_s, kind, group, request, detail) in enumerate(result.decisions):
        assert (table["time_s"][i], table["kind"][i], table["group_id"][i], table["request_id"][i]) == \
            (time_s, kind, group, request)
        fields = dict(zip((name for name, _ in DETAIL_FIELDS[kind]), detail))
        for name in DETAIL_COLUMNS:
            assert table[name][i] == fields.get(name), (i, name)
        assert table["reason_code"][i] == (codes[request] if kind == "reject" else None)


@pytest.mark.parametrize("every", [64, 640])
def test_drain_hands_over_every_decision_once(every: int):
    """Decisions drained in chunks (of pending decisions only, or of several packed chunks),
    tabled chunk by chunk, are the undrained log's table, which was read half-way (so it holds
    joined columns and packed chunks); each chunk reads back the same decisions too."""
    whole, drained = DecisionLog(), DecisionLog()
    chunks = []
    for i in range(2000):
        for log in (whole, drained):
            log.add(i * 0.5, DecisionCode.PREFILL, i % 3, NO_ID, 2, 100 + i, 0, 0.25)
            log.add_ids([i, i + 1])
            if i % 7 == 0:
                log.add_reject(i * 0.5, i, f"no room {i}")
        if i % every == every - 1:
            chunks.append(drained.drain())
        if i == 1000:
            assert len(whole.state()["time_s"]) == len(whole)     # joins what was packed so far
    chunks.append(drained.drain())
    assert len(drained) == 0 and sum(len(c) for c in chunks) == len(whole)
    codes = {i: "kv" for i in range(2000)}
    assert same(pa.concat_tables([decisions_table(c, codes) for c in chunks]), decisions_table(whole, codes))
    assert [d for c in chunks for d in c] == list(whole)


def test_workload_requests_cross_chunk_boundaries_in_order():
    """Requests come out of the columns in 64k-row chunks: ids and values run on across them."""
    w = synthetic(70_000, 50.0, seed=3)
    got = list(w.requests())
    assert [r.request_id for r in got] == list(range(70_000))
    assert [r.arrival_s for r in got[65_530:65_540]] == w.arrival_s[65_530:65_540].tolist()
    assert got[-1].output_tokens == int(w.output_tokens[-1]) and not math.isnan(got[-1].arrival_s)
