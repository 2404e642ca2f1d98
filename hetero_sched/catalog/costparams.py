"""Cost-model parameters per device kind: efficiencies, fixed latencies, prices, reserves.

These are the numbers a roofline needs beyond the spec sheet, and the ones calibration fits.
They live with each device in ``hetero_sched/data/catalog/*.yaml``; the ``calibrated`` ones are
the output of :func:`hetero_sched.calibrate.calibrate_published` (k-fold cross-validated on the
figures of :mod:`hetero_sched.catalog.figures`), and a test re-runs that fit and checks they still
agree, so code and catalog cannot drift apart. Overrides: ``cost.<device>.<field>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Mapping, Optional

from hetero_sched.catalog.sources import Source

@dataclass(frozen=True)
class CostParams:
    """Free and assumed parameters of the roofline for one device kind."""

    device: str
    dollars_per_hour: float
    """Per chip (per CS-3 system)."""
    compute_efficiency: float
    """Fraction of dense peak FLOP/s that prefill matmuls reach."""
    memory_efficiency: float
    """Fraction of peak memory bandwidth that weight and KV reads reach."""
    layer_latency_s: float
    """Fixed time per layer per forward pass (launches, collective latency, sync)."""
    link_efficiency: float = 0.7
    """Fraction of the scale-up link bandwidth TP all-reduces reach."""
    step_overhead_s: float = 0.0
    """Fixed time per forward pass (sampling, host scheduling)."""
    pp_hop_s: float = 20e-6
    """Latency of one pipeline-stage boundary (activations are KBs; latency dominates)."""
    kv_reserve_fraction: float = 0.1
    """Device memory kept free of weights and KV (activations, runtime, fragmentation)."""
    message_cost_s: float = 50e-6
    """Fixed cost of one KV-transfer message."""
    prefill_overhead_s: float = 0.0
    """Fixed time per prefill iteration beyond the roofline (request setup, first-step scheduling)."""
    kv_read_efficiency: Optional[float] = None
    """Fraction of peak memory bandwidth that decode-time KV reads reach (None: memory_efficiency);
    paged-attention kernels can fall far below the weight-read efficiency at long contexts."""
    host_message_s: float = 10e-6
    """Fixed cost of one device <-> host-DRAM copy (a DMA descriptor chain's setup and completion)."""
    ssd_message_s: float = 100e-6
    """Fixed cost of one local-NVMe read or write (one I/O's latency)."""
    half_speed_batch: Optional[float] = None
    """If set, per-user decode speed is ``s1 / (1 + (b − 1)/half_speed_batch)`` on top of the
    roofline: the stated concurrency assumption for devices without a public curve (CS-3)."""
    sources: Mapping[str, Source] = field(default_factory=dict, compare=False)


FLOAT_FIELDS = tuple(f.name for f in fields(CostParams) if f.type in ("float", "Optional[float]"))
"""Cost fields an experiment may override (``cost.<device>.<field>``)."""
