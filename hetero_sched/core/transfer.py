"""KV transfers sharing endpoint bandwidth max-min fairly (DESIGN contract §8).

Each group endpoint has an egress and an ingress bandwidth. A transfer from ``src`` to ``dst``
uses ``src``'s egress and ``dst``'s ingress; concurrent transfers share them max-min fairly
(progressive filling), recomputed whenever a transfer starts or ends. Between those moments
every rate is constant, so the next completion is known in closed form and one event covers it.
A transfer's fixed per-message cost is paid after its bytes land (the KV arrives
``message_cost_s`` later); only unique KV bytes are counted (the caller's job).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence


def uncontended_transfer_s(num_bytes: float, egress_bytes_per_s: float, ingress_bytes_per_s: float,
                           message_s: float) -> float:
    """A transfer's time with the link to itself: its bytes at the pair's bandwidth, plus the
    message's fixed cost (what a policy can predict; the network shares links max-min)."""
    return num_bytes / min(egress_bytes_per_s, ingress_bytes_per_s) + message_s


def max_min_rates(flows: Sequence[tuple[int, int]], egress: Sequence[float],
                  ingress: Sequence[float], counts: Optional[Sequence[int]] = None) -> list[float]:
    """Max-min fair per-flow rates of flow classes ``(src, dst)`` over endpoint capacities.

    ``counts[i]`` flows share class ``i`` (default 1 each); every flow of a class gets the same
    rate. Progressive filling: raise every unfrozen flow's rate together; when a resource
    saturates, freeze the flows through it at the current level.
    """
    n = len(flows)
    weight = list(counts) if counts is not None else [1] * n
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
        level = min(residual[r] / sum(weight[i] for i in u) for r, u in users.items() if u)
        saturated = [r for r, u in users.items()
                     if u and residual[r] / sum(weight[i] for i in u) <= level * (1 + 1e-12)]
        for r in saturated:
            for i in list(users[r]):
                if frozen[i]:
                    continue
                frozen[i] = True
                left -= 1
                rates[i] = level
                src, dst = flows[i]
                for res in (("e", src), ("i", dst)):
                    residual[res] -= level * weight[i]
                    users[res].remove(i)
    return rates


@dataclass(frozen=True)
class LayerwiseStreaming:
    """Send KV layer by layer while the prefill computes it (Splitwise), instead of after it.

    Each layer's KV is one message costing ``layer_message_s`` (None: the sender's
    ``message_cost_s``). See :func:`layerwise_tail` for what overlaps and what is left.
    """

    num_layers: int
    layer_message_s: Optional[float] = None


def layerwise_tail(num_bytes: float, prefill_s: float, num_layers: int, rate_bytes_per_s: float,
                   message_s: float) -> tuple[float, float]:
    """What of a layer-wise KV stream is left when its prefill ends: ``(bytes, extra_delay_s)``.

    Layer ``i`` is ready at ``T·(i+1)/L`` (``T`` the prefill time) and sent as one message of
    ``x = bytes/(L·rate) + c``, one after the other, so the last layer lands at
    ``max(T + x, T/L + L·x)``; sending after the prefill lands at ``T + bytes/rate + c``.
    The stream runs at the pair's uncontended ``rate`` while the prefill lasts (contention
    during the prefill is not modelled); what is left goes through the shared network as
    ``bytes`` and then pays the last message ``c`` plus ``extra_delay_s`` (per-layer message
    costs that the prefill could not hide). Both forms give the closed-form landing time when
    the network is otherwise idle.
    """
    if num_layers <= 1:
        return num_bytes, 0.0
    hidden_s = prefill_s * (num_layers - 1) / num_layers - (num_layers - 1) * message_s
    hidden_bytes = min(max(hidden_s, 0.0) * rate_bytes_per_s, num_bytes * (num_layers - 1) / num_layers)
    return num_bytes - hidden_bytes, max(-hidden_s, 0.0)


