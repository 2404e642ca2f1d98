"""Catalog entries as data: devices (with their cost parameters) and models from YAML/JSON.

The shipped catalog is itself data (``hetero_sched/data/catalog/*.yaml``); a user adds a device
or a model the same way — a file, or an experiment's ``catalog:`` section — with no code change::

    devices:
      my-gpu:
        like: h100                      # optional: start from a known device, change what differs
        title: My GPU
        memory_bytes: {value: 96e9, status: published, source: https://example.com/spec}
        cost:
          dollars_per_hour: {value: 4.0, status: assumed, source: "quote", range: [3, 6],
                             range_reason: "list vs reserved price"}
    models:
      my-model:
        source: https://huggingface.co/org/my-model/blob/main/config.json   # default source
        num_layers: 40
        ...

Every number is either bare (stamped ``assumed``, source: the file, unless the entry gives a
``source``/``status`` default) or ``{value, status, source[, range, range_reason]}``. Validation is
pydantic's, so a bad field is one line naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hetero_sched.catalog.costparams import CostParams
from hetero_sched.catalog.devices import TIER_FIELDS, DeviceSpec
from hetero_sched.catalog.memorynodes import MEMORY_NODE_FIELDS, MemoryNodeSpec
from hetero_sched.catalog.models import DTYPE_BYTES, ModelSpec
from hetero_sched.catalog.sources import Source, Status
from hetero_sched.errors import UserError
from hetero_sched.configfile import validate

StatusName = Literal["published", "vendor-claim", "calibrated", "assumed", "projected"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Sourced(_Strict):
    """A number with its provenance and, optionally, its plausible range."""

    value: float
    status: StatusName
    source: str = Field(min_length=1)
    range: Optional[tuple[float, float]] = None
    range_reason: str = ""

    @model_validator(mode="after")
    def _range_holds_value(self) -> "Sourced":
        if self.range is not None:
            low, high = self.range
            if not low <= self.value <= high:
                raise ValueError(f"range [{low}, {high}] does not contain the value {self.value}")
            if not self.range_reason:
                raise ValueError("a range needs a range_reason (where the range comes from)")
        return self


Number = Union[Sourced, float]   # Sourced first: its error is the one reported for a mapping


class CostEntry(_Strict):
    """A device's cost-model parameters (see :class:`~hetero_sched.catalog.costparams.CostParams`)."""

    dollars_per_hour: Optional[Number] = None
    compute_efficiency: Optional[Number] = None
    memory_efficiency: Optional[Number] = None
    layer_latency_s: Optional[Number] = None
    link_efficiency: Optional[Number] = None
    step_overhead_s: Optional[Number] = None
    pp_hop_s: Optional[Number] = None
    kv_reserve_fraction: Optional[Number] = None
    message_cost_s: Optional[Number] = None
    prefill_overhead_s: Optional[Number] = None
    kv_read_efficiency: Optional[Number] = None
    half_speed_batch: Optional[Number] = None
    host_message_s: Optional[Number] = None
    ssd_message_s: Optional[Number] = None
    no_half_speed_batch: bool = Field(False, description="true: no per-user slowdown beyond the roofline "
                                      "(clears half_speed_batch inherited through `like`)")


class DeviceEntry(_Strict):
    """One accelerator (see :class:`~hetero_sched.catalog.devices.DeviceSpec`)."""

    like: Optional[str] = None
    family: Optional[str] = None
    title: Optional[str] = None
    ray_resource: Optional[str] = None
    units_per_chip: Optional[int] = Field(None, ge=1, le=1024)
    memory_kind: Optional[Literal["HBM", "SRAM"]] = None
    cores_per_chip: Optional[Number] = None
    scale_up_chips: Optional[Number] = None
    bf16_flops_per_s: Optional[Number] = None
    fp8_flops_per_s: Optional[Number] = None
    memory_bytes: Optional[Number] = None
    memory_bytes_per_s: Optional[Number] = None
    scale_up_bytes_per_s: Optional[Number] = None
    network_bytes_per_s: Optional[Number] = None
    watts: Optional[Number] = None
    host_memory_bytes: Optional[Number] = None
    host_bytes_per_s: Optional[Number] = None
    ssd_bytes: Optional[Number] = None
    ssd_read_bytes_per_s: Optional[Number] = None
    ssd_write_bytes_per_s: Optional[Number] = None
    source: Optional[str] = Field(None, description="default source of this entry's bare numbers")
    status: Optional[StatusName] = Field(None, description="default status of this entry's bare numbers")
    cost: CostEntry = Field(default_factory=lambda: CostEntry.model_validate({}))


