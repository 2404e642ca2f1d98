"""Control messages between the scheduler actor and the device-group actors, as msgpack.

Plain fields only — request ids, token counts, token ids, trace context — never ObjectRefs
(those travel as Ray call arguments so Ray counts references; DESIGN contract §9). Every
message carries a schema version and a kind, and is validated on receipt: a message from
another version or with a missing/mistyped field is rejected with one line, not half-used.
"""

from __future__ import annotations

from typing import Any

import msgpack

SCHEMA_VERSION = 6

_REPORT: dict[str, tuple[type, ...]] = {
    "span_id": (int,), "start_s": (float, int), "end_s": (float, int), "steps": (int,),
    "first_step_end_s": (float, int), "max_step_s": (float, int),
    "tokens": (dict,), "margins": (dict,),   # numpy backend: request id -> token ids made / margin
    "exports": (list,),                      # request ids whose KV this span exported (one bundle)
    "compute_s": (float, int),               # wall seconds the backend computed (tracing)
    "incarnation": (int,)}                   # differs from the message's "expect": restarted, not run

# kind -> required field -> accepted Python types
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "configure": {"group_id": (int,), "name": (str,), "role": (str,), "backend": (str,),
                  "model": (str,), "seed": (int,), "bytes_scale": (float,), "block_size": (int,),
                  "clock": (str,),        # "virtual": report modeled times at once; "wall": hold spans
                  "time_scale": (float,), # wall seconds per run second
                  "pace": (str,),         # "modeled": hold each span for its modeled time; "real": compute time
                  "device_speed": (float,), "device_jitter": (float,),   # the device vs the cost model
                  "progress_interval_s": (float,),   # streaming devices report tokens at most this often
                  "trace": (dict,),       # TraceSettings.to_dict(), or {} for tracing off
                  "fetch_timeout_s": (float,),   # a KV bundle not readable by then counts as lost
                  "faults": (dict,)},     # fault injection (tests): {"corrupt_every": k, "seed": s,
                                          #   "hang_group": name, "hang_at_span": n, "short_steps": k,
                                          #   "error_group": name, "error_at_span": n} or {}
    # One span to run: {"span_id", "kind": prefill|decode|mixed, "steps", "start_s" (planned),
    #   "duration_s" (modeled), "line": [a, s], "context0", "batch_size", "joiners": [ids],
    #   "requests": [{"id", "prompt", "generated": [ids], "cached", "hashes", "block",
    #                 "export": bool, "true_bytes", ("start", "end": chunk)}]}
    # answered by a span_report (wall clock: when the span ends; virtual: at once, provisional).
    "span": {"span": (dict,), "expect": (int,), "seq": (int,)},
    "span_report": _REPORT,
    # Stop the running span at its first step boundary at or after at_s (run time); answered by
    # the revised span_report (virtual clock) or an empty span_report with span_id -1 (wall).
    "cut": {"span_id": (int,), "at_s": (float, int), "expect": (int,), "seq": (int,)},   # seq: -1 unordered (wall)
    # Tokens a streaming device made (serving): [[request id, index in its output, token id (-1:
    # none, modeled), time]], sent to the front door as they are made; the span report follows.
    "progress": {"group_id": (int,), "span_id": (int,), "tokens": (list,)},
    # KV hand-offs and bookkeeping, in order:
    #   {"op": "import", "id", "last": token id, "ref": k, "index": i}
    #        (KV = item i of the bundle behind the k-th ref passed with the call)
    #   {"op": "export", "id", "true_bytes"}         (all exports of a step go out as one bundle)
    #   {"op": "forget", "ids": [ids]}
    #   {"op": "trace", "id", "spans": [{"name", "parent": {"traceparent"}, "start_ns", "end_ns",
    #        "attrs", "measure"}]}     (a finished request's spans this group emits; may be empty)
    #   {"op": "export_blocks", "id", "flow", "hashes", "block_bytes"}   (prefix blocks for the KV
    #        store, one batch each; all of a step's go out as one more bundle, after the exports')
    #   {"op": "import_blocks", "id", "hashes", "ref": k}   (the k-th ref: a KV store's answer, the
    #        blocks' refs in order; they join the backend's prefix cache)
    # expect: the actor incarnation the ops were meant for; seq: the call's place in the order
    # the actor must act in (Ray does not order an async actor's calls), from 0 per incarnation
    "step": {"ops": (list,), "expect": (int,), "seq": (int,)},
    "step_report": {"import_bytes": (int,), "import_s": (float,),
                    "fetch_s": (float,),  # waiting for the KV bundles' bytes (the object store's transfer)
                    "queued_s": (float,), # waiting for this call's turn (calls act in the order sent)
                    "imported": (list,),  # requests whose KV landed intact
                    "bad_kv": (list,),    # requests whose imported KV failed its checksum or was lost
                    "exports": (list,),   # request ids exported (one bundle, returned beside)
                    "block_exports": (list,),   # flows whose prefix blocks were exported (a second bundle)
                    "store_bytes": (int,),      # bytes of prefix blocks read from the KV store
                    "incarnation": (int,)},
    # Virtual clock, a device that promised its pace exactly: a stretch of its calls in one —
    # items: packed span, cut and step messages, acted on in order (each in its own turn);
    # answered by their reports in order (span_report or step_report, packed), with every KV batch
    # the stretch exported returned beside as one bundle (import ops' refs: the batch call's).
    "batch": {"items": (list,), "expect": (int,)},
    "batch_report": {"reports": (list,), "incarnation": (int,)},
}

