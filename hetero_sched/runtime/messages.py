"""Control messages between the scheduler actor and the device-group actors, as msgpack.

Plain fields only — request ids, token counts, token ids, trace context — never ObjectRefs
(those travel as Ray call arguments so Ray counts references; DESIGN contract §9). Every
message carries a schema version and a kind, and is validated on receipt: a message from
another version or with a missing/mistyped field is rejected with one line, not half-used.
"""

from __future__ import annotations

from typing import Any

import msgpack

SCHEMA_VERSION = 1

# kind -> required field -> accepted Python types
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "prefill": {"span": (int,), "requests": (list,)},
    # requests: [{"id", "tokens": [prompt + generated ids], "cached": int}]
    "prefill_report": {"span": (int,), "tokens": (dict,), "margins": (dict,)},
    "decode": {"span": (int,), "steps": (int,), "joiners": (list,)},
    # joiners: [{"id", "last": token id}]
    "decode_report": {"span": (int,), "tokens": (dict,), "margins": (dict,)},
    "export": {"requests": (list,)},
    # requests: [{"id", "true_bytes": int}]
    "import": {"requests": (list,)},
    # requests: [{"id", "transfer": int}] — same order as the refs argument
    "import_report": {"bytes": (int,), "decode_s": (float,)},
    "forget": {"ids": (list,)},
    "configure": {"group_id": (int,), "name": (str,), "role": (str,), "backend": (str,),
                  "model": (str,), "seed": (int,), "bytes_scale": (float,), "block_size": (int,)},
}


class MessageError(ValueError):
    """A control message that does not match its schema."""


def pack(kind: str, **fields: Any) -> bytes:
    """Encode a message, checking it against its schema first."""
    msg = {"v": SCHEMA_VERSION, "kind": kind, **fields}
    _validate(msg, kind)
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes, kind: str) -> dict[str, Any]:
    """Decode and validate a message of the expected ``kind``."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise MessageError(f"{kind} message: not valid msgpack ({exc})") from None
    if not isinstance(msg, dict):
        raise MessageError(f"{kind} message: expected a map, got {type(msg).__name__}")
    _validate(msg, kind)
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
