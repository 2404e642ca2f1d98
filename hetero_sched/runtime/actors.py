"""The Ray actors: one per device group, and the scheduler.

``DeviceGroupActor`` asks Ray for the resources its group stands for (``neuron_cores``,
``cs3``, ``GPU``) and a label selector for its device kind and pool; it holds a backend and
the KV of the requests at that group. ``SchedulerActor`` holds the functional core and drives
it with the same event loop as the simulator, on a virtual or a wall clock.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import ray

from hetero_sched.experiment import parse_experiment
from hetero_sched.runtime.backends import make_backend
from hetero_sched.runtime.clock import WallClock
from hetero_sched.runtime.executor import LiveExecutor
from hetero_sched.runtime.messages import pack, unpack
from hetero_sched.sim import build_scheduler
from hetero_sched.sim.engine import run_events


@ray.remote(num_cpus=0)
class DeviceGroupActor:
    """Executes one group's spans and KV hand-offs (calls run in order: one at a time)."""

    def __init__(self, config: bytes) -> None:
        cfg = unpack(config, "configure")
        self.group_id = cfg["group_id"]
        self.name = cfg["name"]
        self.backend = make_backend(cfg["backend"], model=cfg["model"], seed=cfg["seed"],
                                    bytes_scale=cfg["bytes_scale"], block_size=cfg["block_size"])

    def node_labels(self) -> dict[str, str]:
        """Where this actor landed (its node's labels), for placement checks."""
        return {k: str(v) for k, v in ray.get_runtime_context().get_node_labels().items()}

    def step(self, msg: bytes, refs: list[ray.ObjectRef]) -> tuple[bytes, list[ray.ObjectRef]]:
        """Carry out one time step's operations, in order; return the report and the export bundle.

        ``refs`` are KV bundles (lists of per-request Arrow batches) read here — zero-copy on
        one node — with every checksum verified. All exports of a step are ``ray.put`` as one
        bundle this actor owns: one object per step, not per request (a put costs ~1 ms).
        """
        ops = unpack(msg, "step")["ops"]
        tokens: dict[int, list[int]] = {}
        margins: dict[int, float] = {}
        exports = []
        import_bytes = 0
        import_s = 0.0
        bundles = ray.get(refs) if refs else []
        backend = self.backend
        for op in ops:
            kind = op["op"]
            if kind == "prefill":
                t, m = backend.prefill(op["requests"])
            elif kind == "decode":
                t, m = backend.decode(op["joiners"], op["steps"])
            elif kind == "import":
                t0 = time.perf_counter()
                import_bytes += backend.import_kv(op["id"], bundles[op["ref"]][op["index"]], op["last"])
                import_s += time.perf_counter() - t0
                continue
            elif kind == "export":
                exports.append(backend.export_kv(op["id"], op["true_bytes"]))
                continue
            else:
                backend.forget(op["ids"])
                continue
            for rid, toks in t.items():
                tokens.setdefault(rid, []).extend(toks)
            for rid, margin in m.items():
                margins[rid] = min(margin, margins.get(rid, margin))
        del bundles
        report = pack("step_report", tokens=tokens, margins=margins, import_bytes=import_bytes,
                      import_s=import_s)
        return report, ([ray.put(exports)] if exports else [])

    def held(self) -> int:
        """Requests whose KV this group still holds (0 after a clean run)."""
        return self.backend.held()


@ray.remote(num_cpus=0, max_concurrency=2)
class SchedulerActor:
    """Holds the core and runs the event loop; ``progress`` answers while ``run`` works."""

    def __init__(self) -> None:
        self._done = 0

    def progress(self) -> int:
        return self._done

    def run(self, experiment: dict[str, Any], workload: Any, actors: list[Any], *, backend: str,
            clock: str, time_scale: float) -> dict[str, Any]:
        exp = parse_experiment(experiment)
        scheduler = build_scheduler(exp, workload, base_dir=None)
        executor = LiveExecutor(actors, real_tokens=backend == "numpy", send_every_step=clock == "wall")
        scheduler.hooks = executor
        wall: Optional[WallClock] = WallClock(time_scale) if clock == "wall" else None

        def progress(done: int) -> None:
            self._done = done

        t0 = time.perf_counter()
        run_events(scheduler, workload.requests(), progress, progress_every=50, hooks=executor,
                   clock=wall)
        executor.finish()
        return {
            "records": scheduler.records,
            "decisions": scheduler.decisions.state(),
            "usage": [(g.name, g.device, g.role.value, g.busy_s, g.cost.dollars_per_hour) for g in scheduler.groups],
            "tokens": executor.tokens,
            "stats": {"actor_calls": executor.stats.actor_calls, "transfers": executor.stats.transfers,
                      "bytes_moved": executor.stats.bytes_moved, "import_s": executor.stats.import_s,
                      "flushes": executor.stats.flushes, "min_margin": executor.stats.min_margin,
                      "call_s": executor.stats.flush_s,
                      "lateness_s": wall.lateness_s if wall is not None else [],
                      "wall_s": time.perf_counter() - t0},
        }
