"""One-line messages for pydantic validation errors (every config file, every data file)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from hetero_sched.errors import UserError

M = TypeVar("M", bound=BaseModel)


def format_validation_error(source: str, exc: ValidationError) -> str:
    """``<source>: <field path>: <problem> (got <value>)`` for the deepest error of ``exc``."""
    err = max(exc.errors(), key=lambda e: len(e["loc"]))  # deepest: in a union, the branch that got furthest
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more error(s))" if exc.error_count() > 1 else ""
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None or err["type"] == "missing" else f" (got {value!r})"
    return f"{source}: {loc}: {msg}{shown}{more}"


def validate(schema: type[M], data: Any, source: str, what: str = "a mapping") -> M:
    """``data`` validated as ``schema``; anything wrong is one UserError line naming ``source``."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected {what} at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc)) from None
