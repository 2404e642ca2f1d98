"""The CLI as a user meets it: runs, run folders, and one-line errors with exit status 2."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
import yaml

import hetero_sched as hs

from hetero_sched import cli
from hetero_sched.catalog import list_devices, list_models, resolve_assumptions

from helpers import disagg_experiment
from test_calibrate import _synthetic, _write_csv


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
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--prefix-block-tokens", "-1")   # before any Ray
    assert code == 2 and "--prefix-block-tokens" in err and "Traceback" not in err


def test_run_into_a_folder_whose_journal_cannot_be_replaced_is_one_line_before_ray(tmp_path, monkeypatch, capsys):
    (tmp_path / "run" / "scheduler.journal").mkdir(parents=True)      # a directory where the journal goes
    code, out, err = run_cli(monkeypatch, capsys, "run", "--out", str(tmp_path / "run"), "-q")
    assert code == 2 and err.count("\n") == 1 and "cannot replace the run's journal" in err


@pytest.mark.parametrize("blocked", ["requests.parquet", "decisions.parquet"])
def test_simulate_into_a_folder_it_cannot_write_is_one_line(blocked, tmp_path, monkeypatch, capsys):
    """The stream's writer thread opens the Parquet files: its error reaches the user as one line."""
    (tmp_path / "run" / blocked).mkdir(parents=True)                   # a directory where the file goes
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_exp_file(tmp_path)), "-q",
                           "--out", str(tmp_path / "run"))
    _one_line(code, err, f"{tmp_path / 'run'}: cannot write the run folder", blocked)


# ---------------------------------------------------------------- issue 16: what a new user hit

def _exp_file(tmp_path, **over):
    cfg = tmp_path / "exp.yaml"
    exp = disagg_experiment(**over)
    exp["workload"]["num_requests"] = 40
    cfg.write_text(yaml.safe_dump(exp))
    return cfg


def _one_line(code, err, *mentions):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    for m in mentions:
        assert m in lines[0], (m, lines[0])
    return lines[0]


def test_set_overrides_any_field_by_its_dotted_path(tmp_path, monkeypatch, capsys):
    cfg = _exp_file(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q", "--out", str(tmp_path / "run"),
                             "--set", "workload.num_requests=25", "--set", "groups.0.replicas=1",
                             "--set", "policy={name: disagg, params: {choices: 1}}")
    assert code == 0, err
    doc = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert doc["summary"]["requests"] == 25 and doc["experiment"]["groups"][0]["replicas"] == 1
    assert doc["experiment"]["policy"] == {"name": "disagg", "params": {"choices": 1}}
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q", "--set", "colour=red")
    _one_line(code, err, "--set colour", "not a experiment field")
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q", "--set", "workload.rate_per_s")
    _one_line(code, err, "expected KEY=VALUE")
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q", "--set", "workload.rate_per_s=-1")
    _one_line(code, err, "workload.rate_per_s")
    code, _, err = run_cli(monkeypatch, capsys, "run", str(cfg), "-q", "--set", "colour=red")   # before any Ray
    _one_line(code, err, "--set colour")


USER_POLICIES = '''
from hetero_sched.policies import Placement, Policy

class Raises(Policy):
    def place(self, request, groups, now_s):
        raise ValueError("no idea where " + str(request.request_id) + " goes")

class BadInit(Policy):
    def __init__(self, limit: int = 3):
        raise RuntimeError("cannot start")
    def place(self, request, groups, now_s):
        return Placement(0)

class ReturnsNone(Policy):
    def place(self, request, groups, now_s):
        return None

class NamesAGroup(Policy):
    def place(self, request, groups, now_s):
        return Placement(groups[0].name)
'''


