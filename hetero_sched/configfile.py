"""Config files as a user writes them: YAML read with one-line errors, dotted-path assignments
(sweep axes, ``set:``, ``--set key=value``), and pydantic's errors flattened into one line.

Shared by experiments, sweeps and plans, so each kind of file fails the same way.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, TypeVar, Union

import yaml
from pydantic import BaseModel, ValidationError

from hetero_sched.errors import UserError


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; a missing, unreadable, empty or malformed file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: no such {what} file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where}: {getattr(exc, 'problem', None) or 'invalid YAML'}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return data


def expect_mapping(data: Any, source: str, what: str) -> dict[str, Any]:
    """``data`` if it is a mapping; else a UserError saying what the file holds instead."""
    if data is None:
        raise UserError(f"{source}: the {what} is empty (expected a mapping of fields)")
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of fields at the top level, got a {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value),
                                                                                            type(value).__name__)


def format_error(source: str, exc: ValidationError) -> str:
    """A pydantic error as one line: the deepest failing field, its problem and the value given."""
    err = max(exc.errors(), key=lambda e: len(e["loc"]))  # deepest: in a union, the branch that got furthest
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more error(s))" if exc.error_count() > 1 else ""
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None or err["type"] == "missing" else f" (got {value!r})"
    return f"{source}: {loc}: {msg}{shown}{more}"


M = TypeVar("M", bound=BaseModel)


def validate(schema: type[M], data: Any, source: str, what: str = "a mapping") -> M:
    """``data`` validated as ``schema``; anything wrong is one UserError line naming ``source``
    (every pydantic-backed file: experiments' parts, catalog data, figures, sweeps)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected {what} at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_error(source, exc)) from None


def shipped_or_path(path: Union[str, Path]) -> Path:
    """``path`` itself, or the shipped example of that name (``hetero_sched/data/``) if no such file."""
    p = Path(path)
    if not p.exists():
        shipped = Path(str(resources.files("hetero_sched").joinpath("data", p.name)))
        if shipped.is_file():
            return shipped
    return p


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Assign ``value`` at a dotted path (list indices by number; ``overrides.<dotted key>``)."""
    parts = path.split(".")
    if parts[0] == "overrides" and len(parts) > 1:
        if not isinstance(data.get("overrides"), dict):
            data["overrides"] = {}
        data["overrides"][".".join(parts[1:])] = copy.deepcopy(value)
        return
    cur: Any = data
    for i, key in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not key.isdigit() or int(key) >= len(cur):
                raise UserError(f"{'.'.join(parts[:i]) or path}: no list item {key!r} (it has {len(cur)})")
            if last:
                cur[int(key)] = copy.deepcopy(value)
            else:
                cur = cur[int(key)]
        elif isinstance(cur, dict):
            if last:
                cur[key] = copy.deepcopy(value)
            else:
                if not isinstance(cur.get(key), (dict, list)):
                    cur[key] = {}
                cur = cur[key]
        else:
            raise UserError(f"{'.'.join(parts[:i])} is a value, not a mapping, so {path!r} cannot be set")


def parse_sets(sets: Sequence[str]) -> list[tuple[str, Any]]:
    """``--set key=value`` flags as ``(dotted path, value)``; the value is read as YAML, so
    ``4``, ``true``, ``[1, 2]`` and ``{name: disagg}`` are a number, a boolean, a list and a mapping."""
    out = []
    for item in sets:
        key, eq, text = item.partition("=")
        if not eq or not key.strip() or any(not part for part in key.strip().split(".")):
            raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY (e.g. workload.rate_per_s=8)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML (quote it)") from None
        out.append((key.strip(), value))
    return out


def apply_sets(data: dict[str, Any], sets: Sequence[tuple[str, Any]], fields: Sequence[str], what: str) -> dict[str, Any]:
    """A copy of ``data`` with each ``(path, value)`` assigned; a path whose first part is not one
    of ``fields`` is a UserError listing them."""
    out = copy.deepcopy(data)
    for path, value in sets:
        head = path.split(".")[0]
        if head not in fields:
            raise UserError(f"--set {path}: {head!r} is not a {what} field (fields: {', '.join(fields)})")
        try:
            set_path(out, path, value)
        except UserError as exc:
            raise UserError(f"--set {path}: {exc}") from None
    return out
