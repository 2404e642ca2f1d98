"""What a device-group actor computes: nothing but KV bytes (modeled) or a real tiny Llama (numpy).

A backend is the compute half of a device: the core planned a span, the actor runs it — the
backend does the work a real group would do with its KV (compute it, hand it over as Arrow
blocks, read it back with checksums verified, decode from it) — and the actor reports when it
started and ended. **To plug in a real engine** (a GPU engine, a Neuron or Cerebras client),
implement :class:`Backend` — one class, no change to the core — and register it in
:func:`make_backend`; with ``pace: real`` its compute time *is* the device's time.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from hetero_sched.catalog import get_model
from hetero_sched.runtime.kvcodec import decode_kv, encode_kv, make_synthetic_kv_batch
from hetero_sched.tinylm import TinyLM, prompt_token_ids

Tokens = dict[int, list[int]]
Margins = dict[int, float]


class Backend(Protocol):
    """One device group's engine, driven by its actor one span (or one step) at a time.

    Requests are named by id; token ids are ints. ``prefill`` runs whole prompts (or chunks
    ``[start, end)`` of them: chunked prefill) and returns each finished prompt's first token;
    ``decode(joiners, steps)`` adds ``joiners`` (whose KV this backend holds: prefilled here or
    imported) to the running batch and makes ``steps`` tokens for every running request;
    ``rollback(steps)`` undoes the last ``steps`` decode steps (a virtual-clock cut: the actor
    computed a span eagerly and learns later where it stopped). ``export_kv`` / ``import_kv``
    move a request's KV as one Arrow RecordBatch (``runtime/kvcodec.py``); ``forget`` drops
    requests that left the group. ``export_blocks`` / ``import_blocks`` move prefix blocks (one
    RecordBatch each) to and from the cluster KV store. Margins (top-1 minus top-2 logit) are for token-exactness
    checks; a backend without them returns ``{}``.
    """

    def prefill(self, requests: list[dict[str, Any]]) -> tuple[Tokens, Margins]: ...
    def decode(self, joiners: list[int], steps: int) -> tuple[Tokens, Margins]: ...
    def rollback(self, steps: int) -> None: ...
    def export_kv(self, request_id: int, true_bytes: int) -> pa.RecordBatch: ...
    def import_kv(self, request_id: int, batch: pa.RecordBatch, last_token: int) -> int: ...
    def forget(self, request_ids: list[int]) -> None: ...
    def held(self) -> int: ...
    def export_blocks(self, hashes: list[int], block_bytes: int) -> list[pa.RecordBatch]: ...
    def import_blocks(self, hashes: list[int], batches: list[pa.RecordBatch]) -> int: ...


class ModeledBackend:
    """Durations come from the cost model; only KV bytes are real.

    The KV a transfer moves is synthetic, ``bytes_scale`` × its true size (a laptop can replay
    a 70B workload), checksummed and verified like real KV. The importing side keeps the
    decoded view until the request leaves, so the object stays pinned exactly that long.
    """

    def __init__(self, bytes_scale: float, seed: int) -> None:
        self.bytes_scale = bytes_scale
        self.seed = seed
        self._kv: dict[int, Any] = {}
        self._payloads: dict[int, pa.RecordBatch] = {}   # by size: the content is irrelevant, the bytes move

    def prefill(self, requests: list[dict[str, Any]]) -> tuple[Tokens, Margins]:
        return {}, {}

    def decode(self, joiners: list[int], steps: int) -> tuple[Tokens, Margins]:
        return {}, {}

    def rollback(self, steps: int) -> None:
        return None

    def export_kv(self, request_id: int, true_bytes: int) -> pa.RecordBatch:
        nbytes = max(1024, int(true_bytes * self.bytes_scale))
        nbytes -= nbytes % 1024                        # a few sizes, so payloads can be reused
        batch = self._payloads.get(nbytes)
        if batch is None:
            if len(self._payloads) > 64:
                self._payloads.clear()
            batch = self._payloads[nbytes] = make_synthetic_kv_batch(
                nbytes, block_bytes=min(nbytes, 1 << 20), seed=self.seed, request_id=0)
        return batch

    def import_kv(self, request_id: int, batch: pa.RecordBatch, last_token: int) -> int:
        decoded = decode_kv(batch, verify=True)
        self._kv[request_id] = decoded.blocks
        return int(decoded.blocks.nbytes)

    def forget(self, request_ids: list[int]) -> None:
        for rid in request_ids:
            self._kv.pop(rid, None)

    def held(self) -> int:
        return len(self._kv)

    def export_blocks(self, hashes: list[int], block_bytes: int) -> list[pa.RecordBatch]:
        """Synthetic blocks of ``bytes_scale`` × a block's true size (the bytes move; content is moot)."""
        return [self.export_kv(0, block_bytes) for _ in hashes]

    def import_blocks(self, hashes: list[int], batches: list[pa.RecordBatch]) -> int:
        """Verify the blocks read from the store (nothing computes from them here)."""
        return sum(int(decode_kv(batch, verify=True).blocks.nbytes) for batch in batches)