@pytest.mark.parametrize("name, expected", [
    ("mine:Raises", "policy mine:Raises raised ValueError in place(): no idea where 0 goes (--debug for the traceback)"),
    ("mine:BadInit", "policy mine:BadInit raised RuntimeError: cannot start (--debug for the traceback)"),
    ("mine:ReturnsNone", "policy mine:ReturnsNone: place() returned None, expected a Placement or a Reject"),
    ("mine:NamesAGroup", "', decode_group=None), expected a Placement of group ids (int)"),
    ("broken:P", "policy 'broken:P': importing broken raised SyntaxError"),
    ("absent:P", "no module named 'absent' (put absent.py next to the experiment file"),
])
def test_a_user_policy_failing_is_one_line_naming_it(name, expected, tmp_path, monkeypatch, capsys):
    """The policy module sits next to the experiment file, not on PYTHONPATH: the CLI finds it."""
    (tmp_path / "mine.py").write_text(USER_POLICIES)
    (tmp_path / "broken.py").write_text("def place(:\n")
    cfg = _exp_file(tmp_path, policy=name)
    monkeypatch.setattr(sys, "path", list(sys.path))             # the CLI adds the experiment's folder
    monkeypatch.setenv("PYTHONPATH", "")
    for mod in ("mine", "broken"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q", "--out", str(tmp_path / "r"))
    _one_line(code, err, expected)


def test_debug_prints_the_traceback_of_what_failed(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.py").write_text(USER_POLICIES)
    cfg = _exp_file(tmp_path, policy="mine:Raises")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "mine", raising=False)
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q", "--out", str(tmp_path / "r"), "--debug")
    assert code == 2 and "Traceback" in err and 'mine.py", line' in err and "ValueError: no idea where" in err
    assert err.strip().splitlines()[-1].startswith("error: policy mine:Raises raised ValueError")
    code, _, err = run_cli(monkeypatch, capsys, "catalog", "--device", "trn2", "--debug")   # a plain UserError
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --device and --model")
    code, _, err = run_cli(monkeypatch, capsys, "tokenizer", "--hf-cache", "--debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1] == "error: --hf-cache needs a FOLDER"
    code, _, err = run_cli(monkeypatch, capsys, "sensitivity", str(tmp_path / "absent.yaml"), "-o", str(tmp_path / "s"),
                           "--debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].endswith("no such sweep or experiment file")


@pytest.mark.parametrize("command", sorted(typer.main.get_command(cli.app).commands))
def test_every_command_accepts_debug(command, monkeypatch, capsys):
    """The README promises --debug on every command: a command added without it fails here."""
    code, out, err = run_cli(monkeypatch, capsys, command, "--debug", "--help")
    assert code == 0 and "--debug" in out, err


@pytest.mark.parametrize("command", sorted(typer.main.get_command(cli.app).commands))
def test_help_prose_is_wrapped_at_the_terminal_not_at_the_docstring(command, monkeypatch, capsys):
    """On a terminal wide enough, each paragraph of a command's docstring is one help line: the
    docstring's own line breaks (kept by recent typer) left a break mid-sentence at any width."""
    doc = next(c.callback.__doc__ for c in cli.app.registered_commands if c.callback.__name__ == command)
    monkeypatch.setenv("COLUMNS", "1000")
    code, out, err = run_cli(monkeypatch, capsys, command, "--help")
    lines = {line.strip() for line in out.splitlines()}
    assert code == 0, err
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        assert " ".join(paragraph.split()) in lines


def test_a_policy_module_next_to_the_experiment_is_importable(tmp_path, monkeypatch, capsys):
    (tmp_path / "nextdoor.py").write_text(
        "from hetero_sched.policies import Placement, Policy\n"
        "class Last(Policy):\n"
        "    def place(self, request, groups, now_s):\n"
        "        return Placement(max(g.group_id for g in groups if g.can_prefill))\n")
    cfg = _exp_file(tmp_path, policy="nextdoor:Last")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.chdir(tmp_path.parent)                                       # not the experiment's folder
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert set(pq.read_table(tmp_path / "r" / "requests.parquet").column("prefill_group").to_pylist()) == {1}
    assert str(tmp_path) in os.environ["PYTHONPATH"]           # Ray workers it starts inherit it


def test_output_paths_that_cannot_be_written_are_one_line(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"experiment": disagg_experiment(), "set": {"workload.num_requests": 20}}))
    code, _, err = run_cli(monkeypatch, capsys, "sweep", str(sweep), "--out", str(a_file), "--no-ray")
    _one_line(code, err, "--out", "is a file, not a folder")
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_exp_file(tmp_path)), "--out", str(a_file), "-q")
    _one_line(code, err, "is a file, not a folder")
    code, _, err = run_cli(monkeypatch, capsys, "sweep", str(sweep), "--out", str(tmp_path / "s"), "--no-ray", "-q")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "report", str(tmp_path / "s"), "--out", str(a_file))
    _one_line(code, err, "is a file, not a folder")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"model": "llama-3.1-8b", "workload": {"kind": "synthetic", "num_requests": 50,
                                                                         "rate_per_s": 5.0},
                                    "devices": {"h100": {"max_chips": 1, "roles": ["both"]}}}))
    code, _, err = run_cli(monkeypatch, capsys, "plan", str(plan), "--out", str(a_file))
    _one_line(code, err, "is a file, not a folder")                  # at once, not after every simulation
    assert "simulated" not in err
    code, out, err = run_cli(monkeypatch, capsys, "plan", str(plan), "--out", str(tmp_path / "p"), "-q")
    assert code == 0, err
    rows = pq.read_table(tmp_path / "p" / "plan.parquet").to_pylist()
    assert rows and rows[0]["rank"] == 1 and "h100" in rows[0]["configuration"] and "h100" in out


