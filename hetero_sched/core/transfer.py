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

from mypy_extensions import mypyc_attr

from hetero_sched.core.events import Event, EventQueue, Kind


def uncontended_transfer_s(num_bytes: float, egress_bytes_per_s: float, ingress_bytes_per_s: float,
                           message_s: float) -> float:
    """A transfer's time with the link to itself: its bytes at the pair's bandwidth, plus the
    message's fixed cost (what a policy can predict; the network shares links max-min)."""
    return num_bytes / min(egress_bytes_per_s, ingress_bytes_per_s) + message_s


def max_min_rates(flows: Sequence[tuple[int, int]], egress: Sequence[float],
                  ingress: Sequence[float], counts: Optional[Sequence[int]] = None) -> list[float]:
    """Max-min fair per-flow rates of flow classes ``(src, dst)`` over endpoint capacities.

    ``counts[i]`` flows share class ``i`` (default 1 each); every flow of a class gets the same
    rate. See :func:`progressive_fill`.
    """
    index: dict[int, int] = {}            # egress of e: 2e, ingress of i: 2i + 1 -> resource number
    capacity: list[float] = []
    out_res: list[int] = []
    in_res: list[int] = []
    for src, dst in flows:
        for key, cap, side in ((2 * src, egress[src], out_res), (2 * dst + 1, ingress[dst], in_res)):
            r = index.get(key, -1)
            if r < 0:
                r = index[key] = len(capacity)
                capacity.append(float(cap))
            side.append(r)
    return progressive_fill(out_res, in_res, list(counts) if counts is not None else [1] * len(flows), capacity)


def _freeze(r: int, level: float, users: list[list[int]], froze: list[int], rates: list[float], out_res: list[int],
            in_res: list[int], weight: list[int], residual: list[float], unfrozen: list[int],
            heap: Optional[list[tuple[float, int, int]]]) -> None:
    """Resource ``r`` saturates at ``level``: freeze its unfrozen flows there."""
    for i in users[r]:
        if froze[i] >= 0:
            continue
        froze[i] = r
        rates[i] = level
        other = in_res[i] if out_res[i] == r else out_res[i]
        residual[other] -= level * weight[i]
        unfrozen[other] -= weight[i]
        if heap is not None and unfrozen[other] > 0:
            left = residual[other] if residual[other] > 0.0 else 0.0
            heapq.heappush(heap, (left / unfrozen[other], other, unfrozen[other]))
    unfrozen[r] = 0


def progressive_fill(out_res: list[int], in_res: list[int], weight: list[int], capacity: list[float]) -> list[float]:
    """Max-min fair rates of flows ``i`` through resources ``out_res[i]`` and ``in_res[i]``
    (numbers into ``capacity``), ``weight[i]`` flows each (see :func:`progressive_fill_bottlenecks`)."""
    return progressive_fill_bottlenecks(out_res, in_res, weight, capacity)[0]


def progressive_fill_bottlenecks(out_res: list[int], in_res: list[int], weight: list[int],
                                 capacity: list[float]) -> tuple[list[float], list[int]]:
    """Max-min fair rates of flows ``i`` through resources ``out_res[i]`` and ``in_res[i]``
    (numbers into ``capacity``), ``weight[i]`` flows each.

    Progressive filling: raise every unfrozen flow's rate together; when a resource saturates,
    freeze the flows through it at the current level. The next resource to saturate is found by
    a scan when there are few (as in a re-rating around one change), else from a heap keyed by
    the level at which each would saturate: O((flows + resources) log resources). Ties go to the
    lower resource number. Returns the rates and the resource each flow froze at (its bottleneck).
    """
    n = len(out_res)
    num_res = len(capacity)
    residual = list(capacity)
    unfrozen = [0] * num_res              # weight of the unfrozen flows through each resource
    users: list[list[int]] = [[] for _ in range(num_res)]
    for i in range(n):
        unfrozen[out_res[i]] += weight[i]
        users[out_res[i]].append(i)
        unfrozen[in_res[i]] += weight[i]
        users[in_res[i]].append(i)
    rates = [0.0] * n
    froze = [-1] * n                      # the resource each flow froze at: its bottleneck
    if num_res <= 32:                     # few resources: find the next to saturate by a scan
        while True:
            r = -1
            level = 0.0
            for k in range(num_res):
                if unfrozen[k] > 0:
                    lk = (residual[k] if residual[k] > 0.0 else 0.0) / unfrozen[k]
                    if r < 0 or lk < level:
                        r, level = k, lk
            if r < 0:
                return rates, froze
            _freeze(r, level, users, froze, rates, out_res, in_res, weight, residual, unfrozen, None)
    heap = [(residual[r] / unfrozen[r], r, unfrozen[r]) for r in range(num_res)]
    heapq.heapify(heap)
    while heap:
        level, r, w = heapq.heappop(heap)
        if w != unfrozen[r]:              # stale: flows through it froze since
            continue
        _freeze(r, level, users, froze, rates, out_res, in_res, weight, residual, unfrozen, heap)
    return rates, froze


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


