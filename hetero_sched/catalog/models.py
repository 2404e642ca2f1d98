"""Model architectures: what sets weight bytes, KV bytes per token and FLOPs per token.

Parameter counts are computed from the architecture (and checked against the published totals
in the tests), so an override of ``num_layers`` or ``hidden_size`` moves every derived number.
Mixture-of-experts models distinguish total parameters (memory) from active ones (compute and
per-token weight reads). The catalog's models are data (``hetero_sched/data/catalog/*.yaml``).
"""

from __future__ import annotations

import math
from functools import cached_property
from dataclasses import dataclass, field, fields
from typing import Mapping

from hetero_sched.catalog.sources import Source
from hetero_sched.errors import UserError

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5}
"""Bytes per element of each supported storage dtype."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (Llama-style GQA attention; dense SwiGLU or MoE SwiGLU MLP)."""

    name: str
    hf_id: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    """MLP intermediate size (per expert for MoE)."""
    vocab_size: int
    num_experts: int = 1
    experts_per_token: int = 1
    shared_experts: int = 0
    """MoE experts every token uses besides the routed ones (Llama 4's shared expert)."""
    mlp_projections: int = 3
    """Weight matrices per MLP: 3 for SwiGLU (gate, up, down), 2 for a GELU/ReLU MLP (OPT)."""
    tied_embeddings: bool = False
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    published_params: float = 0.0
    """The model card's total parameter count, for checking the computed one."""
    max_context_tokens: int = field(kw_only=True)
    """The context window: prompt plus output tokens one request may hold (the checkpoint's
    ``max_position_embeddings``). A longer request is rejected at arrival, as vLLM does."""
    sources: Mapping[str, Source] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for dtype in (self.weight_dtype, self.kv_dtype):
            if dtype not in DTYPE_BYTES:
                raise UserError(f"model {self.name}: unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"model {self.name}: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @cached_property
    def attn_params_per_layer(self) -> int:
        """Q, K, V and O projections of one layer."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv)

    @cached_property
    def expert_params(self) -> int:
        """One MLP (one expert): gate, up and down projections (SwiGLU), or up and down."""
        return self.mlp_projections * self.hidden_size * self.ffn_size

    @cached_property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (counted once if tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @cached_property
    def total_params(self) -> int:
        """Every weight held in memory."""
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        experts = self.num_experts + self.shared_experts
        per_layer = self.attn_params_per_layer + experts * self.expert_params + router
        return self.num_layers * per_layer + self.embedding_params

    @cached_property
    def active_params(self) -> int:
        """Weights one token multiplies with (no embedding lookup; the LM head counts)."""
        per_layer = self.attn_params_per_layer + (self.experts_per_token + self.shared_experts) * self.expert_params
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size

    @cached_property
    def weight_bytes(self) -> float:
        """Bytes of all weights at ``weight_dtype``."""
        return self.total_params * DTYPE_BYTES[self.weight_dtype]

    def weight_bytes_read(self, num_tokens: float) -> float:
        """Weight bytes one forward pass over ``num_tokens`` tokens reads.

        Dense: every matmul weight once. MoE: shared weights plus the experts the tokens touch,
        ``E·(1 − (1 − k/E)^n)`` per layer in expectation for uniform routing.
        """
        if self.num_experts == 1:
            return self._dense_bytes_read
        shared = (self.num_layers * (self.attn_params_per_layer + self.shared_experts * self.expert_params)
                  + self.vocab_size * self.hidden_size)
        frac = self.experts_per_token / self.num_experts
        experts = self.num_experts * (1.0 - (1.0 - frac) ** max(num_tokens, 1.0))
        return (shared + self.num_layers * experts * self.expert_params) * DTYPE_BYTES[self.weight_dtype]

    @cached_property
    def _dense_bytes_read(self) -> float:
        shared = self.num_layers * self.attn_params_per_layer + self.vocab_size * self.hidden_size
        return (shared + self.num_layers * self.expert_params) * DTYPE_BYTES[self.weight_dtype]

    def kv_bytes_per_token(self, dtype: str | None = None) -> float:
        """Unique K and V bytes of one token over all layers: ``2·L·kv_heads·head_dim·bytes``."""
        nbytes = DTYPE_BYTES[dtype or self.kv_dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * nbytes

    @cached_property
    def flops_per_token(self) -> float:
        """Matmul FLOPs of one token with no context: ``2 × active params``."""
        return 2.0 * self.active_params

    @cached_property
    def attn_flops_per_context_token(self) -> float:
        """Extra FLOPs per token per token attended (QKᵀ and AV, all layers): ``4·L·heads·head_dim``."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim

    def num_devices_for(self, memory_bytes: float, reserve_fraction: float) -> int:
        """Fewest devices of ``memory_bytes`` each whose usable memory holds the weights."""
        return max(1, math.ceil(self.weight_bytes / (memory_bytes * (1.0 - reserve_fraction)) + 1e-9))


INT_FIELDS = tuple(f.name for f in fields(ModelSpec) if f.type == "int")
"""Model fields an experiment may override with an integer (``model.<name>.<field>``)."""
STR_FIELDS = ("weight_dtype", "kv_dtype")

