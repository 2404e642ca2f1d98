"""KV blocks as Arrow: a request's paged KV cache ⇄ one ``pyarrow.RecordBatch``.

One row per block; a block holds ``block_size`` tokens of K and V for the encoded layers. The
last block is zero-padded; the true token count is in the metadata. Columns:

- ``block_index`` int32: the block's index in the request (rows are consecutive blocks);
- ``checksum`` uint32: crc32c (``google_crc32c``) of the block's index (int32 little-endian)
  followed by its payload bytes, padding included — a block moved to another index fails too;
- ``payload``: Arrow's canonical fixed-shape tensor extension type, per-block shape
  ``[layers, 2, block_size, kv_heads, head_dim]`` (2 = K, V). bfloat16, which Arrow lacks, is
  stored as uint16 bit patterns with ``"dtype": "bfloat16"`` in the metadata.

Schema metadata: key ``b"hetero_sched.kv"`` → UTF-8 JSON (readable by any Arrow tool)::

    {"format_version": 1, "model": "tiny", "dtype": "float64", "block_size": 16,
     "num_layers": 2, "layer_start": 0, "layer_stop": 2, "kv_heads": 2, "head_dim": 16,
     "num_tokens": 100, "request_id": 7, "checksum": "crc32c"}

Key ``b"hetero_sched.kv.crc32c"`` → 8 hex digits, the crc32c of that JSON: a damaged request
id or token count is caught like a damaged block, not decoded as some other request's KV.

``num_layers`` is the model's; the payload holds layers ``[layer_start, layer_stop)``.
``num_tokens`` is the whole request's; a batch may hold a slice of its blocks.

Decoding is zero-copy: :func:`decode_kv` returns a read-only, block-major numpy view
``[num_blocks, layers, 2, block_size, kv_heads, head_dim]`` on the payload's Arrow buffer
(token-major needs a transpose, so :meth:`DecodedKV.token_major` is a copy the consumer opts
into). Anything inconsistent — a checksum, the metadata, a shape — raises
:class:`KVCorruptionError`; bad KV is never returned silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import google_crc32c
import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
METADATA_KEY = b"hetero_sched.kv"
HEADER_CHECKSUM_KEY = b"hetero_sched.kv.crc32c"
CHECKSUM = "crc32c"

_DTYPES: dict[str, tuple[type, pa.DataType]] = {
    "float64": (np.float64, pa.float64()),
    "float32": (np.float32, pa.float32()),
    "float16": (np.float16, pa.float16()),
    "bfloat16": (np.uint16, pa.uint16()),  # bit patterns; Arrow has no bfloat16
}
_DTYPE_ALIASES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_SYNTHETIC_KV_HEADS = 8
_SYNTHETIC_HEAD_DIM = 128


class KVCorruptionError(Exception):
    """A KV batch failed a check (checksum, metadata, shape): its KV must not be used."""


@dataclass(frozen=True)
class KVMeta:
    """What a KV batch's schema metadata states (see the module doc for the wire format)."""

    format_version: int
    model: str
    dtype: str
    block_size: int
    num_layers: int
    layer_start: int
    layer_stop: int
    kv_heads: int
    head_dim: int
    num_tokens: int
    request_id: int
    checksum: str = CHECKSUM

    @property
    def num_blocks(self) -> int:
        """Blocks of the whole request (the last one may be partial)."""
        return math.ceil(self.num_tokens / self.block_size)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Per-block payload shape ``[layers, 2, block_size, kv_heads, head_dim]``."""
        return (self.layer_stop - self.layer_start, 2, self.block_size, self.kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Payload bytes of one block."""
        return math.prod(self.block_shape) * np.dtype(_DTYPES[self.dtype][0]).itemsize

    def to_dict(self) -> dict[str, Any]:
        """The metadata as plain fields."""
        return asdict(self)