def test_sweep_prints_its_results_and_validates_on_one_clean_line(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"experiment": disagg_experiment(), "set": {"workload.num_requests": 30},
                                     "axes": {"policy.name": ["disagg", "disagg-slo"]}}))
    code, out, err = run_cli(monkeypatch, capsys, "sweep", str(sweep), "--out", str(tmp_path / "o"), "--no-ray",
                             "--set", "workload.rate_per_s=5")
    assert code == 0, err
    assert "disagg-slo" in out and "attained" in out and out.strip().endswith("sweep.parquet")
    monkeypatch.setenv("COLUMNS", "80")                          # report's tables fit the terminal
    code, out, err = run_cli(monkeypatch, capsys, "report", str(tmp_path / "o"))
    assert code == 0, err
    assert max(len(line) for line in out.splitlines() if not line.endswith(".png")) <= 80 and "disagg-slo" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": disagg_experiment(), "axes": {"policy.name": ["disagg", "nope"]}}))
    code, _, err = run_cli(monkeypatch, capsys, "sweep", str(bad), "--out", str(tmp_path / "o2"), "--no-ray")
    assert err == err.strip() + "\n"                               # no blank line before the error
    _one_line(code, err, "unknown policy 'nope'")


@pytest.mark.parametrize("text, expected", [
    ("", "the experiment is empty"),
    ("# just a comment\n", "the experiment is empty"),
    ("- a\n- b\n", "got a list"),
])
def test_empty_or_odd_yaml_says_what_it_is(text, expected, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, text)))
    line = _one_line(code, err, expected)
    assert "NoneType" not in line


@pytest.mark.parametrize("mutate, expected", [
    (lambda e: e.update(policy={"name": "disagg", "params": {"choices": "two"}}),
     "policy disagg: params: choices: Input should be a valid integer"),
    (lambda e: e["workload"].update(kind="trace", path="t.csv", arrival="gamma"),
     "workload: arrival applies to kind: synthetic"),
    (lambda e: e["workload"].update(path="t.csv"), "workload: path applies to kind: trace"),
    (lambda e: e["workload"].update(zero_lengths="clamp"), "workload: zero_lengths applies to kind: trace"),
    (lambda e: e.update(weight_dtype="fp7"), "weight_dtype"),
    (lambda e: e.update(kv_dtype="fp8", overrides={"model.llama-3.1-8b.kv_dtype": "bf16"}), "kv_dtype is set twice"),
])
def test_config_nits_are_clear(mutate, expected, tmp_path, monkeypatch, capsys):
    exp = disagg_experiment()
    mutate(exp)
    if exp["workload"].get("kind") == "trace":
        for key in ("num_requests", "rate_per_s"):
            exp["workload"].pop(key, None)
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))), "-q")
    _one_line(code, err, expected)