@mypyc_attr(acyclic=True)
class _Flow:
    """One transfer of a pair: it ends when the pair's ``served`` count reaches ``end``."""

    __slots__ = ("end", "transfer_id", "num_bytes")

    def __init__(self, end: float, transfer_id: int, num_bytes: float) -> None:
        self.end = end
        self.transfer_id = transfer_id
        self.num_bytes = num_bytes


def _before(a: _Flow, b: _Flow) -> bool:
    """Heap order of a pair's flows: by end, then transfer id (ids are unique: a total order)."""
    return a.end < b.end or (a.end == b.end and a.transfer_id < b.transfer_id)


# A pair's flows are a binary heap of compiled objects, compared by reading two fields: a heap
# of tuples through ``heapq`` cost a module lookup, a call and rich comparisons per operation.
def _push_flow(heap: list[_Flow], f: _Flow) -> None:
    heap.append(f)
    i = len(heap) - 1
    while i > 0:
        parent = (i - 1) >> 1
        p = heap[parent]
        if not _before(f, p):
            break
        heap[i] = p
        i = parent
    heap[i] = f


def _pop_flow(heap: list[_Flow]) -> _Flow:
    """Remove and return the first flow to end."""
    top = heap[0]
    last = heap.pop()
    n = len(heap)
    if n:
        i = 0
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and _before(heap[c + 1], heap[c]):
                c += 1
            child = heap[c]
            if not _before(child, last):
                break
            heap[i] = child
            i = c
        heap[i] = last
    return top


