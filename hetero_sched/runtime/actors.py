"""The Ray actors: one per device group, and the scheduler.

``DeviceGroupActor`` asks Ray for the resources its group stands for (``neuron_cores``,
``cs3``, ``GPU``) and a label selector for its device kind and pool; it holds a backend and
the KV of the requests at that group. ``SchedulerActor`` holds the functional core and drives
it with the same event loop as the simulator, on a virtual or a wall clock.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, Optional

import numpy as np
import ray

from hetero_sched.errors import RunFailed
from hetero_sched.experiment import parse_experiment
from hetero_sched.runtime.backends import make_backend
from hetero_sched.runtime.clock import WallClock
from hetero_sched.runtime.executor import LiveExecutor, ask_all
from hetero_sched.runtime.journal import JournalError
from hetero_sched.runtime.kvcodec import KVCorruptionError, flip_payload_bit
from hetero_sched.runtime.livemetrics import LiveMetrics
from hetero_sched.runtime.messages import pack, unpack
from hetero_sched.runtime.recovery import Recovered, RunJournal
from hetero_sched.sim import build_scheduler
from hetero_sched.sim.engine import run_events
from hetero_sched.tracing import ProcessTracing, TraceSettings, attach_tracer, emit_shipped, epoch_for


def _restarted() -> bool:
    """Whether Ray restarted this actor (Ray 2.60's own check warns about an API it uses)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.get_runtime_context().was_current_actor_reconstructed


@ray.remote(num_cpus=0)
class DeviceGroupActor:
    """Executes one group's spans and KV hand-offs (calls run in order: one at a time)."""

    def __init__(self, config: bytes) -> None:
        cfg = unpack(config, "configure")
        self.group_id = cfg["group_id"]
        self.name = cfg["name"]
        self._backend_args = dict(kind=cfg["backend"], model=cfg["model"], seed=cfg["seed"],
                                  bytes_scale=cfg["bytes_scale"], block_size=cfg["block_size"])
        self.backend = make_backend(**self._backend_args)
        self.tracing: Optional[ProcessTracing] = (
            ProcessTracing(TraceSettings.from_dict(cfg["trace"]), instance=self.name) if cfg["trace"] else None)
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        """New each time Ray (re)starts this actor: a restart loses everything it held."""
        faults = cfg["faults"]
        self._fetch_timeout_s = cfg["fetch_timeout_s"]
        self._steps = 0
        self._hang_at = 0 if faults.get("hang_group") != self.name or _restarted() \
            else int(faults.get("hang_at_step", 0))
        """Injected fault: this step never returns (once: not after Ray restarts the actor)."""
        self._corrupt_every = int(faults.get("corrupt_every", 0))
        self._fault_rng = np.random.default_rng(int(faults.get("seed", 0)))
        self._exports = 0
        self._measured: dict[int, dict[str, list[dict[str, Any]]]] = {}
        """Tracing: what this actor measured per request, until the request's spans arrive."""

    def _measure(self, request_id: int, kind: str, seconds: float, **attrs: Any) -> None:
        self._measured.setdefault(request_id, {}).setdefault(kind, []).append({"seconds": seconds, **attrs})

    def flush_traces(self) -> dict[str, int]:
        """Export every span this actor ended (bounded wait); its counts, for the run summary."""
        if self.tracing is None:
            return {}
        return dataclasses.asdict(self.tracing.flush())

    def __ray_shutdown__(self) -> None:
        # Graceful exit only (ray.kill skips it): the run flushes explicitly before killing.
        if self.tracing is not None:
            self.tracing.shutdown()

    def incarnation_id(self) -> int:
        return self.incarnation

    def recover(self) -> int:
        """The handshake with a restarted scheduler: how many requests' KV this group held for
        the dead one. All of it is dropped (the new scheduler prefills those requests again) and
        the incarnation renewed, so a late step of the old scheduler runs none of its ops."""
        held = self.backend.held()
        self.backend = make_backend(**self._backend_args)
        self._measured.clear()
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        return held

    def node_labels(self) -> dict[str, str]:
        """Where this actor landed (its node's labels), for placement checks."""
        return {k: str(v) for k, v in ray.get_runtime_context().get_node_labels().items()}

    def step(self, msg: bytes, refs: list[ray.ObjectRef]) -> tuple[bytes, list[ray.ObjectRef]]:
        """Carry out one time step's operations, in order; return the report and the export bundle.

        ``refs`` are KV bundles (lists of per-request Arrow batches) read here — zero-copy on
        one node — with every checksum verified. All exports of a step are ``ray.put`` as one
        bundle this actor owns: one object per step, not per request (a put costs ~1 ms).
        """
        step = unpack(msg, "step")
        self._steps += 1
        if self._steps == self._hang_at:
            time.sleep(1e6)                       # injected fault: stuck, not dead
        if step["expect"] != self.incarnation:
            # restarted since these ops were planned: the state they act on died with the old
            # process, so run none of them and say so (the scheduler resumes those requests)
            return pack("step_report", tokens={}, margins={}, import_bytes=0, import_s=0.0, bad_kv=[],
                        incarnation=self.incarnation), []
        ops = step["ops"]
        tokens: dict[int, list[int]] = {}
        margins: dict[int, float] = {}
        exports = []
        import_bytes = 0
        import_s = 0.0
        bad_kv: list[int] = []
        bundles = [self._fetch(ref) for ref in refs]
        backend = self.backend
        traced = self.tracing is not None
        for op in ops:
            kind = op["op"]
            if kind == "prefill":
                t0 = time.perf_counter()
                t, m = backend.prefill(op["requests"])
                if traced:
                    dt = time.perf_counter() - t0
                    for item in op["requests"]:
                        self._measure(item["id"], "prefill", dt, **{"hetero.compute_s": dt})
            elif kind == "decode":
                t, m = backend.decode(op["joiners"], op["steps"])
            elif kind == "import":
                t0 = time.perf_counter()
                bundle = bundles[op["ref"]]
                try:
                    if bundle is None:
                        raise KVCorruptionError(f"KV of request {op['id']}: its object was lost")
                    moved = backend.import_kv(op["id"], bundle[op["index"]], op["last"])
                except KVCorruptionError:
                    bad_kv.append(op["id"])         # never decoded from: the scheduler sends it again
                    continue
                dt = time.perf_counter() - t0
                import_bytes += moved
                import_s += dt
                if traced:
                    self._measure(op["id"], "decode", dt, **{"hetero.kv.decode_s": dt, "hetero.kv.bytes_moved": moved})
                continue
            elif kind == "export":
                t0 = time.perf_counter()
                batch = backend.export_kv(op["id"], op["true_bytes"])
                self._exports += 1
                if self._corrupt_every and self._exports % self._corrupt_every == 0:
                    batch = flip_payload_bit(batch, int(self._fault_rng.integers(1 << 40)))   # injected fault
                exports.append(batch)
                if traced:
                    dt = time.perf_counter() - t0
                    self._measure(op["id"], "encode", dt, **{"hetero.kv.encode_s": dt,
                                                            "hetero.kv.bytes_moved": int(batch.nbytes)})
                continue
            elif kind == "trace":
                measured = self._measured.pop(op["id"], {})
                if self.tracing is not None:
                    emit_shipped(self.tracing.tracer, op["spans"], measured)
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
                      import_s=import_s, bad_kv=bad_kv, incarnation=self.incarnation)
        return report, ([ray.put(exports)] if exports else [])

    def _fetch(self, ref: ray.ObjectRef) -> Optional[list[Any]]:
        """A KV bundle, or None if it is gone (its owner, the exporting actor, died) or unreadable."""
        try:
            return ray.get(ref, timeout=self._fetch_timeout_s)
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.GetTimeoutError):
            return None

    def held(self) -> int:
        """Requests whose KV this group still holds (0 after a clean run)."""
        return self.backend.held()