def test_catalog_bad_parallelism_names_the_flag(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "catalog", "--device", "trn2", "--model", "llama-3.1-8b", "--tp", "-64")
    line = _one_line(code, err, "--tp")
    assert "count" not in line


def test_at_80_columns_names_are_never_cut(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(monkeypatch, capsys, "catalog")
    assert code == 0, err
    assert max(len(line) for line in out.splitlines() if "http" not in line) <= 80
    words = set(out.split())
    assert {d.name for d in list_devices()} <= words and {m.name for m in list_models()} <= words
    assert set(resolve_assumptions()) <= words                     # every override key, whole
    assert "…" not in out


def test_trace_options_are_settable_and_messages_recommend_only_those(tmp_path, monkeypatch, capsys):
    """Each trace problem's message names an experiment field; setting it makes the trace load."""
    trace = tmp_path / "t.csv"
    trace.write_text("when_ms,in,out\n0,5,0\n2000,6,7\n1000,8,9\n")
    exp = disagg_experiment(workload={"kind": "trace", "path": str(trace)})
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))), "-q")
    _one_line(code, err, "columns: {arrival: ..., prompt: ..., output: ...}")
    exp["workload"]["columns"] = {"arrival": "when_ms", "prompt": "in", "output": "out"}
    exp["workload"]["time_unit"] = "ms"
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))), "-q")
    _one_line(code, err, "set zero_lengths: clamp or drop")
    exp["workload"]["zero_lengths"] = "clamp"
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))), "-q")
    _one_line(code, err, "set sort: true")
    exp["workload"]["sort"] = True
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))), "-q",
                           "--out", str(tmp_path / "ok"))
    assert code == 0, err
    arrivals = sorted(pq.read_table(tmp_path / "ok" / "requests.parquet").column("arrival_s").to_pylist())
    assert arrivals == [0.0, 1.0, 2.0]                              # ms, sorted
    ms = tmp_path / "c.csv"                                         # canonical columns, arrival in ms
    ms.write_text("arrival_ms,prompt_tokens,output_tokens\n0,5,3\n1500,6,7\n")
    exp = disagg_experiment(workload={"kind": "trace", "path": str(ms)})
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))), "-q",
                           "--out", str(tmp_path / "ms"))
    assert code == 0, err
    assert pq.read_table(tmp_path / "ms" / "requests.parquet").column("arrival_s").to_pylist() == [0.0, 1.5]
    exp["workload"]["spread_buckets"] = True                        # a Mooncake-only option on a generic trace
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))), "-q")
    _one_line(code, err, "spread_buckets does not apply to a generic CSV/JSONL/Parquet trace")


def test_fp8_weights_and_kv_are_experiment_fields(tmp_path):
    base = hs.simulate(disagg_experiment(workload={"kind": "synthetic", "num_requests": 20, "rate_per_s": 5.0}))
    fp8 = hs.simulate(disagg_experiment(weight_dtype="fp8", kv_dtype="fp8",
                                        workload={"kind": "synthetic", "num_requests": 20, "rate_per_s": 5.0}))
    stamp = fp8.stamp["assumptions"]
    assert stamp["model.llama-3.1-8b.weight_dtype"]["value"] == "fp8"
    assert stamp["model.llama-3.1-8b.kv_dtype"]["status"] == "override"
    assert base.stamp["assumptions"]["model.llama-3.1-8b.kv_dtype"]["value"] == "bf16"
    # half the bytes per token to move: the transfers of the same requests carry half the bytes
    def moved(r):
        return sum(x for x in r.decisions_table().column("bytes").to_pylist() if x)
    assert moved(fp8) * 2 == moved(base)


