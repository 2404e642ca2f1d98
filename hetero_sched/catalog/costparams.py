"""Cost-model parameters per device kind: efficiencies, fixed latencies, prices, reserves.

These are the numbers a roofline needs beyond the spec sheet, and the ones calibration fits.
The ``calibrated`` values below are the output of :func:`hetero_sched.calibrate.calibrate_published`
on the *fit* figures of :mod:`hetero_sched.catalog.figures`; a test re-runs that fit and checks
they still agree, so code and catalog cannot drift apart. Overrides: ``cost.<device>.<field>``.
"""

from __future__ import annotations

import functools
from types import MappingProxyType

from dataclasses import dataclass, field, fields
from typing import Mapping, Optional

from hetero_sched.catalog.sources import Source, assumed, calibrated, lookup, published

FIT_TRN2 = ("trn2.48xlarge TP64 Llama-3.3-70B BF16 batch 1, 10,000 in / 1,501 out: TTFT 575.6 ms, "
            "TPOT 19.8 ms (https://github.com/aws-neuron/aws-neuron-sdk/blob/master/libraries/nxd-inference/"
            "tutorials/llama70b_perf_comparison.csv)")
FIT_CS3 = ("Cerebras Inference launch, Llama-3.1-8B single user ~1,800 tok/s, 16-bit weights, no speculative "
           "decoding (https://cerebras.ai/blog/introducing-cerebras-inference-ai-at-instant-speed)")
FIT_H100 = ("NVIDIA NIM 1.8.0 Llama-3.3-70B, 2xH100 FP8 TP2, 5,000 in / 500 out, concurrency 1: TTFT 406.77 ms, "
            "ITL 18.58 ms (https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance)")


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
    half_speed_batch: Optional[float] = None
    """If set, per-user decode speed is ``s1 / (1 + (b − 1)/half_speed_batch)`` on top of the
    roofline: the stated concurrency assumption for devices without a public curve (CS-3)."""
    sources: Mapping[str, Source] = field(default_factory=dict, compare=False)


FLOAT_FIELDS = tuple(f.name for f in fields(CostParams) if f.type in ("float", "Optional[float]"))
"""Cost fields an experiment may override (``cost.<device>.<field>``)."""

_EFF_M = assumed("typical achievable fraction of peak HBM bandwidth in decode (~80%)")
_LINK = assumed("all-reduce bus efficiency ~70% of peak link bandwidth")
_OVH = assumed("folded into layer_latency_s (one batch-1 figure cannot separate them)")
_HOP = assumed("one pipeline hop over EFA/NIC: ~20 us")
_RES = assumed("10% of device memory for activations, runtime and fragmentation")
_MSG = assumed("~50 us RDMA setup + completion per KV message")


def _std(**extra: Source) -> dict[str, Source]:
    return {"memory_efficiency": _EFF_M, "link_efficiency": _LINK, "step_overhead_s": _OVH,
            "pp_hop_s": _HOP, "kv_reserve_fraction": _RES, "message_cost_s": _MSG,
            "half_speed_batch": assumed("no batch penalty beyond the roofline"), **extra}


@functools.cache
def _catalog() -> Mapping[str, CostParams]:
    """Built once; read-only (frozen specs in a mapping proxy), so sharing it is safe."""
    trn2_eff, trn2_lat = 0.2820, 1.9113e-4
    h100_eff, h100_lat = 0.4832, 6.8108e-5
    cs3_lat = 1.7333e-5
    same_as = "assumed equal to {}'s calibrated value (same software stack / same compute die)"
    params = [
        CostParams("trn2", 46.98 / 16, trn2_eff, 0.8, trn2_lat, sources=_std(
            dollars_per_hour=assumed("trn2.48xlarge on-demand list price ~$46.98/h / 16 chips (https://aws.amazon.com/ec2/pricing/on-demand/; not re-verified offline)"),
            compute_efficiency=calibrated(FIT_TRN2), layer_latency_s=calibrated(FIT_TRN2))),
        CostParams("trn3", 4.0, trn2_eff, 0.8, trn2_lat, sources=_std(
            dollars_per_hour=assumed("no public Trn3 price found; ~1.4x trn2 per chip"),
            compute_efficiency=assumed(same_as.format("trn2")), layer_latency_s=assumed(same_as.format("trn2")))),
        CostParams("cs3", 100.0, 0.3, 0.8, cs3_lat, pp_hop_s=10e-6, half_speed_batch=32.0, sources=_std(
            dollars_per_hour=assumed("CS-3 has no public price: ~$2.5M system over 3 years (~$95/h) + power; report break-even too"),
            compute_efficiency=assumed("30% of the 125 PFLOPS vendor (sparse) peak for prefill"),
            layer_latency_s=calibrated(FIT_CS3),
            pp_hop_s=assumed("one 100 GbE hop between CS-3 systems: ~10 us"),
            half_speed_batch=assumed("no public per-user-speed-vs-concurrency curve: per-user speed halves at 33 concurrent users (stated guess, anchored at the single-user speed)"))),
        CostParams("h100", 98.32 / 8, h100_eff, 0.8, h100_lat, sources=_std(
            dollars_per_hour=published("p5.48xlarge on-demand $98.32/h / 8 GPUs (pre-June-2025 list): https://www.factualminds.com/blog/aws-trainium2-inferentia2-ai-chips/"),
            compute_efficiency=calibrated(FIT_H100), layer_latency_s=calibrated(FIT_H100))),
        CostParams("h200", 10.6, h100_eff, 0.8, h100_lat, sources=_std(
            dollars_per_hour=assumed("~p5e/p5en per-GPU list order of magnitude; override per experiment"),
            compute_efficiency=assumed(same_as.format("h100")), layer_latency_s=assumed(same_as.format("h100")))),
        CostParams("b200", 14.2, 0.4, 0.8, h100_lat, sources=_std(
            dollars_per_hour=assumed("~p6-b200 per-GPU list order of magnitude; override per experiment"),
            compute_efficiency=assumed("40%: newer stack, lower than H100's calibrated MFU"),
            layer_latency_s=assumed(same_as.format("h100")))),
        CostParams("mi300x", 6.0, 0.4, 0.8, h100_lat, sources=_std(
            dollars_per_hour=assumed("neocloud per-GPU order of magnitude; override per experiment"),
            compute_efficiency=assumed("40% of dense peak"),
            layer_latency_s=assumed(same_as.format("h100")))),
    ]
    return MappingProxyType({p.device: p for p in params})


def list_cost_params() -> tuple[CostParams, ...]:
    """Cost parameters of every catalog device."""
    return tuple(_catalog().values())


def get_cost_params(device: str) -> CostParams:
    """Cost parameters of ``device``; UserError listing the known devices on a typo."""
    return lookup(_catalog(), device, "cost-parameter device")