@dataclass(frozen=True)
class DecodedKV:
    """A decoded KV batch: zero-copy block-major view, block indices and metadata."""

    blocks: np.ndarray
    """``[num_blocks, layers, 2, block_size, kv_heads, head_dim]``, read-only view on Arrow memory
    (uint16 bit patterns for bfloat16 unless decoded with ``widen=True``)."""
    block_indices: np.ndarray
    meta: KVMeta

    @property
    def token_start(self) -> int:
        """Position of the first token in these blocks."""
        return int(self.block_indices[0]) * self.meta.block_size if len(self.block_indices) else 0

    @property
    def num_tokens(self) -> int:
        """Valid (unpadded) tokens in these blocks."""
        end = min(self.token_start + len(self.block_indices) * self.meta.block_size, self.meta.num_tokens)
        return max(0, end - self.token_start)

    def token_major(self) -> np.ndarray:
        """A new array ``[layers, 2, num_tokens, kv_heads, head_dim]`` without the padding (a copy)."""
        layers, _, block_size, heads, dim = self.blocks.shape[1:]
        num_tokens = self.num_tokens
        out = np.empty((layers, 2, num_tokens, heads, dim), dtype=self.blocks.dtype)
        full, rest = divmod(num_tokens, block_size)
        out[:, :, :full * block_size].reshape(layers, 2, full, block_size, heads, dim)[...] = \
            self.blocks[:full].transpose(1, 2, 0, 3, 4, 5)
        if rest:
            out[:, :, full * block_size:] = self.blocks[full, :, :, :rest]
        return out


