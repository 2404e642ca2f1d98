"""Catalog: units, validation, model arithmetic against hand computation, overrides, provenance."""

from __future__ import annotations

import pickle

import pytest

from hetero_sched.catalog import GroupSpec, get_device, get_model, resolve_assumptions, resolve_catalog
from hetero_sched.catalog import list_models
from hetero_sched.catalog.sources import Status
from hetero_sched.errors import UserError


def test_trn2_instance_is_16_chips_64_neuron_cores() -> None:
    group = GroupSpec("trn2", 16, tp=64)
    assert group.num_chips == 16
    assert group.ray_resources() == {"neuron_cores": 64.0}
    assert group.node_labels() == {"hetero.device": "trn2"}
    assert not any(k.startswith("ray.io/") for k in group.node_labels())


@pytest.mark.parametrize("group, resources, chips", [
    (GroupSpec("cs3", 4, tp=1, pp=4), {"cs3": 4.0}, 4),
    (GroupSpec("h100", 2, tp=2), {"GPU": 2.0}, 2),
    (GroupSpec("trn2", 32, tp=64, pp=2), {"neuron_cores": 128.0}, 32),
])
def test_ray_resources_and_chip_counts(group: GroupSpec, resources: dict, chips: int) -> None:
    assert group.ray_resources() == resources
    assert group.num_chips == chips


@pytest.mark.parametrize("args, message", [
    (("trn2", 16, 16, 1), r"tp\*pp must equal 64"),
    (("tpu9", 1, 1, 1), "known devices: trn2"),
    (("cs3", 4, 2, 2), "scale-up domain"),
    (("h100", 16, 16, 1), "scale-up domain"),
    (("h100", 0, 1, 1), "count must be a positive integer"),
])
def test_group_validation_is_one_clear_user_error(args: tuple, message: str) -> None:
    device, count, tp, pp = args
    with pytest.raises(UserError, match=message):
        GroupSpec(device, count, tp=tp, pp=pp)


def test_kv_bytes_per_token_by_hand() -> None:
    # 2 (K and V) x layers x kv_heads x head_dim x bytes
    assert get_model("llama-3.1-70b").kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2 == 327_680
    assert get_model("llama-3.1-8b").kv_bytes_per_token("fp8") == 2 * 32 * 8 * 128 * 1 == 65_536
    assert get_model("qwen3-32b").kv_bytes_per_token() == 2 * 64 * 8 * 128 * 2
    assert get_model("tiny").kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2


@pytest.mark.parametrize("model", [m for m in list_models() if m.published_params])
def test_computed_parameter_count_matches_model_card(model) -> None:
    assert model.total_params == pytest.approx(model.published_params, rel=0.01)


def test_tiny_model_parameters_by_hand() -> None:
    tiny = get_model("tiny")
    attn = 64 * (2 * 4 * 16 + 2 * 2 * 16)
    mlp = 3 * 64 * 128
    assert tiny.total_params == 2 * (attn + mlp) + 2 * 256 * 64


def test_moe_active_vs_total() -> None:
    oss = get_model("gpt-oss-120b")
    assert oss.total_params == pytest.approx(116.8e9, rel=0.01)
    assert oss.active_params == pytest.approx(5.1e9, rel=0.03)  # model card: 5.1B active
    assert oss.flops_per_token == 2 * oss.active_params
    # One token reads 4 of 128 experts; a big batch reads nearly all of them.
    assert oss.weight_bytes_read(1) < 0.1 * oss.weight_bytes < oss.weight_bytes_read(4096)


def test_lookup_typos_list_known_names() -> None:
    with pytest.raises(UserError, match="known models: llama-3.1-8b"):
        get_model("llama-70b")
    with pytest.raises(UserError, match="known devices: .*cs3"):
        get_device("cs-3")


def test_overrides_apply_and_are_stamped() -> None:
    ov = {"device.trn2.hbm_bytes_per_s": 2.5e12, "model.llama-3.1-70b.num_layers": 40,
          "cost.cs3.dollars_per_hour": 250, "model.llama-3.1-70b.weight_dtype": "fp8"}
    cat = resolve_catalog(ov)
    assert cat.device("trn2").memory_bytes_per_s == 2.5e12
    assert cat.model("llama-3.1-70b").num_layers == 40
    assert cat.model("llama-3.1-70b").weight_bytes == pytest.approx(get_model("llama-3.1-70b").weight_bytes / 4, rel=0.05)
    stamp = resolve_assumptions(ov)
    assert stamp["device.trn2.memory_bytes_per_s"]["status"] == "override"
    assert stamp["cost.cs3.dollars_per_hour"] == {"value": 250.0, "status": "override",
                                                 "source": "experiment override cost.cs3.dollars_per_hour"}
    assert get_device("trn2").memory_bytes_per_s == 2.9e12  # the catalog itself is untouched
    # two fields of one model, set in one copy: each is sourced to its own key
    for key in ("model.llama-3.1-70b.num_layers", "model.llama-3.1-70b.weight_dtype"):
        assert stamp[key]["status"] == "override" and stamp[key]["source"] == f"experiment override {key}"


