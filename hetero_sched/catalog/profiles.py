"""Device profiles written by ``hetero-sched calibrate`` and read by ``build_group_cost``.

A profile is JSON. ``kind: roofline`` carries fitted cost parameters of a device kind
(model-independent physics: efficiencies, latencies); ``kind: fitted`` carries per-(model,
device, tp, pp) coefficients of a :class:`~hetero_sched.costmodel.FittedCost`. Both record the
points they were fitted on and the fit and leave-one-out errors, so a result stamped with a
profile says how good its cost model was.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hetero_sched.errors import UserError

FORMAT = "hetero-sched-profile/1"
KINDS = ("roofline", "fitted")


@dataclass(frozen=True)
class Profile:
    """A calibration result for one device kind (roofline) or one group shape (fitted)."""

    kind: str
    device: str
    """The name the user gave the calibrated device (may be new, e.g. ``my-gpu``)."""
    base_device: str
    """The catalog device whose spec-sheet numbers the fit started from."""
    model: str
    tp: int
    pp: int
    count: int
    params: Mapping[str, Any]
    """roofline: ``{cost field: value}``; fitted: ``{prefill: [a, b, c], decode_pieces: [[max_batch, a, b, c], ...]}``."""
    fit: Mapping[str, Any] = field(default_factory=dict)
    """Fit report: points, per-point and leave-one-out relative errors."""
    source: str = ""
    forced: tuple[str, ...] = ()
    """Why the fit was refused, when ``calibrate --force`` wrote it anyway (stamped on results)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"format": FORMAT, **asdict(self)}


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write ``profile`` as JSON (a path that cannot be written is a UserError)."""
    try:
        Path(path).write_text(json.dumps(profile.to_dict(), indent=2, default=float) + "\n")
    except OSError as exc:
        raise UserError(f"{path}: cannot write the profile ({exc.strerror or exc})") from None


def load_profile(path: str | Path) -> Profile:
    """Read a profile; a missing or malformed file is a UserError naming it."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"profile {p}: file not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"profile {p}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"profile {p}: not a {FORMAT} file")
    if raw.get("kind") not in KINDS:
        raise UserError(f"profile {p}: kind must be one of {', '.join(KINDS)}, got {raw.get('kind')!r}")
    try:
        return Profile(kind=raw["kind"], device=str(raw["device"]), base_device=str(raw["base_device"]),
                       model=str(raw["model"]), tp=int(raw["tp"]), pp=int(raw["pp"]), count=int(raw["count"]),
                       params=dict(raw["params"]), fit=dict(raw.get("fit", {})), source=str(raw.get("source", "")),
                       forced=tuple(str(x) for x in raw.get("forced", ())))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"profile {p}: missing or bad field {exc}") from None
