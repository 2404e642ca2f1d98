"""KV blocks as Arrow: bit-exact round trips, zero-copy decode, corruption always detected."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from hetero_sched.runtime.kvcodec import (
    METADATA_KEY, DecodedKV, KVCorruptionError, decode_kv, encode_kv, from_bfloat16_bits,
    from_ipc_buffer, make_synthetic_kv_batch, to_bfloat16_bits, to_ipc_buffer)

DTYPES = ["float64", "float32", "float16", "bfloat16"]


def _kv(num_tokens: int, *, layers: int = 2, heads: int = 2, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((layers, 2, num_tokens, heads, dim))


def _stored(kv: np.ndarray, dtype: str) -> np.ndarray:
    """What ``dtype`` storage holds for ``kv`` (bfloat16: bit patterns)."""
    return to_bfloat16_bits(kv) if dtype == "bfloat16" else kv.astype(dtype)


def _with_payload_bytes(batch: pa.RecordBatch, raw: bytes) -> pa.RecordBatch:
    """``batch`` with its payload values replaced by ``raw`` (same types, checksums, metadata)."""
    payload = batch.column("payload")
    value_type = payload.type.value_type
    flat = pa.Array.from_buffers(value_type, len(raw) * 8 // value_type.bit_width, [None, pa.py_buffer(raw)])
    storage = pa.FixedSizeListArray.from_arrays(flat, payload.type.storage_type.list_size)
    columns = [batch.column("block_index"), batch.column("checksum"),
               pa.ExtensionArray.from_storage(payload.type, storage)]
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def _with_metadata(batch: pa.RecordBatch, **changes: object) -> pa.RecordBatch:
    fields = json.loads(batch.schema.metadata[METADATA_KEY])
    fields.update(changes)
    fields = {k: v for k, v in fields.items() if v is not None}
    return batch.replace_schema_metadata({METADATA_KEY: json.dumps(fields).encode()})


def _payload_buffer(batch: pa.RecordBatch) -> pa.Buffer:
    return batch.column("payload").storage.flatten().buffers()[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,block_size", [(1, 16), (16, 16), (17, 16), (100, 7), (64, 64)])
def test_round_trip_is_bit_exact(dtype: str, num_tokens: int, block_size: int) -> None:
    kv = _kv(num_tokens)
    batch = encode_kv(kv, model="tiny", dtype=dtype, block_size=block_size, request_id=42)
    decoded = decode_kv(batch)
    assert batch.num_rows == -(-num_tokens // block_size)
    assert decoded.meta.num_tokens == num_tokens and decoded.meta.dtype == dtype
    assert decoded.meta.request_id == 42 and decoded.meta.model == "tiny"
    token_major = decoded.token_major()
    expected = _stored(kv, dtype)
    assert token_major.dtype == expected.dtype and token_major.shape == expected.shape
    assert token_major.tobytes() == expected.tobytes()          # bit-exact, NaN-safe
    padding = decoded.blocks[-1, :, :, num_tokens - (batch.num_rows - 1) * block_size:]
    assert not padding.any()


def test_bfloat16_widens_to_float32_on_request() -> None:
    kv = _kv(20)
    batch = encode_kv(kv, model="tiny", dtype="bf16", block_size=8, request_id=1)
    bits = decode_kv(batch).blocks
    assert bits.dtype == np.uint16
    wide = decode_kv(batch, widen=True)
    assert wide.blocks.dtype == np.float32
    assert np.array_equal(wide.token_major(), from_bfloat16_bits(to_bfloat16_bits(kv)))
    np.testing.assert_allclose(wide.token_major(), kv, rtol=2 ** -8)
    as_bits = encode_kv(to_bfloat16_bits(kv), model="tiny", dtype="bfloat16", block_size=8, request_id=1)
    assert np.array_equal(decode_kv(as_bits).blocks, bits)       # uint16 input is taken as bits


def test_bfloat16_rounds_to_nearest_even() -> None:
    one = np.float32(1.0)
    cases = [(one, 0x3F80), (one + np.float32(2 ** -8), 0x3F80),         # tie → even (down)
             (one + np.float32(3 * 2 ** -8), 0x3F82),                   # tie → even (up)
             (one + np.float32(2 ** -8 + 2 ** -20), 0x3F81),            # above the tie → up
             (np.float32(-2.0), 0xC000), (np.float32(np.inf), 0x7F80), (np.float32(-np.inf), 0xFF80),
             (np.finfo(np.float32).max, 0x7F80), (np.float32(0.0), 0x0000), (np.float32(-0.0), 0x8000)]
    got = to_bfloat16_bits(np.array([x for x, _ in cases], dtype=np.float32))
    assert [hex(g) for g in got] == [hex(bits) for _, bits in cases]
    nan = to_bfloat16_bits(np.array([np.nan, -np.nan, np.uint32(0x7F800001).view(np.float32)], dtype=np.float32))
    assert np.isnan(from_bfloat16_bits(nan)).all()
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 1e3
    rounded = from_bfloat16_bits(to_bfloat16_bits(x))
    bits = x.view(np.uint32)
    down = from_bfloat16_bits((bits >> 16).astype(np.uint16))
    up = from_bfloat16_bits(((bits >> 16) + 1).astype(np.uint16))
    err = np.abs(rounded.astype(np.float64) - x)
    assert (err <= np.minimum(np.abs(down.astype(np.float64) - x), np.abs(up.astype(np.float64) - x))).all()


def test_layer_and_block_ranges() -> None:
    kv = _kv(50, layers=4)
    batch = encode_kv(kv, model="tiny", dtype="float64", block_size=16, request_id=3,
                      layer_range=(1, 3), block_range=(1, 4))
    decoded = decode_kv(batch)
    assert decoded.blocks.shape == (3, 2, 2, 16, 2, 16)
    assert decoded.block_indices.tolist() == [1, 2, 3]
    assert (decoded.meta.layer_start, decoded.meta.layer_stop, decoded.meta.num_layers) == (1, 3, 4)
    assert (decoded.token_start, decoded.num_tokens) == (16, 34)
    assert np.array_equal(decoded.token_major(), kv[1:3, :, 16:50])
    middle = decode_kv(encode_kv(kv, model="tiny", dtype="float64", block_size=16, request_id=3,
                                 block_range=(1, 2)))
    assert np.array_equal(middle.token_major(), kv[:, :, 16:32])
    with pytest.raises(ValueError, match="layer_range"):
        encode_kv(kv, model="tiny", dtype="float64", block_size=16, request_id=3, layer_range=(2, 2))
    with pytest.raises(ValueError, match="block_range"):
        encode_kv(kv, model="tiny", dtype="float64", block_size=16, request_id=3, block_range=(0, 5))


def test_decode_is_zero_copy_on_the_arrow_buffer() -> None:
    batch = encode_kv(_kv(40), model="tiny", dtype="float32", block_size=16, request_id=9)
    decoded = decode_kv(batch)
    buffer = _payload_buffer(batch)
    assert decoded.blocks.__array_interface__["data"][0] == buffer.address
    base = decoded.blocks
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, pa.Buffer) and base.address == buffer.address  # chain ends at Arrow memory
    assert not decoded.blocks.flags.writeable
    sliced = decode_kv(batch.slice(1, 2))                        # an offset into the same buffer
    assert sliced.blocks.__array_interface__["data"][0] == buffer.address + decoded.meta.block_bytes
    assert np.shares_memory(sliced.blocks, decoded.blocks)
    assert sliced.block_indices.tolist() == [1, 2]


def test_ipc_and_pickle5_keep_the_payload_out_of_band_and_uncopied() -> None:
    batch = make_synthetic_kv_batch(1 << 20, block_bytes=1 << 16, seed=1)
    payload = _payload_buffer(batch)
    ipc = to_ipc_buffer(batch)
    decoded = decode_kv(from_ipc_buffer(ipc))
    start = decoded.blocks.__array_interface__["data"][0]
    assert ipc.address <= start and start + decoded.blocks.nbytes <= ipc.address + ipc.size
    import ray.cloudpickle  # what ray.put uses; no Ray cluster is started
    buffers: list[pickle.PickleBuffer] = []
    data = ray.cloudpickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    assert len(data) < 10_000 and sum(b.raw().nbytes for b in buffers) >= payload.size
    restored = decode_kv(ray.cloudpickle.loads(data, buffers=buffers))
    assert restored.blocks.__array_interface__["data"][0] == payload.address
    assert np.array_equal(restored.blocks, decode_kv(batch).blocks)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_single_bit_flip_in_the_payload_is_detected(dtype: str) -> None:
    kv = _kv(10, layers=2, heads=1, dim=4)
    batch = encode_kv(kv, model="tiny", dtype=dtype, block_size=4, request_id=5)
    raw = _payload_buffer(batch).to_pybytes()
    block_bytes = decode_kv(batch).meta.block_bytes
    assert len(raw) == 3 * block_bytes                           # padding bytes included
    for byte in range(len(raw)):
        for bit in range(8):
            corrupt = bytearray(raw)
            corrupt[byte] ^= 1 << bit
            with pytest.raises(KVCorruptionError, match=rf"request 5: block {byte // block_bytes} is corrupt"):
                decode_kv(_with_payload_bytes(batch, bytes(corrupt)))
    decode_kv(_with_payload_bytes(batch, raw))                   # the helper itself is faithful


def test_flips_in_the_index_and_checksum_columns_are_detected() -> None:
    batch = encode_kv(_kv(40), model="tiny", dtype="float32", block_size=16, request_id=5)
    indices = batch.column("block_index").to_numpy()
    sums = batch.column("checksum").to_numpy()
    for row in range(batch.num_rows):
        for bit in (0, 3, 31):
            bad_index = indices.copy()
            bad_index[row] ^= np.int32(1 << bit) if bit < 31 else np.int32(-2 ** 31)
            bad_sum = sums.copy()
            bad_sum[row] ^= np.uint32(1 << bit)
            for column, values in (("block_index", bad_index), ("checksum", bad_sum)):
                arrays = [pa.array(values) if name == column else batch.column(name) for name in batch.schema.names]
                with pytest.raises(KVCorruptionError, match="request 5"):
                    decode_kv(pa.RecordBatch.from_arrays(arrays, schema=batch.schema))


def test_verify_false_skips_only_the_checksums() -> None:
    batch = encode_kv(_kv(20), model="tiny", dtype="float64", block_size=16, request_id=5)
    corrupt = bytearray(_payload_buffer(batch).to_pybytes())
    corrupt[0] ^= 1
    decode_kv(_with_payload_bytes(batch, bytes(corrupt)), verify=False)
    with pytest.raises(KVCorruptionError, match="unknown format_version"):
        decode_kv(_with_metadata(batch, format_version=2), verify=False)


@pytest.mark.parametrize("changes,message", [
    ({"format_version": 99}, "unknown format_version 99"),
    ({"format_version": None}, "unknown format_version None"),
    ({"block_size": 8}, "column payload is"),                  # payload shape disagrees
    ({"head_dim": "16"}, "head_dim='16' is not int"),
    ({"kv_heads": None}, r"missing \['kv_heads'\]"),
    ({"extra": 1}, r"unknown \['extra'\]"),
    ({"dtype": "float8"}, "dtype 'float8'"),
    ({"dtype": "float32"}, "column payload is"),               # value type disagrees
    ({"num_tokens": 10}, "2 blocks but 10 tokens fill only 1"),
    ({"layer_stop": 3}, r"layer range \[0, 3\) is not within 2 layers"),
    ({"checksum": "md5"}, "checksum 'md5'"),
])
def test_bad_metadata_is_a_clear_error(changes: dict, message: str) -> None:
    batch = encode_kv(_kv(20), model="tiny", dtype="float64", block_size=16, request_id=8)
    with pytest.raises(KVCorruptionError, match=message) as info:
        decode_kv(_with_metadata(batch, **changes))
    assert "\n" not in str(info.value)


def test_missing_or_garbled_metadata_and_wrong_columns() -> None:
    batch = encode_kv(_kv(20), model="tiny", dtype="float64", block_size=16, request_id=8)
    with pytest.raises(KVCorruptionError, match="no 'hetero_sched.kv' schema metadata"):
        decode_kv(batch.replace_schema_metadata(None))
    with pytest.raises(KVCorruptionError, match="not valid JSON"):
        decode_kv(batch.replace_schema_metadata({METADATA_KEY: b"{oops"}))
    with pytest.raises(KVCorruptionError, match="not a JSON object"):
        decode_kv(batch.replace_schema_metadata({METADATA_KEY: b"[1]"}))
    renamed = batch.rename_columns(["block_index", "crc", "payload"]).replace_schema_metadata(batch.schema.metadata)
    with pytest.raises(KVCorruptionError, match="columns"):
        decode_kv(renamed)
    with_nulls = pa.RecordBatch.from_arrays(
        [pa.array([0, None], pa.int32()), batch.column("checksum"), batch.column("payload")],
        schema=batch.schema.remove(0).insert(0, pa.field("block_index", pa.int32())))
    with pytest.raises(KVCorruptionError, match="nulls"):
        decode_kv(with_nulls)
    with pytest.raises(KVCorruptionError, match="not a valid Arrow stream"):
        from_ipc_buffer(pa.py_buffer(b"\x00" * 64 + b"garbage"))


def test_synthetic_batch_has_about_the_asked_bytes_and_is_checked() -> None:
    batch = make_synthetic_kv_batch(3_000_000, block_bytes=1 << 18, seed=7)
    decoded = decode_kv(batch)
    assert isinstance(decoded, DecodedKV) and decoded.meta.dtype == "bfloat16"
    assert 3_000_000 <= decoded.blocks.nbytes < 3_000_000 + decoded.meta.block_bytes
    assert decoded.meta.block_bytes == 1 << 18
    assert np.array_equal(decode_kv(make_synthetic_kv_batch(3_000_000, block_bytes=1 << 18, seed=7)).blocks,
                          decoded.blocks)
    corrupt = bytearray(_payload_buffer(batch).to_pybytes())
    corrupt[5 * (1 << 18) + 123] ^= 0x10
    with pytest.raises(KVCorruptionError, match="block 5 is corrupt"):
        decode_kv(_with_payload_bytes(batch, bytes(corrupt)))


def test_encode_rejects_what_it_cannot_represent() -> None:
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        encode_kv(_kv(4), model="tiny", dtype="int8", block_size=4, request_id=0)
    with pytest.raises(ValueError, match="bfloat16 bit patterns"):
        encode_kv(np.zeros((1, 2, 4, 1, 4), np.uint16), model="tiny", dtype="float16", block_size=4, request_id=0)
    with pytest.raises(ValueError, match="num_layers, 2"):
        encode_kv(np.zeros((2, 3, 4, 1, 4)), model="tiny", dtype="float32", block_size=4, request_id=0)
