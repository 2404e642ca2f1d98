"""Shared fixtures. Ray (where a test needs it) is started once per session."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from hetero_sched.runtime.cluster import LocalCluster, NodeSpec, connect, make_node  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = ROOT.parent / "shared" / "traces"


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    """The public traces in ``../shared/traces`` (skips where a clone has none)."""
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"public traces not found at {SHARED_TRACES} (../shared is not part of a clone)")
    return SHARED_TRACES


SESSION_NODES: tuple[NodeSpec, ...] = (
    make_node("trn2", "prefill", {"neuron_cores": 256.0}),  # 4 trn2.48xlarge groups at TP64
    make_node("cs3", "decode", {"cs3": 8.0}),               # two 4-system CS-3 groups
    make_node("h100", "both", {"GPU": 8.0}),                # one 8-GPU colocated box
)
"""Labelled worker nodes of the session cluster: enough for small experiments."""


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LocalCluster]:
    """One local labelled Ray cluster for the whole session, with this driver connected."""
    with LocalCluster(SESSION_NODES) as cluster:
        connect(cluster.address)
        yield cluster


@pytest.fixture(scope="session")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator["Jaeger"]:
    """A real Jaeger v2 on loopback for the session (skips without a binary, fails under CI)."""
    from jaeger import Jaeger, start_jaeger  # noqa: F401 - tests/ is on sys.path (rootdir conftest)

    j = start_jaeger(tmp_path_factory.mktemp("jaeger"))
    yield j
    j.process.terminate()
    try:
        j.process.wait(timeout=10)
    except subprocess.TimeoutExpired:      # a loaded machine: do not fail a test over a slow exit
        j.process.kill()
        j.process.wait(timeout=10)
