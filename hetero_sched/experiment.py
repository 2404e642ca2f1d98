"""Experiment config: YAML validated into typed objects, and the cluster it describes.

Config is flat, frozen and validated at the edge (pydantic); a bad field is one line naming it.
Values derived at run time (block counts, capacities) live in the core's state objects, never
written back into the config.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hetero_sched import workload as wl
from hetero_sched.catalog import CatalogData, device_names, model_names, resolve_catalog
from hetero_sched.catalog.datafile import read_catalog_file, resolve_entries
from hetero_sched.catalog.models import DTYPE_BYTES
from hetero_sched.catalog.profiles import load_profile
from hetero_sched.catalog.shipped import shipped
from hetero_sched.configfile import apply_sets, expect_mapping, format_error, read_yaml
from hetero_sched.core.group import GroupLimits, GroupState, Role
from hetero_sched.core.transfer import LayerwiseStreaming
from hetero_sched.costmodel import build_group_cost
from hetero_sched.errors import UserError
from hetero_sched.kvcache import KVCacheConfig, attach_kv_tiers
from hetero_sched.metrics import SLO, SLO_TIERS
from hetero_sched.predictor import PredictorSpec
from hetero_sched.speculation import Speculation


_LIMITS = GroupLimits()
"""Default batching limits (an instance: compiled dataclasses expose no class-level defaults)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # NaN/inf: never a valid setting


class SpeculativeConfig(_Strict):
    """Speculative decoding on a group (see :mod:`hetero_sched.speculation`)."""

    draft_tokens: int = Field(ge=1, le=64, description="k: tokens drafted per sequence per step")
    acceptance_rate: Optional[float] = Field(None, ge=0.0, le=1.0, description="i.i.d. per-token acceptance α")
    tokens_per_step: Optional[float] = Field(None, ge=1.0, description="τ directly (vLLM's mean acceptance length)")
    draft_model: Optional[str] = Field(None, description="a catalog model drafting on the same group")
    draft_cost_fraction: Optional[float] = Field(None, ge=0.0, le=10.0, description="or: one draft token costs "
                                                 "this fraction of a target decode step (MTP/EAGLE heads)")

    def speculation(self) -> Speculation:
        """The cost model's setting (UserError when it is inconsistent)."""
        return Speculation(self.draft_tokens, self.acceptance_rate, self.tokens_per_step, self.draft_model,
                           self.draft_cost_fraction)

    @model_validator(mode="after")
    def _consistent(self) -> "SpeculativeConfig":
        try:
            self.speculation()
        except UserError as exc:
            raise ValueError(str(exc).removeprefix("speculative: ")) from None
        return self


class GroupConfig(_Strict):
    """One kind of device group; ``replicas`` identical groups of it."""

    name: str
    device: str
    count: int = Field(1, ge=1, description="chips (GPUs, Trainium chips, CS-3 systems) per group")
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1, le=10_000)  # sanity bound: more is a typo, and costs O(groups) per decision
    role: Literal["prefill", "decode", "both"]
    pool: str = ""
    cost_profile: Optional[str] = None
    max_batch_tokens: int = Field(_LIMITS.max_batch_tokens, ge=1)
    max_num_seqs: int = Field(_LIMITS.max_num_seqs, ge=1)
    max_prefill_seqs: int = Field(_LIMITS.max_prefill_seqs, ge=1)
    block_size: int = Field(_LIMITS.block_size, ge=1)
    extend_tokens: int = Field(_LIMITS.extend_tokens, ge=1)
    prefix_cache_fraction: float = Field(_LIMITS.prefix_cache_fraction, ge=0.0, lt=1.0)
    kv_capacity_tokens: Optional[int] = Field(None, ge=1, le=10**12, description="KV tokens the group holds "
                                              "(default: derived from memory, weights and reserve)")
    speculative: Optional[SpeculativeConfig] = None

    def limits(self) -> GroupLimits:
        return GroupLimits(self.max_batch_tokens, self.max_num_seqs, self.max_prefill_seqs,
                           self.block_size, self.extend_tokens, self.prefix_cache_fraction)


