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
    saturates, freeze the flows through it at the current level. The resources wait in a heap
    keyed by the level at which they would saturate, so this is O((flows + resources) log
    resources), not a scan of every resource per level.
    """
    n = len(flows)
    weight = list(counts) if counts is not None else [1] * n
    index: dict[int, int] = {}            # egress of e: 2e, ingress of i: 2i + 1 -> resource number
    residual: list[float] = []
    unfrozen: list[int] = []              # weight of the unfrozen flows through each resource
    users: list[list[int]] = []
    sides: list[tuple[int, int]] = []
    for i in range(n):
        src, dst = flows[i]
        pair = []
        for key, cap in ((2 * src, egress[src]), (2 * dst + 1, ingress[dst])):
            r = index.get(key, -1)
            if r < 0:
                r = index[key] = len(residual)
                residual.append(float(cap))
                unfrozen.append(0)
                users.append([])
            unfrozen[r] += weight[i]
            users[r].append(i)
            pair.append(r)
        sides.append((pair[0], pair[1]))
    heap = [(residual[r] / unfrozen[r], r, unfrozen[r]) for r in range(len(residual))]
    heapq.heapify(heap)
    rates = [0.0] * n
    frozen = [False] * n
    while heap:
        level, r, w = heapq.heappop(heap)
        if w != unfrozen[r]:              # stale: flows through it froze since
            continue
        for i in users[r]:
            if frozen[i]:
                continue
            frozen[i] = True
            rates[i] = level
            a, b = sides[i]
            other = b if a == r else a
            residual[other] -= level * weight[i]
            unfrozen[other] -= weight[i]
            if unfrozen[other] > 0:
                heapq.heappush(heap, (max(residual[other], 0.0) / unfrozen[other], other, unfrozen[other]))
        unfrozen[r] = 0
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

    ``served`` counts the bytes each of its flows had received by ``since_s`` (since the pair
    became active); a flow that started when ``served`` was ``s`` with ``b`` bytes ends when it
    reaches ``s + b``. The rate is constant between rate changes, so ``served`` is settled only
    when the rate changes, and advancing time touches nothing.
    """

    __slots__ = ("src", "dst", "rate", "served", "since_s", "ends", "version")

    def __init__(self, src: int, dst: int, now_s: float) -> None:
        self.src = src
        self.dst = dst
        self.rate = 0.0
        self.served = 0.0
        self.since_s = now_s
        self.ends: list[tuple[float, int, float]] = []   # heap of (served at finish, transfer id, bytes)
        self.version = 0
        """Bumped at every rate change: the due-heap entries of older versions are stale."""

    def settle(self, now_s: float) -> None:
        """Count the bytes served up to ``now_s`` at the current rate."""
        if now_s != self.since_s:
            self.served += self.rate * (now_s - self.since_s)
            self.since_s = now_s

    def next_end_s(self) -> float:
        """When the first of its flows finishes at the current rate."""
        return self.since_s + (self.ends[0][0] - self.served) / self.rate


