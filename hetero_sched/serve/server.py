"""``hetero-sched serve``: bring up the experiment's cluster and serve it over HTTP until stopped."""

from __future__ import annotations

import functools
import threading
from typing import Callable, Optional

from hetero_sched.experiment import Experiment
from hetero_sched.runtime.cluster import ensure_cluster
from hetero_sched.serve.engine import EngineCore, EngineOptions
from hetero_sched.serve.ingress import ServeOptions, start_ingress


def serve_until(exp: Experiment, stop: threading.Event, *, address: Optional[str] = None,
                options: EngineOptions = EngineOptions(), listen: ServeOptions = ServeOptions(),
                ready: Callable[[str], None] = lambda url: None) -> None:
    """Serve ``exp`` (paths already absolute) until ``stop`` is set; ``ready(url)`` once listening.

    The cluster is the one at ``address`` (or ``RAY_ADDRESS``), else a private local cluster of
    labelled nodes started here and stopped on the way out, as ``hetero-sched run`` does.
    """
    with ensure_cluster(exp, address):
        ingress = start_ingress(functools.partial(EngineCore, exp, options), listen)
        try:
            ready(ingress.url)
            stop.wait()
        finally:
            ingress.stop()