class TraceColumns(_Strict):
    """Which columns of a generic CSV/JSONL/Parquet trace hold what (default: the canonical
    ``arrival_s`` — or ``arrival_ms`` —, ``prompt_tokens``, ``output_tokens``)."""

    arrival: str = "arrival_s"
    prompt: str = "prompt_tokens"
    output: str = "output_tokens"
    hashes: Optional[str] = Field(None, description="prefix-block hashes per request (lists of integers)")
    max_tokens: Optional[str] = Field(None, description="the request's own output limit")


_SYNTHETIC_ONLY = ("arrival", "cv", "prompt", "output")
_TRACE_ONLY = ("path", "format", "window_s", "columns", "time_unit", "sort", "zero_lengths",
               "spread_buckets", "prefix_block_tokens")


class WorkloadConfig(_Strict):
    """Synthetic arrivals and lengths, or a trace file; then optional rate scaling/trimming.

    A field of the other kind is an error, not silently ignored (a trace has its own arrivals
    and lengths; a synthetic workload reads no file).
    """

    kind: Literal["synthetic", "trace"] = "synthetic"
    num_requests: Optional[int] = Field(None, ge=1, le=wl.MAX_REQUESTS, description="synthetic: how many; trace: the first N")
    rate_per_s: Optional[float] = Field(None, gt=0, description="synthetic: arrival rate; trace: rescale to it")
    rate_scale: Optional[float] = Field(None, gt=0)
    arrival: Literal["poisson", "gamma", "constant"] = "poisson"
    cv: float = Field(1.0, gt=0)
    prompt: Union[int, str, dict[str, Any]] = "azure-conv"
    output: Union[int, str, dict[str, Any]] = "azure-conv"
    path: Optional[str] = None
    format: Literal["auto", "azure", "mooncake", "csv", "jsonl", "parquet"] = "auto"
    window_s: Optional[tuple[float, float]] = None
    columns: Optional[TraceColumns] = Field(None, description="generic traces: which column holds what")
    time_unit: Optional[Literal["s", "ms", "us", "ns"]] = Field(
        None, description="generic traces: unit of numeric arrival times (default s; ms for arrival_ms)")
    sort: bool = Field(False, description="sort rows by arrival time (default: out-of-order rows are an error)")
    zero_lengths: Literal["error", "clamp", "drop"] = Field(
        "error", description="a 0-token prompt or output: stop (error), raise it to 1 token (clamp), skip the row (drop)")
    spread_buckets: Optional[bool] = Field(
        None, description="Mooncake traces: spread each ~3 s timestamp bucket's requests over it (default true)")
    prefix_block_tokens: Optional[int] = Field(None, ge=1, le=wl.MAX_TOKENS,
                                               description="generic traces with hashes: tokens per hash block (default 512)")

    @model_validator(mode="after")
    def _check(self) -> "WorkloadConfig":
        if self.kind == "synthetic":
            if self.num_requests is None or self.rate_per_s is None:
                raise ValueError("a synthetic workload needs num_requests and rate_per_s")
            stray = self._set_beyond_default(_TRACE_ONLY)
            if stray:
                raise ValueError(f"{stray[0]} applies to kind: trace (this workload is synthetic)")
        else:
            if self.path is None:
                raise ValueError("a trace workload needs a path")
            stray = self._set_beyond_default(_SYNTHETIC_ONLY)
            if stray:
                raise ValueError(f"{stray[0]} applies to kind: synthetic (a trace brings its own arrivals and "
                                 f"lengths; rescale it with rate_per_s or rate_scale)")
        return self

    def _set_beyond_default(self, names: Sequence[str]) -> list[str]:
        """Which of ``names`` hold something other than their default (a dumped config repeats
        the defaults of the other kind; only a real setting is an error)."""
        fields = type(self).model_fields
        return [f for f in names if f in self.model_fields_set and getattr(self, f) != fields[f].default]

    def trace_options(self) -> dict[str, Any]:
        """The trace reader's options this workload sets (:func:`hetero_sched.workload.load_trace`)."""
        opts: dict[str, Any] = {"sort": self.sort, "zero_lengths": self.zero_lengths}
        if self.columns is not None:
            opts.update({k: v for k, v in self.columns.model_dump().items() if v is not None})
        for key in ("time_unit", "spread_buckets", "prefix_block_tokens"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts


class PolicyConfig(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class PredictorConfig(_Strict):
    kind: Literal["oracle", "constant", "mean", "noisy", "max_tokens"] = "noisy"
    tokens: int = Field(256, ge=1, le=wl.MAX_TOKENS)
    sigma: float = Field(0.5, ge=0)


class TransferConfig(_Strict):
    """How KV moves from a prefill group to a decode group (any disaggregated policy)."""

    mode: Literal["after_prefill", "layerwise"] = "after_prefill"
    """``layerwise``: stream each layer's KV as the prefill computes it (Splitwise)."""
    layer_message_s: Optional[float] = Field(default=None, ge=0, description="cost of one per-layer "
                                             "message (default: the sender's message_cost_s)")


class AdmissionConfig(_Strict):
    """Admission control: what the scheduler refuses at arrival instead of queueing without bound."""

    max_inflight: Optional[int] = Field(default=None, ge=1, description="requests accepted and not yet "
                                        "finished, cluster-wide; an arrival beyond it is rejected at once "
                                        "(default: no limit)")


class SLOConfig(_Strict):
    ttft_s: float = Field(gt=0)
    tpot_s: float = Field(gt=0)
    name: str = "custom"


Dtype = Literal[tuple(DTYPE_BYTES)]  # type: ignore[valid-type]


class Experiment(_Strict):
    """A whole experiment: cluster, model, workload, policy, SLOs, predictor, overrides."""

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="letters, digits, '.', '_', '-' (it names the run folder)")
    seed: int = Field(0, ge=0)  # numpy seeds are non-negative
    model: str = "llama-3.1-70b"
    weight_dtype: Optional[Dtype] = Field(None, description="weights stored and multiplied at this precision "
                                          "(fp8: half the bytes of bf16, the device's FP8 FLOP rate); default bf16")
    kv_dtype: Optional[Dtype] = Field(None, description="KV cache precision (fp8: half the KV bytes per token "
                                      "to hold and to move); default bf16")
    groups: list[GroupConfig] = Field(min_length=1)
    policy: PolicyConfig
    workload: WorkloadConfig
    slo: Union[Literal["standard", "high-speed"], SLOConfig] = "standard"
    predictor: PredictorConfig = Field(default_factory=lambda: PredictorConfig())
    oracle: bool = False
    report_interval_s: float = Field(0.0, ge=0)
    transfer: TransferConfig = Field(default_factory=lambda: TransferConfig())
    admission: AdmissionConfig = Field(default_factory=lambda: AdmissionConfig())
    kv_cache: Optional[KVCacheConfig] = Field(None, description="KV tiers below device memory (host DRAM, "
                                              "local SSD) and a cluster KV store (default: device memory only)")
    catalog: list[dict[str, Any]] = Field(default_factory=list, description="the experiment's own devices and "
                                          "models: catalog data files (paths) or inline {devices:, models:} mappings")
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("groups")
    @classmethod
    def _unique_names(cls, v: list[GroupConfig]) -> list[GroupConfig]:
        names = [g.name for g in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"group names must be unique; repeated: {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _precision(self) -> "Experiment":
        """``weight_dtype`` / ``kv_dtype`` are the catalog overrides ``model.<model>.<field>``:
        fold them in, so every consumer of the overrides sees them (and the stamp records them)."""
        extra = {f"model.{self.model}.{f}": getattr(self, f) for f in ("weight_dtype", "kv_dtype")
                 if getattr(self, f) is not None}
        clash = [k for k, v in extra.items() if k in self.overrides and self.overrides[k] != v]
        if clash:
            raise ValueError(f"{clash[0].rsplit('.', 1)[1]} is set twice, differently (field and overrides.{clash[0]})")
        if extra and any(k not in self.overrides for k in extra):
            object.__setattr__(self, "overrides", {**self.overrides, **extra})
        return self

    @property
    def catalog_data(self) -> CatalogData:
        """The experiment's own catalog entries (validated when the experiment was parsed)."""
        return catalog_extension(self.catalog, "experiment")

    @property
    def slo_target(self) -> SLO:
        return SLO_TIERS[self.slo] if isinstance(self.slo, str) else SLO(self.slo.ttft_s, self.slo.tpot_s, self.slo.name)

    @property
    def layerwise(self) -> Optional[LayerwiseStreaming]:
        """The layer-wise streaming option for the core (None: send KV after prefill)."""
        if self.transfer.mode != "layerwise":
            return None
        layers = resolve_catalog(self.overrides, self.catalog_data).model(self.model).num_layers
        return LayerwiseStreaming(layers, self.transfer.layer_message_s)

    @property
    def predictor_spec(self) -> PredictorSpec:
        if self.oracle:
            return PredictorSpec("oracle")
        p = self.predictor
        return PredictorSpec(p.kind, p.tokens, p.sigma)


EXPERIMENT_FIELDS = tuple(Experiment.model_fields)


def catalog_extension(items: list[dict[str, Any]], source: str) -> CatalogData:
    """Resolve an experiment's ``catalog:`` entries (inline mappings) against the shipped catalog."""
    if not items:
        return CatalogData()
    known = shipped()
    devices = {name: (spec, known.costs[name]) for name, spec in known.devices.items()}
    return resolve_entries([(item, f"{source}: catalog[{i}]") for i, item in enumerate(items)], devices, known.models,
                           known.memory_nodes)


def inline_catalog(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``data`` with every catalog file path (relative to ``base_dir``) replaced by its content, so an
    experiment carries its own devices and models wherever it goes (sweep points, Ray tasks)."""
    items = data.get("catalog")
    if not isinstance(items, list) or not any(isinstance(i, str) for i in items):
        return data
    inlined = []
    for item in items:
        if isinstance(item, str):
            path = Path(item)
            if not path.is_absolute() and not path.exists():
                path = base_dir / path
            item = read_catalog_file(path)
        inlined.append(item)
    return {**data, "catalog": inlined}


def parse_experiment(data: Any, source: str = "experiment", base_dir: Optional[Path] = None) -> Experiment:
    """Validate a mapping as an experiment (UserError naming the first bad field).

    Catalog file paths resolve against ``base_dir`` (default: the working directory). A group's
    ``device`` may name a device calibrated with ``hetero-sched calibrate --device NAME --like
    BASE``: its profile (``cost_profile``, else ``NAME-profile.json`` in ``base_dir`` or the
    working directory) says which catalog device it is, and its fitted parameters apply.
    """
    data = expect_mapping(data, source, "experiment")
    base = base_dir or Path.cwd()
    data = inline_catalog(data, base)
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_error(source, exc)) from None
    extra = catalog_extension(exp.catalog, source)     # a bad device or model: one line, at parse time
    models = (*model_names(), *(m.name for m in extra.models))
    if exp.model not in models:
        raise UserError(f"{source}: model: unknown model {exp.model!r}; known models: {', '.join(models)}")
    return _calibrated_devices(exp, source, base, (*device_names(), *(d.name for d in extra.devices)))


def _calibrated_devices(exp: Experiment, source: str, base_dir: Path, known: Sequence[str]) -> Experiment:
    """Groups with their profiles found (relative to ``base_dir``, else the working directory)
    and calibrated device names resolved to the catalog device they were calibrated from
    (``known``: the catalog's devices and the experiment's own)."""
    if all(g.cost_profile is None for g in exp.groups) and all(g.device in known for g in exp.groups):
        return exp
    groups = []
    for i, g in enumerate(exp.groups):
        calibrated = g.device not in known
        if g.cost_profile is None and not calibrated:
            groups.append(g)
            continue
        name = g.cost_profile or f"{g.device}-profile.json"
        found = next((c for c in (base_dir / name, Path(name)) if c.is_file()), None)
        if found is None and calibrated:
            raise UserError(f"{source}: groups.{i}.device: unknown device {g.device!r}; known devices: "
                            f"{', '.join(known)} (a calibrated device needs its profile: cost_profile: "
                            f"FILE, or {g.device}-profile.json next to the experiment)")
        if found is None:
            raise UserError(f"{source}: groups.{i}.cost_profile: no such file {name!r} (looked in {base_dir} "
                            "and the working directory)")
        update: dict[str, Any] = {"cost_profile": str(found.resolve())}
        if calibrated:
            profile = load_profile(found)
            if profile.device != g.device:
                raise UserError(f"{source}: groups.{i}: profile {found} calibrates {profile.device!r}, "
                                f"not {g.device!r}")
            update["device"] = profile.base_device
        groups.append(g.model_copy(update=update))
    return exp.model_copy(update={"groups": groups})


def load_experiment(path: Union[str, Path, None] = None,
                    sets: Sequence[tuple[str, Any]] = ()) -> tuple[Experiment, Path]:
    """Read and validate a YAML experiment (the shipped default when ``path`` is None), with
    ``sets`` (``(dotted path, value)``, as ``--set`` gives them) applied first.

    Returns the experiment and the folder relative paths in it resolve against.
    """
    if path is None:
        text = resources.files("hetero_sched").joinpath("data", "experiment_default.yaml").read_text()
        data, source, base = yaml.safe_load(text), "default experiment", Path.cwd()
    else:
        p = Path(path)
        data, source, base = read_yaml(p, "experiment"), str(p), p.parent
    if sets:
        data = apply_sets(expect_mapping(data, source, "experiment"), sets, EXPERIMENT_FIELDS, "experiment")
    return parse_experiment(data, source, base), base


def profile_stamp(exp: Experiment) -> dict[str, dict[str, Any]]:
    """What each calibrated group's profile is, for a result's stamp: file, the device name it
    calibrated, its fit errors, and the problems ``calibrate --force`` wrote it past."""
    out: dict[str, dict[str, Any]] = {}
    for g in exp.groups:
        if g.cost_profile is not None:
            p = load_profile(g.cost_profile)
            out[g.name] = {"path": g.cost_profile, "device": p.device, "base_device": p.base_device, "kind": p.kind,
                           "source": p.source, "rms_fit_error": p.fit.get("rms_fit_error"),
                           "rms_loo_error": p.fit.get("rms_loo_error"), "forced": list(p.forced)}
    return out


def build_workload(cfg: WorkloadConfig, seed: int, base_dir: Path) -> wl.Workload:
    """The experiment's workload, trimmed and rescaled as configured."""
    if cfg.kind == "synthetic":
        assert cfg.num_requests is not None and cfg.rate_per_s is not None
        w = wl.synthetic(cfg.num_requests, cfg.rate_per_s, arrival=cfg.arrival, cv=cfg.cv,
                         prompt=cfg.prompt, output=cfg.output, seed=seed)
    else:
        assert cfg.path is not None
        path = Path(cfg.path)
        if not path.is_absolute() and not path.exists() and (base_dir / path).exists():
            path = base_dir / path
        w = wl.load_trace(path, fmt=cfg.format, **cfg.trace_options())
        if cfg.window_s is not None:
            w = wl.window(w, *cfg.window_s)
        if cfg.num_requests is not None:
            w = wl.head(w, cfg.num_requests)
        if cfg.rate_per_s is not None:
            w = wl.scale_to_rate(w, cfg.rate_per_s)
    if cfg.rate_scale is not None:
        w = wl.scale_rate(w, cfg.rate_scale)
    return w


def build_groups(exp: Experiment, base_dir: Path) -> list[GroupState]:
    """One core :class:`GroupState` per group replica, costs resolved with the overrides."""
    extra = exp.catalog_data
    catalog = resolve_catalog(exp.overrides, extra)
    catalog.model(exp.model)
    groups: list[GroupState] = []
    layers = exp.layerwise.num_layers if exp.kv_cache is not None and exp.layerwise is not None else 1
    for i, g in enumerate(exp.groups):
        where = f"groups[{i}] ({g.name})"
        try:
            spec = catalog.group(g.device, g.count, g.tp, g.pp)
            profile = None
            if g.cost_profile is not None:
                profile = Path(g.cost_profile)
                if not profile.is_absolute() and not profile.exists():
                    profile = base_dir / profile
            cost = build_group_cost(spec, exp.model, exp.overrides, profile=profile, extra=extra,
                                    speculation=g.speculative.speculation() if g.speculative else None,
                                    kv_capacity_tokens=g.kv_capacity_tokens)
            limits = g.limits()
            if cost.kv_capacity_tokens < limits.block_size:
                raise UserError(f"no KV memory left after the weights of {exp.model}")
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        for r in range(g.replicas):
            name = g.name if g.replicas == 1 else f"{g.name}-{r}"
            state = GroupState(len(groups), name, Role(g.role), cost, limits, device=g.device, pool=g.pool or g.role)
            attach_kv_tiers(exp.kv_cache, state, catalog.device(g.device), catalog.cost(g.device), g.count, layers,
                            where)
            groups.append(state)
    return groups
