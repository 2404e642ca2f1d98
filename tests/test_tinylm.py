"""The numpy tiny Llama: deterministic, a real Llama, and bit-identical however work is split."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_sched.runtime.kvcodec import decode_kv, encode_kv
from hetero_sched.tinylm import TinyLM, TinyWeights, prompt_token_ids

VOCAB = 256


@pytest.fixture(scope="module")
def model() -> TinyLM:
    return TinyLM("tiny", seed=0)


def _textbook_logits(w: TinyWeights, num_heads: int, num_kv_heads: int, tokens: np.ndarray) -> np.ndarray:
    """A plain Llama forward pass with matmuls and an explicit causal mask (no KV cache)."""
    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * g

    n = len(tokens)
    head_dim = w.layers[0].wq.shape[1] // num_heads
    half = head_dim // 2
    angles = np.arange(n)[:, None] * 10000.0 ** (-np.arange(half) / half)
    cos, sin = np.tile(np.cos(angles), 2)[:, None], np.tile(np.sin(angles), 2)[:, None]

    def rope(x: np.ndarray) -> np.ndarray:
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin

    mask = np.triu(np.full((n, n), -np.inf), k=1)
    x = w.embed[tokens]
    for layer in w.layers:
        h = rms(x, layer.attn_norm)
        q = rope((h @ layer.wq).reshape(n, num_heads, head_dim))
        k = rope((h @ layer.wk).reshape(n, num_kv_heads, head_dim))
        v = (h @ layer.wv).reshape(n, num_kv_heads, head_dim)
        heads = []
        for head in range(num_heads):
            kv_head = head // (num_heads // num_kv_heads)
            scores = q[:, head] @ k[:, kv_head].T / np.sqrt(head_dim) + mask
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            heads.append(p / p.sum(axis=1, keepdims=True) @ v[:, kv_head])
        x = x + np.concatenate(heads, axis=1) @ layer.wo
        h = rms(x, layer.mlp_norm)
        gate = h @ layer.w_gate
        x = x + (gate / (1 + np.exp(-gate)) * (h @ layer.w_up)) @ layer.w_down
    return rms(x, w.final_norm) @ w.lm_head


def test_same_seed_same_tokens_other_seed_other_model(model: TinyLM) -> None:
    prompt = prompt_token_ids(3, 40, VOCAB)
    again = TinyLM("tiny", seed=0)
    assert model.generate(prompt, 12) == again.generate(prompt, 12)
    assert np.array_equal(model.prefill(prompt).kv, again.prefill(prompt).kv)
    other = TinyLM("tiny", seed=1)
    assert not np.array_equal(model.prefill(prompt).kv, other.prefill(prompt).kv)


def test_shapes_follow_the_catalog_model(model: TinyLM) -> None:
    s = model.spec
    result = model.prefill(prompt_token_ids(0, 21, VOCAB))
    assert result.kv.shape == (s.num_layers, 2, 21, s.num_kv_heads, s.head_dim) == model.kv_shape(21)
    assert result.kv.dtype == np.float64
    assert model.weights.lm_head.shape == (s.hidden_size, s.vocab_size)


def test_is_a_textbook_llama(model: TinyLM) -> None:
    tokens = prompt_token_ids(5, 30, VOCAB)
    expected = _textbook_logits(model.weights, model.spec.num_heads, model.spec.num_kv_heads, tokens)
    np.testing.assert_allclose(model.logits(tokens), expected, rtol=0, atol=1e-10)


def test_prefill_then_decode_equals_a_single_pass(model: TinyLM) -> None:
    prompt = prompt_token_ids(9, 57, VOCAB)
    first = model.prefill(prompt)
    rest = model.decode(first.kv, first.next_token, 15)
    tokens = [first.next_token, *rest.tokens]
    sequence = np.concatenate([prompt, tokens[:-1]])
    logits = model.logits(sequence)[len(prompt) - 1:]   # teacher forcing = greedy replay
    assert logits.argmax(axis=1).tolist() == tokens
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert [first.margin, *rest.margins] == (top2[:, 1] - top2[:, 0]).tolist()  # bit-exact
    assert np.array_equal(rest.kv, model.prefill(sequence).kv)
    assert model.generate(prompt, 16) == (tokens, min([first.margin, *rest.margins]))


def test_prefix_cache_hit_from_another_request_is_bit_identical(model: TinyLM) -> None:
    hashes = [101, 202]
    donor = prompt_token_ids(1, 150, VOCAB, prefix_hashes=hashes, block_tokens=32)
    prompt = prompt_token_ids(2, 80, VOCAB, prefix_hashes=hashes + [303], block_tokens=32)
    assert np.array_equal(donor[:64], prompt[:64]) and not np.array_equal(donor[64:80], prompt[64:])
    donor_kv = model.prefill(donor).kv
    full = model.prefill(prompt)
    for hit in (1, 32, 64):
        cached = model.prefill(prompt, cached_kv=donor_kv[:, :, :hit])
        assert np.array_equal(cached.kv, full.kv), hit
        assert (cached.next_token, cached.margin) == (full.next_token, full.margin)
    whole = model.prefill(prompt, cached_kv=full.kv)   # a full hit recomputes the last token
    assert np.array_equal(whole.kv, full.kv) and whole.next_token == full.next_token


def test_results_do_not_depend_on_the_batch(model: TinyLM) -> None:
    prompts = [prompt_token_ids(r, n, VOCAB) for r, n in [(1, 20), (2, 90), (3, 7)]]
    alone = model.prefill(prompts[1])
    for batch in (prompts, prompts[::-1], [prompts[1]] * 2):
        results = model.prefill_batch(batch)
        match = [r for p, r in zip(batch, results) if p is prompts[1]]
        assert match and all(np.array_equal(r.kv, alone.kv) and r.margin == alone.margin for r in match)
    decoded = model.decode_batch([alone.kv, model.prefill(prompts[0]).kv], [alone.next_token, 5], [6, 3])
    single = model.decode(alone.kv, alone.next_token, 6)
    assert decoded[0].tokens == single.tokens and np.array_equal(decoded[0].kv, single.kv)


def test_margins_are_reported_per_token(model: TinyLM) -> None:
    prompt = prompt_token_ids(4, 33, VOCAB)
    first = model.prefill(prompt)
    rest = model.decode(first.kv, first.next_token, 8)
    assert len(rest.margins) == len(rest.tokens) == 8
    assert all(m > 0 for m in [first.margin, *rest.margins])
    logits = model.logits(prompt)[-1]
    assert first.margin == pytest.approx(np.sort(logits)[-1] - np.sort(logits)[-2], abs=0)


def test_decode_leaves_its_input_alone_and_grows_kv(model: TinyLM) -> None:
    first = model.prefill(prompt_token_ids(6, 10, VOCAB))
    before = first.kv.copy()
    out = model.decode(first.kv, first.next_token, 4)
    assert out.kv.shape[2] == 14 and np.array_equal(out.kv[:, :, :10], before)
    assert np.array_equal(first.kv, before)
    assert model.decode(first.kv, first.next_token, 0).tokens == []


def test_bad_inputs_are_rejected(model: TinyLM) -> None:
    with pytest.raises(ValueError, match="token ids"):
        model.prefill(np.array([0, VOCAB]))
    with pytest.raises(ValueError, match="at least one"):
        model.prefill(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="cached_kv has shape"):
        model.prefill(np.array([1, 2, 3]), cached_kv=np.zeros((2, 2, 2, 3, 16)))
    with pytest.raises(ValueError, match="kv has shape"):
        model.decode(np.zeros((1, 2, 2, 2, 16)), 0, 1)
    with pytest.raises(ValueError, match="widen bfloat16"):
        model.decode(np.zeros((2, 2, 2, 2, 16), np.uint16), 0, 1)


def test_prompt_token_ids_share_exactly_the_hashed_blocks() -> None:
    a = prompt_token_ids(1, 100, VOCAB, prefix_hashes=[7, 8], block_tokens=40)
    b = prompt_token_ids(2, 100, VOCAB, prefix_hashes=[7, 9], block_tokens=40)
    assert a.dtype == np.int64 and len(a) == 100 and 0 <= a.min() and a.max() < VOCAB
    assert np.array_equal(a[:40], b[:40]) and not np.array_equal(a[40:80], b[40:80])
    assert np.array_equal(a, prompt_token_ids(1, 100, VOCAB, prefix_hashes=[7, 8], block_tokens=40))
    short = prompt_token_ids(3, 50, VOCAB, prefix_hashes=[7, 8], block_tokens=40)
    assert np.array_equal(short, a[:50])   # a partial hashed block is a prefix of the full one
    assert not np.array_equal(prompt_token_ids(1, 60, VOCAB), prompt_token_ids(2, 60, VOCAB))
    assert not np.array_equal(prompt_token_ids(1, 60, VOCAB, seed=1), prompt_token_ids(1, 60, VOCAB))


def test_fifty_requests_through_the_arrow_codec_decode_to_the_reference(model: TinyLM) -> None:
    """What the live runtime does (prefill here, KV as Arrow, decode there), without Ray."""
    rng = np.random.default_rng(0)
    min_margin = np.inf
    prefix_cache: dict[int, np.ndarray] = {}
    for request_id in range(50):
        prefix_hash = request_id % 3
        prompt = prompt_token_ids(request_id, int(rng.integers(16, 201)), VOCAB,
                                  prefix_hashes=[prefix_hash], block_tokens=16)
        num_output = int(rng.integers(4, 33))
        expected, margin = model.generate(prompt, num_output)
        first = model.prefill(prompt, cached_kv=prefix_cache.get(prefix_hash))
        prefix_cache.setdefault(prefix_hash, first.kv[:, :, :16])
        batch = encode_kv(first.kv, model="tiny", dtype="float64", block_size=16, request_id=request_id)
        kv = decode_kv(batch).token_major()
        rest = model.decode(kv, first.next_token, num_output - 1)
        assert [first.next_token, *rest.tokens] == expected, request_id
        min_margin = min(min_margin, margin)
    assert min_margin > 1e-9   # ties cannot be what makes this pass
