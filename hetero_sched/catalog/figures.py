"""Published performance figures: what the cost model is calibrated and cross-validated on.

The figures are data (``hetero_sched/data/figures.yaml``): each is one public number with what
it measures — metric, input/output lengths, concurrency, parallelism, dtype, speculative or not —
who measured it, when, and where it is published. :mod:`hetero_sched.calibrate` fits each device
family's free parameters on them by k-fold cross-validation and reports every figure's held-out
error (``hetero-sched calibrate --published``, ``bench/accuracy.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hetero_sched.catalog.groups import GroupSpec
from hetero_sched.errors import UserError
from hetero_sched.speculation import Speculation
from hetero_sched.configfile import validate

FIGURES_FILE = "figures.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SpeculativeFigure(_Strict):
    """The speculative-decoding setting of a figure; ``acceptance_rate: fit`` makes it a fitted
    parameter shared by every figure of the same ``fit_group``."""

    draft_tokens: int = Field(ge=1, le=64)
    acceptance_rate: Union[float, Literal["fit"], None] = None
    tokens_per_step: Optional[float] = Field(None, ge=1.0)
    fit_group: Optional[str] = None
    draft_model: Optional[str] = None
    draft_cost_fraction: Optional[float] = Field(None, ge=0.0, le=10.0)

    @model_validator(mode="after")
    def _fit_group(self) -> "SpeculativeFigure":
        if (self.acceptance_rate == "fit") != (self.fit_group is not None):
            raise ValueError("acceptance_rate: fit and fit_group go together")
        return self


class FigureEntry(_Strict):
    """One published number (see the header of figures.yaml)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    device: str
    count: int = Field(ge=1)
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    model: str
    metric: Literal["ttft_s", "tpot_s"]
    value: float = Field(gt=0)
    prompt_tokens: int = Field(ge=1)
    output_tokens: int = Field(ge=2)
    concurrency: int = Field(1, ge=1)
    closed_loop: bool = Field(False, description="a finished request is replaced at once (a concurrency-limited "
                              "benchmark): the other requests' prefills stall each one's decoding")
    weight_dtype: Optional[str] = None
    kv_dtype: Optional[str] = None
    statistic: str
    speculative: Optional[SpeculativeFigure] = None
    measured_by: str
    date: str
    title: str
    source: str = Field(pattern=r"^https?://")
    note: str = ""


class FiguresFile(_Strict):
    figures: list[FigureEntry]


@dataclass(frozen=True)
class Figure:
    """One published number: ``ttft_s`` (one prefill) or ``tpot_s`` (mean decode step)."""

    name: str
    group: GroupSpec
    model: str
    metric: str
    prompt_tokens: int
    output_tokens: int
    value_s: float
    source: str
    title: str = ""
    date: str = ""
    measured_by: str = ""
    statistic: str = ""
    batch: int = 1
    closed_loop: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)
    speculative: Optional[SpeculativeFigure] = None
    note: str = ""

    @property
    def device(self) -> str:
        """The catalog device the figure is predicted with."""
        return self.group.device

    @property
    def kind(self) -> str:
        """The hardware family it counts for (``cs3-2024`` counts as ``cs3``)."""
        return self.group.spec.kind

    @property
    def fit_group(self) -> Optional[str]:
        """The fitted speculative acceptance this figure shares, if any."""
        return self.speculative.fit_group if self.speculative is not None else None

    def speculation(self, fitted_acceptance: Optional[float] = None) -> Optional[Speculation]:
        """The cost model's setting; a fitted acceptance fills ``acceptance_rate: fit``."""
        s = self.speculative
        if s is None:
            return None
        alpha = fitted_acceptance if s.acceptance_rate == "fit" else s.acceptance_rate
        if s.acceptance_rate == "fit" and fitted_acceptance is None:
            raise UserError(f"figure {self.name}: its acceptance rate is fitted; give it")
        assert alpha is None or isinstance(alpha, float)
        return Speculation(s.draft_tokens, alpha, s.tokens_per_step, s.draft_model, s.draft_cost_fraction)


def _figure(entry: FigureEntry) -> Figure:
    overrides: dict[str, Any] = {}
    if entry.weight_dtype:
        overrides[f"model.{entry.model}.weight_dtype"] = entry.weight_dtype
    if entry.kv_dtype:
        overrides[f"model.{entry.model}.kv_dtype"] = entry.kv_dtype
    return Figure(entry.name, GroupSpec(entry.device, entry.count, entry.tp, entry.pp), entry.model, entry.metric,
                  entry.prompt_tokens, entry.output_tokens, entry.value, entry.source, entry.title, entry.date,
                  entry.measured_by, entry.statistic, entry.concurrency, entry.closed_loop, overrides, entry.speculative, entry.note)


def parse_figures(data: Any, origin: str) -> tuple[Figure, ...]:
    """Validate a figures file's content (UserError naming the file and field)."""
    parsed = validate(FiguresFile, data, origin)
    names = [f.name for f in parsed.figures]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{origin}: figure names must be unique; repeated: {', '.join(dup)}")
    try:
        return tuple(_figure(e) for e in parsed.figures)
    except UserError as exc:
        raise UserError(f"{origin}: {exc}") from None


@functools.cache
def published_figures() -> tuple[Figure, ...]:
    """Every shipped figure (read once)."""
    text = resources.files("hetero_sched").joinpath("data", FIGURES_FILE).read_text()
    return parse_figures(yaml.safe_load(text), f"hetero_sched/data/{FIGURES_FILE}")