@pytest.mark.parametrize("overrides, message", [
    ({"device.trn2.hbm_gb": 1}, "unknown override key 'device.trn2.hbm_gb'"),
    ({"model.llama-9b.num_layers": 1}, "unknown override key 'model.llama-9b.num_layers'"),
    ({"cost.trn2.dollars_per_hour": "cheap"}, "expected a number"),
    ({"cost.trn2.dollars_per_hour": [1, 2]}, "expected a number"),
    ({"model.tiny.num_layers": 2.5}, "expected an integer"),
    ({"model.tiny.kv_dtype": "fp7"}, "unknown dtype 'fp7'"),
    ({"speed": 3}, "unknown override key 'speed'"),
    ({"model.tiny.num_layers": 2, "model.tiny.kv_dtype": "fp7"}, "override .*model.tiny.kv_dtype.*: .*unknown dtype 'fp7'"),
])
def test_bad_overrides_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_catalog(overrides)


def test_a_remembered_catalog_follows_its_overrides_and_is_read_only() -> None:
    """Catalogs are remembered per set of overrides (a calibration asks for the same ones once per
    figure): each set gets its own numbers, and no caller can change a catalog others share."""
    for value in (1e-3, 2e-3, 1e-3):
        assert resolve_catalog({"cost.trn2.step_overhead_s": value}).cost("trn2").step_overhead_s == value
    cat = resolve_catalog()
    assert resolve_catalog() is cat
    with pytest.raises(TypeError):
        cat.devices["trn2"] = cat.devices["cs3"]     # type: ignore[index]
    assert pickle.loads(pickle.dumps(cat)) == cat     # (to a Ray task, say)
    for _ in range(2):                                # an error is not remembered
        with pytest.raises(UserError, match="unknown override key 'speed'"):
            resolve_catalog({"speed": 3})
    resolve_catalog({"cost.trn2.dollars_per_hour": 1})
    with pytest.raises(UserError, match="expected a number, got True"):   # True == 1, yet refused
        resolve_catalog({"cost.trn2.dollars_per_hour": True})


def test_every_number_has_a_status_and_a_source() -> None:
    stamp = resolve_assumptions()
    assert len(stamp) > 150
    allowed = {s.value for s in Status}
    for key, entry in stamp.items():
        assert entry["status"] in allowed, key
        assert entry["source"] and entry["source"] != "unsourced", key
        if entry["status"] in ("published", "vendor-claim"):
            assert "http" in entry["source"], key
    assert stamp["cost.trn2.layer_latency_s"]["status"] == "calibrated"
    assert "figures.yaml" in stamp["cost.trn2.layer_latency_s"]["source"]
    assert stamp["cost.trn2.layer_latency_s"]["range"][0] < stamp["cost.trn2.layer_latency_s"]["value"]
    assert stamp["cost.cs3.dollars_per_hour"]["status"] == "assumed"
    assert stamp["device.cs3.memory_bytes_per_s"]["status"] == "vendor-claim"
    small = resolve_assumptions(devices_used=["cs3"], models_used=["tiny"])
    assert {k.split(".")[1] for k in small} == {"cs3", "tiny"}


def test_every_model_states_its_context_window_with_a_source() -> None:
    # the checkpoints' max_position_embeddings (config.json): what the arrival check rejects beyond
    assert get_model("llama-3.1-70b").max_context_tokens == 131_072
    assert get_model("qwen3-32b").max_context_tokens == 40_960
    stamp = resolve_assumptions(models_used=["llama-3.1-70b"], devices_used=[])
    assert stamp["model.llama-3.1-70b.max_context_tokens"]["status"] == "published"
    assert "config.json" in stamp["model.llama-3.1-70b.max_context_tokens"]["source"]
    over = resolve_catalog({"model.qwen3-32b.max_context_tokens": 131_072})   # YaRN, as the model card allows
    assert over.model("qwen3-32b").max_context_tokens == 131_072
