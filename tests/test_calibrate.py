"""`calibrate`: recovers known parameters from synthetic measurements (model + seeded noise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hetero_sched.calibrate import Measurement, fit_coefficients, fit_roofline, predict_s, read_measurements
from hetero_sched.catalog import GroupSpec
from hetero_sched.cli import app
from hetero_sched.costmodel import FittedCost, RooflineCost, build_group_cost
from hetero_sched.errors import UserError

TRUE = {"compute_efficiency": 0.62, "memory_efficiency": 0.71, "layer_latency_s": 4e-5}
GROUP = GroupSpec("h100", 1, tp=1)


def _grid() -> list[Measurement]:
    rows = [Measurement("prefill", b, n, h, 1.0) for b in (1, 4) for n in (256, 2048, 8192) for h in (0, 4096)]
    rows += [Measurement("decode", b, 16, b * c, 1.0) for b in (1, 8, 64, 512) for c in (256, 4096)]
    return rows


def _synthetic(seed: int, noise: float) -> list[Measurement]:
    truth = build_group_cost(GROUP, "llama-3.1-8b", {f"cost.h100.{k}": v for k, v in TRUE.items()})
    rng = np.random.default_rng(seed)
    return [Measurement(m.kind, m.batch, m.tokens, m.context,
                        predict_s(truth, m) * (1 + noise * rng.standard_normal()), f"p{i}")
            for i, m in enumerate(_grid())]


def test_roofline_fit_recovers_known_parameters_from_noisy_synthetic_points() -> None:
    result = fit_roofline(_synthetic(seed=7, noise=0.02), GROUP, "llama-3.1-8b")
    for name, value in TRUE.items():
        assert result.params[name] == pytest.approx(value, rel=0.1), name
    assert result.rms() < 0.04
    assert result.rms(loo=True) < 0.06


def test_roofline_fit_is_exact_without_noise() -> None:
    result = fit_roofline(_synthetic(seed=0, noise=0.0), GROUP, "llama-3.1-8b")
    for name, value in TRUE.items():
        assert result.params[name] == pytest.approx(value, rel=1e-4), name


def test_fitted_coefficients_recovered() -> None:
    truth = FittedCost(2e-3, 3e-5, 4e-10, ((64, 5e-3, 2e-8, 1e-5), (1024, 9e-3, 2e-8, 3e-5)),
                       kv_capacity_tokens=1, kv_bytes_per_token=1, transfer_bytes_per_token=1,
                       egress_bytes_per_s=1.0, ingress_bytes_per_s=1.0)
    rng = np.random.default_rng(3)
    rows = []
    for m in _grid():
        t = predict_s(truth, m)
        rows.append(Measurement(m.kind, m.batch, m.tokens, m.context, t * (1 + 0.01 * rng.standard_normal())))
    rows += [Measurement("decode", b, 1, b * 1000, predict_s(truth, Measurement("decode", b, 1, b * 1000, 1.0)))
             for b in (2, 16, 128, 256)]
    result = fit_coefficients(rows, decode_pieces=(64,))
    a, b, c = result.params["prefill"]
    assert (a, b, c) == pytest.approx((2e-3, 3e-5, 4e-10), rel=0.15)
    (hi1, *small), (hi2, *large) = result.params["decode_pieces"]
    assert (hi1, hi2) == (64, 512)
    assert small == pytest.approx([5e-3, 2e-8, 1e-5], rel=0.15)
    assert large == pytest.approx([9e-3, 2e-8, 3e-5], rel=0.15)


def _write_csv(path: Path, rows: list[Measurement]) -> Path:
    lines = ["kind,batch,tokens,context,ms,label"]
    lines += [f"{m.kind},{m.batch},{m.tokens},{m.context},{m.seconds * 1e3:.6f},{m.label}" for m in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_writes_a_profile_that_build_group_cost_uses(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "my_gpu.csv", _synthetic(seed=11, noise=0.01))
    out = tmp_path / "my-gpu.json"
    res = CliRunner().invoke(app, ["calibrate", str(csv_path), "--device", "my-gpu", "--like", "h100",
                                   "--model", "llama-3.1-8b", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "leave-one-out" in res.output
    profile = json.loads(out.read_text())
    assert profile["device"] == "my-gpu" and profile["base_device"] == "h100"
    cost = build_group_cost(GROUP, "llama-3.1-8b", profile=out)
    assert isinstance(cost, RooflineCost)
    assert cost.layer_latency_s == pytest.approx(TRUE["layer_latency_s"], rel=0.1)
    # An explicit experiment override still beats the profile.
    pinned = build_group_cost(GROUP, "llama-3.1-8b", {"cost.h100.layer_latency_s": 1e-4}, profile=out)
    assert pinned.layer_latency_s == 1e-4
    with pytest.raises(UserError, match="calibrated on device 'h100'"):
        build_group_cost(GroupSpec("b200", 1, tp=1), "llama-3.1-8b", profile=out)


def test_cli_fitted_profile_gives_fitted_cost(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "m.csv", _synthetic(seed=5, noise=0.01))
    out = tmp_path / "fitted.json"
    res = CliRunner().invoke(app, ["calibrate", str(csv_path), "--device", "h100", "--kind", "fitted",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert isinstance(build_group_cost(GROUP, "llama-3.1-8b", profile=out), FittedCost)
    with pytest.raises(UserError, match="fitted for llama-3.1-8b"):
        build_group_cost(GroupSpec("h100", 8, tp=8), "llama-3.1-70b", profile=out)


@pytest.mark.parametrize("body, where", [
    ("kind,batch,tokens,ms\nprefill,1,10,5\n", "line 1: missing column 'context'"),
    ("kind,batch,tokens,context,ms\nprefill,1,10,0,5\ndecode,2,1,40,fast\n", "line 3, column 'ms'"),
    ("kind,batch,tokens,context,ms\nprefil,1,10,0,5\n", "line 2, column 'kind'"),
    ("kind,batch,tokens,context,ms\ndecode,1.5,1,0,5\n", "line 2, column 'batch'"),
])
def test_bad_csv_names_file_line_and_column(tmp_path: Path, body: str, where: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(UserError, match=f"bad.csv, {where}" if where.startswith("line") else where):
        read_measurements(path)


def test_bad_csv_through_the_console_script_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("kind,batch,tokens,context,ms\ndecode,2,1,40,fast\n")
    proc = subprocess.run([sys.executable, "-c", "from hetero_sched.cli import main; main()",
                           "calibrate", str(path), "--device", "h100"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "bad.csv, line 2, column 'ms'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_device_without_like_is_a_user_error(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "m.csv", _synthetic(seed=1, noise=0.0))
    proc = subprocess.run([sys.executable, "-c", "from hetero_sched.cli import main; main()",
                           "calibrate", str(csv_path), "--device", "my-gpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--like" in proc.stderr
