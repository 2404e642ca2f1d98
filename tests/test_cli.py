"""The CLI as a user meets it: runs, run folders, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from hetero_sched import cli

from helpers import disagg_experiment


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["hetero-sched", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_writes_a_run_folder(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(disagg_experiment()))
    code, out, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "--out", str(tmp_path / "run"), "-q")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "run")
    doc = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert doc["summary"]["requests"] == 400
    assert doc["stamp"]["version"] and "assumptions" in doc["stamp"]
    assert (tmp_path / "run" / "requests.parquet").stat().st_size > 0


def _bad(tmp_path, text: str):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


BAD_CONFIGS = {
    "unknown field": (lambda e: e.update(colour="red"), "colour: Extra inputs are not permitted"),
    "negative tp": (lambda e: e["groups"][0].update(tp=-1), "groups.0.tp"),
    "unknown device": (lambda e: e["groups"][0].update(device="tpu9"), "unknown device 'tpu9'"),
    "unknown policy": (lambda e: e.update(policy="fastest"), "unknown policy 'fastest'"),
    "bad policy param": (lambda e: e.update(policy={"name": "disagg", "params": {"speed": 3}}), "unknown parameter(s) speed"),
    "unknown model": (lambda e: e.update(model="llama-9"), "unknown model 'llama-9'"),
    "model does not fit": (lambda e: e.update(model="llama-3.1-405b"), "groups[0] (p): llama-3.1-405b"),
    "missing workload rate": (lambda e: e["workload"].pop("rate_per_s"), "needs num_requests and rate_per_s"),
    "duplicate group": (lambda e: e["groups"].append(dict(e["groups"][0])), "repeated: p"),
    "no decode group": (lambda e: e["groups"].pop(), "no group can decode"),
    "tp mismatch": (lambda e: e["groups"][0].update(tp=8), "tp*pp"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_give_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    mutate, expected = BAD_CONFIGS[case]
    exp = disagg_experiment()
    mutate(exp)
    code, out, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))), "-q")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("text,expected", [
    ("groups: [\n  - name: x\n", "line"),                 # YAML syntax error, with its line
    ("- just\n- a list\n", "expected a mapping"),
    ("", "expected a mapping"),
])
def test_malformed_yaml(text, expected, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, text)))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_bad_trace_names_file_line_and_field(tmp_path, monkeypatch, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:47.0000000,12x,44\n")
    exp = disagg_experiment(workload={"kind": "trace", "path": str(trace)})
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))))
    assert code == 2
    assert "t.csv line 3" in err and "ContextTokens" in err and len(err.strip().splitlines()) == 1


def test_bad_flags_and_missing_file(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "simulate", "--seed", "abc")
    assert code == 2 and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such experiment file" in err


def test_run_into_a_folder_whose_journal_cannot_be_replaced_is_one_line_before_ray(tmp_path, monkeypatch, capsys):
    (tmp_path / "run" / "scheduler.journal").mkdir(parents=True)      # a directory where the journal goes
    code, out, err = run_cli(monkeypatch, capsys, "run", "--out", str(tmp_path / "run"), "-q")
    assert code == 2 and err.count("\n") == 1 and "cannot replace the run's journal" in err
