"""KV transfers sharing endpoint bandwidth max-min fairly (DESIGN contract §8).

Each group endpoint has an egress and an ingress bandwidth. A transfer from ``src`` to ``dst``
uses ``src``'s egress and ``dst``'s ingress; concurrent transfers share them max-min fairly
(progressive filling), recomputed whenever a transfer starts or ends. Between those moments
every rate is constant, so the next completion is known in closed form and one event covers it.
A transfer's fixed per-message cost is paid after its bytes land (the KV arrives
``message_cost_s`` later); only unique KV bytes are counted (the caller's job).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(slots=True)
class Transfer:
    """One KV transfer in flight."""

    transfer_id: int
    src: int
    dst: int
    num_bytes: float
    remaining_bytes: float
    rate_bytes_per_s: float = 0.0


def max_min_rates(flows: Sequence[tuple[int, int]], egress: Sequence[float],
                  ingress: Sequence[float]) -> list[float]:
    """Max-min fair rates of flows ``(src, dst)`` over per-endpoint egress/ingress capacities.

    Progressive filling: raise every unfrozen flow's rate together; when a resource saturates,
    freeze the flows through it at the current level.
    """
    n = len(flows)
    rates = [0.0] * n
    residual: dict[tuple[str, int], float] = {}
    users: dict[tuple[str, int], list[int]] = {}
    for i, (src, dst) in enumerate(flows):
        for res, cap in ((("e", src), egress[src]), (("i", dst), ingress[dst])):
            residual[res] = cap
            users.setdefault(res, []).append(i)
    frozen = [False] * n
    left = n
    while left:
        level = min(residual[r] / len(u) for r, u in users.items() if u)
        saturated = [r for r, u in users.items() if u and residual[r] / len(u) <= level * (1 + 1e-12)]
        for r in saturated:
            for i in list(users[r]):
                if frozen[i]:
                    continue
                frozen[i] = True
                left -= 1
                rates[i] = level
                src, dst = flows[i]
                for res in (("e", src), ("i", dst)):
                    residual[res] -= level
                    users[res].remove(i)
    return rates


class TransferNetwork:
    """The set of transfers in flight and when the next one finishes."""

    def __init__(self, egress_bytes_per_s: Sequence[float], ingress_bytes_per_s: Sequence[float]) -> None:
        self.egress = list(egress_bytes_per_s)
        self.ingress = list(ingress_bytes_per_s)
        self.active: dict[int, Transfer] = {}
        self.version = 0
        """Bumped whenever rates change; an event carrying an older version is stale."""
        self._last_s = 0.0

    def backlog_bytes(self, endpoint: int) -> float:
        """Bytes still to move into or out of ``endpoint``."""
        return sum(t.remaining_bytes for t in self.active.values() if endpoint in (t.src, t.dst))

    def start(self, now_s: float, transfer_id: int, src: int, dst: int, num_bytes: float) -> list[int]:
        """Add a transfer at ``now_s``; returns transfers that finished by then (usually none)."""
        done = self._advance(now_s)
        self.active[transfer_id] = Transfer(transfer_id, src, dst, float(num_bytes), float(num_bytes))
        self._rerate()
        return done

    def finish_due(self, now_s: float) -> list[int]:
        """Advance to ``now_s``; remove and return the transfers whose bytes have all moved."""
        done = self._advance(now_s)
        self._rerate()
        return done

    def next_finish_s(self) -> float | None:
        """When the next in-flight transfer finishes at current rates (None if idle)."""
        best = None
        for t in self.active.values():
            end = self._last_s + t.remaining_bytes / t.rate_bytes_per_s
            if best is None or end < best:
                best = end
        return best

    def _advance(self, now_s: float) -> list[int]:
        dt = now_s - self._last_s
        self._last_s = now_s
        done = []
        for t in self.active.values():
            t.remaining_bytes -= t.rate_bytes_per_s * dt
            # Done when the bytes left are rounding error, or would take less than the clock's
            # resolution at this time (else a timer at `now` would fire forever).
            if (t.remaining_bytes <= 1e-9 * t.num_bytes + 1e-6
                    or now_s + t.remaining_bytes / t.rate_bytes_per_s <= now_s):
                done.append(t.transfer_id)
        for tid in done:
            del self.active[tid]
        return done

    def _rerate(self) -> None:
        self.version += 1
        if not self.active:
            return
        if len(self.active) == 1:   # the common case: nothing to share
            t = next(iter(self.active.values()))
            t.rate_bytes_per_s = min(self.egress[t.src], self.ingress[t.dst])
            return
        transfers = list(self.active.values())
        rates = max_min_rates([(t.src, t.dst) for t in transfers], self.egress, self.ingress)
        for t, r in zip(transfers, rates):
            t.rate_bytes_per_s = r
