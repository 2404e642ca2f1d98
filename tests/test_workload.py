"""Workload: generators (statistics, determinism), readers, transforms, one-line errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetero_sched import workload as wl
from hetero_sched.core.request import Request
from hetero_sched.errors import UserError
from hetero_sched.workload import LengthDist

N = 200_000


# ---------------------------------------------------------------------------- generators


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 2.0),
                                        ("gamma", 1.0)])
def test_arrivals_have_the_asked_rate_and_cv(arrival: str, cv: float) -> None:
    w = wl.synthetic(N, 7.5, arrival=arrival, cv=cv, prompt=100, output=10, seed=3)
    assert w.arrival_s[0] == 0.0 and np.all(np.diff(w.arrival_s) >= 0)
    assert wl.mean_rate_per_s(w) == pytest.approx(7.5, rel=0.02)
    assert wl.interarrival_cv(w) == pytest.approx(cv, rel=0.03)


def test_constant_arrivals_are_evenly_spaced() -> None:
    w = wl.synthetic(1000, 4.0, arrival="constant", prompt=1, output=1)
    np.testing.assert_allclose(np.diff(w.arrival_s), 0.25)
    assert wl.interarrival_cv(w) == pytest.approx(0.0, abs=1e-9)


def test_same_seed_same_arrays_other_seed_differs() -> None:
    a = wl.synthetic(5000, 3.0, arrival="gamma", cv=1.5, seed=11)
    b = wl.synthetic(5000, 3.0, arrival="gamma", cv=1.5, seed=11)
    c = wl.synthetic(5000, 3.0, arrival="gamma", cv=1.5, seed=12)
    for col in ("arrival_s", "prompt_tokens", "output_tokens"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
        assert not np.array_equal(getattr(a, col), getattr(c, col))
    assert a.source == b.source and a.source["seed"] == 11


def test_length_dists_sample_their_means_and_bounds() -> None:
    rng = np.random.default_rng(0)
    assert set(LengthDist.constant(42).sample(rng, 100)) == {42}
    u = LengthDist.uniform(10, 20).sample(rng, N)
    assert u.min() == 10 and u.max() == 20 and u.mean() == pytest.approx(15, rel=0.01)
    ln = LengthDist.lognormal(500, 0.8).sample(rng, N)
    assert ln.dtype == np.int64 and ln.mean() == pytest.approx(500, rel=0.02)
    capped = LengthDist.lognormal(500, 0.8, cap_tokens=600).sample(rng, N)
    assert capped.max() == 600
    tiny = LengthDist.lognormal(1.0, 2.0).sample(rng, N)  # most draws round to 0
    assert tiny.min() == 1


def test_fit_recovers_a_lognormal() -> None:
    x = LengthDist.lognormal(300, 0.6).sample(np.random.default_rng(1), N)
    fitted = LengthDist.fit(x, "lognormal")
    assert fitted.get("sigma") == pytest.approx(0.6, rel=0.03)
    assert fitted.get("mean") == pytest.approx(300, rel=0.03)
    table = LengthDist.fit(x, "empirical")
    resampled = table.sample(np.random.default_rng(2), N)
    assert resampled.mean() == pytest.approx(x.mean(), rel=0.02)


@pytest.mark.parametrize("name", ["azure-conv", "mooncake-conv"])
def test_shipped_defaults_reproduce_their_trace_moments(name: str) -> None:
    summary = wl.load_length_summary(name)
    assert "license" in summary["source"] and "citation" in summary["source"]
    w = wl.synthetic(N, 1.0, prompt=name, output=name, seed=5)
    for role, col in (("prompt", w.prompt_tokens), ("output", w.output_tokens)):
        assert col.mean() == pytest.approx(summary[role]["mean"], rel=0.03)
        assert np.median(col) == pytest.approx(summary[role]["p50"], rel=0.03)
        assert col.min() >= 1 and col.max() <= summary[role]["max"]


def test_length_specs_from_config_values() -> None:
    assert wl.length_dist(7) == LengthDist.constant(7)
    assert wl.length_dist({"kind": "uniform", "low": 1, "high": 9}) == LengthDist.uniform(1, 9)
    assert wl.length_dist("azure-conv:lognormal", "output").kind == "lognormal"
    assert wl.length_dist("mooncake-conv", "prompt").get("name") == "mooncake-conv:prompt"
    assert wl.available_length_dists() == ["azure-conv", "mooncake-conv"]
    with pytest.raises(UserError, match="unknown length distribution 'nope'"):
        wl.length_dist("nope")
    with pytest.raises(UserError, match="unknown parameter 'sigm'"):
        wl.length_dist({"kind": "lognormal", "mean": 5, "sigm": 1})
    with pytest.raises(UserError, match="missing parameter 'sigma'"):
        wl.length_dist({"kind": "lognormal", "mean": 5})
    with pytest.raises(UserError, match="invalid parameters"):
        LengthDist.uniform(9, 1)


def test_bad_generator_arguments() -> None:
    with pytest.raises(UserError, match="rate_per_s must be > 0"):
        wl.synthetic(10, 0.0)
    with pytest.raises(UserError, match="cv applies to arrival='gamma'"):
        wl.synthetic(10, 1.0, cv=2.0)
    with pytest.raises(UserError, match="arrival must be"):
        wl.synthetic(10, 1.0, arrival="bursty")


def test_a_million_requests_are_fast_and_small() -> None:
    start = time.perf_counter()
    w = wl.synthetic(1_000_000, 50.0, arrival="gamma", cv=2.0, seed=0)
    assert time.perf_counter() - start < 2.0
    nbytes = w.arrival_s.nbytes + w.prompt_tokens.nbytes + w.output_tokens.nbytes
    assert len(w) == 1_000_000 and nbytes <= 30e6
    first = next(w.requests())
    assert first.request_id == 0 and first.arrival_s == 0.0 and first.prompt_tokens >= 1


def test_requests_hold_their_columns_field_by_field() -> None:
    """requests() makes each Request from a row without calling its constructor: every field,
    prefix hashes and max_tokens too, must still be the one the constructor would set."""
    n = 6
    w = wl.Workload("t", np.arange(n) * 0.5, np.arange(1, n + 1), np.arange(10, 10 + n),
                    prefix_hashes=[(i, i + 1) for i in range(n)], prefix_block_tokens=16,
                    max_tokens=np.arange(100, 100 + n))
    expected = [Request(i, i * 0.5, i + 1, 10 + i, (i, i + 1), 16, 100 + i) for i in range(n)]
    got = list(w.requests())
    assert got == expected and all(type(r) is Request for r in got)
    assert [r.token_ids for r in got] == [None] * n


# ---------------------------------------------------------------------------- transforms


def test_transforms_return_new_workloads_and_record_themselves() -> None:
    w = wl.synthetic(10_000, 2.0, seed=1)
    fast = wl.scale_to_rate(w, 9.0)
    assert wl.mean_rate_per_s(fast) == pytest.approx(9.0, rel=1e-12)
    np.testing.assert_array_equal(fast.prompt_tokens, w.prompt_tokens)
    assert wl.mean_rate_per_s(wl.scale_rate(w, 3.0)) == pytest.approx(
        3 * wl.mean_rate_per_s(w), rel=1e-12)
    assert fast.source["transforms"] == [
        {"op": "scale_to_rate", "rate_per_s": 9.0, "factor": pytest.approx(9 / wl.mean_rate_per_s(w))}]
    assert w.source["transforms"] == [] and wl.mean_rate_per_s(w) != pytest.approx(9.0)

    h = wl.head(fast, 100)
    assert len(h) == 100 and h.source["rows"] == 100
    assert [t["op"] for t in h.source["transforms"]] == ["scale_to_rate", "head"]

    win = wl.window(w, 1000.0, 2000.0)
    inside = (w.arrival_s >= 1000.0) & (w.arrival_s < 2000.0)
    assert len(win) == int(inside.sum()) and win.arrival_s[0] == 0.0
    np.testing.assert_allclose(win.arrival_s, w.arrival_s[inside] - w.arrival_s[inside][0])
    np.testing.assert_array_equal(win.output_tokens, w.output_tokens[inside])
    assert win.source["transforms"][-1] == {"op": "window", "start_s": 1000.0, "end_s": 2000.0,
                                            "offset_s": float(w.arrival_s[inside][0])}
    with pytest.raises(ValueError):
        win.arrival_s[0] = 5.0  # shared arrays are read-only
    with pytest.raises(UserError, match="holds no requests"):
        wl.window(w, 1e9, 2e9)


# ---------------------------------------------------------------------------- readers


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_csv_with_a_mapping(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.csv", "t_ms,in,out,h,cap\n1000,5,2,\"[1, 2]\",9\n"
                                   "1500,7,3,1 3,9\n\n2500,9,1,,4\n")
    w = wl.read_table(p, arrival="t_ms", prompt="in", output="out", hashes="h",
                      max_tokens="cap", time_unit="ms")
    np.testing.assert_allclose(w.arrival_s, [0.0, 0.5, 1.5])
    assert w.prompt_tokens.tolist() == [5, 7, 9] and w.output_tokens.tolist() == [2, 3, 1]
    assert w.prefix_hashes == [(1, 2), (1, 3), ()] and w.max_tokens.tolist() == [9, 9, 4]
    assert w.source["path"] == str(p) and w.source["format"] == "csv" and w.source["rows"] == 3


def test_read_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"ts": 3.0, "p": 10, "o": 1, "hh": [4]}, {"ts": 3.25, "p": 20, "o": 2, "hh": []}]
    p = _write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    w = wl.read_table(p, arrival="ts", prompt="p", output="o", hashes="hh")
    assert w.arrival_s.tolist() == [0.0, 0.25] and w.prefix_hashes == [(4,), ()]
    q = tmp_path / "t.parquet"
    pq.write_table(pa.table({"arrival_s": [0.0, 1.0, 1.0], "prompt_tokens": [3, 4, 5],
                             "output_tokens": [6, 7, 8]}), q)
    w = wl.load_trace(q)
    assert w.source["format"] == "parquet" and w.output_tokens.tolist() == [6, 7, 8]


def test_datetime_arrivals_and_load_trace_dispatch(tmp_path: Path) -> None:
    azure = _write(tmp_path / "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                       "2023-11-16 18:15:46.6805900,374,44\n"
                                       "2023-11-16 18:15:50.9951690,396,109\n")
    w = wl.load_trace(azure)
    assert w.source["format"] == "azure-csv"
    assert w.arrival_s[1] == pytest.approx(4.314579, abs=1e-9)
    moon = _write(tmp_path / "m.jsonl",
                  '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}\n'
                  '{"timestamp": 3000, "input_length": 9, "output_length": 5, "hash_ids": [0]}\n')
    w = wl.load_trace(moon)
    assert w.source["format"] == "mooncake-jsonl" and w.prefix_hashes == [(0, 1), (0,)]
    odd = _write(tmp_path / "o.csv", "when,a,b\n1,2,3\n")
    with pytest.raises(UserError, match=r"unknown trace columns \(a, b, when\)"):
        wl.load_trace(odd)
    w = wl.load_trace(odd, arrival="when", prompt="a", output="b")
    assert len(w) == 1
    bom = _write(tmp_path / "bom.csv", "\ufeff" + "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                           "2023-11-16 18:15:46,0,44\n2023-11-16 18:15:47,3,4\n")
    w = wl.load_trace(bom, zero_lengths="clamp")
    assert w.source["format"] == "azure-csv" and w.prompt_tokens.tolist() == [1, 3]
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"a,b,c\n\xff\xfe\x00,1,2\n")
    with pytest.raises(UserError, match=r"bin\.csv: not UTF-8 text"):
        wl.read_table(binary, arrival="a", prompt="b", output="c")
    with pytest.raises(UserError, match="unknown trace format"):
        wl.load_trace(_write(tmp_path / "x.txt", "1,2,3\n"))


def test_unsorted_rows_error_unless_sort(tmp_path: Path) -> None:
    p = _write(tmp_path / "u.csv", "t,p,o\n0,1,1\n5,2,2\n3,3,3\n")
    with pytest.raises(UserError, match=r"u\.csv line 4: t goes back in time by 2 s"):
        wl.read_table(p, arrival="t", prompt="p", output="o")
    w = wl.read_table(p, arrival="t", prompt="p", output="o", sort=True)
    assert w.arrival_s.tolist() == [0, 3, 5] and w.prompt_tokens.tolist() == [1, 3, 2]
    assert w.source["sorted"] is True


def test_zero_lengths_error_by_default_or_clamp_or_drop(tmp_path: Path) -> None:
    p = _write(tmp_path / "z.csv", "t,p,o\n0,5,0\n1,0,4\n2,6,7\n")
    with pytest.raises(UserError, match=r"z\.csv line 2: o is 0 .*set zero_lengths: clamp or drop"):
        wl.read_table(p, arrival="t", prompt="p", output="o")
    c = wl.read_table(p, arrival="t", prompt="p", output="o", zero_lengths="clamp")
    assert c.output_tokens.tolist() == [1, 4, 7] and c.prompt_tokens.tolist() == [5, 1, 6]
    assert c.source["zero_rows"] == {"prompt": 1, "output": 1}
    d = wl.read_table(p, arrival="t", prompt="p", output="o", zero_lengths="drop")
    assert d.prompt_tokens.tolist() == [6] and d.arrival_s.tolist() == [0.0]
    assert d.source["dropped_rows"] == 2


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD = "2023-11-16 18:15:46.6805900,374,44\n"


@pytest.mark.parametrize("name,text,message", [
    ("bad_int.csv", AZURE_HEADER + GOOD + "\n" + "2023-11-16 18:15:47.1,12,abc\n",
     r"bad_int\.csv line 4: GeneratedTokens 'abc' is not an integer$"),
    ("neg.csv", AZURE_HEADER + GOOD + "2023-11-16 18:15:47.1,-3,4\n",
     r"neg\.csv line 3: ContextTokens -3 is negative$"),
    ("frac.csv", AZURE_HEADER + GOOD + "2023-11-16 18:15:47.1,3.5,4\n",
     r"frac\.csv line 3: ContextTokens 3\.5 is not an integer$"),
    ("ts.csv", AZURE_HEADER + GOOD + "yesterday,3,4\n",
     r"ts\.csv line 3: TIMESTAMP 'yesterday' is not a date/time$"),
    ("ragged.csv", AZURE_HEADER + GOOD + "2023-11-16 18:15:47.1,3\n",
     r"ragged\.csv line 3: expected 3 fields, found 2$"),
    ("cols.csv", "TIMESTAMP,ContextTokens\n" + GOOD,
     r"cols\.csv line 1: missing column 'GeneratedTokens' \(header has: TIMESTAMP, ContextTokens\)$"),
    ("empty.csv", "", r"empty\.csv: empty file$"),
    ("header_only.csv", AZURE_HEADER, r"header_only\.csv: no data rows$"),
])
def test_malformed_csv_gives_one_line_naming_line_and_field(
        tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        wl.read_azure_csv(_write(tmp_path / name, text))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize("text,message", [
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": []}\n{"timestamp": 1',
     r"line 2: not valid JSON"),
    ('{"timestamp": 0, "input_length": 5, "hash_ids": []}\n', r"line 1: missing field 'output_length'"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": []}\n\n'
     '{"timestamp": 9, "input_length": "x", "output_length": 1, "hash_ids": []}\n',
     r"line 3: input_length 'x' is not an integer"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, "a"]}\n',
     r"line 1: hash_ids \[1, 'a'\] is not a list of integers"),
    ('[1, 2]\n', r"line 1: expected a JSON object per line"),
])
def test_malformed_jsonl(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError, match=r"m\.jsonl " + message):
        wl.read_mooncake_jsonl(_write(tmp_path / "m.jsonl", text))


def test_malformed_parquet_names_the_row(tmp_path: Path) -> None:
    q = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"arrival_s": [0.0, 1.0], "prompt_tokens": [3.0, 4.5],
                             "output_tokens": [1, 1]}), q)
    with pytest.raises(UserError, match=r"bad\.parquet row 2: prompt_tokens 4\.5 is not an integer"):
        wl.load_trace(q)
    with pytest.raises(UserError, match=r"missing column 'out'"):
        wl.read_table(q, arrival="arrival_s", prompt="prompt_tokens", output="out")
    junk = _write(tmp_path / "junk.parquet", "not parquet")
    with pytest.raises(UserError, match=r"junk\.parquet"):
        wl.load_trace(junk)


# ---------------------------------------------------------------------------- real traces


def test_azure_trace(shared_traces: Path) -> None:
    w = wl.read_azure_csv(shared_traces / "azure2023_conv.csv")
    assert len(w) == 19_366 and w.source["rows"] == 19_366
    assert wl.mean_rate_per_s(w) == pytest.approx(5.5, abs=0.05)
    assert wl.interarrival_cv(w) == pytest.approx(1.1, abs=0.02)
    assert w.prompt_tokens.mean() == pytest.approx(1155, abs=1)
    assert w.output_tokens.mean() == pytest.approx(211, abs=1)
    assert np.percentile(w.prompt_tokens, 99) == pytest.approx(4142, abs=1)
    assert w.arrival_s[-1] / 60 == pytest.approx(58, abs=1)
    assert wl.mean_rate_per_s(wl.scale_to_rate(w, 20.0)) == pytest.approx(20.0, rel=1e-12)


def test_mooncake_trace(shared_traces: Path) -> None:
    path = shared_traces / "mooncake_conversation.jsonl"
    w = wl.read_mooncake_jsonl(path)
    assert len(w) == 12_031 and wl.mean_rate_per_s(w) == pytest.approx(3.4, abs=0.05)
    assert w.prompt_tokens.mean() == pytest.approx(12_035, abs=1)
    assert w.output_tokens.mean() == pytest.approx(343, abs=1)
    assert np.all(np.diff(w.arrival_s) >= 0) and w.source["bucket_s"] == pytest.approx(3.0, abs=0.01)
    blocks = np.array([len(h) for h in w.prefix_hashes])
    np.testing.assert_array_equal(blocks, -(-w.prompt_tokens // 512))
    seen: set[int] = set()
    hits = 0
    for hashes in w.prefix_hashes:
        hits += sum(h in seen for h in hashes)
        seen.update(hashes)
    assert hits / blocks.sum() == pytest.approx(0.366, abs=0.001)

    raw = wl.read_mooncake_jsonl(path, spread_buckets=False)
    assert len(np.unique(raw.arrival_s)) == 1180  # ~3 s buckets
    spread = w.arrival_s + w.source["rebased_by_s"]
    assert np.all((spread >= raw.arrival_s - 1e-9) & (spread < raw.arrival_s + 3.1))
    assert len(np.unique(w.arrival_s)) == len(w)
    again = wl.read_mooncake_jsonl(path, seed=0)
    other = wl.read_mooncake_jsonl(path, seed=1)
    np.testing.assert_array_equal(again.arrival_s, w.arrival_s)
    assert not np.array_equal(other.arrival_s, w.arrival_s)


def test_shipped_summaries_are_fitted_from_the_traces(shared_traces: Path) -> None:
    for name, w in (("azure-conv", wl.read_azure_csv(shared_traces / "azure2023_conv.csv")),
                    ("mooncake-conv",
                     wl.read_mooncake_jsonl(shared_traces / "mooncake_conversation.jsonl"))):
        shipped = wl.load_length_summary(name)
        fitted = wl.fit_length_summary(w, name=name, trace="", citation="", license="")
        assert shipped["prompt"] == fitted["prompt"] and shipped["output"] == fitted["output"]
        assert shipped["source"]["rows"] == len(w)
        assert math.isclose(shipped["arrival"]["mean_rate_per_s"],
                            fitted["arrival"]["mean_rate_per_s"])
