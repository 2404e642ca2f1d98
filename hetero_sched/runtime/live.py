"""``hetero-sched run``: an experiment on a Ray cluster, with real actors and real KV bytes.

Brings up (or connects to) a cluster that can host the experiment, places one
``DeviceGroupActor`` per group replica by resources and labels, runs the core in a
``SchedulerActor`` on the driver's node, and turns what comes back into the same
:class:`~hetero_sched.results.RunResult` the simulator makes.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Union

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hetero_sched.core.events import DecisionLog
from hetero_sched.errors import RunFailed, UserError
from hetero_sched.experiment import Experiment, build_workload
from hetero_sched.metrics import GroupUsage
from hetero_sched.results import RunResult
from hetero_sched.runtime.actors import SCHEDULER_RESTARTS, DeviceGroupActor, SchedulerActor
from hetero_sched.runtime.cluster import ensure_cluster, object_store_usage, placement_options
from hetero_sched.runtime.messages import pack
from hetero_sched.runtime.store import start_store_actors
from hetero_sched.engine.assembly import ExperimentLike, make_result, resolve, tracing_summary
from hetero_sched.tracing import ExportCounts, TraceSettings
from hetero_sched.workload import Workload

Clock = Literal["wall", "virtual"]
Backend = Literal["modeled", "numpy"]
Pace = Literal["modeled", "real"]
PerGroup = Union[float, Mapping[str, float]]
"""A device knob for every group (a number) or by group name (a group's ``name``, or a replica's
``name-i``; groups not named keep the default)."""


def _per_group(value: PerGroup, group: str, replica: str, default: float, what: str) -> float:
    if isinstance(value, Mapping):
        v = value.get(replica, value.get(group, default))
    else:
        v = value
    v = float(v)
    if not math.isfinite(v) or v < 0 or (what == "device_speed" and v == 0):
        raise UserError(f"{what} for {replica} must be finite and {'> 0' if what == 'device_speed' else '>= 0'}, got {v}")
    return v


def with_absolute_paths(exp: Experiment, base: Path) -> Experiment:
    """Cost-profile paths resolved here, since the scheduler actor may run elsewhere."""
    groups = []
    for g in exp.groups:
        if g.cost_profile is not None and not Path(g.cost_profile).is_absolute():
            p = Path(g.cost_profile)
            g = g.model_copy(update={"cost_profile": str((p if p.exists() else base / p).resolve())})
        groups.append(g)
    return exp.model_copy(update={"groups": groups})


def start_group_actors(exp: Experiment, backend: Backend, bytes_scale: float, *, clock: Clock = "wall",
                       time_scale: float = 1.0, pace: Pace = "modeled", device_speed: PerGroup = 1.0,
                       device_jitter: PerGroup = 0.0, trace: Optional[TraceSettings] = None,
                       faults: Optional[dict[str, Any]] = None, fetch_timeout_s: float = 60.0,
                       sink: Any = None, progress_interval_s: float = 0.005) -> list[Any]:
    """One actor per group replica, in the core's group order, placed by resources and labels.

    ``sink``: an actor the devices stream their tokens to as they make them (``deliver``), at
    most every ``progress_interval_s`` (serving); None: they only report spans."""
    actors = []
    for g in exp.groups:
        options = placement_options(g)
        for r in range(g.replicas):
            name = g.name if g.replicas == 1 else f"{g.name}-{r}"
            cfg = pack("configure", group_id=len(actors), name=name, role=g.role, backend=backend,
                       model="tiny" if backend == "numpy" else exp.model, seed=exp.seed,
                       bytes_scale=float(bytes_scale), block_size=g.block_size, clock=clock,
                       time_scale=float(time_scale), pace=pace,
                       device_speed=_per_group(device_speed, g.name, name, 1.0, "device_speed"),
                       device_jitter=_per_group(device_jitter, g.name, name, 0.0, "device_jitter"),
                       trace=trace.to_dict() if trace is not None else {}, faults=dict(faults or {}),
                       fetch_timeout_s=float(fetch_timeout_s), progress_interval_s=float(progress_interval_s))
            actors.append(DeviceGroupActor.options(**options).remote(cfg, sink))
    return actors


def run_live(experiment: ExperimentLike = None, *, address: Optional[str] = None, clock: Clock = "wall",
             backend: Backend = "modeled", time_scale: float = 1.0, bytes_scale: float = 1e-3,
             pace: Pace = "modeled", device_speed: PerGroup = 1.0, device_jitter: PerGroup = 0.0,
             workload: Optional[Workload] = None,
             progress: Optional[Callable[[int, int], None]] = None,
             trace: Optional[TraceSettings] = None, faults: Optional[dict[str, Any]] = None,
             journal: Optional[Path] = None, call_timeout_s: float = 120.0) -> RunResult:
    """Run an experiment live: device-group actors run the spans the core plans and report them.

    ``clock="virtual"``: devices report their spans' times on a virtual clock at once — at the
    default pace the decision log is the simulator's exactly, *through the reports*; a device
    that reports otherwise changes the run. ``clock="wall"``: devices hold each span on their
    own clock and report when it ended; results are what they reported.
    ``device_speed`` / ``device_jitter`` (a number, or by group name): how a modeled device
    departs from the cost model — 0.8 runs 20% slower; jitter is the relative standard
    deviation of each span's duration (seeded). ``pace="real"`` (numpy backend, wall clock):
    a span takes the backend's real compute time, not the modeled one.
    ``bytes_scale``: real KV bytes moved per modeled byte (modeled backend). The numpy backend
    runs the catalog's ``tiny`` Llama for real and moves its real KV. ``trace``: one trace per
    request, spans emitted by the scheduler actor and by the group actors that did the work;
    the run returns after every process exported its spans (``summary["tracing"]``).
    ``faults`` injects faults for tests and chaos runs: ``{"corrupt_every": k, "seed": s}`` flips
    one bit of every k-th KV export's payload (each is caught by checksum and sent again);
    ``{"hang_group": name, "hang_at_span": n}`` makes that group's actor never report its n-th
    span; ``{"short_group": name, "short_steps": k}`` makes it stop every decode span of two or
    more steps k steps short; ``{"overpromise_group": name}`` makes it say it is twice as slow as
    it runs (virtual clock: its early reports fail the run); ``{"error_group": name,
    "error_at_span": n}`` makes its n-th span (default 1) raise inside the actor (the run fails,
    naming the group and the error). ``call_timeout_s``: a report that
    late past its span's expected end (or any answer that late) means the actor is stuck; it is
    killed and restarted, and what it held resumed, as if it had crashed.
    ``journal``: where the scheduler actor journals the run (a new file on this machine; default:
    a temporary one, removed afterwards). If the scheduler actor dies, Ray restarts it (up to
    ``SCHEDULER_RESTARTS`` times) and it recovers the run from the journal.
    """
    if clock not in ("wall", "virtual"):
        raise UserError(f"--clock must be wall or virtual, got {clock!r}")
    if backend not in ("modeled", "numpy"):
        raise UserError(f"--backend must be modeled or numpy, got {backend!r}")
    if not 0 < time_scale < math.inf or not 0 < bytes_scale < math.inf:
        raise UserError("--time-scale and --bytes-scale must be finite and > 0")
    if not 0 < call_timeout_s < math.inf:
        raise UserError(f"--call-timeout-s must be finite and > 0, got {call_timeout_s}")
    if pace not in ("modeled", "real"):
        raise UserError(f"--pace must be modeled or real, got {pace!r}")
    if pace == "real" and (backend != "numpy" or clock != "wall"):
        raise UserError("--pace real needs --backend numpy and --clock wall (a modeled device computes nothing "
                        "to time, and virtual time has no real durations)")
    exp, base = resolve(experiment)
    exp = with_absolute_paths(exp, base)
    if workload is None:
        workload = build_workload(exp.workload, exp.seed, base)
    if journal is not None and Path(journal).exists():
        raise UserError(f"journal {journal} already exists (a journal belongs to one run)")
    with ensure_cluster(exp, address) as cluster_address, _journal_file(journal) as journal_path:
        store_before = object_store_usage(cluster_address)
        actors = start_group_actors(exp, backend, bytes_scale, clock=clock, time_scale=time_scale, pace=pace,
                                    device_speed=device_speed, device_jitter=device_jitter, trace=trace,
                                    faults=faults, fetch_timeout_s=call_timeout_s / 2)
        stores = start_store_actors(exp)
        # pinned to this node, where its journal is; restarted (and its run retried) if it dies
        scheduler = SchedulerActor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
            max_restarts=SCHEDULER_RESTARTS, max_task_retries=SCHEDULER_RESTARTS).remote()
        try:
            placement = ray.get([a.node_labels.remote() for a in actors], timeout=120)
            t0 = time.perf_counter()
            fut = scheduler.run.remote(exp.model_dump(mode="json"), workload, actors, backend=backend,
                                       clock=clock, time_scale=time_scale,
                                       trace=trace.to_dict() if trace is not None else None,
                                       journal_path=str(journal_path), call_timeout_s=call_timeout_s,
                                       verify_imports=bool(faults), store_actors=stores)
            done = 0
            while True:
                ready, _ = ray.wait([fut], timeout=0.25)
                if progress is not None:
                    done = _progress(scheduler, done)
                    progress(done, len(workload))
                if ready:
                    break
            out = _result(fut)
            wall_s = time.perf_counter() - t0
            del fut, ready      # fetched: released, else the store never settles and the wait below takes 5 s
            held = [_held(a) for a in actors]
            store_held = ray.get([a.held.remote() for a in stores], timeout=60)
            store_after = _settled_store(cluster_address, store_before)
        except ray.exceptions.GetTimeoutError:
            raise UserError("the cluster could not place every device-group actor within 120 s "
                            "(check its resources and labels against the experiment)") from None
        finally:
            for a in [*actors, *stores, scheduler]:
                ray.kill(a)
    usage = [GroupUsage(*u) for u in out["usage"]]
    result = make_result(exp, out["records"], DecisionLog.from_state(out["decisions"]), usage, workload,
                         f"live-{clock}")
    stats = out["stats"]

    def ms(key: str, scale: float = time_scale) -> dict[str, float]:
        """A list of seconds in ``stats`` as its p50, p99 and mean in ms on the run's clock."""
        values = np.array(stats.pop(key) or [0.0]) * 1e3 * scale
        name = key.removesuffix("_s")
        return {f"{name}_ms_p50": float(np.percentile(values, 50)), f"{name}_ms_p99": float(np.percentile(values, 99)),
                f"{name}_ms_mean": float(values.mean())}

    # wall clock: the control plane's latency — from a span's reported end to the core applying
    # it, and from the core planning a span to its device starting it; KV imports at the
    # destination actor: fetching the bundle's bytes, and waiting for the call's turn
    latencies = {**ms("report_delay_s"), **ms("dispatch_delay_s"), **ms("lateness_s"),
                 **ms("import_fetch_s", 1.0), **ms("import_queued_s", 1.0)}
    result.summary["runtime"] = {
        "clock": clock, "backend": backend, "pace": pace, "time_scale": time_scale, "bytes_scale": bytes_scale,
        "wall_s": wall_s, **stats, **latencies, "kv_held_after_run": int(sum(held)),
        "store_actors": len(stores), "store_blocks_held_after_run": int(sum(b for b, _ in store_held)),
        "object_store_before": {"mib": store_before[0], "objects": store_before[1]},
        "object_store_after": {"mib": store_after[0], "objects": store_after[1]},
    }
    if out["kv_cache"] is not None:
        result.summary["kv_cache"] = out["kv_cache"]
    if trace is not None:
        result.summary["tracing"] = tracing_summary(trace, [ExportCounts(**c) for c in out["span_counts"]])
    result.stamp["placement"] = [{"group": u.name, "node_labels": labels} for u, labels in zip(usage, placement)]
    result.tokens = {int(k): v for k, v in out["tokens"].items()}
    return result