class ModelEntry(_Strict):
    """One model architecture (see :class:`~hetero_sched.catalog.models.ModelSpec`)."""

    like: Optional[str] = None
    hf_id: Optional[str] = None
    num_layers: Optional[int] = Field(None, ge=1, le=10_000)
    hidden_size: Optional[int] = Field(None, ge=1, le=1_000_000)
    num_heads: Optional[int] = Field(None, ge=1, le=100_000)
    num_kv_heads: Optional[int] = Field(None, ge=1, le=100_000)
    head_dim: Optional[int] = Field(None, ge=1, le=100_000)
    ffn_size: Optional[int] = Field(None, ge=1, le=10_000_000)
    vocab_size: Optional[int] = Field(None, ge=1, le=100_000_000)
    num_experts: Optional[int] = Field(None, ge=1, le=100_000)
    experts_per_token: Optional[int] = Field(None, ge=1, le=100_000)
    shared_experts: Optional[int] = Field(None, ge=0, le=100_000)
    mlp_projections: Optional[Literal[2, 3]] = None
    tied_embeddings: Optional[bool] = None
    weight_dtype: Optional[str] = None
    kv_dtype: Optional[str] = None
    published_params: Optional[float] = Field(None, ge=0)
    max_context_tokens: Optional[int] = Field(None, ge=2, le=1_000_000_000)
    source: Optional[str] = Field(None, description="where the architecture numbers come from (config.json)")
    status: Optional[StatusName] = None

    @field_validator("weight_dtype", "kv_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {v!r}; known: {', '.join(DTYPE_BYTES)}")
        return v


class MemoryNodeEntry(_Strict):
    """One kind of memory node a cluster KV store pools (see
    :class:`~hetero_sched.catalog.memorynodes.MemoryNodeSpec`)."""

    title: str
    memory_bytes: Number
    network_bytes_per_s: Number
    message_cost_s: Number
    dollars_per_hour: Number
    source: Optional[str] = Field(None, description="default source of this entry's bare numbers")
    status: Optional[StatusName] = Field(None, description="default status of this entry's bare numbers")


class CatalogFile(_Strict):
    """A catalog data file: any number of devices, models and memory nodes, keyed by name."""

    devices: dict[str, DeviceEntry] = Field(default_factory=dict)
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    memory_nodes: dict[str, MemoryNodeEntry] = Field(default_factory=dict)

    @field_validator("devices", "models", "memory_nodes")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"name {name!r}: use letters, digits, '.', '_', '-'")
        return v


