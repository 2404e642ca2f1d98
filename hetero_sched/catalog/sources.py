"""Provenance of a catalog number: every value says where it came from (DESIGN §10).

A result is only as good as the numbers under it, so each number carries a :class:`Source`:
``published`` (a spec sheet or measurement, with its URL), ``vendor-claim`` (a vendor's
marketing figure nobody independently checked), ``calibrated`` (fitted; the reference names
the figure it was fitted on), ``assumed`` (our stated guess, with the reasoning),
``projected`` (a number for hardware not yet shipped, extrapolated from an announcement) or
``override`` (set by the experiment).

A number someone must defend also says how wrong it could be: ``range`` is a plausible
``(low, high)`` with ``range_reason`` saying where it comes from (a cross-validation spread,
or a stated plausible range). ``hetero-sched sensitivity`` varies parameters over their ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Optional, TypeVar

from hetero_sched.errors import UserError

T = TypeVar("T")


class Status(str, Enum):
    """How much to trust a number."""

    PUBLISHED = "published"
    VENDOR_CLAIM = "vendor-claim"
    CALIBRATED = "calibrated"
    ASSUMED = "assumed"
    PROJECTED = "projected"
    OVERRIDE = "override"


@dataclass(frozen=True)
class Source:
    """Status plus a reference: a URL, the fitted-on figure, or the reason for an assumption."""

    status: Status
    ref: str
    range: Optional[tuple[float, float]] = None
    """Plausible ``(low, high)`` of the value (None: not stated)."""
    range_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain form for stamping results."""
        out: dict[str, Any] = {"status": self.status.value, "source": self.ref}
        if self.range is not None:
            out["range"] = list(self.range)
            out["range_reason"] = self.range_reason
        return out


def published(url: str) -> Source:
    """A number from a spec sheet, documentation page or published measurement."""
    return Source(Status.PUBLISHED, url)


def vendor_claim(url: str) -> Source:
    """A vendor's own headline number (not independently verified)."""
    return Source(Status.VENDOR_CLAIM, url)


def assumed(reason: str) -> Source:
    """Our stated assumption; the reason says why this value."""
    return Source(Status.ASSUMED, reason)


def projected(reason: str) -> Source:
    """A number for announced, not yet shipped hardware (what it is extrapolated from)."""
    return Source(Status.PROJECTED, reason)


def calibrated(figure: str) -> Source:
    """A value fitted on the named published figure(s)."""
    return Source(Status.CALIBRATED, figure)


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """``table[name]``, or a UserError naming the unknown ``what`` and listing the known ones."""
    if name not in table:
        raise UserError(f"unknown {what} {name!r}; known {what}s: {', '.join(table)}")
    return table[name]
