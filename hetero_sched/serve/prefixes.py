"""Prefix hashes of a served prompt, so that prefix caching works for live requests as it does
for traces that carry hashes (Mooncake's): the groups' prefix caches, the KV tiers and store, and
prefix-aware policies (``disagg-prefix``) all key on them.

Block ``j``'s hash covers the prompt's first ``(j + 1) × block_tokens`` token ids (a chain: each
block's digest starts from the previous one's), so two prompts share it exactly when they share
every token up to the block's end -- the condition for the block's KV to be the same (attention
is causal). Only full blocks are hashed, as vLLM's automatic prefix caching does. blake2b, not
``hash()``: the same prompt gets the same hashes in every process and run.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

DEFAULT_BLOCK_TOKENS = 16
"""Tokens per hashed block when serving (vLLM's KV block, at which it caches prefixes)."""


def prompt_prefix_hashes(token_ids: Sequence[int], block_tokens: int) -> tuple[int, ...]:
    """The chained hashes of ``token_ids``' full blocks of ``block_tokens`` (non-negative, 63 bits)."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be at least 1 (got {block_tokens})")
    ids = np.asarray(token_ids, dtype="<i8")
    hashes = []
    digest = b""
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        h = hashlib.blake2b(digest, digest_size=8)
        h.update(ids[start:start + block_tokens].tobytes())
        digest = h.digest()
        hashes.append(int.from_bytes(digest, "little") >> 1)
    return tuple(hashes)