@dataclass(frozen=True)
class CatalogData:
    """Resolved entries of one or more data files, in file order."""

    devices: tuple[DeviceSpec, ...] = ()
    costs: tuple[CostParams, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    memory_nodes: tuple[MemoryNodeSpec, ...] = ()

    def __add__(self, other: "CatalogData") -> "CatalogData":
        return CatalogData(self.devices + other.devices, self.costs + other.costs, self.models + other.models,
                           self.memory_nodes + other.memory_nodes)


# --- bounds ---------------------------------------------------------------------------------
_ZERO_OK = {"step_overhead_s", "kv_reserve_fraction", "pp_hop_s", "message_cost_s", "layer_latency_s",
            "link_efficiency", "prefill_overhead_s", "host_message_s", "ssd_message_s", *TIER_FIELDS}
_AT_MOST_ONE = {"compute_efficiency", "memory_efficiency", "link_efficiency", "kv_read_efficiency"}
_INTEGERS = {"cores_per_chip", "scale_up_chips"}


def _check_number(field: str, value: float) -> Optional[str]:
    if not math.isfinite(value) or value < 0 or value > 1e300 or (value == 0 and field not in _ZERO_OK):
        return f"{field}: expected a positive number, got {value!r}"
    if field in _AT_MOST_ONE and value > 1:
        return f"{field}: a fraction of peak must be <= 1, got {value!r}"
    if field == "kv_reserve_fraction" and value >= 1:
        return f"{field}: must be < 1, got {value!r}"
    if field in _INTEGERS and value != int(value):
        return f"{field}: expected an integer, got {value!r}"
    return None


def _resolve_number(field: str, raw: Number, default: Source, where: str) -> tuple[float, Source]:
    if isinstance(raw, Sourced):
        value = raw.value
        src = Source(Status(raw.status), raw.source, (raw.range[0], raw.range[1]) if raw.range else None,
                     raw.range_reason)
    else:
        value, src = float(raw), default
    problem = _check_number(field, value)
    if problem:
        raise UserError(f"{where}: {problem}")
    if src.range is not None:
        for bound in src.range:
            if _check_number(field, bound):
                raise UserError(f"{where}: {field}: range bound {bound!r} is not a valid {field}")
    return (int(value) if field in _INTEGERS else value), src


def _default_source(entry: Union[DeviceEntry, ModelEntry, "MemoryNodeEntry"], origin: str) -> Source:
    if entry.source:
        return Source(Status(entry.status or "published"), entry.source)
    return Source(Status(entry.status or "assumed"), f"{origin}: given without a source")


_DEVICE_NUMBERS = ("cores_per_chip", "scale_up_chips", "bf16_flops_per_s", "fp8_flops_per_s", "memory_bytes",
                   "memory_bytes_per_s", "scale_up_bytes_per_s", "network_bytes_per_s", "watts", *TIER_FIELDS)
_NO_TIER = "no KV tier of this kind known for the device (give it in a catalog entry or an override to use one)"
_DEVICE_TEXT = ("title", "ray_resource", "units_per_chip", "memory_kind", "family")
_COST_NUMBERS = tuple(f.name for f in fields(CostParams) if f.name not in ("device", "sources"))
_MODEL_FIELDS = tuple(f.name for f in fields(ModelSpec) if f.name not in ("name", "sources"))
_MODEL_SOURCED = tuple(f.name for f in fields(ModelSpec) if f.type == "int")
_DTYPE_DEFAULT = Source(Status.ASSUMED, "served at the checkpoint's 16-bit precision unless an experiment says otherwise")


_COST_DEFAULTS = {
    "link_efficiency": "default: all-reduce bus efficiency ~70% of peak link bandwidth",
    "step_overhead_s": "default: no fixed time per forward pass beyond the per-layer latency",
    "pp_hop_s": "default: one pipeline hop ~20 us",
    "kv_reserve_fraction": "default: 10% of memory for activations, runtime and fragmentation",
    "message_cost_s": "default: ~50 us per KV message",
    "prefill_overhead_s": "default: no fixed time per prefill beyond the roofline",
    "kv_read_efficiency": "default: KV reads reach the same bandwidth fraction as weight reads (memory_efficiency)",
    "half_speed_batch": "default: no per-user slowdown beyond the roofline",
    "host_message_s": "default: ~10 us per device<->host copy (DMA descriptor setup and completion)",
    "ssd_message_s": "default: ~100 us per NVMe I/O (a read command's latency)",
}
"""Where a cost parameter no data file gives comes from (the dataclass default)."""


def _device(name: str, entry: DeviceEntry, base: Optional[tuple[DeviceSpec, CostParams]],
            origin: str) -> tuple[DeviceSpec, CostParams]:
    where = f"{origin}: device {name}"
    default = _default_source(entry, origin)
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    if base is not None:
        values = {f.name: getattr(base[0], f.name) for f in fields(DeviceSpec) if f.name not in ("name", "sources")}
        values["family"] = ""      # a derived device is its own family unless it says otherwise
        sources = dict(base[0].sources)
    for key in _DEVICE_TEXT:
        if getattr(entry, key) is not None:
            values[key] = getattr(entry, key)
    for key in _DEVICE_NUMBERS:
        raw = getattr(entry, key)
        if raw is not None:
            values[key], sources[key] = _resolve_number(key, raw, default, where)
    for key in TIER_FIELDS:                    # optional: a device without them has no such tier
        if key not in values:
            values[key] = 0.0
            sources[key] = Source(Status.ASSUMED, _NO_TIER)
    missing = [f.name for f in fields(DeviceSpec) if f.name not in ("name", "sources", "family") and f.name not in values]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)} (give them, or `like: <device>` to start from one)")
    spec = DeviceSpec(name=name, sources=sources, **values)

    cost_values: dict[str, Any] = {}
    cost_sources: dict[str, Source] = {}
    if base is not None:
        cost_values = {k: getattr(base[1], k) for k in _COST_NUMBERS}
        cost_sources = dict(base[1].sources)
    for key in _COST_NUMBERS:
        raw = getattr(entry.cost, key)
        if raw is not None:
            cost_values[key], cost_sources[key] = _resolve_number(key, raw, default, f"{where}: cost")
    if entry.cost.no_half_speed_batch:
        cost_values["half_speed_batch"] = None
        cost_sources["half_speed_batch"] = Source(Status.ASSUMED, f"{origin}: no batch penalty beyond the roofline")
    for key, reason in _COST_DEFAULTS.items():
        cost_sources.setdefault(key, Source(Status.ASSUMED, reason))
    needed = [k for k in ("dollars_per_hour", "compute_efficiency", "memory_efficiency", "layer_latency_s")
              if k not in cost_values]
    if needed:
        raise UserError(f"{where}: cost: missing {', '.join(needed)} (or `like: <device>`)")
    return spec, CostParams(device=name, sources=cost_sources, **cost_values)


