"""Requests and workloads: synthetic generators, trace readers, rate scaling.

A :class:`Workload` is columnar (numpy arrays) so a million requests cost tens of MB, not a
million Python objects; :meth:`Workload.requests` yields :class:`Request` records lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request as the workload states it (true lengths; policies see predictions)."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_hashes: Optional[tuple[int, ...]] = None
    """Hashes of the prompt's prefix blocks (e.g. Mooncake's), ``prefix_block_tokens`` each."""
    prefix_block_tokens: int = 512
    max_tokens: Optional[int] = None


@dataclass(frozen=True)
class Workload:
    """A sorted-by-arrival set of requests, stored as columns."""

    name: str
    arrival_s: np.ndarray          # float64, non-decreasing, starts at the first arrival
    prompt_tokens: np.ndarray      # int64, >= 1
    output_tokens: np.ndarray      # int64, >= 1
    prefix_hashes: Optional[list[tuple[int, ...]]] = None
    prefix_block_tokens: int = 512
    max_tokens: Optional[np.ndarray] = None
    source: dict = field(default_factory=dict)
    """Where it came from (file, generator and its parameters, scaling) — stamped on results."""

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def requests(self) -> Iterator[Request]:
        """Yield the requests in arrival order, ids ``0..n-1``."""
        arrivals = self.arrival_s.tolist()
        prompts = self.prompt_tokens.tolist()
        outputs = self.output_tokens.tolist()
        hashes = self.prefix_hashes
        max_tokens = self.max_tokens.tolist() if self.max_tokens is not None else None
        block = self.prefix_block_tokens
        for i in range(len(arrivals)):
            yield Request(i, arrivals[i], prompts[i], outputs[i],
                          hashes[i] if hashes is not None else None, block,
                          max_tokens[i] if max_tokens is not None else None)