def test_a_calibrated_device_name_is_usable_as_a_group_device(tmp_path, monkeypatch, capsys):
    csv_path = _write_csv(tmp_path / "m.csv", _synthetic(seed=11, noise=0.01))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", str(csv_path), "--device", "my-h100", "--like", "h100")
    assert code == 0, err
    assert (tmp_path / "my-h100-profile.json").is_file()
    exp = disagg_experiment(groups=[{"name": "g", "device": "my-h100", "count": 1, "role": "both"}], policy="colocated")
    exp["workload"]["num_requests"] = 20
    sub = tmp_path / "exps"
    sub.mkdir()
    (sub / "my-h100-profile.json").write_bytes((tmp_path / "my-h100-profile.json").read_bytes())
    cfg = sub / "e.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    monkeypatch.chdir(tmp_path.parent)                      # the profile is found next to the experiment
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q", "--out", str(tmp_path / "r"))
    assert code == 0, err
    doc = json.loads((tmp_path / "r" / "summary.json").read_text())
    profile = doc["stamp"]["profiles"]["g"]
    assert profile["device"] == "my-h100" and profile["base_device"] == "h100" and not profile["forced"]
    assert doc["experiment"]["groups"][0]["cost_profile"] == str(sub / "my-h100-profile.json")
    exp["groups"][0]["device"] = "my-h200"
    cfg.write_text(yaml.safe_dump(exp))
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(cfg), "-q")
    _one_line(code, err, "unknown device 'my-h200'", "my-h200-profile.json next to the experiment")


def test_calibrate_refuses_fits_it_cannot_trust_unless_forced(tmp_path, monkeypatch, capsys):
    one = tmp_path / "one.csv"
    one.write_text("kind,batch,tokens,context,ms\nprefill,1,2048,0,40\n")
    out = tmp_path / "p.json"
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", str(one), "--device", "h100", "--out", str(out))
    _one_line(code, err, "not writing a profile: under-determined: 3 parameters from 1 point", "--force")
    assert not out.exists()
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", str(one), "--device", "h100", "--out", str(out), "--force")
    assert code == 0, err
    profile = json.loads(out.read_text())
    assert profile["forced"] and "under-determined" in profile["forced"][0]
    exp = disagg_experiment(groups=[{"name": "g", "device": "h100", "count": 1, "role": "both",
                                     "cost_profile": str(out)}], policy="colocated")
    exp["workload"]["num_requests"] = 10
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_bad(tmp_path, yaml.safe_dump(exp))), "-q",
                           "--out", str(tmp_path / "forced"))
    assert code == 0, err
    stamped = json.loads((tmp_path / "forced" / "summary.json").read_text())["stamp"]["profiles"]["g"]
    assert "under-determined" in stamped["forced"][0]               # a result from it says it was forced
    tiny = tmp_path / "tiny.csv"                                    # a 1e-7 ms "measurement"
    tiny.write_text("kind,batch,tokens,context,ms\nprefill,1,2048,0,0.0000001\n")
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", str(tiny), "--device", "h100", "--out", str(out))
    _one_line(code, err, "line 2, column 'ms'", "1 µs")
    folder = tmp_path / "profiles"                                  # --out a folder: the profile goes inside
    folder.mkdir()
    good = _write_csv(tmp_path / "good.csv", _synthetic(seed=3, noise=0.01))
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", str(good), "--device", "h100", "--out", str(folder))
    assert code == 0, err
    assert (folder / "h100-profile.json").is_file()


def test_the_readme_python_example_runs_on_a_fresh_install(tmp_path):
    """The README's "From Python" block, run as written with pandas unavailable (not a
    dependency: the block once called ``to_pandas()``)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"From Python:\n\n```python\n(.*?)```", readme, re.S).group(1)
    prelude = ("import sys\n"                      # pandas cannot be imported, as on a fresh install
               "class NoPandas:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'pandas':\n"
               "            raise ModuleNotFoundError(\"No module named 'pandas'\")\n"
               "sys.meta_path.insert(0, NoPandas())\n")
    proc = subprocess.run([sys.executable, "-c", prelude + block], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "x" / "requests.parquet").is_file()
