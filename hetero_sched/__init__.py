"""hetero-sched: disaggregated LLM inference on heterogeneous accelerators, simulated and on Ray."""

__version__ = "0.1.0"
