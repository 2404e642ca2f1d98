"""A device group: device kind × chip count × (tp, pp) — one serving instance, one Ray actor.

Units (DESIGN §6): ``count`` is chips (Trainium chips, GPUs, CS-3 systems). ``tp × pp`` must
equal ``count × units_per_chip`` — for Trainium, TP ranks are logical NeuronCores (LNC=2), so
one trn2.48xlarge is ``GroupSpec("trn2", 16, tp=64)``; four CS-3 pipelining a 70B model are
``GroupSpec("cs3", 4, tp=1, pp=4)``; two H100 at TP2 are ``GroupSpec("h100", 2, tp=2)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hetero_sched.catalog.devices import DeviceSpec
from hetero_sched.catalog.shipped import get_device
from hetero_sched.errors import UserError

DEVICE_LABEL = "hetero.device"
"""Node label naming the device kind (``ray start --labels``); not under the reserved ``ray.io/``."""


MAX_CHIPS = 1_000_000
"""Sanity bound on a group's chips, tp and pp: a larger number is a typo, not a cluster."""


@dataclass(frozen=True)
class GroupSpec:
    """Which chips a group holds and how the model is split over them."""

    device: str
    count: int
    tp: int
    pp: int = 1
    device_spec: Optional[DeviceSpec] = field(default=None, compare=False, repr=False)
    """The device, when it is not a shipped one (an experiment's own catalog entry);
    :meth:`hetero_sched.catalog.Catalog.group` fills it in."""

    def __post_init__(self) -> None:
        spec = self.spec
        where = f"group {self.device} x{self.count} (tp={self.tp}, pp={self.pp})"
        for name in ("count", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{where}: {name} must be a positive integer, got {value!r}")
            if value > MAX_CHIPS:
                raise UserError(f"{where}: {name} {value} is more than {MAX_CHIPS:,}")
        units = self.count * spec.units_per_chip
        if self.tp * self.pp != units:
            unit = "logical NeuronCores (LNC=2)" if spec.ray_resource == "neuron_cores" else "chips"
            raise UserError(f"{where}: tp*pp = {self.tp * self.pp} but {self.count} {self.device} chips are "
                            f"{units} {unit}; tp*pp must equal {units}")
        if self.count % self.pp:
            raise UserError(f"{where}: pp={self.pp} does not divide the {self.count} chips into equal stages")
        if self.chips_per_stage > spec.scale_up_chips:
            raise UserError(f"{where}: a tensor-parallel stage of {self.chips_per_stage} chips exceeds the "
                            f"{spec.scale_up_chips}-chip scale-up domain of {self.device}; use pp")

    @property
    def spec(self) -> DeviceSpec:
        """The catalog device (no overrides applied)."""
        return self.device_spec if self.device_spec is not None else get_device(self.device)

    @property
    def num_chips(self) -> int:
        """Chips (GPUs, Trainium chips, CS-3 systems) in the group."""
        return self.count

    @property
    def chips_per_stage(self) -> int:
        """Chips one pipeline stage spans (its tensor-parallel domain)."""
        return self.count // self.pp

    def ray_resources(self) -> dict[str, float]:
        """What the group's actor asks Ray for, e.g. ``{"neuron_cores": 64.0}``."""
        spec = self.spec
        return {spec.ray_resource: float(self.count * spec.units_per_chip)}

    def node_labels(self) -> dict[str, str]:
        """Node labels a node must carry to host this group, e.g. ``{"hetero.device": "trn2"}``."""
        return {DEVICE_LABEL: self.device}
