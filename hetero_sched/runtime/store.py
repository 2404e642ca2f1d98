"""The cluster KV store on Ray: store actors holding prefix blocks as Arrow objects, read by ref.

One ``KVStoreActor`` per memory node of the experiment's ``kv_cache.store``; block ``h`` lives on
actor ``h % n``. A block is one Arrow RecordBatch (``runtime/kvcodec.py``: the block's KV, its
checksum, its metadata) that the store actor ``ray.put``s itself, so the store owns it and it
outlives the prefill actor that computed it.

- **write**: when the core starts a write, the prefill group's actor exports the blocks (one
  bundle of batches, as KV transfers do) and :meth:`KVStoreActor.put` — handed the bundle by the
  scheduler actor — verifies every checksum and keeps each block as its own object, tagged with
  the write's flow id (its version);
- **read**: :meth:`KVStoreActor.get` answers with the blocks' ObjectRefs, which the scheduler
  actor passes on to the reading group's actor as call arguments; that actor reads them (zero-copy
  on one node), verifies them and adds them to its backend's prefix cache before its prefill;
- **evict**: the core's store evicted a block; the actor drops it if it still holds that version
  (a newer write of the same block is kept).

A plain (synchronous) actor: calls from one caller run in the order sent, so a ``get`` never
overtakes an ``evict`` or a ``put`` the scheduler actor sent before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import ray

from hetero_sched.runtime.kvcodec import decode_kv

if TYPE_CHECKING:
    from hetero_sched.experiment import Experiment


@ray.remote(num_cpus=0)
class KVStoreActor:
    """One memory node of the cluster KV store: prefix blocks as Arrow objects this actor owns."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._blocks: dict[int, tuple[int, ray.ObjectRef, int]] = {}   # hash -> (version, block, bytes)

    def put(self, version: int, hashes: list[int], indices: list[int], bundle: list[Any]) -> int:
        """Keep block ``hashes[i]`` = ``bundle[indices[i]]`` (checksums verified first: a damaged
        block raises ``KVCorruptionError`` and nothing of the call is kept). Returns bytes kept."""
        checked = []
        for h, i in zip(hashes, indices):
            batch = bundle[i]
            decode_kv(batch, verify=True)
            checked.append((h, batch))
        kept = 0
        for h, batch in checked:
            self._blocks[h] = (version, ray.put(batch), int(batch.nbytes))
            kept += int(batch.nbytes)
        return kept

    def get(self, hashes: list[int]) -> list[Optional[ray.ObjectRef]]:
        """The blocks' refs (None for a block not held): the reader borrows them."""
        return [self._blocks[h][1] if h in self._blocks else None for h in hashes]

    def evict(self, blocks: list[tuple[int, int]]) -> int:
        """Drop ``(hash, version)`` blocks still held at that version; returns how many."""
        dropped = 0
        for h, version in blocks:
            held = self._blocks.get(h)
            if held is not None and held[0] == version:
                del self._blocks[h]
                dropped += 1
        return dropped

    def held(self) -> tuple[int, int]:
        """Blocks held and their bytes."""
        return len(self._blocks), sum(b for _, _, b in self._blocks.values())


def start_store_actors(exp: Experiment) -> list[Any]:
    """The cluster KV store of ``exp``: one actor per memory node (any node of the cluster; they
    ask for no CPU), none without ``kv_cache.store``."""
    store = exp.kv_cache.store if exp.kv_cache is not None else None
    return [KVStoreActor.options(max_restarts=0).remote(i) for i in range(store.nodes)] if store is not None else []


def shard(hashes: list[int] | tuple[int, ...], num_actors: int) -> dict[int, list[int]]:
    """Which store actor holds which of ``hashes`` (block ``h`` on actor ``h % n``), in order."""
    out: dict[int, list[int]] = {}
    for h in hashes:
        out.setdefault(h % num_actors, []).append(h)
    return out
