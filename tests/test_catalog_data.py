"""Catalogs extended by data: a new device and model from a file, validated, used by an experiment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hetero_sched as hs
from hetero_sched.catalog import get_cost_params, get_device, get_model, resolve_catalog
from hetero_sched.catalog.sources import Status
from hetero_sched.costmodel import build_group_cost
from hetero_sched.experiment import parse_experiment
from hetero_sched.errors import UserError

NEW = {
    "devices": {
        "sram-x": {
            "title": "A made-up SRAM decode chip",
            "ray_resource": "sramx", "units_per_chip": 1, "memory_kind": "SRAM",
            "source": "https://example.com/sram-x-datasheet", "status": "vendor-claim",
            "cores_per_chip": 1, "scale_up_chips": 64,
            "bf16_flops_per_s": 400e12, "fp8_flops_per_s": 800e12,
            "memory_bytes": 2.0e9, "memory_bytes_per_s": 100e12,
            "scale_up_bytes_per_s": 400e9, "network_bytes_per_s": 50e9, "watts": 300,
            "cost": {
                "dollars_per_hour": {"value": 2.0, "status": "assumed", "source": "a guess",
                                     "range": [1.0, 4.0], "range_reason": "no price yet"},
                "compute_efficiency": 0.4, "memory_efficiency": 0.7, "layer_latency_s": 1.0e-5,
            },
        },
    },
    "models": {
        "mini-moe": {
            "hf_id": "example/mini-moe", "source": "https://example.com/mini-moe/config.json",
            "num_layers": 8, "hidden_size": 1024, "num_heads": 16, "num_kv_heads": 4, "head_dim": 64,
            "ffn_size": 512, "vocab_size": 32000, "max_context_tokens": 32768, "num_experts": 8, "experts_per_token": 2,
        },
    },
}


def _experiment(catalog_path: str) -> dict:
    return {
        "name": "data-catalog", "model": "mini-moe", "catalog": [catalog_path],
        "groups": [{"name": "prefill", "device": "h100", "count": 1, "role": "prefill"},
                   {"name": "decode", "device": "sram-x", "count": 16, "tp": 16, "role": "decode"}],
        "policy": "disagg",
        "workload": {"kind": "synthetic", "num_requests": 200, "rate_per_s": 20, "prompt": 300, "output": 40},
    }


def test_a_new_device_and_model_by_data_file_run_in_an_experiment(tmp_path: Path) -> None:
    path = tmp_path / "my-catalog.yaml"
    path.write_text(yaml.safe_dump(NEW))
    result = hs.simulate(_experiment(str(path)))
    assert result.summary["completed"] == 200
    stamp = result.stamp["assumptions"]
    assert stamp["device.sram-x.memory_bytes"] == {"value": 2.0e9, "status": "vendor-claim",
                                                   "source": "https://example.com/sram-x-datasheet"}
    assert stamp["cost.sram-x.dollars_per_hour"]["range"] == [1.0, 4.0]
    assert stamp["model.mini-moe.num_experts"]["value"] == 8
    # a relative path resolves against the experiment's folder, and the experiment carries the entries
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(yaml.safe_dump(_experiment("my-catalog.yaml")))
    exp, _ = hs.sim.resolve(exp_file)
    assert exp.catalog[0]["devices"]["sram-x"]["memory_kind"] == "SRAM"
    assert "sram-x" not in [d for d in ("trn2", "cs3")] and "sram-x" in resolve_catalog(extra=exp.catalog_data).devices


def test_like_starts_from_a_known_device_and_changes_what_differs() -> None:
    exp = parse_experiment({**_experiment("unused"), "model": "llama-3.1-8b", "catalog": [
        {"devices": {"h100-slow": {"like": "h100", "memory_bytes_per_s": 2.0e12}}}],
        "groups": [{"name": "g", "device": "h100-slow", "count": 1, "role": "both"}], "policy": "colocated"})
    cat = resolve_catalog(extra=exp.catalog_data)
    assert cat.device("h100-slow").memory_bytes_per_s == 2.0e12
    assert cat.device("h100-slow").bf16_flops_per_s == get_device("h100").bf16_flops_per_s
    assert cat.cost("h100-slow").compute_efficiency == get_cost_params("h100").compute_efficiency
    slow = build_group_cost(cat.group("h100-slow", 1, 1), "llama-3.1-8b", extra=exp.catalog_data)
    fast = build_group_cost(cat.group("h100", 1, 1), "llama-3.1-8b")
    assert slow.decode_step_lines(1)[0][0] > fast.decode_step_lines(1)[0][0]


@pytest.mark.parametrize("entry, message", [
    ({"devices": {"trn2": {"like": "trn2"}}}, "device 'trn2' is already in the catalog"),
    ({"devices": {"x": {"like": "tpu-v9"}}}, "like: unknown device 'tpu-v9'"),
    ({"devices": {"x": {"like": "h100", "memory_bytes": -1}}}, "memory_bytes: expected a positive number"),
    ({"devices": {"x": {"like": "h100", "cost": {"compute_efficiency": 1.5}}}}, "a fraction of peak must be <= 1"),
    ({"devices": {"x": {"like": "h100", "cost": {"dollars_per_hour": {"value": 5, "status": "assumed", "source": "s",
                                                                    "range": [6, 9], "range_reason": "r"}}}}},
     "does not contain the value 5"),
    ({"devices": {"x": {"title": "no numbers"}}}, "missing"),
    ({"models": {"m": {"like": "llama-3.1-8b", "weight_dtype": "fp7"}}}, "unknown dtype 'fp7'"),
    ({"models": {"m": {"like": "llama-3.1-8b", "num_heads": 30}}}, "not a multiple of num_kv_heads"),
    ({"gadgets": {}}, "gadgets: Extra inputs are not permitted"),
])
def test_bad_catalog_entries_are_one_line_errors(entry: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_experiment({**_experiment("unused"), "catalog": [entry]})


def test_bad_catalog_file_through_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices:\n  x:\n    like: h100\n    watts: lots\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({**_experiment("bad.yaml"), "model": "llama-3.1-8b"}))
    proc = subprocess.run([sys.executable, "-c", "from hetero_sched.cli import main; main()", "simulate", str(exp), "-q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "catalog[0]" in proc.stderr and "watts" in proc.stderr


def test_group_kv_capacity_is_settable_directly() -> None:
    exp = parse_experiment({**_experiment("unused"), "model": "llama-3.1-8b", "catalog": [],
                            "groups": [{"name": "g", "device": "h100", "count": 1, "role": "both",
                                        "kv_capacity_tokens": 12345}], "policy": "colocated"})
    groups = hs.experiment.build_groups(exp, Path.cwd())
    assert groups[0].cost.kv_capacity_tokens == 12345


def test_shipped_entries_with_their_statuses() -> None:
    trn3 = get_device("trn3")
    assert trn3.network_bytes_per_s == 25e9 and trn3.sources["network_bytes_per_s"].status is Status.PUBLISHED
    assert "28,800 Gbps" in trn3.sources["network_bytes_per_s"].ref
    trn4 = get_device("trn4")
    assert trn4.sources["fp8_flops_per_s"].status is Status.PROJECTED
    assert trn4.fp8_flops_per_s == pytest.approx(3 * trn3.fp8_flops_per_s, rel=1e-3)
    assert get_cost_params("trn4").sources["dollars_per_hour"].status is Status.PROJECTED
    assert get_device("groq-lpu").memory_kind == "SRAM" and get_device("groq-lpu").memory_bytes == 230e6
    assert get_device("a100").memory_bytes_per_s == 2.039e12
    opt = get_model("opt-13b")
    assert opt.num_kv_heads == opt.num_heads == 40 and opt.mlp_projections == 2
    assert get_device("cs3-2024").kind == "cs3" and get_device("trn3").kind == "trn3"