def canonical_dtype(dtype: str) -> str:
    """``float64``/``float32``/``float16``/``bfloat16`` (also the catalog's ``fp32``, ``bf16``…)."""
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in _DTYPES:
        raise ValueError(f"unsupported KV dtype {dtype!r}; supported: {', '.join(_DTYPES)}")
    return name


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of ``x``, rounded to nearest even; NaN stays a quiet NaN.

    Non-float32 input is first converted to float32 (so float64 is rounded twice).
    """
    values = np.asarray(x, dtype=np.float32)
    bits = values.view(np.uint32)
    work = bits >> 16           # in place from here: one scratch array, not five
    work &= np.uint32(1)
    work += np.uint32(0x7FFF)
    work += bits                # wraps only for negative NaNs, which are fixed below
    work >>= 16
    rounded = work.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode_kv(kv: np.ndarray, *, model: str, dtype: str, block_size: int, request_id: int,
              layer_range: Optional[tuple[int, int]] = None,
              block_range: Optional[tuple[int, int]] = None) -> pa.RecordBatch:
    """Encode a request's KV ``[num_layers, 2, num_tokens, kv_heads, head_dim]`` as Arrow blocks.

    ``layer_range`` ``(start, stop)`` encodes only those layers; ``block_range`` only those
    blocks (absolute indices). Values are converted to ``dtype``; uint16 input is taken as
    bfloat16 bit patterns. The one copy is the token-major → block-major transpose.
    """
    name = canonical_dtype(dtype)
    kv = np.asarray(kv)
    if kv.ndim != 5 or kv.shape[1] != 2:
        raise ValueError(f"KV must be [num_layers, 2, num_tokens, kv_heads, head_dim], got shape {kv.shape}")
    if kv.dtype == np.uint16 and name != "bfloat16":
        raise ValueError(f"uint16 KV is read as bfloat16 bit patterns; cannot encode it as {name}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_layers, _, num_tokens, kv_heads, head_dim = kv.shape
    layer_start, layer_stop = layer_range if layer_range is not None else (0, num_layers)
    if not 0 <= layer_start < layer_stop <= num_layers:
        raise ValueError(f"layer_range {layer_range} is not within the KV's {num_layers} layers")
    meta = KVMeta(format_version=FORMAT_VERSION, model=model, dtype=name, block_size=block_size,
                  num_layers=num_layers, layer_start=layer_start, layer_stop=layer_stop,
                  kv_heads=kv_heads, head_dim=head_dim, num_tokens=num_tokens, request_id=request_id)
    first, stop = block_range if block_range is not None else (0, meta.num_blocks)
    if not 0 <= first <= stop <= meta.num_blocks:
        raise ValueError(f"block_range {block_range} is not within the request's {meta.num_blocks} blocks")
    token_start, token_stop = first * block_size, min(stop * block_size, num_tokens)
    source = kv[layer_start:layer_stop, :, token_start:token_stop]
    if name == "bfloat16" and source.dtype != np.uint16:
        source = to_bfloat16_bits(source)
    blocks: np.ndarray = np.empty((stop - first, *meta.block_shape), dtype=_DTYPES[name][0])
    full, rest = divmod(token_stop - token_start, block_size)
    layers = layer_stop - layer_start
    blocks[:full] = source[:, :, :full * block_size].reshape(
        layers, 2, full, block_size, kv_heads, head_dim).transpose(2, 0, 1, 3, 4, 5)
    if rest:
        blocks[full, :, :, :rest] = source[:, :, full * block_size:]
        blocks[full, :, :, rest:] = 0
    return _batch_from_blocks(blocks, np.arange(first, stop, dtype=np.int32), meta)


def decode_kv(batch: pa.RecordBatch, *, verify: bool = True, widen: bool = False) -> DecodedKV:
    """Decode a KV batch to a zero-copy block-major view, checking metadata, shapes and checksums.

    ``verify=False`` skips the checksums (not the structural checks). ``widen=True`` turns
    bfloat16 bit patterns into float32 (a copy); other dtypes are returned as stored.
    """
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"decode_kv takes a pyarrow.RecordBatch, got {type(batch).__name__}")
    meta = _read_meta(batch.schema.metadata, batch.num_rows)
    where = f"KV batch of request {meta.request_id}"
    value_type = _DTYPES[meta.dtype][1]
    expected = {"block_index": pa.int32(), "checksum": pa.uint32(),
                "payload": pa.fixed_shape_tensor(value_type, list(meta.block_shape))}
    try:
        names = batch.schema.names
    except UnicodeDecodeError as error:  # a damaged field name
        raise KVCorruptionError(f"{where}: column names are not UTF-8") from error
    if names != list(expected):
        raise KVCorruptionError(f"{where}: columns {names}, expected {list(expected)}")
    for column_name, column_type in expected.items():
        column = batch.column(column_name)
        if column.type != column_type:
            raise KVCorruptionError(f"{where}: column {column_name} is {column.type}, expected {column_type}")
        if column.null_count:
            raise KVCorruptionError(f"{where}: column {column_name} has {column.null_count} nulls")
    indices = batch.column("block_index").to_numpy(zero_copy_only=True)
    if len(indices) and (indices[0] < 0 or indices[-1] >= meta.num_blocks
                         or not np.array_equal(indices, np.arange(indices[0], indices[0] + len(indices)))):
        raise KVCorruptionError(f"{where}: block indices {indices[:8].tolist()}… are not consecutive "
                                f"blocks within the request's {meta.num_blocks}")
    values = batch.column("payload").storage.flatten()
    itemsize = value_type.bit_width // 8
    data = values.buffers()[1]
    count = batch.num_rows * math.prod(meta.block_shape)
    offset = values.offset * itemsize
    if count and (data is None or data.size < offset + count * itemsize):
        raise KVCorruptionError(f"{where}: payload buffer holds fewer than {count} values")
    if verify:
        _verify_header(batch.schema.metadata, where)
        expected_sums = batch.column("checksum").to_numpy(zero_copy_only=True)
        for row in range(batch.num_rows):
            actual = _block_checksum(int(indices[row]), data.slice(offset + row * meta.block_bytes, meta.block_bytes))
            if actual != expected_sums[row]:
                raise KVCorruptionError(
                    f"{where}: block {indices[row]} is corrupt: crc32c {actual:#010x}, expected {int(expected_sums[row]):#010x}")
    np_dtype = _DTYPES[meta.dtype][0]
    flat: np.ndarray = np.frombuffer(data, dtype=np_dtype, count=count, offset=offset) if count else np.empty(0, np_dtype)
    blocks = flat.reshape(batch.num_rows, *meta.block_shape)
    blocks.flags.writeable = False
    if widen and meta.dtype == "bfloat16":
        blocks = from_bfloat16_bits(blocks)
    return DecodedKV(blocks=blocks, block_indices=indices, meta=meta)


def make_synthetic_kv_batch(num_bytes: int, *, block_bytes: int = 1 << 20, seed: int = 0,
                            dtype: str = "bfloat16", request_id: int = 0,
                            model: str = "synthetic") -> pa.RecordBatch:
    """A checksummed KV batch of about ``num_bytes`` random payload (one layer, 8 KV heads of 128).

    For the modeled backend, whose real bytes moved stand in (scaled down) for the modeled KV.
    """
    name = canonical_dtype(dtype)
    np_dtype = np.dtype(_DTYPES[name][0])
    token_bytes = 2 * _SYNTHETIC_KV_HEADS * _SYNTHETIC_HEAD_DIM * np_dtype.itemsize
    block_size = max(1, block_bytes // token_bytes)
    num_tokens = max(1, math.ceil(num_bytes / token_bytes))
    meta = KVMeta(format_version=FORMAT_VERSION, model=model, dtype=name, block_size=block_size,
                  num_layers=1, layer_start=0, layer_stop=1, kv_heads=_SYNTHETIC_KV_HEADS,
                  head_dim=_SYNTHETIC_HEAD_DIM, num_tokens=num_tokens, request_id=request_id)
    raw = bytearray(np.random.default_rng(seed).bytes(meta.num_blocks * meta.block_bytes))
    blocks = np.frombuffer(raw, dtype=np_dtype).reshape(meta.num_blocks, *meta.block_shape)
    rest = num_tokens - (meta.num_blocks - 1) * block_size
    blocks[-1, :, :, rest:] = 0
    return _batch_from_blocks(blocks, np.arange(meta.num_blocks, dtype=np.int32), meta)


def to_ipc_buffer(batch: pa.RecordBatch) -> pa.Buffer:
    """The batch as one contiguous Arrow IPC stream (for transports that want a single buffer)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def from_ipc_buffer(buffer: pa.Buffer) -> pa.RecordBatch:
    """The one batch of an IPC stream made by :func:`to_ipc_buffer`; its arrays view ``buffer``."""
    try:
        batches = list(pa.ipc.open_stream(buffer))
        for batch in batches:  # a damaged stream can hold offsets and lengths that point anywhere
            batch.validate(full=True)
    except (pa.ArrowException, OSError) as error:
        raise KVCorruptionError(f"KV IPC buffer is not a valid Arrow stream: {error}") from error
    if len(batches) != 1:
        raise KVCorruptionError(f"KV IPC buffer holds {len(batches)} record batches, expected 1")
    return batches[0]


