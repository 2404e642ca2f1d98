"""The launcher tests run only when asked for by marker (``-m launcher``), in their own process.

``ray up`` / ``ray down`` run ``ray stop``, which stops every Ray cluster on the machine: a
plain ``python -m pytest`` (whose session cluster they would kill) deselects them; ``.ci/run``
runs ``python -m pytest -m launcher tests/launcher`` as a separate step after the main suite.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect ``launcher`` tests unless the marker expression names them."""
    if "launcher" in (config.option.markexpr or ""):
        return
    chosen = [i for i in items if i.get_closest_marker("launcher") is None]
    dropped = [i for i in items if i.get_closest_marker("launcher") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = chosen
