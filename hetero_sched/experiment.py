"""Experiment config: YAML validated into typed objects, and the cluster it describes.

Config is flat, frozen and validated at the edge (pydantic); a bad field is one line naming it.
Values derived at run time (block counts, capacities) live in the core's state objects, never
written back into the config.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hetero_sched import workload as wl
from hetero_sched.catalog import CatalogData, resolve_catalog
from hetero_sched.catalog.datafile import read_catalog_file, resolve_entries
from hetero_sched.catalog.shipped import shipped
from hetero_sched.core.group import GroupLimits, GroupState, Role
from hetero_sched.core.transfer import LayerwiseStreaming
from hetero_sched.costmodel import build_group_cost
from hetero_sched.errors import UserError
from hetero_sched.kvcache import KVCacheConfig, attach_kv_tiers
from hetero_sched.metrics import SLO, SLO_TIERS
from hetero_sched.predictor import PredictorSpec
from hetero_sched.speculation import Speculation
from hetero_sched.validation import format_validation_error


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


class WorkloadConfig(_Strict):
    """Synthetic arrivals and lengths, or a trace file; then optional rate scaling/trimming."""

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

    @model_validator(mode="after")
    def _check(self) -> "WorkloadConfig":
        if self.kind == "synthetic":
            if self.num_requests is None or self.rate_per_s is None:
                raise ValueError("a synthetic workload needs num_requests and rate_per_s")
        elif self.path is None:
            raise ValueError("a trace workload needs a path")
        return self


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


class Experiment(_Strict):
    """A whole experiment: cluster, model, workload, policy, SLOs, predictor, overrides."""

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="letters, digits, '.', '_', '-' (it names the run folder)")
    seed: int = Field(0, ge=0)  # numpy seeds are non-negative
    model: str = "llama-3.1-70b"
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


_format_error = format_validation_error
"""Kept under its old name for callers (sweep, planner)."""


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
    """Validate a mapping as an experiment (UserError naming the first bad field); catalog file
    paths resolve against ``base_dir`` (default: the working directory)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = inline_catalog(data, base_dir or Path.cwd())
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_error(source, exc)) from None
    catalog_extension(exp.catalog, source)     # a bad device or model: one line, at parse time
    return exp


def load_experiment(path: Union[str, Path, None] = None) -> tuple[Experiment, Path]:
    """Read and validate a YAML experiment (the shipped default when ``path`` is None).

    Returns the experiment and the folder relative paths in it resolve against.
    """
    if path is None:
        text = resources.files("hetero_sched").joinpath("data", "experiment_default.yaml").read_text()
        return parse_experiment(yaml.safe_load(text), "default experiment"), Path.cwd()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such experiment file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{p}:{where}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text file") from None
    return parse_experiment(data, str(p), p.parent), p.parent


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
        fmt = {"azure": "azure", "mooncake": "mooncake"}.get(cfg.format, cfg.format)
        w = wl.load_trace(path, fmt=fmt)
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
