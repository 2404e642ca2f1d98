"""The shipped catalog: the devices, cost parameters and models of ``hetero_sched/data/catalog``.

Read once (files in name order, so an entry may be ``like:`` one in an earlier file) and kept
read-only (frozen specs in mapping proxies), so sharing it is safe. An experiment adds entries of
its own through :func:`hetero_sched.catalog.resolve_catalog`'s ``extra``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Mapping

import yaml

from hetero_sched.catalog.costparams import CostParams
from hetero_sched.catalog.datafile import resolve_entries
from hetero_sched.catalog.devices import DeviceSpec
from hetero_sched.catalog.memorynodes import MemoryNodeSpec
from hetero_sched.catalog.models import ModelSpec
from hetero_sched.catalog.sources import lookup
from hetero_sched.errors import UserError




@dataclass(frozen=True)
class Shipped:
    """The shipped entries by name."""

    devices: Mapping[str, DeviceSpec]
    costs: Mapping[str, CostParams]
    models: Mapping[str, ModelSpec]
    memory_nodes: Mapping[str, MemoryNodeSpec]


@functools.cache
def shipped() -> Shipped:
    """Parse the shipped data files (once)."""
    folder = resources.files("hetero_sched").joinpath("data", "catalog")
    items = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")) and not entry.name.startswith("figures"):
            items.append((yaml.safe_load(entry.read_text()), f"hetero_sched/data/catalog/{entry.name}"))
    data = resolve_entries(items, {}, {})
    if not data.devices or not data.models:
        raise UserError("the shipped catalog (hetero_sched/data/catalog) has no devices or no models")
    return Shipped(MappingProxyType({d.name: d for d in data.devices}),
                   MappingProxyType({c.device: c for c in data.costs}),
                   MappingProxyType({m.name: m for m in data.models}),
                   MappingProxyType({n.name: n for n in data.memory_nodes}))


def device_names() -> tuple[str, ...]:
    """Names of the shipped devices, in catalog order."""
    return tuple(shipped().devices)


def list_devices() -> tuple[DeviceSpec, ...]:
    """Every shipped device."""
    return tuple(shipped().devices.values())


def get_device(name: str) -> DeviceSpec:
    """The shipped device called ``name``; a typo gets a UserError listing the known names."""
    return lookup(shipped().devices, name, "device")


def model_names() -> tuple[str, ...]:
    """Names of the shipped models."""
    return tuple(shipped().models)


def list_models() -> tuple[ModelSpec, ...]:
    """Every shipped model."""
    return tuple(shipped().models.values())


def get_model(name: str) -> ModelSpec:
    """The shipped model called ``name``; a typo gets a UserError listing the known names."""
    return lookup(shipped().models, name, "model")


def list_memory_nodes() -> tuple[MemoryNodeSpec, ...]:
    """Every shipped memory node (what a cluster KV store may be built from)."""
    return tuple(shipped().memory_nodes.values())


def list_cost_params() -> tuple[CostParams, ...]:
    """Cost parameters of every shipped device."""
    return tuple(shipped().costs.values())


def get_cost_params(device: str) -> CostParams:
    """Cost parameters of ``device``; UserError listing the known devices on a typo."""
    return lookup(shipped().costs, device, "cost-parameter device")
