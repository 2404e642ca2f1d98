"""The compiled core: it computes what the interpreted source computes, and is linked as setup.py
intends (its functions call each other directly, not through exported symbols)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hetero_sched
from hetero_sched.core import scheduler

PACKAGE = Path(hetero_sched.__file__).parent

BENCH = Path(__file__).resolve().parents[1] / "bench"

# One run of bench/sim_scale.py's 80-group experiment (the shipped one's groups × 16, the arrival
# rate to match), printed as which module ran it and a digest of every record and decision.
RUN = textwrap.dedent(f"""
    import hashlib, sys
    sys.path.insert(0, {str(BENCH)!r})
    from sim_scale import scaled_experiment
    from hetero_sched.core import scheduler
    from hetero_sched.engine.assembly import build_scheduler, resolve
    from hetero_sched.engine.loop import run_events
    from hetero_sched.workload import synthetic

    exp, base = resolve(scaled_experiment(16, 256.0, 600))
    w = synthetic(600, 256.0, prompt="azure-conv", output="azure-conv", seed=exp.seed)
    s = build_scheduler(exp, w, base)
    run_events(s, w.requests())
    h = hashlib.sha256(repr(s.records).encode())
    cols = s.decisions.columns()
    for name in sorted(cols):
        h.update(name.encode() + repr(list(cols[name])).encode())
    print(scheduler.__file__)
    print(len(s.records), h.hexdigest())
""")

def _require_compiled() -> None:
    """Skip unless the core in use is the compiled one; under CI (which always compiles) fail."""
    if scheduler.__file__.endswith(".py"):
        if os.environ.get("CI") == "true":
            pytest.fail("the core is interpreted under CI: setup.py did not compile it")
        pytest.skip("the core is not compiled here (HETERO_SCHED_PURE_PYTHON, or no C compiler)")


def _run(pythonpath: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    out = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=300,
                         check=True, cwd=pythonpath)
    return out.stdout.split("\n")


def test_the_compiled_core_computes_what_the_interpreted_source_does(tmp_path):
    _require_compiled()
    shutil.copytree(PACKAGE, tmp_path / "hetero_sched", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    compiled = _run(PACKAGE.parent)
    interpreted = _run(tmp_path)
    assert compiled[0].endswith(".so") and interpreted[0].endswith(".py")   # each ran what it claims
    assert compiled[1] == interpreted[1]
    assert compiled[1].startswith("600 ")


def test_the_compiled_core_exports_only_its_module_init():
    """setup.py builds with hidden visibility: a compiled function exported from the shared library
    is called through the PLT by the others and never inlined (5-6% more instructions)."""
    _require_compiled()
    if not sys.platform.startswith("linux"):
        pytest.skip("setup.py sets the visibility on Linux only")
    shared = [m for name, m in sys.modules.items()    # (other packages may be compiled by mypyc too)
              if name.endswith("__mypyc") and Path(m.__file__ or "").parent == PACKAGE.parent]
    assert len(shared) == 1, "expected one mypyc library, beside the package, holding its compiled modules"
    path = shared[0].__file__
    assert path is not None
    lib = ctypes.CDLL(path)
    assert hasattr(lib, "PyInit_" + shared[0].__name__)
    for function in ("CPyDef_scheduler___Scheduler___on_span_end", "CPyDef_events___EventQueue___pop"):
        assert not hasattr(lib, function), f"{function} is exported from {path}"
