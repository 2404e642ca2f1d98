"""The engine both drivers share: the event loop, its devices, and experiment assembly.

The simulator is this engine with *virtual devices* that report the core's planned times;
the live runtime is the same engine with Ray device actors that run each span and report what
they measured, asynchronously (``hetero_sched.runtime.devices``).
"""