class NumpyBackend:
    """A deterministic tiny Llama that really computes prefill KV and decodes from the KV it is sent.

    Prompt ids derive from the request id and its prefix hashes (``prompt_token_ids``), so a
    prefix-cache hit reuses exactly the KV another request computed. The prefix cache here
    keeps every full hash block it computed (the model is tiny); the core decides which hits
    count, and a hit this cache cannot serve is an error, never a silent recompute.
    """

    def __init__(self, model: str, seed: int, block_size: int) -> None:
        self.lm = TinyLM(model, seed)
        self.model = model
        self.vocab = get_model(model).vocab_size
        self.seed = seed
        self.block_size = block_size
        self._kv: dict[int, np.ndarray] = {}
        self._last: dict[int, int] = {}
        self._running: list[int] = []
        self._prefix: dict[int, np.ndarray] = {}
        self._partial: dict[int, np.ndarray] = {}         # KV of chunked prefills under way
        self._undo: dict[int, tuple[int, int, list[int]]] = {}
        """Per running request, since the last ``decode`` call began: (KV length, last token,
        tokens made) — what ``rollback`` restores."""

    def prefill(self, requests: list[dict[str, Any]]) -> tuple[Tokens, Margins]:
        """Prefill whole prompts, or chunks ``[start, end)`` of them (chunked prefill).

        A chunk attends to the KV of every earlier chunk; only the last one yields a token.
        """
        tokens: Tokens = {}
        margins: Margins = {}
        for r in requests:
            rid, hashes, block = r["id"], r.get("hashes"), r.get("block", 512)
            given = r.get("tokens")     # a client's prompt (serving); else derived from the request
            ids = (np.asarray(given, dtype=np.int64) if given is not None
                   else prompt_token_ids(rid, r["prompt"], self.vocab, hashes, block, self.seed))
            ids = np.concatenate([ids, np.asarray(r["generated"], dtype=np.int64)])
            cached = r["cached"]
            end = r.get("end", len(ids))
            cached_kv = None
            if r.get("start", cached) > cached:          # a later chunk: continue the partial KV
                cached_kv = self._partial.pop(rid)
            elif cached:   # exactly the tokens the core counted as hits (may end inside a block)
                blocks = [self._prefix[h] for h in hashes[:-(-cached // block)]]
                cached_kv = np.concatenate(blocks, axis=2)[:, :, :cached]
            res = self.lm.prefill(ids[:end], cached_kv)
            if end < len(ids):
                self._partial[rid] = res.kv
                continue
            if hashes:
                for j, h in enumerate(hashes[:r["prompt"] // block]):
                    self._prefix.setdefault(h, res.kv[:, :, j * block:(j + 1) * block])
            self._kv[rid] = res.kv
            self._last[rid] = res.next_token
            tokens[rid] = [res.next_token]
            margins[rid] = res.margin
        return tokens, margins

    def decode(self, joiners: list[int], steps: int) -> tuple[Tokens, Margins]:
        self._running.extend(joiners)
        tokens: Tokens = {}
        margins: Margins = {}
        self._undo = {}
        for rid in self._running:
            kv = self._kv[rid]
            self._undo[rid] = (kv.shape[2], self._last[rid], [])
            if not steps:
                continue
            res = self.lm.decode(kv, self._last[rid], steps)
            self._kv[rid] = res.kv
            self._last[rid] = res.tokens[-1]
            self._undo[rid][2].extend(res.tokens)
            tokens[rid] = res.tokens
            margins[rid] = min(res.margins)
        return tokens, margins

    def rollback(self, steps: int) -> None:
        """Undo the last ``steps`` steps of the last ``decode`` call."""
        for rid, (length, last, made) in self._undo.items():
            keep = len(made) - steps
            if keep < 0 or rid not in self._kv:
                raise ValueError(f"cannot roll back {steps} steps of request {rid} (made {len(made)})")
            self._kv[rid] = self._kv[rid][:, :, :length + keep]
            self._last[rid] = made[keep - 1] if keep else last
            del made[keep:]

    def export_kv(self, request_id: int, true_bytes: int) -> pa.RecordBatch:
        return encode_kv(self._kv[request_id], model=self.model, dtype="float64",
                         block_size=self.block_size, request_id=request_id)

    def import_kv(self, request_id: int, batch: pa.RecordBatch, last_token: int) -> int:
        decoded = decode_kv(batch, verify=True)
        self._kv[request_id] = decoded.token_major()
        self._last[request_id] = last_token
        return int(decoded.blocks.nbytes)

    def export_blocks(self, hashes: list[int], block_bytes: int) -> list[pa.RecordBatch]:
        """Prefix blocks this backend computed (or read), one Arrow batch each, for the store."""
        return [encode_kv(self._prefix[h], model=self.model, dtype="float64", block_size=self._prefix[h].shape[2],
                          request_id=h) for h in hashes]

    def import_blocks(self, hashes: list[int], batches: list[pa.RecordBatch]) -> int:
        """Prefix blocks read from the store (checksums verified) join the prefix cache: a prefill
        the core counts as hitting them reuses them exactly."""
        moved = 0
        for h, batch in zip(hashes, batches):
            decoded = decode_kv(batch, verify=True)
            self._prefix[h] = decoded.token_major()
            moved += int(decoded.blocks.nbytes)
        return moved

    def forget(self, request_ids: list[int]) -> None:
        gone = set(request_ids)
        for rid in gone:
            self._kv.pop(rid, None)
            self._partial.pop(rid, None)
            self._last.pop(rid, None)
        self._running = [rid for rid in self._running if rid not in gone]

    def held(self) -> int:
        return len(self._kv)


def make_backend(kind: str, *, model: str, seed: int, bytes_scale: float, block_size: int) -> Backend:
    """A backend by name: ``modeled`` or ``numpy``."""
    if kind == "modeled":
        return ModeledBackend(bytes_scale, seed)
    if kind == "numpy":
        return NumpyBackend(model, seed, block_size)
    raise ValueError(f"unknown backend {kind!r} (modeled or numpy)")