class TransferNetwork:
    """The set of transfers in flight and when the next one finishes.

    Only what changed is touched: a start or finish re-rates the pairs connected to it through
    shared endpoints (max-min fairness decomposes over those components), and a heap of each
    active pair's next finish answers "what is due" in O(log n) — no pass over all transfers,
    pairs or groups per event.
    """

    def __init__(self, egress_bytes_per_s: Sequence[float], ingress_bytes_per_s: Sequence[float]) -> None:
        self.egress = list(egress_bytes_per_s)
        self.ingress = list(ingress_bytes_per_s)
        self._pairs: dict[tuple[int, int], _Pair] = {}
        """Active pairs (with flows in flight); an idle pair is dropped and starts afresh."""
        self._out: dict[int, dict[tuple[int, int], _Pair]] = {}   # active pairs by source endpoint
        self._in: dict[int, dict[tuple[int, int], _Pair]] = {}    # active pairs by destination
        self._due: list[tuple[float, int, _Pair, int]] = []      # heap of (next end, seq, pair, its version)
        self._seq = 0
        self._flows = 0
        self.version = 0
        """Bumped whenever rates change; an event carrying an older version is stale."""
        self._last_s = 0.0
        self._carry: list[int] = []
        """Transfers found finished by :meth:`cancel`, handed out by the next start or finish."""

    @property
    def num_active(self) -> int:
        return self._flows

    def backlog_bytes(self, endpoint: int) -> float:
        """Bytes still to move into or out of ``endpoint`` (as of the last change)."""
        total = 0.0
        for side in (self._out.get(endpoint), self._in.get(endpoint)):
            if side is not None:
                for p in side.values():
                    served = p.served + p.rate * (self._last_s - p.since_s)
                    total += sum(end - served for end, _, _ in p.ends)
        return total

    def start(self, now_s: float, transfer_id: int, src: int, dst: int, num_bytes: float) -> list[int]:
        """Add a transfer at ``now_s``; returns transfers that finished by then (usually none)."""
        touched: list[_Pair] = []
        done = self._finish_by(now_s, touched)
        pair = self._pairs.get((src, dst))
        if pair is None:
            pair = self._pairs[(src, dst)] = _Pair(src, dst, now_s)
            self._out.setdefault(src, {})[(src, dst)] = pair
            self._in.setdefault(dst, {})[(src, dst)] = pair
        else:
            pair.settle(now_s)
        heapq.heappush(pair.ends, (pair.served + float(num_bytes), transfer_id, float(num_bytes)))
        self._flows += 1
        touched.append(pair)
        self._rerate(now_s, touched)
        return done

    def cancel(self, now_s: float, transfer_id: int) -> None:
        """Drop a transfer (an endpoint failed); the others keep their progress and share its rate."""
        touched: list[_Pair] = []
        carry = self._carry
        self._carry = []
        carry.extend(self._finish_by(now_s, touched))     # finished by now: handed out later, not lost
        if transfer_id in carry:
            carry.remove(transfer_id)
        for p in list(self._pairs.values()):               # a failure path: a scan is fine here
            for i, entry in enumerate(p.ends):
                if entry[1] == transfer_id:
                    p.settle(now_s)
                    p.ends.pop(i)
                    heapq.heapify(p.ends)
                    self._flows -= 1
                    touched.append(p)
                    break
        self._carry = carry
        self._rerate(now_s, touched)

    def finish_due(self, now_s: float) -> list[int]:
        """Advance to ``now_s``; remove and return the transfers whose bytes have all moved."""
        touched: list[_Pair] = []
        done = self._finish_by(now_s, touched)
        self._rerate(now_s, touched)
        return done

    def next_finish_s(self) -> Optional[float]:
        """When the next in-flight transfer finishes at current rates (None if idle)."""
        if self._carry:
            return self._last_s
        due = self._due
        while due:
            _, _, p, version = due[0]
            if version == p.version and p.ends:
                return due[0][0]
            heapq.heappop(due)
        return None

    def _finish_by(self, now_s: float, touched: list[_Pair]) -> list[int]:
        """Pop the flows that finished by ``now_s`` (with what :meth:`cancel` carried); the pairs
        they left go to ``touched`` (their rates must be recomputed)."""
        self._last_s = now_s
        done: list[int] = self._carry
        self._carry = []
        due = self._due
        while due and due[0][0] <= now_s:
            _, _, p, version = heapq.heappop(due)
            if version != p.version or not p.ends:
                continue
            p.settle(now_s)
            ends = p.ends
            finished = False
            while ends:
                end, tid, nbytes = ends[0]
                left = end - p.served
                # Done when the bytes left are rounding error, or would take less than the clock's
                # resolution at this time (else a timer at `now` would fire forever).
                if left <= 1e-9 * nbytes + 1e-6 or now_s + left / p.rate <= now_s:
                    heapq.heappop(ends)
                    done.append(tid)
                    self._flows -= 1
                    finished = True
                else:
                    break
            if finished:
                touched.append(p)
            else:                   # not quite there (rounding): due again at its recomputed end
                p.version += 1
                self._push(p)
        if len(done) > 1:
            done.sort()             # same-time finishes land in the order they started
        return done

    def _push(self, p: _Pair) -> None:
        self._seq += 1
        heapq.heappush(self._due, (p.next_end_s(), self._seq, p, p.version))

    def _rerate(self, now_s: float, touched: list[_Pair]) -> None:
        """Recompute max-min rates over the components of the pairs in ``touched``."""
        self.version += 1
        if not touched:
            return
        seen: set[tuple[int, int]] = set()
        srcs: list[int] = []
        dsts: list[int] = []
        for p in touched:
            if not p.ends:                  # idle now: drop it; its neighbours are re-rated
                self._drop(p)
            srcs.append(p.src)
            dsts.append(p.dst)
        component: list[_Pair] = []
        while srcs or dsts:                 # the pairs connected to the touched endpoints
            side = self._out.get(srcs.pop()) if srcs else self._in.get(dsts.pop())
            if side is None:
                continue
            for key, q in side.items():
                if key not in seen:
                    seen.add(key)
                    component.append(q)
                    srcs.append(q.src)
                    dsts.append(q.dst)
        if not component:
            return
        component.sort(key=_pair_key)       # a deterministic order for the max-min computation
        for q in component:
            q.settle(now_s)
        if len(component) == 1:             # the common case: one path, nothing to share with another
            q = component[0]
            q.rate = min(self.egress[q.src], self.ingress[q.dst]) / len(q.ends)
        else:
            rates = max_min_rates([(q.src, q.dst) for q in component], self.egress, self.ingress,
                                  [len(q.ends) for q in component])
            for q, r in zip(component, rates):
                q.rate = r
        for q in component:
            q.version += 1
            self._push(q)
        if len(self._due) > 4 * len(self._pairs) + 64:   # stale entries: rebuild the heap
            self._due = [e for e in self._due if e[3] == e[2].version and e[2].ends]
            heapq.heapify(self._due)

    def _drop(self, p: _Pair) -> None:
        key = (p.src, p.dst)
        if self._pairs.get(key) is p:
            del self._pairs[key]
            out = self._out[p.src]
            del out[key]
            if not out:
                del self._out[p.src]
            inn = self._in[p.dst]
            del inn[key]
            if not inn:
                del self._in[p.dst]
        p.version += 1


def _pair_key(p: _Pair) -> tuple[int, int]:
    return (p.src, p.dst)
