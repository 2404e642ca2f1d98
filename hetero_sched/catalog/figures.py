"""Published performance figures: the ones calibration fits on, and the held-out ones tests check.

Each figure is one measured number with its workload and URL. ``role`` is ``fit`` (used by
:func:`hetero_sched.calibrate.calibrate_published`) or ``holdout`` (never seen by the fit;
``tests/test_costmodel.py`` checks the calibrated model against it, ±25%).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from hetero_sched.catalog.groups import GroupSpec

NXDI = "https://github.com/aws-neuron/aws-neuron-sdk/blob/master/libraries/nxd-inference/tutorials/"
NIM = "https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance"
CEREBRAS_LAUNCH = "https://cerebras.ai/blog/introducing-cerebras-inference-ai-at-instant-speed"
CEREBRAS_AA = "https://cerebras.ai/blog/llama3.1-model-quality-evaluation-cerebras-groq-together-and-fireworks"
CEREBRAS_SPEC_DECODE = "https://news.ycombinator.com/item?id=41942822 (quotes the Oct 2024 release: 'This release also implements speculative decoding')"
FP8 = {"model.llama-3.1-70b.weight_dtype": "fp8", "model.llama-3.1-70b.kv_dtype": "fp8"}


@dataclass(frozen=True)
class Figure:
    """One published number: ``ttft_s`` (one prefill) or ``tpot_s`` (mean decode step)."""

    name: str
    role: str
    group: GroupSpec
    model: str
    metric: str
    prompt_tokens: int
    output_tokens: int
    value_s: float
    source: str
    batch: int = 1
    overrides: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""


def published_figures() -> tuple[Figure, ...]:
    """Every figure, fit and hold-out (Llama-3.3-70B has Llama-3.1-70B's architecture)."""
    trn2 = GroupSpec("trn2", 16, tp=64)
    h100 = GroupSpec("h100", 2, tp=2)
    return (
        # --- fit -------------------------------------------------------------------------------
        Figure("trn2-70b-ttft", "fit", trn2, "llama-3.1-70b", "ttft_s", 10_000, 1_501, 0.5756,
               NXDI + "llama70b_perf_comparison.csv", note="Llama-3.3-70B BF16, TP64, batch 1, P50, vLLM + NxDI"),
        Figure("trn2-70b-tpot", "fit", trn2, "llama-3.1-70b", "tpot_s", 10_000, 1_501, 0.0198,
               NXDI + "llama70b_perf_comparison.csv", note="same run, TPOT P50"),
        Figure("cs3-8b-speed", "fit", GroupSpec("cs3", 1, tp=1), "llama-3.1-8b", "tpot_s", 1_000, 500, 1 / 1800,
               CEREBRAS_LAUNCH + " ; Artificial Analysis measured >1,800 tok/s: " + CEREBRAS_AA,
               note="Aug 27 2024 launch, 16-bit weights; predates Cerebras' speculative decoding (Oct 2024: "
                    + CEREBRAS_SPEC_DECODE + "); workload (1,000 in / 500 out) assumed"),
        Figure("h100-70b-fp8-ttft", "fit", h100, "llama-3.1-70b", "ttft_s", 5_000, 500, 0.40677, NIM,
               overrides=FP8, note="NIM 1.8.0, Llama-3.3-70B FP8, 2xH100 TP2, concurrency 1"),
        Figure("h100-70b-fp8-itl", "fit", h100, "llama-3.1-70b", "tpot_s", 5_000, 500, 0.01858, NIM,
               overrides=FP8, note="same run, inter-token latency"),
        # --- hold-out --------------------------------------------------------------------------
        Figure("trn2-405b-ttft", "holdout", trn2, "llama-3.1-405b", "ttft_s", 10_000, 1_785, 2.442,
               NXDI + "llama405b_perf_comparison.csv", note="Llama-3.1-405B BF16, TP64, batch 1, P50"),
        Figure("trn2-405b-tpot", "holdout", trn2, "llama-3.1-405b", "tpot_s", 10_000, 1_785, 0.0379,
               NXDI + "llama405b_perf_comparison.csv", note="same run, TPOT P50"),
        Figure("cs3-70b-speed", "holdout", GroupSpec("cs3", 4, tp=1, pp=4), "llama-3.1-70b", "tpot_s", 1_000, 500,
               1 / 450, CEREBRAS_LAUNCH, note="same day as the 8B figure; 70B on four CS-3 ('as few as four systems')"),
        Figure("h100-70b-fp8-ttft-short", "holdout", h100, "llama-3.1-70b", "ttft_s", 500, 2_000, 0.04777, NIM,
               overrides=FP8, note="NIM 1.8.0, 500 in / 2,000 out, concurrency 1"),
        Figure("h100-70b-fp8-itl-short", "holdout", h100, "llama-3.1-70b", "tpot_s", 500, 2_000, 0.01891, NIM,
               overrides=FP8, note="same run, inter-token latency"),
    )


def figures(role: str) -> tuple[Figure, ...]:
    """The figures of one role: ``fit`` or ``holdout``."""
    return tuple(f for f in published_figures() if f.role == role)
