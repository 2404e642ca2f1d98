"""Accelerators: per-chip peak numbers, memory, links, and the units a group is counted in.

Units (DESIGN §6): a group's ``count`` is in *chips* (a Trainium chip, a GPU, a whole CS-3
system). ``units_per_chip`` is both the Ray resource a chip represents and its number of
tensor-parallel ranks: Trainium exposes logical NeuronCores at the default LNC=2 (a Trainium2
chip has 8 physical NeuronCore-v3 = 4 logical cores, so a trn2.48xlarge is 16 chips = 64
``neuron_cores`` = the "TP64" of AWS's figures); a CS-3 is one unit of the custom resource
``cs3``; a GPU is one ``GPU``. Bandwidths are bytes/s, FLOP/s are dense (no sparsity).

The catalog's devices are data (``hetero_sched/data/catalog/*.yaml``, read by
:mod:`hetero_sched.catalog.shipped`); this module only defines what a device is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Mapping

from hetero_sched.catalog.sources import Source

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
    family: str = ""
    """Hardware family for grouping accuracy figures (``cs3-2024`` is a ``cs3``); empty: the name."""
    host_memory_bytes: float = 0.0
    """Host DRAM per chip (the instance's memory over its chips) a KV tier may use; 0: none known."""
    host_bytes_per_s: float = 0.0
    """Device <-> host copy bandwidth per chip, each direction (PCIe DMA): the DRAM tier's reads and writes."""
    ssd_bytes: float = 0.0
    """Local NVMe per chip (the instance's drives over its chips) a KV tier may use; 0: none known."""
    ssd_read_bytes_per_s: float = 0.0
    ssd_write_bytes_per_s: float = 0.0
    sources: Mapping[str, Source] = field(default_factory=dict, compare=False)

    def flops_per_s(self, dtype: str) -> float:
        """Dense peak for matmuls with weights in ``dtype`` (8- and 4-bit weights use the fp8 rate)."""
        return self.fp8_flops_per_s if dtype in ("fp8", "int8", "fp4") else self.bf16_flops_per_s

    @property
    def kind(self) -> str:
        """The hardware family (the name unless ``family`` says otherwise)."""
        return self.family or self.name


TIER_FIELDS = ("host_memory_bytes", "host_bytes_per_s", "ssd_bytes", "ssd_read_bytes_per_s", "ssd_write_bytes_per_s")
"""KV-tier numbers (below device memory): optional, 0 when the catalog knows none for a device."""

NUMERIC_FIELDS = tuple(f.name for f in fields(DeviceSpec)
                       if f.type in ("float", "int") and f.name not in ("units_per_chip",))
"""Device fields an experiment may override (``device.<name>.<field>``)."""

ALIASES = {"hbm_bytes": "memory_bytes", "hbm_bytes_per_s": "memory_bytes_per_s",
           "sram_bytes": "memory_bytes", "sram_bytes_per_s": "memory_bytes_per_s"}
"""Override spellings accepted for the memory fields."""
