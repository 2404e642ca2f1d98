"""hetero-sched: disaggregated LLM inference on heterogeneous accelerators, simulated and on Ray.

``hetero_sched.simulate(path_or_config)`` runs an experiment in the simulator and returns a
:class:`~hetero_sched.results.RunResult` (``.summary``, ``.records``, ``.write(folder)``).
"""

__version__ = "0.1.0"

from hetero_sched.sim import simulate  # noqa: E402

__all__ = ["simulate", "__version__"]