SPAN_FIELDS = {"span_id": (int,), "kind": (str,), "steps": (int,), "start_s": (float, int),
               "duration_s": (float, int), "line": (list,), "context0": (int,), "batch_size": (int,),
               "joiners": (list,), "requests": (list,)}
"""Fields of a ``span`` message's span."""

OPS = {"import": ("id", "last", "ref", "index"), "export": ("id", "true_bytes"), "forget": ("ids",),
       "trace": ("id", "spans"), "export_blocks": ("id", "flow", "hashes", "block_bytes"),
       "import_blocks": ("id", "hashes", "ref")}
"""Operations a ``step`` message may carry, with their required fields."""


class MessageError(ValueError):
    """A control message that does not match its schema."""


def pack(kind: str, **fields: Any) -> bytes:
    """Encode a message, checking it against its schema first."""
    msg = {"v": SCHEMA_VERSION, "kind": kind, **fields}
    _validate(msg, kind)
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes, kind: str) -> dict[str, Any]:
    """Decode and validate a message of the expected ``kind``."""
    msg = _decode(data, f"{kind} message")
    _validate(msg, kind)
    return msg


def unpack_any(data: bytes, kinds: tuple[str, ...]) -> dict[str, Any]:
    """Decode and validate a message of one of ``kinds`` (the items of a batch)."""
    msg = _decode(data, "batch item")
    if msg.get("kind") not in kinds:
        raise MessageError(f"batch item: expected one of {', '.join(kinds)}, got {msg.get('kind')!r}")
    _validate(msg, msg["kind"])
    return msg


def _decode(data: bytes, what: str) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise MessageError(f"{what}: not valid msgpack ({exc})") from None
    if not isinstance(msg, dict):
        raise MessageError(f"{what}: expected a map, got {type(msg).__name__}")
    return msg


def _validate(msg: dict[str, Any], kind: str) -> None:
    if msg.get("v") != SCHEMA_VERSION:
        raise MessageError(f"{kind} message: schema version {msg.get('v')!r}, expected {SCHEMA_VERSION}")
    if msg.get("kind") != kind:
        raise MessageError(f"expected a {kind} message, got {msg.get('kind')!r}")
    for name, types in SCHEMAS[kind].items():
        if name not in msg:
            raise MessageError(f"{kind} message: missing field {name!r}")
        if not isinstance(msg[name], types) or isinstance(msg[name], bool):
            raise MessageError(f"{kind} message: field {name!r} has type {type(msg[name]).__name__}")
    if kind == "span":
        for name, types in SPAN_FIELDS.items():
            if not isinstance(msg["span"].get(name), types) or isinstance(msg["span"].get(name), bool):
                raise MessageError(f"span message: span field {name!r} missing or mistyped")
    if kind == "step":
        for i, op in enumerate(msg["ops"]):
            if not isinstance(op, dict) or op.get("op") not in OPS:
                raise MessageError(f"step message: op {i} is not one of {', '.join(OPS)}")
            missing = [f for f in OPS[op["op"]] if f not in op]
            if missing:
                raise MessageError(f"step message: {op['op']} op {i} lacks {missing[0]!r}")
