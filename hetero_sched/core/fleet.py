"""The groups as policies see them, indexed: "the best group of this role" without a scan.

A :class:`Fleet` is the sequence of :class:`~hetero_sched.policies.base.GroupView` policies get
(``groups``), plus what a scheduling decision needs in O(log G) or better, whatever the number
of groups G:

- :meth:`Fleet.best`: the group with the least of a criterion among the groups of a role
  (pending prefill tokens; decode load, then free KV; free KV among groups with a decode slot;
  KV in use; pending work), over all groups or one *kind* (groups built alike: same cost model
  and limits). A criterion's :class:`Ranking` is made on first use and kept up to date as views
  change; ties go to the lowest group id, as a scan in group order would.
- :meth:`Fleet.ranking`: the same for a policy's own criterion (a key and a filter of a view).
- :meth:`Fleet.sample`: ``k`` groups of a role drawn as ``rng.sample(pool, k)`` would draw them
  from the role's groups in id order, without building that list.
- :attr:`Fleet.holders`: which groups' prefix caches hold a prefix block.
- running totals per role (queued prefill tokens, decode load, their capacities).

The scheduler changes views only through the Fleet (:meth:`placed`, :meth:`routed_decode`,
:meth:`report`, :meth:`set_roles`), so the indexes always agree with what the views say —
stale exactly as the views are (refreshed at span ends at most once per report interval, plus
what the scheduler routed itself). A Fleet built over a plain list of views (a test, a direct
caller) indexes that list's current state; the views are :class:`~hetero_sched.core.view.GroupView`
objects (compiled: a report's writes to one are stores).
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left, insort
from collections.abc import Sequence
from typing import Any, Callable, Final, Iterator, Optional

from librt.vecs import vec
from mypy_extensions import i64

from hetero_sched.core.kvblocks import PrefixHolders
from hetero_sched.core.view import GroupView

PREFILL_TOKENS = "prefill_tokens"
"""Criterion: pending prefill tokens (queued or prefilling)."""
DECODE_LOAD = "decode_load"
"""Criterion: sequences decoding or waiting for a decode slot, then the most free KV."""
FREE_KV = "free_kv"
"""Criterion: the most free KV blocks."""
KV_IN_USE = "kv_in_use"
"""Criterion: pending prefill tokens plus the tokens of KV held (Dynamo's "blocks in use")."""
PENDING_WORK = "pending_work"
"""Criterion: pending prefill tokens plus ``weight`` × decode load (vLLM-style routing)."""
CRITERIA = (PREFILL_TOKENS, DECODE_LOAD, FREE_KV, KV_IN_USE, PENDING_WORK)

PREFILL = "prefill"
"""Filter: groups that may prefill now."""
DECODE = "decode"
"""Filter: groups that may decode now."""
BOTH = "both"
"""Filter: groups that may do both (colocated)."""
DECODE_SLOT = "decode_slot"
"""Filter: groups that may decode and have a free decode slot."""
DECODE_ONLY_SLOT = "decode_only_slot"
"""Filter: decode groups (not prefill-capable) with a free decode slot."""
FILTERS = (PREFILL, DECODE, BOTH, DECODE_SLOT, DECODE_ONLY_SLOT)

_TOKENS: Final = 1
_LOAD: Final = 2
_FREE: Final = 4
_ROLE: Final = 8
_ALL: Final = 15

_DEPS = {PREFILL_TOKENS: _TOKENS, DECODE_LOAD: _LOAD | _FREE, FREE_KV: _FREE, KV_IN_USE: _TOKENS | _FREE,
         PENDING_WORK: _TOKENS | _LOAD, PREFILL: _ROLE, DECODE: _ROLE, BOTH: _ROLE,
         DECODE_SLOT: _ROLE | _LOAD, DECODE_ONLY_SLOT: _ROLE | _LOAD}
"""Which of a group's numbers each criterion and filter reads (a change elsewhere skips it)."""
_CODE = {name: i for i, name in enumerate(CRITERIA)} | {name: i for i, name in enumerate(FILTERS)}


_POS: Final = 2
"""A Ranking tree node's third number: its best member's position."""
_ROOT: Final = 3
"""Where the root's numbers start in a Ranking tree (node 1, three numbers per node)."""

SCAN_LIMIT: Final = 16
"""A built-in ranking over at most this many groups is answered by a scan at query time: with
so few groups that is cheaper than keeping a tree up to date at every change."""


class _Numbers:
    """One group's numbers as the rankings read them, in one compiled object: a ranking update
    reads a few fields of one object instead of an item of each of ten lists of boxed ints
    (with a thousand groups those lists and their ints are spread over memory the caches
    cannot hold)."""

    def __init__(self, group_id: i64, v: Any) -> None:
        self.group_id = group_id
        self.kind: i64 = -1
        """Its kind (see :meth:`Fleet.kind_members`)."""
        self.kind_position: i64 = -1
        """Its place among the groups of its kind (a kind's ranking's position for it)."""
        self.can_prefill = bool(v.can_prefill)
        self.can_decode = bool(v.can_decode)
        self.tokens: i64 = int(v.prefill_queued_tokens)
        self.num_prefill: i64 = int(v.num_prefill_queued)
        self.num_queued: i64 = int(v.num_decode_queued)
        self.num_decoding: i64 = int(v.num_decoding)
        self.load: i64 = self.num_decoding + self.num_queued
        self.free: i64 = int(v.kv_blocks_free)
        self.total: i64 = int(v.kv_blocks_total)
        self.block: i64 = int(v.block_size)
        self.max_seqs: i64 = int(v.max_num_seqs)
        self.max_batch: i64 = int(v.max_batch_tokens)
        self.changed: i64 = 0
        """What changed (a mask) since the rankings last looked."""


class Ranking:
    """The least ``(primary, secondary, position)`` over a fixed list of groups, among members.

    A tournament tree: a change costs O(log n), the best is read in O(1). Positions follow
    group ids, so ties go to the lowest id. Built-in criteria are computed from the Fleet's
    numbers; a policy's own ranking calls its ``key(view) -> float`` and ``where(view) -> bool``.
    (A built-in ranking of at most :data:`SCAN_LIMIT` groups keeps no tree: the Fleet scans.)
    """

    def __init__(self, group_ids: list[int], criterion: str, among: str, weight: float = 0.0,
                 key: Optional[Callable[[Any], float]] = None,
                 where: Optional[Callable[[Any], bool]] = None, kind: i64 = -1) -> None:
        self.group_ids = group_ids
        self.kind = kind
        """The kind whose groups it ranks, in id order (-1: every group; a group's position is its id)."""
        self.criterion = criterion
        self.among = among
        self.weight = weight
        self.key = key
        self.where = where
        self.custom = key is not None
        self.deps: i64 = _ALL if self.custom else _DEPS[criterion] | _DEPS[among]
        self.criterion_code = _CODE.get(criterion, -1)
        self.among_code = _CODE.get(among, -1)
        self.scan = False
        """Kept no tree: the Fleet scans its groups when asked (few groups; see :data:`SCAN_LIMIT`)."""
        size = 1
        while size < len(group_ids):
            size *= 2
        self._size = size
        # The tree in one unboxed array, three numbers per node (node 1 the root, leaves at
        # ``size + position``): the node's best member's two keys, copied up, and its position
        # (-1: no member below it). A change compares a node with its sibling, the node next to
        # it: one or two cache lines per level, where an array per number read three (and a tree
        # of objects an object per level: with a thousand groups, cold memory at every level).
        self._tree = vec[float]([-1.0 if i % 3 == _POS else math.inf for i in range(6 * size)])

    def best_id(self) -> int:
        """The best member's group id, or -1 if there is none."""
        p = self._tree[_ROOT + _POS]
        return -1 if p < 0.0 else self.group_ids[int(p)]

    def best_key(self) -> float:
        """The best member's primary key (inf if there is none)."""
        return self._tree[_ROOT]

    def ordered(self) -> Iterator[int]:
        """The members' group ids from the best on, lazily: O(log n) each (a best-first walk of
        the tree), so the first few cost what they are, not a sort of every group."""
        t = self._tree
        if t[_ROOT + _POS] < 0.0:
            return
        frontier: list[tuple[float, float, float, int]] = [(t[_ROOT], t[_ROOT + 1], t[_ROOT + _POS], 1)]
        while frontier:
            _, _, position, node = heapq.heappop(frontier)
            while node < self._size:       # descend to the leaf, keeping the other branch
                left = 2 * node
                right = left + 1
                if t[3 * left + _POS] == position:
                    node, other = left, right
                else:
                    node, other = right, left
                o = 3 * other
                if t[o + _POS] >= 0.0:
                    heapq.heappush(frontier, (t[o], t[o + 1], t[o + _POS], other))
            yield self.group_ids[int(position)]

    def set(self, position: i64, member: bool, primary: float, secondary: float) -> None:
        """The group at ``position`` is (or is not) a member, with this key."""
        t = self._tree
        node: i64 = self._size + position
        me = float(position)
        w = me
        if not member:
            w = -1.0
            primary = secondary = math.inf
        at: i64 = 3 * node
        if t[at + _POS] == w and t[at] == primary and t[at + 1] == secondary:
            return
        t[at] = primary
        t[at + 1] = secondary
        t[at + _POS] = w
        # Carry the winner w up, meeting only the sibling subtree's winner at each level (the
        # right one wins only if strictly less: ties go to the left, a lower group id); stop where
        # a node keeps a winner other than this group: nothing above it changes.
        while node > 1:
            sib: i64 = 3 * (node ^ 1)
            s = t[sib + _POS]
            if s >= 0.0:
                sp = t[sib]
                ss = t[sib + 1]
                if w < 0.0:
                    w, primary, secondary = s, sp, ss
                elif node & 1:          # w is the right child
                    if not (primary < sp or (primary == sp and secondary < ss)):
                        w, primary, secondary = s, sp, ss
                elif sp < primary or (sp == primary and ss < secondary):
                    w, primary, secondary = s, sp, ss
            node >>= 1
            at = 3 * node
            if t[at + _POS] == w and w != me:
                break
            t[at] = primary
            t[at + 1] = secondary
            t[at + _POS] = w


class Fleet:
    """Group views plus indexes over them (see the module docstring). A read-only sequence to
    policies; the scheduler reports every change through its methods."""

    def __init__(self, views: Sequence[Any], holders: Optional[PrefixHolders] = None,
                 scan_limit: int = SCAN_LIMIT) -> None:
        self.views: list[GroupView] = list(views)   # compiled: a report's writes are stores
        self._scan_limit = scan_limit
        self.holders = holders
        """Which groups' prefix caches hold each prefix block (kept by the caches; None: ask
        every view's prefix probe instead, O(G))."""
        n = len(self.views)
        self._nums = [_Numbers(i, v) for i, v in enumerate(self.views)]
        kinds: dict[tuple, int] = {}
        self._kind_of: list[int] = []
        self._kinds: list[list[int]] = []
        for i, v in enumerate(self.views):
            m = self._nums[i]
            spec = (id(v.cost), v.device, m.total, m.block, m.max_seqs, m.max_batch)
            k = kinds.get(spec)
            if k is None:
                k = kinds[spec] = len(self._kinds)
                self._kinds.append([])
            m.kind = k
            m.kind_position = len(self._kinds[k])
            self._kinds[k].append(i)
            self._kind_of.append(k)
        self._rankings: dict[tuple[str, str, int, float], Ranking] = {}
        self._least_prefill: Optional[Ranking] = None
        self._least_decode: Optional[Ranking] = None
        self._trees: list[Ranking] = []
        """The rankings that keep a tree (every change to a group they rank updates them)."""
        self._dirty: list[_Numbers] = []
        """Groups whose numbers changed since the rankings last looked (they catch up on a query)."""
        self._custom: dict[Any, Ranking] = {}
        self._prefill_ids = [i for i in range(n) if self._nums[i].can_prefill]
        self._decode_ids = [i for i in range(n) if self._nums[i].can_decode]
        self.prefill_tokens = 0
        """Pending prefill tokens over the groups that may prefill."""
        self.prefill_batch_tokens = 0
        """Their ``max_batch_tokens``, summed (one iteration of every prefill group)."""
        self.decode_load = 0
        """Sequences decoding or waiting for a slot over the groups that may decode."""
        self.decode_slots = 0
        """Their ``max_num_seqs``, summed."""
        self.num_idle_roles = 0
        """Groups that may take neither role now (switching roles, or failed)."""
        for i in range(n):
            self._count(self._nums[i], 1)

    # --- the sequence policies see ----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: Any) -> Any:
        return self.views[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.views)

    # --- kinds -----------------------------------------------------------------------------
    @property
    def num_kinds(self) -> int:
        """Kinds of groups: groups of one kind share a cost model and limits."""
        return len(self._kinds)

    def kind_members(self, kind: int) -> list[int]:
        """The group ids of ``kind``, ascending."""
        return self._kinds[kind]

    def kind_of(self, group_id: int) -> int:
        return self._kind_of[group_id]

    def role_ids(self, prefill: bool) -> list[int]:
        """Ids of the groups that may prefill (or decode) now, ascending (do not modify)."""
        return self._prefill_ids if prefill else self._decode_ids

    @property
    def num_prefill(self) -> int:
        """Groups that may prefill now."""
        return len(self._prefill_ids)

    @property
    def num_decode(self) -> int:
        """Groups that may decode now."""
        return len(self._decode_ids)

    # --- queries -----------------------------------------------------------------------------
    def best(self, criterion: str, among: str, kind: int = -1, weight: float = 0.0) -> Optional[Any]:
        """The view with the least ``criterion`` among the groups passing ``among`` (of ``kind``;
        -1: all), ties to the lowest id; None if no group passes. See :data:`CRITERIA` and
        :data:`FILTERS`; ``weight`` is :data:`PENDING_WORK`'s decode-load weight."""
        if self._dirty:
            self._sync()
        r = self._rankings.get((criterion, among, kind, weight))
        if r is None:
            if criterion not in CRITERIA or among not in FILTERS:
                raise ValueError(f"unknown criterion {criterion!r} or filter {among!r} "
                                 f"(criteria: {', '.join(CRITERIA)}; filters: {', '.join(FILTERS)})")
            members = list(range(len(self.views))) if kind < 0 else self._kinds[kind]
            r = self._add(Ranking(members, criterion, among, weight, kind=kind))
            self._rankings[(criterion, among, kind, weight)] = r
        gid = self._best_id(r)
        return None if gid < 0 else self.views[gid]

    def least_prefill_queued(self) -> Optional[Any]:
        """``best(PREFILL_TOKENS, PREFILL)``: the prefill group with the fewest pending prefill
        tokens (the least-loaded routing's question, asked once per request: kept at hand)."""
        if self._dirty:
            self._sync()
        r = self._least_prefill
        if r is None:
            self.best(PREFILL_TOKENS, PREFILL)
            r = self._least_prefill = self._rankings[(PREFILL_TOKENS, PREFILL, -1, 0.0)]
        gid = self._best_id(r)
        return None if gid < 0 else self.views[gid]

    def least_decode_loaded(self) -> Optional[Any]:
        """``best(DECODE_LOAD, DECODE)``: the decode group with the fewest decoding or waiting
        sequences, then the most free KV."""
        if self._dirty:
            self._sync()
        r = self._least_decode
        if r is None:
            self.best(DECODE_LOAD, DECODE)
            r = self._least_decode = self._rankings[(DECODE_LOAD, DECODE, -1, 0.0)]
        gid = self._best_id(r)
        return None if gid < 0 else self.views[gid]

    def ordered(self, criterion: str, among: str, kind: int = -1, weight: float = 0.0) -> Iterator[Any]:
        """The views passing ``among`` from the least ``criterion`` on (as :meth:`best` ranks
        them), lazily: taking the first few costs O(log G) each."""
        self.best(criterion, among, kind, weight)
        r = self._rankings[(criterion, among, kind, weight)]
        if r.scan:
            nums = self._nums
            keyed = sorted((self._primary(r, nums[g]), self._secondary(r, nums[g]), g) for g in r.group_ids
                           if self._is_member(r, nums[g]))
            for _, _, gid in keyed:
                yield self.views[gid]
            return
        for gid in r.ordered():
            yield self.views[gid]

    def ranking(self, name: Any, key: Callable[[Any], float], where: Callable[[Any], bool]) -> Ranking:
        """A policy's own criterion, kept up to date like the built-in ones: the least
        ``key(view)`` (ties: lowest id) among the views for which ``where(view)``; read it with
        :meth:`best_of`. Made on the first call with ``name`` (any hashable naming the criterion
        and its parameters); later calls with that name return it. Every view change calls
        both functions, so keep them cheap."""
        r = self._custom.get(name)
        if r is None:
            r = self._custom[name] = self._add(Ranking(list(range(len(self.views))), "", "", 0.0, key, where))
        return r

    def best_of(self, ranking: Ranking) -> Optional[Any]:
        """The best view of ``ranking`` (None if no group passes its filter)."""
        if self._dirty:
            self._sync()
        gid = ranking.best_id()
        return None if gid < 0 else self.views[gid]

    def sample(self, rng: Any, prefill: bool, k: int) -> list[Any]:
        """``k`` distinct groups of a role, drawn as ``rng.sample(role_groups, k)`` would draw them
        (``role_groups`` in id order) — all of them if there are at most ``k`` — without a list."""
        pool = self._prefill_ids if prefill else self._decode_ids
        if len(pool) <= k:
            return [self.views[i] for i in pool]
        return [self.views[pool[j]] for j in sample_positions(rng, len(pool), k)]

    def prefix_holders(self, block_hash: int) -> list[Any]:
        """Views of the groups whose prefix cache holds ``block_hash`` now, by id."""
        if self.holders is None:
            return [v for v in self.views if v.cached_prefix_blocks((block_hash,)) > 0]
        return [self.views[g] for g in self.holders.holders(block_hash)]

    # --- changes (the scheduler's) -------------------------------------------------------
    def placed(self, group_id: int, tokens: int, count: int = 1) -> None:
        """The scheduler queued a prompt of ``tokens`` at ``group_id`` (``count`` -1 and negative
        ``tokens``: took one out, a cancellation)."""
        v = self.views[group_id]
        m = self._nums[group_id]
        m.num_prefill += count
        v.num_prefill_queued = m.num_prefill
        m.tokens += tokens
        v.prefill_queued_tokens = m.tokens
        if m.can_prefill:
            self.prefill_tokens += tokens
        self._touch(m, _TOKENS)

    def routed_decode(self, group_id: int, delta: int) -> None:
        """The scheduler queued (``delta`` > 0) or took out requests for decode at ``group_id``."""
        v = self.views[group_id]
        m = self._nums[group_id]
        m.num_queued += delta
        v.num_decode_queued = m.num_queued
        m.load += delta
        if m.can_decode:
            self.decode_load += delta
        self._touch(m, _LOAD)

    def report(self, group_id: int, now_s: float, kv_blocks_free: int, num_prefill_queued: int,
               prefill_queued_tokens: int, num_decode_queued: int, num_decoding: int) -> None:
        """The group's state as reported at ``now_s``."""
        v = self.views[group_id]             # (only what changed is written: views are Python objects)
        v.reported_s = now_s
        m = self._nums[group_id]
        if m.num_prefill != num_prefill_queued:
            m.num_prefill = num_prefill_queued
            v.num_prefill_queued = num_prefill_queued
        if m.num_queued != num_decode_queued:
            m.num_queued = num_decode_queued
            v.num_decode_queued = num_decode_queued
        if m.num_decoding != num_decoding:
            m.num_decoding = num_decoding
            v.num_decoding = num_decoding
        changed = 0
        old = m.tokens
        if old != prefill_queued_tokens:
            changed = _TOKENS
            m.tokens = prefill_queued_tokens
            v.prefill_queued_tokens = prefill_queued_tokens
            if m.can_prefill:
                self.prefill_tokens += prefill_queued_tokens - old
        load = num_decoding + num_decode_queued
        old = m.load
        if old != load:
            changed |= _LOAD
            m.load = load
            if m.can_decode:
                self.decode_load += load - old
        if m.free != kv_blocks_free:
            changed |= _FREE
            m.free = kv_blocks_free
            v.kv_blocks_free = kv_blocks_free
        if changed:
            self._touch(m, changed)

    def set_roles(self, group_id: int, can_prefill: bool, can_decode: bool, role: Any = None) -> None:
        """The group may now prefill / decode (a role switch, a drain, a failure, a restore)."""
        v = self.views[group_id]
        v.can_prefill = can_prefill
        v.can_decode = can_decode
        if role is not None:
            v.role = role
        m = self._nums[group_id]
        self._count(m, -1)
        for ids, was, now in ((self._prefill_ids, m.can_prefill, can_prefill),
                              (self._decode_ids, m.can_decode, can_decode)):
            if was and not now:
                del ids[bisect_left(ids, group_id)]
            elif now and not was:
                insort(ids, group_id)
        m.can_prefill = can_prefill
        m.can_decode = can_decode
        self._count(m, 1)
        self._touch(m, _ALL)

    # --- internals -------------------------------------------------------------------------
    def _add(self, r: Ranking) -> Ranking:
        if not r.custom and len(r.group_ids) <= self._scan_limit:
            r.scan = True
            return r
        self._trees.append(r)
        for position, gid in enumerate(r.group_ids):
            self._update(r, position, self._nums[gid], _ALL)
        return r

    def _best_id(self, r: Ranking) -> int:
        if not r.scan:
            return r.best_id()
        best = -1
        bp = bs = 0.0
        nums = self._nums
        for g in r.group_ids:               # ascending ids: strict comparisons keep the lowest
            m = nums[g]
            if self._is_member(r, m):
                p = self._primary(r, m)
                sec = self._secondary(r, m)
                if best < 0 or p < bp or (p == bp and sec < bs):
                    best, bp, bs = g, p, sec
        return best

    def _touch(self, m: _Numbers, changed: i64) -> None:
        if not self._trees:                 # no tree to catch up (few groups: queries scan)
            return
        if not m.changed:
            self._dirty.append(m)
        m.changed |= changed

    def _sync(self) -> None:
        """Bring the rankings up to date with the groups that changed since the last query (a
        group changed several times costs one update per ranking)."""
        trees = self._trees
        for m in self._dirty:
            changed = m.changed
            m.changed = 0
            for r in trees:                 # (a group's place in each is its id, or its place in its kind)
                if r.deps & changed:
                    if r.kind < 0:
                        self._update(r, m.group_id, m, changed)
                    elif r.kind == m.kind:
                        self._update(r, m.kind_position, m, changed)
        self._dirty.clear()

    def _update(self, r: Ranking, position: i64, m: _Numbers, changed: i64) -> None:
        """Group ``m``, at ``position`` in ``r``, after the changes ``changed`` (a mask)."""
        if r.custom:
            v = self.views[m.group_id]
            member = r.where is None or bool(r.where(v))
            r.set(position, member, float(r.key(v)) if member and r.key is not None else 0.0, 0.0)
        elif self._is_member(r, m):
            r.set(position, True, self._primary(r, m), self._secondary(r, m))
        elif r.among_code <= 2 and not changed & _ROLE:
            pass                            # not of a role-only filter's role, still: its entry is not read
        else:                               # a non-member's key is not read: an unchanged no-op
            r.set(position, False, math.inf, math.inf)

    def _is_member(self, r: Ranking, m: _Numbers) -> bool:
        among = r.among_code
        if among == 0:                      # PREFILL
            return m.can_prefill
        if among == 1:                      # DECODE
            return m.can_decode
        if among == 2:                      # BOTH
            return m.can_prefill and m.can_decode
        if among == 3:                      # DECODE_SLOT
            return m.can_decode and m.load < m.max_seqs
        return m.can_decode and not m.can_prefill and m.load < m.max_seqs

    def _primary(self, r: Ranking, m: _Numbers) -> float:
        criterion = r.criterion_code
        if criterion == 0:                  # PREFILL_TOKENS
            return float(m.tokens)
        if criterion == 1:                  # DECODE_LOAD
            return float(m.load)
        if criterion == 2:                  # FREE_KV
            return float(-m.free)
        if criterion == 3:                  # KV_IN_USE
            return float(m.tokens + (m.total - m.free) * m.block)
        return float(m.tokens) + r.weight * float(m.load)      # PENDING_WORK

    def _secondary(self, r: Ranking, m: _Numbers) -> float:
        return float(-m.free) if r.criterion_code == 1 else 0.0    # DECODE_LOAD: most free KV

    def _count(self, m: _Numbers, sign: int) -> None:
        if m.can_prefill:
            self.prefill_tokens += sign * m.tokens
            self.prefill_batch_tokens += sign * m.max_batch
        if m.can_decode:
            self.decode_load += sign * m.load
            self.decode_slots += sign * m.max_seqs
        if not m.can_prefill and not m.can_decode:
            self.num_idle_roles += sign


Sequence.register(Fleet)   # a sequence of views to isinstance checks too (mypyc classes cannot inherit it)


_RANDBELOW_BITS: Final = getattr(random.Random, "_randbelow_with_getrandbits", None)
"""How ``random.Random`` draws an int below ``n`` (from ``getrandbits``; None if Python renamed it)."""


def sample_positions(rng: Any, n: int, k: int) -> list[int]:
    """``rng.sample(range(n), k)`` for ``0 <= k <= n``, compiled: CPython's algorithm
    (``Lib/random.py``) drawing from ``rng.getrandbits`` as ``random.Random`` does, so the draws
    and the generator's state after are the same, without ``random.sample``'s interpreted loop
    (with ``choices: 2`` at a thousand groups, a fifth of the run). A generator that draws
    otherwise (a ``random.Random`` subclass with its own ``random()``, or another kind) is asked
    ``rng.sample`` itself."""
    if _RANDBELOW_BITS is None or getattr(type(rng), "_randbelow", None) is not _RANDBELOW_BITS:
        return list(rng.sample(range(n), k))
    getrandbits: Callable[[int], int] = rng.getrandbits
    result: list[int] = []
    setsize = 21                            # random.sample's: a list of n beats a set of k
    if k > 5:
        setsize += 4 ** math.ceil(math.log(k * 3, 4))
    if n <= setsize:
        pool = list(range(n))
        for i in range(k):
            j = _below(getrandbits, n - i)
            result.append(pool[j])
            pool[j] = pool[n - i - 1]
    else:
        selected: set[int] = set()
        for _ in range(k):
            j = _below(getrandbits, n)
            while j in selected:
                j = _below(getrandbits, n)
            selected.add(j)
            result.append(j)
    return result


def _below(getrandbits: Callable[[int], int], n: int) -> int:
    """An int in ``[0, n)`` as ``random.Random._randbelow`` draws it."""
    bits = n.bit_length()
    r = getrandbits(bits)
    while r >= n:
        r = getrandbits(bits)
    return r


def as_fleet(groups: Sequence[Any]) -> Fleet:
    """``groups`` itself if the scheduler passed a :class:`Fleet`, else a Fleet indexing a plain
    list of views as they are now (O(G): for tests and direct callers)."""
    return groups if isinstance(groups, Fleet) else Fleet(groups)