class _Pair:
    """All transfers from one endpoint to another: they share one per-flow rate.

    ``served`` counts the bytes each of its flows has received since the pair was created;
    a flow that started when ``served`` was ``s`` with ``b`` bytes ends when it reaches ``s + b``,
    so advancing time touches the pair, not each transfer.
    """

    __slots__ = ("src", "dst", "rate", "served", "ends")

    def __init__(self, src: int, dst: int) -> None:
        self.src = src
        self.dst = dst
        self.rate = 0.0
        self.served = 0.0
        self.ends: list[tuple[float, int, float]] = []   # heap of (served at finish, transfer id, bytes)


class TransferNetwork:
    """The set of transfers in flight and when the next one finishes."""

    def __init__(self, egress_bytes_per_s: Sequence[float], ingress_bytes_per_s: Sequence[float]) -> None:
        self.egress = list(egress_bytes_per_s)
        self.ingress = list(ingress_bytes_per_s)
        self._pairs: dict[tuple[int, int], _Pair] = {}
        self.version = 0
        """Bumped whenever rates change; an event carrying an older version is stale."""
        self._last_s = 0.0
        self._carry: list[int] = []
        """Transfers found finished by :meth:`cancel`'s advance, handed out by the next advance."""

    @property
    def num_active(self) -> int:
        return sum(len(p.ends) for p in self._pairs.values())

    def backlog_bytes(self, endpoint: int) -> float:
        """Bytes still to move into or out of ``endpoint``."""
        return sum(end - p.served for p in self._pairs.values() if endpoint in (p.src, p.dst)
                   for end, _, _ in p.ends)

    def start(self, now_s: float, transfer_id: int, src: int, dst: int, num_bytes: float) -> list[int]:
        """Add a transfer at ``now_s``; returns transfers that finished by then (usually none)."""
        done = self._advance(now_s)
        pair = self._pairs.get((src, dst))
        if pair is None:
            pair = self._pairs[(src, dst)] = _Pair(src, dst)
        heapq.heappush(pair.ends, (pair.served + float(num_bytes), transfer_id, float(num_bytes)))
        self._rerate()
        return done

    def cancel(self, now_s: float, transfer_id: int) -> None:
        """Drop a transfer (an endpoint failed); the others keep their progress and share its rate."""
        # _advance hands out (and resets) the carry plus what finished by now: keep all of it.
        # Not ``self._carry.extend(self._advance(...))``: that extends the list _advance replaced.
        self._carry = self._advance(now_s)
        if transfer_id in self._carry:
            self._carry.remove(transfer_id)
        for p in self._pairs.values():
            for i, entry in enumerate(p.ends):
                if entry[1] == transfer_id:
                    p.ends.pop(i)
                    heapq.heapify(p.ends)
                    break
        self._rerate()

    def finish_due(self, now_s: float) -> list[int]:
        """Advance to ``now_s``; remove and return the transfers whose bytes have all moved."""
        done = self._advance(now_s)
        self._rerate()
        return done

    def next_finish_s(self) -> Optional[float]:
        """When the next in-flight transfer finishes at current rates (None if idle)."""
        best: Optional[float] = self._last_s if self._carry else None
        for p in self._pairs.values():
            if p.ends:
                end = self._last_s + (p.ends[0][0] - p.served) / p.rate
                if best is None or end < best:
                    best = end
        return best

    def _advance(self, now_s: float) -> list[int]:
        dt = now_s - self._last_s
        self._last_s = now_s
        done: list[int] = self._carry
        self._carry = []
        for p in self._pairs.values():
            p.served += p.rate * dt
            ends = p.ends
            while ends:
                end, tid, nbytes = ends[0]
                left = end - p.served
                # Done when the bytes left are rounding error, or would take less than the clock's
                # resolution at this time (else a timer at `now` would fire forever).
                if left <= 1e-9 * nbytes + 1e-6 or now_s + left / p.rate <= now_s:
                    heapq.heappop(ends)
                    done.append(tid)
                else:
                    break
        return done

    def _rerate(self) -> None:
        self.version += 1
        live = [p for p in self._pairs.values() if p.ends]
        if len(live) == 1:   # the common case: one path, nothing to share with another
            p = live[0]
            p.rate = min(self.egress[p.src], self.ingress[p.dst]) / len(p.ends)
        elif live:
            rates = max_min_rates([(p.src, p.dst) for p in live], self.egress, self.ingress,
                                  [len(p.ends) for p in live])
            for p, r in zip(live, rates):
                p.rate = r
