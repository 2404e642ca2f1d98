"""Accelerators: per-chip peak numbers, memory, links, and the units a group is counted in.

Units (DESIGN §6): a group's ``count`` is in *chips* (a Trainium chip, a GPU, a whole CS-3
system). ``units_per_chip`` is both the Ray resource a chip represents and its number of
tensor-parallel ranks: Trainium exposes logical NeuronCores at the default LNC=2 (a Trainium2
chip has 8 physical NeuronCore-v3 = 4 logical cores, so a trn2.48xlarge is 16 chips = 64
``neuron_cores`` = the "TP64" of AWS's figures); a CS-3 is one unit of the custom resource
``cs3``; a GPU is one ``GPU``. Bandwidths are bytes/s, FLOP/s are dense (no sparsity).
"""

from __future__ import annotations

import functools
from types import MappingProxyType

from dataclasses import dataclass, field, fields
from typing import Mapping

from hetero_sched.catalog.sources import Source, assumed, lookup, published, vendor_claim

GB = 1e9
GiB = 2**30

TRN2_ARCH = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/trainium2.html"
TRN2_INSTANCE = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/trn2-arch.html"
TRN2_EC2 = "https://aws.amazon.com/ec2/instance-types/trn2/"
TRN3_ARCH = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/trainium3.html"
TRN3_NEWS = "https://www.tomshardware.com/tech-industry/artificial-intelligence/amazon-launches-trainium3-ai-accelerator-competing-directly-against-blackwell-ultra-in-fp8-performance-new-trn3-gen2-ultraserver-takes-vertical-scaling-notes-from-nvidias-playbook"
CS3_CHIP = "https://www.cerebras.ai/chip"
CS3_SYSTEM = "https://www.cerebras.ai/system"
CS3_INFERENCE_BLOG = "https://cerebras.ai/blog/introducing-cerebras-inference-ai-at-instant-speed"
H100 = "https://www.nvidia.com/en-us/data-center/h100/"
H200 = "https://www.nvidia.com/en-us/data-center/h200/"
B200 = "https://www.nvidia.com/en-us/data-center/hgx/"
MI300X = "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html"
P5 = "https://aws.amazon.com/ec2/instance-types/p5/"


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator chip (or wafer-scale system) and how a group of them is counted."""

    name: str
    title: str
    ray_resource: str
    """Ray resource a group asks for: ``neuron_cores`` (built in), ``cs3`` (custom), ``GPU``."""
    units_per_chip: int
    """Ray resource units and tensor-parallel ranks per chip (Trainium: logical cores, LNC=2)."""
    cores_per_chip: int
    """Physical cores per chip (NeuronCores, SMs/CUs, WSE cores): informational."""
    scale_up_chips: int
    """Most chips one tensor-parallel stage may span (one NeuronLink/NVLink domain; CS-3: 1)."""
    memory_kind: str
    """``HBM`` or ``SRAM`` (CS-3 keeps weights and KV on the wafer)."""
    bf16_flops_per_s: float
    fp8_flops_per_s: float
    memory_bytes: float
    memory_bytes_per_s: float
    scale_up_bytes_per_s: float
    """Chip-to-chip link bandwidth per chip (NeuronLink, NVLink, Infinity Fabric, CS-3 I/O)."""
    network_bytes_per_s: float
    """Scale-out network (EFA, NICs, CS-3 I/O) per chip: the KV-transfer endpoint bandwidth."""
    watts: float
    sources: Mapping[str, Source] = field(default_factory=dict, compare=False)

    def flops_per_s(self, dtype: str) -> float:
        """Dense peak for matmuls with weights in ``dtype`` (fp8 uses the fp8 rate)."""
        return self.fp8_flops_per_s if dtype == "fp8" else self.bf16_flops_per_s


NUMERIC_FIELDS = tuple(f.name for f in fields(DeviceSpec)
                       if f.type in ("float", "int") and f.name not in ("units_per_chip",))
"""Device fields an experiment may override (``device.<name>.<field>``)."""

ALIASES = {"hbm_bytes": "memory_bytes", "hbm_bytes_per_s": "memory_bytes_per_s",
           "sram_bytes": "memory_bytes", "sram_bytes_per_s": "memory_bytes_per_s"}
"""Override spellings accepted for the memory fields."""


def _trn2() -> DeviceSpec:
    return DeviceSpec(
        name="trn2", title="AWS Trainium2 (chip; trn2.48xlarge = 16 chips = 64 logical cores)",
        ray_resource="neuron_cores", units_per_chip=4, cores_per_chip=8, scale_up_chips=16,
        memory_kind="HBM", bf16_flops_per_s=667e12, fp8_flops_per_s=1299e12,
        memory_bytes=96 * GiB, memory_bytes_per_s=2.9e12, scale_up_bytes_per_s=1.28e12,
        network_bytes_per_s=3.2e12 / 8 / 16, watts=500.0,
        sources={
            "bf16_flops_per_s": published(TRN2_ARCH), "fp8_flops_per_s": published(TRN2_ARCH),
            "memory_bytes": published(TRN2_ARCH), "memory_bytes_per_s": published(TRN2_INSTANCE),
            "scale_up_bytes_per_s": published(TRN2_ARCH + " (NeuronLink-v3 1.28 TB/s per chip)"),
            "network_bytes_per_s": published(TRN2_EC2 + " (3.2 Tbps EFAv3 per trn2.48xlarge / 16 chips)"),
            "watts": assumed("AWS publishes no Trainium2 chip power; ~500 W placeholder"),
            "cores_per_chip": published(TRN2_ARCH), "scale_up_chips": published(TRN2_INSTANCE + " (16 chips per instance, 2D torus)"),
        })


def _trn3() -> DeviceSpec:
    return DeviceSpec(
        name="trn3", title="AWS Trainium3 (chip; Trn3 UltraServer up to 144 chips)",
        ray_resource="neuron_cores", units_per_chip=4, cores_per_chip=8, scale_up_chips=144,
        memory_kind="HBM", bf16_flops_per_s=671e12, fp8_flops_per_s=2517e12,
        memory_bytes=144 * GiB, memory_bytes_per_s=4.9e12, scale_up_bytes_per_s=2.56e12,
        network_bytes_per_s=3.2e12 / 8 / 16, watts=1000.0,
        sources={
            "bf16_flops_per_s": published(TRN3_ARCH), "fp8_flops_per_s": published(TRN3_ARCH + " (MXFP8)"),
            "memory_bytes": published(TRN3_ARCH), "memory_bytes_per_s": published(TRN3_ARCH),
            "scale_up_bytes_per_s": published(TRN3_ARCH + " (NeuronLink-v4 2.56 TB/s per device)"),
            "network_bytes_per_s": assumed("same EFA share per chip as trn2 (Trn3 per-chip EFA not found)"),
            "watts": assumed("press reports of up to ~1 kW per Trainium3: " + TRN3_NEWS),
            "cores_per_chip": published(TRN3_ARCH), "scale_up_chips": published(TRN3_NEWS + " (144-chip Trn3 UltraServer)"),
        })


def _cs3() -> DeviceSpec:
    return DeviceSpec(
        name="cs3", title="Cerebras CS-3 system (one WSE-3 wafer)",
        ray_resource="cs3", units_per_chip=1, cores_per_chip=900_000, scale_up_chips=1,
        memory_kind="SRAM", bf16_flops_per_s=125e15, fp8_flops_per_s=125e15,
        memory_bytes=44 * GB, memory_bytes_per_s=21e15, scale_up_bytes_per_s=1.2e12 / 8,
        network_bytes_per_s=1.2e12 / 8, watts=23_000.0,
        sources={
            "bf16_flops_per_s": vendor_claim(CS3_CHIP + " (125 PFLOPS 'peak AI', sparse FP16; no dense figure published)"),
            "fp8_flops_per_s": vendor_claim(CS3_CHIP + " (no separate FP8 figure; same 125 PFLOPS)"),
            "memory_bytes": vendor_claim(CS3_CHIP + " (44 GB on-wafer SRAM)"),
            "memory_bytes_per_s": vendor_claim(CS3_CHIP + " (21 PB/s)"),
            "scale_up_bytes_per_s": vendor_claim(CS3_SYSTEM + " (system I/O 1.2 Tb/s = 12x100 GbE; systems pipeline over it)"),
            "network_bytes_per_s": vendor_claim(CS3_SYSTEM + " (system I/O 1.2 Tb/s)"),
            "watts": vendor_claim(CS3_SYSTEM + " (~23 kW per CS-3)"),
            "cores_per_chip": vendor_claim(CS3_CHIP + " (900,000 cores)"),
            "scale_up_chips": assumed("no tensor parallelism across CS-3 systems: a model spans systems as pipeline stages"),
        })


def _gpu(name: str, title: str, url: str, bf16: float, fp8: float, mem: float, bw: float,
         link: float, cores: int, watts: float, scale_up: int = 8) -> DeviceSpec:
    return DeviceSpec(
        name=name, title=title, ray_resource="GPU", units_per_chip=1, cores_per_chip=cores,
        scale_up_chips=scale_up, memory_kind="HBM", bf16_flops_per_s=bf16, fp8_flops_per_s=fp8,
        memory_bytes=mem, memory_bytes_per_s=bw, scale_up_bytes_per_s=link,
        network_bytes_per_s=400e9 / 8, watts=watts,
        sources={
            **{k: published(url + " (dense; NVIDIA sparse datasheet figures halved)") for k in ("bf16_flops_per_s", "fp8_flops_per_s")},
            **{k: published(url) for k in ("memory_bytes", "memory_bytes_per_s", "scale_up_bytes_per_s", "watts",
                                           "cores_per_chip")},
            "scale_up_chips": published(url + " (8-GPU NVLink / Infinity Fabric server)"),
            "network_bytes_per_s": published(P5 + " (3,200 Gbps EFA per 8-GPU instance = 400 Gb/s per GPU)")
            if name in ("h100", "h200") else assumed("one 400 Gb/s NIC per GPU, as in 8-GPU HGX servers"),
        })


@functools.cache
def _catalog() -> Mapping[str, DeviceSpec]:
    """Built once; read-only (frozen specs in a mapping proxy), so sharing it is safe."""
    devices = [
        _trn2(), _trn3(), _cs3(),
        _gpu("h100", "NVIDIA H100 SXM 80GB", H100, 989e12, 1979e12, 80 * GB, 3.35e12, 900e9, 132, 700.0),
        _gpu("h200", "NVIDIA H200 SXM 141GB", H200, 989e12, 1979e12, 141 * GB, 4.8e12, 900e9, 132, 700.0),
        _gpu("b200", "NVIDIA B200 (HGX B200)", B200, 2.25e15, 4.5e15, 180 * GB, 8.0e12, 1.8e12, 148, 1000.0),
        _gpu("mi300x", "AMD Instinct MI300X", MI300X, 1307.4e12, 2614.9e12, 192 * GB, 5.3e12, 896e9, 304, 750.0),
    ]
    return MappingProxyType({d.name: d for d in devices})


def device_names() -> tuple[str, ...]:
    """Names of the catalog's devices, in catalog order."""
    return tuple(_catalog())


def list_devices() -> tuple[DeviceSpec, ...]:
    """Every catalog device (fresh objects: nothing global to mutate)."""
    return tuple(_catalog().values())


def get_device(name: str) -> DeviceSpec:
    """The catalog device called ``name``; a typo gets a UserError listing the known names."""
    return lookup(_catalog(), name, "device")