def _batch_from_blocks(blocks: np.ndarray, indices: np.ndarray, meta: KVMeta) -> pa.RecordBatch:
    """The RecordBatch of C-contiguous block-major ``blocks`` (referenced, not copied)."""
    checksums = np.fromiter((_block_checksum(int(i), pa.py_buffer(block)) for i, block in zip(indices, blocks)),
                            dtype=np.uint32, count=len(blocks))
    value_type = _DTYPES[meta.dtype][1]
    flat = pa.Array.from_buffers(value_type, blocks.size, [None, pa.py_buffer(blocks)])
    storage = pa.FixedSizeListArray.from_arrays(flat, math.prod(meta.block_shape))
    payload = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(value_type, list(meta.block_shape)), storage)
    meta_json = json.dumps(meta.to_dict(), sort_keys=True).encode()
    schema = pa.schema([pa.field("block_index", pa.int32(), nullable=False),
                        pa.field("checksum", pa.uint32(), nullable=False),
                        pa.field("payload", payload.type, nullable=False)],
                       metadata={METADATA_KEY: meta_json, HEADER_CHECKSUM_KEY: _header_checksum(meta_json)})
    return pa.RecordBatch.from_arrays([pa.array(indices, pa.int32()), pa.array(checksums, pa.uint32()), payload],
                                      schema=schema)


def _block_checksum(index: int, payload: Any) -> int:
    return int(google_crc32c.extend(google_crc32c.value(index.to_bytes(4, "little", signed=True)), payload))


