"""The policy registry: name → class, and loading a user's policy by dotted path."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping

from hetero_sched.errors import UserError
from hetero_sched.policies.base import Policy

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
        try:
            module = importlib.import_module(module_name)
        except (ImportError, ValueError) as exc:  # ValueError: an empty module name
            raise UserError(f"policy {name!r}: cannot import {module_name!r} ({exc})") from None
        cls = getattr(module, attr, None)
        if not (inspect.isclass(cls) and issubclass(cls, Policy)):
            raise UserError(f"policy {name!r}: {attr!r} is not a Policy subclass in {module_name}")
        return cls
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]


def make_policy(name: str, params: Mapping[str, Any]) -> Policy:
    """Instantiate a policy, turning a bad parameter into a one-line error."""
    cls = policy_class(name)
    sig = inspect.signature(cls.__init__)
    known = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise UserError(f"policy {name}: unknown parameter(s) {', '.join(unknown)}; "
                        f"known: {', '.join(known) or 'none'}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise UserError(f"policy {name}: {exc}") from None