class _Pair:
    """All transfers from one endpoint to another: they share one per-flow rate.

    ``served`` counts the bytes each of its flows had received by ``since_s`` (since the pair
    last became active); a flow that started when ``served`` was ``s`` with ``b`` bytes ends when
    it reaches ``s + b``. The rate is constant between rate changes, so ``served`` is settled
    only when the rate changes, and advancing time touches nothing.
    """

    __slots__ = ("src", "dst", "key", "rate", "served", "since_s", "ends", "due", "out_pos", "in_pos", "mark",
                 "changed", "bottleneck_out", "next_rate", "next_out")

    def __init__(self) -> None:
        self.src = -1
        self.dst = -1
        self.key = -1
        self.rate = 0.0
        self.served = 0.0
        self.since_s = 0.0
        self.ends: list[_Flow] = []         # heap of its flows (see _push_flow)
        self.due: Optional[Event] = None
        """Its next finish in the network's due queue (None: not queued)."""
        self.out_pos = -1
        """Where it sits in its source's list of active pairs (-1: idle)."""
        self.in_pos = -1
        self.mark = 0
        self.changed = 0
        self.bottleneck_out = True
        """Whether its rate is set by its source's egress (else its destination's ingress)."""
        self.next_rate = 0.0                # scratch of a re-rating
        self.next_out = True

    def restart(self, src: int, dst: int, key: int, now_s: float) -> None:
        """Carry the flows from ``src`` to ``dst`` from ``now_s`` on (a new pair, or an idle one
        reused: a pair per transfer made and freed was a tenth of the network's cost)."""
        self.src = src
        self.dst = dst
        self.key = key
        self.rate = 0.0
        self.served = 0.0
        self.since_s = now_s
        self.bottleneck_out = True
        self.next_rate = 0.0
        self.next_out = True

    def settle(self, now_s: float) -> None:
        """Count the bytes served up to ``now_s`` at the current rate."""
        if now_s != self.since_s:
            self.served += self.rate * (now_s - self.since_s)
            self.since_s = now_s

    def next_end_s(self) -> float:
        """When the first of its flows finishes at the current rate."""
        return self.since_s + (self.ends[0].end - self.served) / self.rate


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
        n = len(self.egress)
        # Only active pairs are kept, found by their endpoints (see _find): with a thousand groups
        # most pairs carry one transfer, and a table of every pair ever used would outgrow the
        # caches. An idle pair leaves its endpoints' lists for the spares, to carry a later one.
        self._out: list[list[_Pair]] = [[] for _ in range(n)]   # active pairs by source endpoint
        self._in: list[list[_Pair]] = [[] for _ in range(n)]    # active pairs by destination
        self._spare_pairs: list[_Pair] = []
        self._out_mark = [0] * n            # scratch numbering of a component's resources
        self._out_res = [0] * n
        self._in_mark = [0] * n
        self._in_res = [0] * n
        self._out_x = [0] * n               # endpoints being re-rated (see _rerate)
        self._in_x = [0] * n
        self._due = EventQueue()
        """Each active pair's next finish, the pair as payload: a pair re-rated is moved, not
        queued again, so the queue holds one entry per active pair and none stale."""
        self._mark = 0
        self._flows = 0
        self.version = 0
        """Bumped whenever rates change; an event carrying an older version is stale."""
        self._last_s = 0.0
        self._carry: list[int] = []
        """Transfers found finished by :meth:`cancel`, handed out by the next start or finish."""
        self._pending: list[_Pair] = []
        """Pairs whose flows changed at ``_pending_s``, not yet re-rated: the starts and finishes of
        one instant (a prefill batch's transfers) are re-rated once, when the rates are next needed."""
        self._pending_s = 0.0

    @property
    def num_active(self) -> int:
        return self._flows

    def rates(self) -> dict[tuple[int, int], float]:
        """The per-flow rate of every active pair ``(src, dst)`` (for tests and metrics)."""
        self._flush()
        return {(p.src, p.dst): p.rate for side in self._out for p in side}

    def counts(self) -> dict[tuple[int, int], int]:
        """How many transfers each active pair ``(src, dst)`` carries."""
        return {(p.src, p.dst): len(p.ends) for side in self._out for p in side}

    def backlog_bytes(self, endpoint: int) -> float:
        """Bytes still to move into or out of ``endpoint`` (as of the last change)."""
        self._flush()
        total = 0.0
        for side in (self._out[endpoint], self._in[endpoint]):
            for p in side:
                served = p.served + p.rate * (self._last_s - p.since_s)
                total += sum(f.end - served for f in p.ends)
        return total

    def start(self, now_s: float, transfer_id: int, src: int, dst: int, num_bytes: float) -> list[int]:
        """Add a transfer at ``now_s``; returns transfers that finished by then (usually none)."""
        if self._pending and self._pending_s != now_s:
            self._flush()
        touched = self._pending
        self._pending_s = now_s
        done = self._finish_by(now_s, touched)
        pair = self._find(src, dst)
        if pair is None:                    # (re)activated: its count starts afresh
            pair = self._spare_pairs.pop() if self._spare_pairs else _Pair()
            pair.restart(src, dst, src * len(self.egress) + dst, now_s)
            pair.out_pos = len(self._out[src])
            self._out[src].append(pair)
            pair.in_pos = len(self._in[dst])
            self._in[dst].append(pair)
        else:
            pair.settle(now_s)
        _push_flow(pair.ends, _Flow(pair.served + float(num_bytes), transfer_id, float(num_bytes)))
        self._flows += 1
        touched.append(pair)
        self.version += 1
        return done

    def _find(self, src: int, dst: int) -> Optional[_Pair]:
        """The active pair from ``src`` to ``dst``, if any, from the shorter of their lists (the
        pairs a re-rating at these endpoints walks anyway)."""
        out = self._out[src]
        into = self._in[dst]
        if len(out) <= len(into):
            for p in out:
                if p.dst == dst:
                    return p
        else:
            for p in into:
                if p.src == src:
                    return p
        return None

    def cancel(self, now_s: float, transfer_id: int) -> None:
        """Drop a transfer (an endpoint failed); the others keep their progress and share its rate."""
        self._flush()
        touched: list[_Pair] = []
        carry = self._carry
        self._carry = []
        carry.extend(self._finish_by(now_s, touched))     # finished by now: handed out later, not lost
        if transfer_id in carry:
            carry.remove(transfer_id)
        for side in self._out:                              # a failure path: a scan is fine here
            for p in side:
                for i, f in enumerate(p.ends):
                    if f.transfer_id == transfer_id:
                        p.settle(now_s)
                        rest = p.ends[:i] + p.ends[i + 1:]
                        p.ends = []
                        for g in rest:                  # the heap again, without it
                            _push_flow(p.ends, g)
                        self._flows -= 1
                        touched.append(p)
                        break
        self._carry = carry
        self._rerate(now_s, touched)
        self.version += 1

    def finish_due(self, now_s: float) -> list[int]:
        """Advance to ``now_s``; remove and return the transfers whose bytes have all moved."""
        if self._pending and self._pending_s != now_s:
            self._flush()
        self._pending_s = now_s
        done = self._finish_by(now_s, self._pending)
        self.version += 1
        return done

    def next_finish_s(self) -> Optional[float]:
        """When the next in-flight transfer finishes at current rates (None if idle)."""
        self._flush()
        if self._carry:
            return self._last_s
        return self._due.peek_time()

    def _finish_by(self, now_s: float, touched: list[_Pair]) -> list[int]:
        """Pop the flows that finished by ``now_s`` (with what :meth:`cancel` carried); the pairs
        they left go to ``touched`` (their rates must be recomputed)."""
        self._last_s = now_s
        done: list[int] = self._carry
        self._carry = []
        due = self._due
        while due.due_by(now_s):
            p: _Pair = due.pop().payload
            p.due = None
            p.settle(now_s)
            ends = p.ends
            finished = False
            while ends:
                f = ends[0]
                left = f.end - p.served
                # Done when the bytes left are rounding error, or would take less than the clock's
                # resolution at this time (else a timer at `now` would fire forever).
                if left <= 1e-9 * f.num_bytes + 1e-6 or now_s + left / p.rate <= now_s:
                    _pop_flow(ends)
                    done.append(f.transfer_id)
                    self._flows -= 1
                    finished = True
                else:
                    break
            if finished:
                touched.append(p)
            else:                   # not quite there (rounding): due again at its recomputed end
                self._push(p)
        if len(done) > 1:
            done.sort()             # same-time finishes land in the order they started
        return done

    def _flush(self) -> None:
        """Re-rate what changed at ``_pending_s``."""
        if self._pending:
            touched = self._pending
            self._pending = []
            self._rerate(self._pending_s, touched)

    def _push(self, p: _Pair) -> None:
        """Queue ``p``'s next finish at its current rate (moving the one queued)."""
        p.due = self._due.push_or_move(p.due, p.next_end_s(), Kind.TRANSFER, p)

    def _rerate(self, now_s: float, touched: list[_Pair]) -> None:
        """Recompute the max-min rates that the changes to the pairs in ``touched`` affect.

        Max-min rates change only through saturated endpoints, so the pairs at the touched
        endpoints are re-rated first, with the other pairs' rates held fixed (what they use of a
        shared endpoint is not available); then every endpoint where the two sets meet is
        checked: a held pair must keep its bottleneck there (still saturated, still the fastest
        there) and a re-rated pair bottlenecked there must be no slower than the held ones. Where
        a check fails, that endpoint's pairs join the re-rated set and it runs again. The result
        is the max-min allocation of the whole component (up to a 1e-9 tolerance), at the cost
        of the neighbourhood of what changed — typically one prefill group's batch of transfers
        — not of every transfer in flight.
        """
        if not touched:
            return
        if len(touched) == 1:       # the common cases: one path, nothing to share with another
            p = touched[0]
            if not p.ends:
                self._deactivate(p)
                if not self._out[p.src] and not self._in[p.dst]:
                    return
            elif len(self._out[p.src]) == 1 and len(self._in[p.dst]) == 1:
                p.settle(now_s)
                p.rate = min(self.egress[p.src], self.ingress[p.dst]) / float(len(p.ends))
                p.bottleneck_out = self.egress[p.src] <= self.ingress[p.dst]
                self._push(p)
                return
        self._mark += 1
        changed = self._mark                # marks the pairs whose flows changed
        xs: list[int] = []                  # endpoints re-rated: out side e as 2e, in side as 2e + 1
        self._mark += 1
        xmark = self._mark
        for p in touched:
            if not p.ends and p.out_pos >= 0:   # idle now: it leaves; its neighbours are re-rated
                self._deactivate(p)
            p.changed = changed
            for code, marks, e in ((2 * p.src, self._out_x, p.src), (2 * p.dst + 1, self._in_x, p.dst)):
                if marks[e] != xmark:
                    marks[e] = xmark
                    xs.append(code)
        for _ in range(8):
            more = self._rerate_around(now_s, xs, xmark, changed)
            if more is None:
                break
            xs.extend(more)
        else:                               # spread too far: re-rate the whole component
            self._rerate_component(now_s, xs, changed)

    def _rerate_around(self, now_s: float, xs: list[int], xmark: int, changed: int) -> Optional[list[int]]:
        """Re-rate the pairs at endpoints ``xs`` (marked ``xmark``) holding the others; commit and
        return None if the checks pass, else the endpoints to add."""
        self._mark += 1
        smark = self._mark                  # marks the pairs re-rated now
        chosen: list[tuple[int, _Pair]] = []
        for code in xs:
            for q in (self._out[code >> 1] if code & 1 == 0 else self._in[code >> 1]):
                if q.mark != smark:
                    q.mark = smark
                    chosen.append((q.key, q))
        if not chosen:
            return None
        chosen.sort()                       # a deterministic order
        self._mark += 1
        rmark = self._mark                  # numbers this round's resources
        capacity: list[float] = []
        boundary: list[int] = []            # resource number -> endpoint code, for boundary resources
        codes: list[int] = []
        out_res: list[int] = []
        in_res: list[int] = []
        weight: list[int] = []
        for _, q in chosen:
            e = q.src
            if self._out_mark[e] != rmark:
                self._out_mark[e] = rmark
                self._out_res[e] = len(capacity)
                codes.append(2 * e)
                if self._out_x[e] == xmark:
                    capacity.append(self.egress[e])
                else:                       # a boundary endpoint: what the held pairs leave
                    boundary.append(len(capacity))
                    capacity.append(_left(self.egress[e], self._out[e], smark))
            out_res.append(self._out_res[e])
            e = q.dst
            if self._in_mark[e] != rmark:
                self._in_mark[e] = rmark
                self._in_res[e] = len(capacity)
                codes.append(2 * e + 1)
                if self._in_x[e] == xmark:
                    capacity.append(self.ingress[e])
                else:
                    boundary.append(len(capacity))
                    capacity.append(_left(self.ingress[e], self._in[e], smark))
            in_res.append(self._in_res[e])
            weight.append(len(q.ends))
        rates, froze = progressive_fill_bottlenecks(out_res, in_res, weight, capacity)
        for i in range(len(chosen)):
            q = chosen[i][1]
            q.next_rate = rates[i]
            q.next_out = froze[i] == out_res[i]
        more: list[int] = []
        for r in boundary:                  # the checks where re-rated and held pairs meet
            code = codes[r]
            e = code >> 1
            is_out = code & 1 == 0
            side = self._out[e] if is_out else self._in[e]
            cap = self.egress[e] if is_out else self.ingress[e]
            used = 0.0
            fastest_new = fastest_held = 0.0
            for h in side:
                if h.mark == smark:
                    used += h.next_rate * len(h.ends)
                    fastest_new = max(fastest_new, h.next_rate)
                else:
                    used += h.rate * len(h.ends)
                    fastest_held = max(fastest_held, h.rate)
            saturated = used >= cap * (1 - 1e-9)
            ok = True
            for h in side:
                if h.mark == smark:
                    if h.next_out == is_out and h.next_rate < fastest_held * (1 - 1e-9):
                        ok = False          # re-rated, bottlenecked here, yet slower than a held one
                elif h.bottleneck_out == is_out and (not saturated or h.rate < fastest_new * (1 - 1e-9)):
                    ok = False              # held, bottlenecked here, and no longer is
            if not ok:
                (self._out_x if is_out else self._in_x)[e] = xmark
                more.append(code)
        if more:
            return more
        for _, q in chosen:                 # commit
            if q.next_rate != q.rate or q.changed == changed:
                q.settle(now_s)
                q.rate = q.next_rate
                self._push(q)
            q.bottleneck_out = q.next_out
        return None

    def _rerate_component(self, now_s: float, xs: list[int], changed: int) -> None:
        """Re-rate every pair connected to the endpoints ``xs`` (the fallback of :meth:`_rerate`)."""
        self._mark += 1
        mark = self._mark
        srcs = [code >> 1 for code in xs if code & 1 == 0]
        dsts = [code >> 1 for code in xs if code & 1 == 1]
        component: list[tuple[int, _Pair]] = []
        while srcs or dsts:
            side = self._out[srcs.pop()] if srcs else self._in[dsts.pop()]
            for q in side:
                if q.mark != mark:
                    q.mark = mark
                    component.append((q.key, q))
                    srcs.append(q.src)
                    dsts.append(q.dst)
        if not component:
            return
        component.sort()
        self._mark += 1
        rmark = self._mark
        capacity: list[float] = []
        out_res: list[int] = []
        in_res: list[int] = []
        weight: list[int] = []
        for _, q in component:
            q.settle(now_s)
            if self._out_mark[q.src] != rmark:
                self._out_mark[q.src] = rmark
                self._out_res[q.src] = len(capacity)
                capacity.append(self.egress[q.src])
            out_res.append(self._out_res[q.src])
            if self._in_mark[q.dst] != rmark:
                self._in_mark[q.dst] = rmark
                self._in_res[q.dst] = len(capacity)
                capacity.append(self.ingress[q.dst])
            in_res.append(self._in_res[q.dst])
            weight.append(len(q.ends))
        rates, froze = progressive_fill_bottlenecks(out_res, in_res, weight, capacity)
        for i in range(len(component)):
            q = component[i][1]
            q.rate = rates[i]
            q.bottleneck_out = froze[i] == out_res[i]
            self._push(q)

    def _deactivate(self, p: _Pair) -> None:
        side = self._out[p.src]
        last = side.pop()
        if last is not p:                   # swap the last one into its place
            side[p.out_pos] = last
            last.out_pos = p.out_pos
        side = self._in[p.dst]
        last = side.pop()
        if last is not p:
            side[p.in_pos] = last
            last.in_pos = p.in_pos
        p.out_pos = p.in_pos = -1
        if p.due is not None:
            self._due.remove(p.due)
            p.due = None
        self._spare_pairs.append(p)


def _left(capacity: float, side: list[_Pair], smark: int) -> float:
    """What the pairs of ``side`` not marked ``smark`` leave of an endpoint's ``capacity``."""
    held = 0.0
    for h in side:
        if h.mark != smark:
            held += h.rate * len(h.ends)
    return capacity - held if held < capacity else 0.0