def _model(name: str, entry: ModelEntry, base: Optional[ModelSpec], origin: str) -> ModelSpec:
    where = f"{origin}: model {name}"
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    if base is not None:
        values = {k: getattr(base, k) for k in _MODEL_FIELDS}
        values["published_params"] = 0.0 if entry.num_layers or entry.hidden_size else base.published_params
        sources = dict(base.sources)
    default = _default_source(entry, origin)
    for key in _MODEL_FIELDS:
        value = getattr(entry, key, None)
        if value is not None:
            values[key] = value
            if key in _MODEL_SOURCED:
                sources[key] = default
    required = ("hf_id", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_size",
                "vocab_size", "max_context_tokens")
    missing = [k for k in required if k not in values]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)} (give them, or `like: <model>`)")
    for key in _MODEL_SOURCED:
        sources.setdefault(key, default)
    for key in ("weight_dtype", "kv_dtype"):
        sources[key] = default if getattr(entry, key) is not None else sources.get(key, _DTYPE_DEFAULT)
    try:
        return ModelSpec(name=name, sources=sources, **values)
    except UserError as exc:
        raise UserError(f"{origin}: {exc}") from None


def _base(kind: str, name: str, like: Optional[str], known: Mapping[str, Any], origin: str) -> Any:
    """The ``like:`` entry a new one starts from (None), after checking the name is new."""
    if name in known:
        raise UserError(f"{origin}: {kind} {name!r} is already in the catalog; pick another name "
                        f"(`like: {name}` starts from it) or change its numbers with overrides")
    if like is None:
        return None
    if like not in known:
        raise UserError(f"{origin}: {kind} {name}: like: unknown {kind} {like!r}; known: {', '.join(known)}")
    return known[like]


def _memory_node(name: str, entry: MemoryNodeEntry, origin: str) -> MemoryNodeSpec:
    where = f"{origin}: memory node {name}"
    default = _default_source(entry, origin)
    values: dict[str, float] = {}
    sources: dict[str, Source] = {}
    for key in MEMORY_NODE_FIELDS:
        values[key], sources[key] = _resolve_number(key, getattr(entry, key), default, where)
    return MemoryNodeSpec(name=name, title=entry.title, sources=sources, **values)


def parse_catalog(data: Any, origin: str, known_devices: Mapping[str, tuple[DeviceSpec, CostParams]],
                  known_models: Mapping[str, ModelSpec],
                  known_memory_nodes: Mapping[str, MemoryNodeSpec] = {}) -> CatalogData:
    """Validate one file's content and resolve its entries against what is known so far
    (``known_*``: the shipped catalog and earlier files — what a ``like:`` may name; every name is
    defined once)."""
    parsed = validate(CatalogFile, data, origin, "a mapping with `devices:`, `models:` and/or `memory_nodes:`")
    devs = dict(known_devices)
    mods = dict(known_models)
    for name, entry in parsed.devices.items():
        devs[name] = _device(name, entry, _base("device", name, entry.like, devs, origin), origin)
    for name, mentry in parsed.models.items():
        mods[name] = _model(name, mentry, _base("model", name, mentry.like, mods, origin), origin)
    nodes = []
    for name, nentry in parsed.memory_nodes.items():
        _base("memory node", name, None, known_memory_nodes, origin)
        nodes.append(_memory_node(name, nentry, origin))
    new_devices = [devs[n] for n in parsed.devices]
    return CatalogData(tuple(d for d, _ in new_devices), tuple(c for _, c in new_devices),
                       tuple(mods[n] for n in parsed.models), tuple(nodes))


def read_catalog_file(path: Union[str, Path]) -> Any:
    """A catalog file's raw content (YAML or JSON); a missing or malformed file is a UserError."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"{p}: no such catalog file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: cannot read ({exc})") from None
    try:
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}:{where}: {getattr(exc, 'problem', None) or exc}") from None


def resolve_entries(items: Iterable[tuple[Any, str]], known_devices: Mapping[str, tuple[DeviceSpec, CostParams]],
                    known_models: Mapping[str, ModelSpec],
                    known_memory_nodes: Mapping[str, MemoryNodeSpec] = {}) -> CatalogData:
    """Resolve several files' contents ``(data, origin)`` in order; later ones may be ``like:`` earlier ones."""
    devs = dict(known_devices)
    mods = dict(known_models)
    nodes = dict(known_memory_nodes)
    total = CatalogData()
    for data, origin in items:
        part = parse_catalog(data, origin, devs, mods, nodes)
        devs.update({d.name: (d, c) for d, c in zip(part.devices, part.costs)})
        mods.update({m.name: m for m in part.models})
        nodes.update({n.name: n for n in part.memory_nodes})
        total = total + part
    return total