SCHEDULER_RESTARTS = 10
"""Times Ray restarts a dead scheduler actor (and retries its ``run``, which recovers)."""


@ray.remote(num_cpus=0, max_concurrency=2)
class SchedulerActor:
    """Holds the core and runs the event loop; ``progress`` answers while ``run`` works.

    ``run`` journals to ``journal_path`` (on this node: the actor is pinned to the driver's);
    if the journal already has records, this is a restart and ``run`` recovers from it
    (``runtime/recovery.py``).
    """

    def __init__(self) -> None:
        self._done = 0

    def progress(self) -> int:
        return self._done

    def run(self, experiment: dict[str, Any], workload: Any, actors: list[Any], *, backend: str,
            clock: str, time_scale: float, trace: Optional[dict[str, Any]] = None,
            verify_imports: bool = False, journal_path: Optional[str] = None,
            call_timeout_s: float = 120.0) -> dict[str, Any]:
        exp = parse_experiment(experiment)
        scheduler = build_scheduler(exp, workload, base_dir=None)
        try:
            journal = RunJournal(journal_path) if journal_path else None
        except JournalError as exc:                  # damaged on disk: say so, in one line
            raise RunFailed(f"the run's journal cannot be recovered: {exc}") from None
        recovered = journal.recovered if journal is not None else Recovered()
        kv_dropped = 0
        if journal is not None and journal.is_restart:      # the handshake: drop the old run's KV
            kv_dropped = sum(ask_all(actors, "recover", call_timeout_s))
        executor = LiveExecutor(actors, real_tokens=backend == "numpy", send_every_step=clock == "wall",
                                verify_imports=verify_imports, journal=journal, call_timeout_s=call_timeout_s)
        executor.scheduler = scheduler
        executor.tokens.update(recovered.tokens)
        executor.failures[:] = recovered.failures
        executor.stats.kv_damaged = recovered.kv_damaged
        scheduler.hooks = executor
        scheduler.resumed = dict(recovered.resumed)
        first = float(workload.arrival_s[0]) if len(workload) else 0.0
        wall: Optional[WallClock] = WallClock(time_scale, recovered.origin_unix_s) if clock == "wall" else None
        origin = wall.origin_unix_s(first) if wall is not None else None
        restarts: list[float] = []
        if journal is not None and journal.is_restart:
            now = (time.time() - origin) / time_scale if origin is not None else first
            restarts = journal.restarted(now)
        elif journal is not None:
            journal.started(origin)
        tracing = ProcessTracing(TraceSettings.from_dict(trace), instance="scheduler") if trace else None
        if tracing is not None:
            # Wall clock: virtual 0 at its wall time (spans at real times); virtual: the last arrival is now.
            last = float(workload.arrival_s[-1]) if len(workload) else 0.0
            epoch = int(origin * 1e9) if origin is not None else epoch_for(last)
            attach_tracer(scheduler, tracing, model=exp.model, epoch_ns=epoch, remote=executor.ship_spans)

        metrics = LiveMetrics(scheduler, exp.slo_target, experiment=exp.name)
        before = len(recovered.rows)

        def progress(done: int) -> None:
            self._done = before + done
            metrics.update()

        finished = recovered.finished_ids
        requests = (r for r in workload.requests() if r.request_id not in finished) if finished else workload.requests()
        t0 = time.perf_counter()
        end_s = run_events(scheduler, requests, progress, progress_every=50, hooks=executor, clock=wall)
        executor.finish()
        busy = [g.busy_s for g in scheduler.groups]
        if journal is not None:
            journal.commit(end_s, scheduler.decisions, busy)
            busy = journal.total_busy(busy)
            journal.close()
        metrics.update(force=True)
        span_counts: list[dict[str, int]] = []
        if tracing is not None:        # a run ends only once its spans are exported (or counted dropped)
            span_counts = [dataclasses.asdict(tracing.shutdown()), *ray.get([a.flush_traces.remote() for a in actors], timeout=120)]
        return {
            "span_counts": span_counts,
            "records": [*recovered.rows, *scheduler.records],
            "decisions": recovered.whole_log(scheduler.decisions).state(),
            "usage": [(g.name, g.device, g.role.value, b, g.cost.dollars_per_hour, g.decode_seq_s, g.kv_block_s,
                       g.limits.max_num_seqs, g.kv.num_blocks) for g, b in zip(scheduler.groups, busy)],
            "tokens": executor.tokens,
            "stats": {"actor_calls": executor.stats.actor_calls, "transfers": executor.stats.transfers,
                      "bytes_moved": executor.stats.bytes_moved, "import_s": executor.stats.import_s,
                      "flushes": executor.stats.flushes, "min_margin": executor.stats.min_margin,
                      "kv_damaged": executor.stats.kv_damaged, "stuck_actors": executor.stats.stuck,
                      "call_s": executor.stats.flush_s,
                      "lateness_s": wall.lateness_s if wall is not None else [],
                      "wall_s": time.perf_counter() - t0,
                      "scheduler_restarts_at_s": restarts,
                      "recovered_requests": len(recovered.resumed), "kv_dropped_at_restart": kv_dropped,
                      "failures": [{"time_s": t, "group": scheduler.groups[g].name, "restarted": back}
                                   for t, g, back in executor.failures]},
        }
