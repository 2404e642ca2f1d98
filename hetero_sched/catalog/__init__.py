"""The catalog: devices, models, cost-model parameters — every number with its source.

The catalog is data: the shipped devices and models are ``hetero_sched/data/catalog/*.yaml``, and an
experiment adds its own with a ``catalog:`` section (:mod:`hetero_sched.catalog.datafile`), passed
here as ``extra``. Overrides (DESIGN §10) are a flat dict of dotted keys resolved against it::

    {"device.trn2.memory_bytes_per_s": 2.5e12,      # also: hbm_bytes_per_s, sram_bytes
     "model.llama-3.1-70b.num_layers": 80,           # also: weight_dtype / kv_dtype ("fp8", ...)
     "cost.cs3.dollars_per_hour": 100}

:func:`resolve_catalog` applies them (an unknown key or a bad value is a UserError naming it);
:func:`resolve_assumptions` returns every number as ``{key: {"value", "status", "source"}}`` —
status ``published`` / ``vendor-claim`` / ``calibrated`` / ``assumed`` / ``override`` — which
results are stamped with.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

from hetero_sched.catalog import costparams, devices, memorynodes, models
from hetero_sched.catalog.costparams import CostParams
from hetero_sched.catalog.datafile import CatalogData
from hetero_sched.catalog.devices import DeviceSpec
from hetero_sched.catalog.groups import GroupSpec
from hetero_sched.catalog.memorynodes import MemoryNodeSpec
from hetero_sched.catalog.models import ModelSpec
from hetero_sched.catalog.shipped import (device_names, get_cost_params, get_device, get_model, list_cost_params,
                                          list_devices, list_memory_nodes, list_models, model_names, shipped)
from hetero_sched.catalog.sources import Source, Status, lookup
from hetero_sched.errors import UserError

__all__ = ["Catalog", "CatalogData", "CostParams", "DeviceSpec", "GroupSpec", "MemoryNodeSpec", "ModelSpec", "Source", "Status",
           "device_names", "get_cost_params", "get_device", "get_model", "list_devices", "list_models",
           "model_names", "resolve_assumptions", "resolve_catalog"]

Overrides = Mapping[str, Any]


@dataclass(frozen=True)
class Catalog:
    """Devices, models and cost parameters with an experiment's overrides applied."""

    devices: Mapping[str, DeviceSpec]
    models: Mapping[str, ModelSpec]
    costs: Mapping[str, CostParams]
    memory_nodes: Mapping[str, MemoryNodeSpec]

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as plain dicts (its read-only views of them do not pickle)."""
        return (Catalog, (dict(self.devices), dict(self.models), dict(self.costs), dict(self.memory_nodes)))

    def device(self, name: str) -> DeviceSpec:
        """A device by name (UserError listing the known ones)."""
        return lookup(self.devices, name, "device")

    def model(self, name: str) -> ModelSpec:
        """A model by name (UserError listing the known ones)."""
        return lookup(self.models, name, "model")

    def memory_node(self, name: str) -> MemoryNodeSpec:
        """A memory node (what a cluster KV store pools) by name (UserError listing the known ones)."""
        return lookup(self.memory_nodes, name, "memory node")

    def cost(self, device: str) -> CostParams:
        """Cost parameters of a device kind."""
        return lookup(self.costs, device, "cost-parameter device")

    def group(self, device: str, count: int, tp: int, pp: int = 1) -> GroupSpec:
        """A validated :class:`GroupSpec` of one of this catalog's devices (shipped or the experiment's)."""
        return GroupSpec(device, count, tp, pp, device_spec=self.device(device))


_ZERO_OK = ("step_overhead_s", "kv_reserve_fraction", "pp_hop_s", "message_cost_s", "link_efficiency",
            "layer_latency_s", "shared_experts", "prefill_overhead_s", "host_message_s", "ssd_message_s",
            *devices.TIER_FIELDS)


def _number(key: str, value: Any, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"override {key}: expected a number, got {value!r}")
    if integer and int(value) != value:
        raise UserError(f"override {key}: expected an integer, got {value!r}")
    if not 0 <= value <= 1e300 or (value == 0 and not key.endswith(_ZERO_OK)):  # NaN, inf and overflow too
        raise UserError(f"override {key}: expected a positive number, got {value!r}")
    return int(value) if integer else float(value)


def _replace(obj: Any, fields: dict[str, Any], keys: dict[str, str]) -> Any:
    """``obj`` with ``fields`` set, each sourced to its override key: one copy (and one
    validation) per catalog entry, however many of its fields are overridden (a calibration
    resolves the catalog ~100k times)."""
    sources = dict(obj.sources)
    for field, key in keys.items():
        sources[field] = Source(Status.OVERRIDE, f"experiment override {key}")
    try:
        return dataclasses.replace(obj, **fields, sources=sources)
    except UserError as exc:
        raise UserError(f"override {', '.join(keys.values())}: {exc}") from None


def resolve_catalog(overrides: Optional[Overrides] = None, extra: CatalogData = CatalogData()) -> Catalog:
    """The shipped catalog plus ``extra`` entries, with ``overrides`` applied; an unknown key or
    bad value is a UserError.

    Catalogs of the shipped entries alone are remembered per set of overrides (the last 256): a
    calibration asks for the same overrides once per figure at each step of its fit (~140,000
    times for ``calibrate --published``). A Catalog is read-only, so callers may share one."""
    key = shipped_key(overrides, extra)
    return _resolve(overrides, extra) if key is None else resolve_shipped(key)


ShippedKey = tuple[tuple[str, type, Any], ...]
_NO_EXTRA = CatalogData()


def shipped_key(overrides: Optional[Overrides], extra: CatalogData = _NO_EXTRA) -> Optional[ShippedKey]:
    """What the shipped catalog with ``overrides`` is remembered under (here, and the costs built
    from it): each override with its value's type too (True == 1, but an override of True is
    refused). None — resolve as it is, do not remember — with ``extra`` entries or a value that
    cannot be hashed (a list, say)."""
    if extra != _NO_EXTRA:
        return None
    key = tuple((k, type(v), v) for k, v in (overrides or {}).items())
    try:
        hash(key)
    except TypeError:
        return None
    return key


@functools.lru_cache(maxsize=256)
def resolve_shipped(key: ShippedKey) -> Catalog:
    """The shipped catalog with the overrides of a :func:`shipped_key` (remembered: see
    :func:`resolve_catalog`)."""
    return _resolve({k: v for k, _, v in key}, _NO_EXTRA)


def _resolve(overrides: Optional[Overrides], extra: CatalogData) -> Catalog:
    base = shipped()                    # (keyed by name already: a copy, not a rebuild)
    devs, mods, costs, nodes = dict(base.devices), dict(base.models), dict(base.costs), dict(base.memory_nodes)
    devs.update({d.name: d for d in extra.devices})
    mods.update({m.name: m for m in extra.models})
    costs.update({c.device: c for c in extra.costs})
    nodes.update({n.name: n for n in extra.memory_nodes})
    entries: dict[str, dict[str, Any]] = {"device": devs, "model": mods, "cost": costs, "memory": nodes}
    changes: dict[tuple[str, str], tuple[dict[str, Any], dict[str, str]]] = {}   # entry -> (fields, keys)
    for key, value in (overrides or {}).items():
        parts = str(key).split(".")
        if len(parts) < 3:
            raise UserError(f"unknown override key {key!r}: expected device.<name>.<field>, "
                            "model.<name>.<field>, cost.<device>.<field> or memory.<node>.<field>")
        kind, field = parts[0], parts[-1]
        name = ".".join(parts[1:-1])
        if kind == "device":
            field = devices.ALIASES.get(field, field)
            if name not in devs or field not in devices.NUMERIC_FIELDS:
                raise UserError(f"unknown override key {key!r}: devices are {', '.join(devs)}; "
                                f"fields are {', '.join(devices.NUMERIC_FIELDS)}")
            new = _number(key, value, field in ("cores_per_chip", "scale_up_chips"))
        elif kind == "model":
            if name not in mods or field not in models.INT_FIELDS + models.STR_FIELDS:
                raise UserError(f"unknown override key {key!r}: models are {', '.join(mods)}; "
                                f"fields are {', '.join(models.INT_FIELDS + models.STR_FIELDS)}")
            new = value if field in models.STR_FIELDS else _number(key, value, integer=True)
        elif kind == "cost":
            if name not in costs or field not in costparams.FLOAT_FIELDS:
                raise UserError(f"unknown override key {key!r}: devices are {', '.join(costs)}; "
                                f"fields are {', '.join(costparams.FLOAT_FIELDS)}")
            new = _number(key, value)
        elif kind == "memory":
            if name not in nodes or field not in memorynodes.MEMORY_NODE_FIELDS:
                raise UserError(f"unknown override key {key!r}: memory nodes are {', '.join(nodes)}; "
                                f"fields are {', '.join(memorynodes.MEMORY_NODE_FIELDS)}")
            new = _number(key, value)
        else:
            raise UserError(f"unknown override key {key!r}: must start with device., model., cost. or memory.")
        fields, keys = changes.setdefault((kind, name), ({}, {}))
        fields[field] = new
        keys[field] = key
    for (kind, name), (fields, keys) in changes.items():
        entries[kind][name] = _replace(entries[kind][name], fields, keys)
    return Catalog(devices=MappingProxyType(devs), models=MappingProxyType(mods), costs=MappingProxyType(costs),
                   memory_nodes=MappingProxyType(nodes))


def _entries(prefix: str, obj: Any, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        src = obj.sources.get(name)
        entry = {"value": getattr(obj, name)}
        entry.update(src.to_dict() if src else {"status": Status.ASSUMED.value, "source": "unsourced"})
        out[f"{prefix}.{name}"] = entry
    return out


def resolve_assumptions(overrides: Optional[Overrides] = None,
                        devices_used: Optional[Iterable[str]] = None,
                        models_used: Optional[Iterable[str]] = None,
                        extra: CatalogData = CatalogData()) -> dict[str, dict[str, Any]]:
    """Every catalog and cost-model number as ``{key: {value, status, source}}``.

    Keys are the override keys (``device.trn2.bf16_flops_per_s`` ...); a number with a stated
    plausible range also carries ``range`` and ``range_reason``. Restrict to the devices and models
    an experiment uses with ``devices_used`` / ``models_used`` to keep stamps small.
    """
    cat = resolve_catalog(overrides, extra)
    dev_names = list(devices_used) if devices_used is not None else list(cat.devices)
    mod_names = list(models_used) if models_used is not None else list(cat.models)
    out: dict[str, dict[str, Any]] = {}
    for name in dev_names:
        out.update(_entries(f"device.{name}", cat.device(name), devices.NUMERIC_FIELDS))
        out.update(_entries(f"cost.{name}", cat.cost(name), costparams.FLOAT_FIELDS))
    for name in mod_names:
        out.update(_entries(f"model.{name}", cat.model(name), models.INT_FIELDS + models.STR_FIELDS))
    for name in (cat.memory_nodes if devices_used is None else ()):
        out.update(_entries(f"memory.{name}", cat.memory_node(name), memorynodes.MEMORY_NODE_FIELDS))
    return out
