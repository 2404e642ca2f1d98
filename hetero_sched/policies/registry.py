"""The policy registry: name → class, and loading a user's policy by dotted path.

A user's policy is user code: importing it, constructing it and calling it can fail in any way.
Every such failure is one line naming the policy — ``policy my_mod:P raised ValueError: ...
(--debug for the traceback)`` — with the original exception chained for ``--debug``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import typing
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from hetero_sched.configfile import format_error
from hetero_sched.errors import DEBUG_HINT, UserError
from hetero_sched.policies.base import Policy, PolicyFailed

POLICIES: dict[str, type[Policy]] = {}
"""Built-in policies, filled by :func:`register` when their modules are imported."""


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy selectable by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a `name`")
    POLICIES[cls.name] = cls
    return cls


def policy_class(name: str) -> type[Policy]:
    """A built-in policy by name, or a user's by dotted path ``module:Class``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        module = _import(name, module_name)
        cls = getattr(module, attr, None)
        if not (inspect.isclass(cls) and issubclass(cls, Policy)):
            raise UserError(f"policy {name!r}: {attr!r} is not a Policy subclass in {module_name}")
        return cls
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]


def _import(name: str, module_name: str) -> Any:
    """Import a user's policy module; what goes wrong is one line (its cause chained)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise UserError(f"policy {name!r}: no module named {module_name!r} (put {module_name.split('.')[0]}.py "
                            "next to the experiment file, install it, or add its folder to PYTHONPATH)") from None
        raise UserError(f"policy {name!r}: importing {module_name} failed: {exc} {DEBUG_HINT}") from exc
    except ValueError as exc:               # an empty or relative module name
        raise UserError(f"policy {name!r}: cannot import {module_name!r} ({exc})") from None
    except Exception as exc:                 # the user's module itself: SyntaxError, NameError, ...
        raise UserError(f"policy {name!r}: importing {module_name} raised {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())} {DEBUG_HINT}") from exc


def make_policy(name: str, params: Mapping[str, Any]) -> Policy:
    """Instantiate a policy, its parameters checked against its ``__init__`` signature and type
    hints first (a bad parameter is a one-line error naming it)."""
    cls = policy_class(name)
    values = _checked_params(cls, name, params)
    try:
        return cls(**values)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        if cls.__module__.startswith("hetero_sched.policies."):   # a built-in's own parameter check
            raise UserError(f"policy {name}: {exc}") from None
        raise PolicyFailed.raised(cls, "__init__", exc) from exc
    except Exception as exc:
        raise PolicyFailed.raised(cls, "__init__", exc) from exc


def _checked_params(cls: type[Policy], name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` validated (and converted: ``"2"`` → 2) against ``cls.__init__``'s parameters."""
    sig = inspect.signature(cls.__init__)
    named = {n: p for n, p in sig.parameters.items()
             if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = sorted(set(params) - set(named))
    if unknown and not open_ended:
        raise UserError(f"policy {name}: unknown parameter(s) {', '.join(unknown)}; "
                        f"known: {', '.join(named) or 'none'}")
    given = tuple(n for n in named if n in params)
    model = _params_model(cls, given)
    if model is None:        # a parameter pydantic cannot model (a name like `_x`): pass it unchecked
        return dict(params)
    try:
        checked = model.model_validate({n: v for n, v in params.items() if n in named})
    except ValidationError as exc:
        raise UserError(format_error(f"policy {name}: params", exc)) from None
    return {**dict(params), **{n: getattr(checked, n) for n in given}}


@functools.lru_cache(maxsize=256)
def _params_model(cls: type[Policy], given: tuple[str, ...]) -> Optional[type[BaseModel]]:
    """The pydantic model of ``cls.__init__``'s parameters ``given`` (None: it cannot be made).
    Remembered: a goodput search or a sweep makes its policy once per run."""
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:        # a user's annotation naming something undefined: check nothing
        hints = {}
    fields: dict[str, Any] = {n: (hints.get(n, Any), ... if defaults[n] is inspect.Parameter.empty else defaults[n])
                              for n in given}
    try:
        return create_model(f"{cls.__name__}Params", __config__=ConfigDict(arbitrary_types_allowed=True), **fields)
    except Exception:
        return None