@contextlib.contextmanager
def _journal_file(path: Optional[Path]) -> Iterator[Path]:
    """The run's journal path: the one given (kept), or a temporary one (removed afterwards)."""
    if path is not None:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{Path(path).parent}: cannot hold the run's journal ({exc.strerror or exc})") from None
        yield Path(path).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="hetero-sched-journal-") as d:
        yield Path(d) / "scheduler.journal"


def _progress(scheduler: Any, last: int) -> int:
    """Requests finished so far (``last`` while a restarted scheduler actor is not answering yet)."""
    try:
        return int(ray.get(scheduler.progress.remote(), timeout=5))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return last


def _held(actor: Any) -> int:
    """Requests whose KV an actor still holds after the run (0 if it died since: so did its KV,
    or is still waiting to be restarted, e.g. its node is gone)."""
    try:
        return int(ray.get(actor.held.remote(), timeout=10))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return 0


def _result(fut: ray.ObjectRef) -> dict[str, Any]:
    """The scheduler actor's answer; its failure as one :class:`RunFailed` line, not a traceback."""
    try:
        return ray.get(fut)
    except ray.exceptions.RayActorError as exc:
        raise RunFailed(f"the scheduler actor died and its {SCHEDULER_RESTARTS} restarts are used up: "
                        f"{str(exc).splitlines()[0]}") from None
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, RunFailed):
            raise RunFailed(str(cause)) from None
        if isinstance(cause, UserError):        # a user's policy failing in the scheduler actor: one line
            raise UserError(str(cause)) from exc
        raise


def _settled_store(address: str, baseline: tuple[int, int], wait_s: float = 5.0) -> tuple[int, int]:
    """Object-store usage once Ray's asynchronous frees have caught up (actors still alive).

    Measured before the actors are killed, so objects freed only by their owner's death would
    still show here.
    """
    deadline = time.monotonic() + wait_s
    usage = object_store_usage(address)
    while usage[1] > baseline[1] and time.monotonic() < deadline:
        time.sleep(0.1)
        usage = object_store_usage(address)
    return usage
