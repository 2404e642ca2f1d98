"""Output-length predictors: what policies and KV reservations see instead of the truth.

Predictions are computed once per workload, vectorized and seeded, so a request gets the same
prediction every time it is (re-)placed, in the simulator and the runtime alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from hetero_sched.workload import MAX_TOKENS, Workload


@dataclass(frozen=True)
class PredictorSpec:
    """``oracle``: the true length. ``constant``: ``tokens``. ``mean``: the workload's mean
    output. ``noisy``: truth × lognormal(0, ``sigma``), seeded. ``max_tokens``: the request's
    max tokens (``tokens`` where it has none)."""

    kind: Literal["oracle", "constant", "mean", "noisy", "max_tokens"] = "noisy"
    tokens: int = 256
    sigma: float = 0.5


def predict_outputs(spec: PredictorSpec, workload: Workload, seed: int) -> np.ndarray:
    """Predicted output tokens per request (int64, >= 1)."""
    true = workload.output_tokens
    n = len(workload)
    if spec.kind == "oracle":
        pred = true.astype(np.int64)
    elif spec.kind == "constant":
        pred = np.full(n, spec.tokens, dtype=np.int64)
    elif spec.kind == "mean":
        pred = np.full(n, int(round(float(true.mean()))) if n else 1, dtype=np.int64)
    elif spec.kind == "noisy":
        rng = np.random.default_rng([seed, 0x9E37])
        pred = np.rint(np.minimum(true * rng.lognormal(0.0, spec.sigma, n), MAX_TOKENS)).astype(np.int64)
    else:
        if workload.max_tokens is not None:
            pred = workload.max_tokens.astype(np.int64)
        else:
            pred = np.full(n, spec.tokens, dtype=np.int64)
    return np.maximum(pred, 1)