def _header_checksum(meta_json: bytes) -> bytes:
    return f"{google_crc32c.value(meta_json):08x}".encode()


def _verify_header(metadata: Optional[dict[bytes, bytes]], where: str) -> None:
    stated = (metadata or {}).get(HEADER_CHECKSUM_KEY)
    actual = _header_checksum((metadata or {}).get(METADATA_KEY, b""))
    if stated != actual:
        raise KVCorruptionError(f"{where}: metadata is corrupt: crc32c {actual.decode()}, stated {stated!r}")


_META_FIELDS: dict[str, type] = {"format_version": int, "model": str, "dtype": str, "block_size": int,
                                 "num_layers": int, "layer_start": int, "layer_stop": int,
                                 "kv_heads": int, "head_dim": int, "num_tokens": int,
                                 "request_id": int, "checksum": str}


def _read_meta(metadata: Optional[dict[bytes, bytes]], num_rows: int) -> KVMeta:
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise KVCorruptionError(f"KV batch has no {METADATA_KEY.decode()!r} schema metadata")
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KVCorruptionError(f"KV batch metadata is not valid JSON: {error}") from error
    if not isinstance(fields, dict):
        raise KVCorruptionError("KV batch metadata is not a JSON object")
    where = f"KV batch of request {fields.get('request_id', '?')}"
    if fields.get("format_version") != FORMAT_VERSION:
        raise KVCorruptionError(f"{where}: unknown format_version {fields.get('format_version')!r}; "
                                f"this reader knows {FORMAT_VERSION}")
    missing = [name for name in _META_FIELDS if name not in fields]
    unknown = [name for name in fields if name not in _META_FIELDS]
    if missing or unknown:
        raise KVCorruptionError(f"{where}: metadata missing {missing}, unknown {unknown}")
    for name, kind in _META_FIELDS.items():
        if not isinstance(fields[name], kind) or isinstance(fields[name], bool):
            raise KVCorruptionError(f"{where}: metadata {name}={fields[name]!r} is not {kind.__name__}")
    meta = KVMeta(**fields)
    problem = None
    if meta.dtype not in _DTYPES:
        problem = f"dtype {meta.dtype!r} is not one of {', '.join(_DTYPES)}"
    elif meta.checksum != CHECKSUM:
        problem = f"checksum {meta.checksum!r} is not {CHECKSUM!r}"
    elif min(meta.block_size, meta.kv_heads, meta.head_dim) < 1 or meta.num_tokens < 0:
        problem = "block_size, kv_heads and head_dim must be >= 1 and num_tokens >= 0"
    elif not 0 <= meta.layer_start < meta.layer_stop <= meta.num_layers:
        problem = f"layer range [{meta.layer_start}, {meta.layer_stop}) is not within {meta.num_layers} layers"
    elif num_rows > meta.num_blocks:
        problem = f"{num_rows} blocks but {meta.num_tokens} tokens fill only {meta.num_blocks}"
    if problem:
        raise KVCorruptionError(f"{where}: {problem}")
    return meta


def flip_payload_bit(batch: pa.RecordBatch, position: int) -> pa.RecordBatch:
    """``batch`` with one bit of its KV payload flipped (``position`` wraps around the payload).

    Fault injection for the chaos tests and benchmark: the copy models bytes damaged between
    the encoding side and the decoding side, which :func:`decode_kv` must catch by checksum.
    """
    i = batch.schema.get_field_index("payload")
    column = batch.column(i)
    storage = column.storage
    values = storage.values
    data = bytearray(values.buffers()[1].to_pybytes())
    bit = position % (len(data) * 8)
    data[bit // 8] ^= 1 << (bit % 8)
    new_values = pa.Array.from_buffers(values.type, len(values), [None, pa.py_buffer(bytes(data))])
    new_storage = pa.FixedSizeListArray.from_arrays(new_values, storage.type.list_size)
    columns = list(batch.columns)
    columns[i] = pa.ExtensionArray.from_storage(column.type, new_storage)
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)
