"""An experiment's KV cache hierarchy (``kv_cache:``): tiers below device memory and a cluster store.

::

    kv_cache:
      hbm: {policy: lru}                          # the prefix cache in device memory (size: prefix_cache_fraction)
      dram: {policy: lru, capacity_fraction: 0.5} # host DRAM: a share of the device's host memory
      ssd: {policy: lfu, capacity_fraction: 0.9}  # local NVMe
      store: {node: x2iedn, nodes: 4, policy: lru, capacity_fraction: 0.9}   # cluster KV store

Every prefill-capable group gets the tiers listed, sized and timed from its device's catalog
numbers (``host_memory_bytes``, ``host_bytes_per_s``, ``ssd_bytes``, ``ssd_read_bytes_per_s``,
``ssd_write_bytes_per_s`` per chip × the group's chips; ``cost.<device>.host_message_s`` /
``ssd_message_s``); the store from a catalog memory node × ``nodes``. Without ``kv_cache`` the
group keeps its plain device-memory prefix cache and nothing here runs.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field

from hetero_sched.catalog import CatalogData, resolve_catalog
from hetero_sched.catalog.costparams import CostParams
from hetero_sched.catalog.devices import DeviceSpec
from hetero_sched.core.group import GroupState
from hetero_sched.core.kvstore import ClusterKVStore
from hetero_sched.core.kvtiers import DRAM, SSD, KVTiers, TierSpec
from hetero_sched.errors import UserError

Policy = Literal["lru", "lfu"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class HBMTierConfig(_Strict):
    """The device-memory prefix cache as the first tier (its size stays ``prefix_cache_fraction``)."""

    policy: Policy = "lru"


class TierConfig(_Strict):
    """Local NVMe as a tier below device memory on every prefill-capable group."""

    policy: Policy = "lru"
    capacity_fraction: float = Field(0.9, gt=0, le=1, description="share of the device's local NVMe given to KV")


class DRAMTierConfig(TierConfig):
    """Host DRAM as a tier below device memory on every prefill-capable group."""

    capacity_fraction: float = Field(0.5, gt=0, le=1, description="share of the device's host memory given to KV "
                                     "(the rest: the OS, the runtime, staging buffers — an assumption)")


class StoreConfig(_Strict):
    """The cluster KV store: memory nodes any prefill group reads prefixes from."""

    node: str = Field("x2iedn", description="a memory node of the catalog (`memory_nodes:`)")
    nodes: int = Field(4, ge=1, le=10_000)
    policy: Policy = "lru"
    capacity_fraction: float = Field(0.9, gt=0, le=1, description="share of the nodes' memory holding KV")


class KVCacheConfig(_Strict):
    """Which tiers exist below device memory, and their eviction policies."""

    hbm: HBMTierConfig = Field(default_factory=lambda: HBMTierConfig())
    dram: Optional[DRAMTierConfig] = None
    ssd: Optional[TierConfig] = None
    store: Optional[StoreConfig] = None


def _tier(kind: int, cfg: TierConfig, dev: DeviceSpec, cost: CostParams, chips: int, where: str) -> TierSpec:
    if kind == DRAM:
        capacity, read, write, msg = dev.host_memory_bytes, dev.host_bytes_per_s, dev.host_bytes_per_s, cost.host_message_s
        fields = "host_memory_bytes, host_bytes_per_s"
    else:
        capacity, read, write, msg = dev.ssd_bytes, dev.ssd_read_bytes_per_s, dev.ssd_write_bytes_per_s, cost.ssd_message_s
        fields = "ssd_bytes, ssd_read_bytes_per_s, ssd_write_bytes_per_s"
    if not (capacity > 0 and read > 0 and write > 0):
        name = "dram" if kind == DRAM else "ssd"
        raise UserError(f"{where}: kv_cache.{name}: device {dev.name} has no {name} tier in the catalog "
                        f"(give device.{dev.name}.{{{fields}}} in overrides or a catalog entry)")
    return TierSpec(kind, capacity * chips * cfg.capacity_fraction, read * chips, write * chips, msg, cfg.policy)


def attach_kv_tiers(cfg: Optional[KVCacheConfig], group: GroupState, dev: DeviceSpec, cost: CostParams, chips: int,
                    layers: int, where: str) -> None:
    """Give a prefill-capable ``group`` the configured tiers (no-op without ``kv_cache`` or for a
    decode-only group). ``layers`` > 1: reads overlap the prefill layer by layer."""
    if cfg is None or not group.role.can_prefill:
        return
    lower = [_tier(kind, tier, dev, cost, chips, where)
             for kind, tier in ((DRAM, cfg.dram), (SSD, cfg.ssd)) if tier is not None]
    gcost = group.cost
    group.memory.tiers = KVTiers(group.memory.prefix_cache_tokens, cfg.hbm.policy, lower,
                                 gcost.transfer_bytes_per_token, layers,
                                 lambda new, cached: gcost.prefill_time_s([new], [cached]))


def build_kv_store(cfg: Optional[KVCacheConfig], overrides: Mapping[str, Any], extra: CatalogData,
                   groups: list[GroupState]) -> Optional[ClusterKVStore]:
    """The cluster KV store the experiment configures (None: none), from the catalog with the
    experiment's overrides and entries."""
    if cfg is None or cfg.store is None:
        return None
    sc = cfg.store
    try:
        node = resolve_catalog(overrides, extra).memory_node(sc.node)
    except UserError as exc:
        raise UserError(f"kv_cache.store.node: {exc}") from None
    prefill = [g for g in groups if g.memory.tiers is not None]
    if not prefill:
        raise UserError("kv_cache.store: no prefill-capable group to read from it")
    return ClusterKVStore(node.memory_bytes * sc.nodes * sc.capacity_fraction, node.network_bytes_per_s * sc.nodes,
                          node.message_cost_s, sc.policy, prefill[0].cost.transfer_bytes_per_token, sc.nodes, node.name,
                          node.dollars_per_hour * sc.nodes)
