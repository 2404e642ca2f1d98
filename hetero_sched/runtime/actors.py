"""The Ray actors: one per device group, and the scheduler.

``DeviceGroupActor`` asks Ray for the resources its group stands for (``neuron_cores``,
``cs3``, ``GPU``) and a label selector for its device kind and pool; it holds a backend and
the KV of the requests at that group. ``SchedulerActor`` holds the functional core and drives
it with the same event loop as the simulator, on a virtual or a wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import numpy as np
import ray

from hetero_sched.errors import RunFailed
from hetero_sched.experiment import parse_experiment
from hetero_sched.runtime.backends import make_backend
from hetero_sched.runtime.clock import WallClock
from hetero_sched.runtime.devices import RayDevices, ask_all
from hetero_sched.runtime.journal import JournalError
from hetero_sched.runtime.kvcodec import KVCorruptionError, flip_payload_bit
from hetero_sched.runtime.livemetrics import LiveMetrics
from hetero_sched.runtime.messages import pack, unpack, unpack_any
from hetero_sched.engine.pacing import DevicePace, Timeline, measured_report
from hetero_sched.runtime.recovery import Recovered, RunJournal
from hetero_sched.engine.assembly import build_scheduler
from hetero_sched.engine.loop import run_events
from hetero_sched.kvmetrics import kv_summary
from hetero_sched.metrics import records_table
from hetero_sched.tracing import ProcessTracing, TraceSettings, attach_tracer, emit_shipped, epoch_for


def _restarted() -> bool:
    """Whether Ray restarted this actor (Ray 2.60's own check warns about an API it uses)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.get_runtime_context().was_current_actor_reconstructed


@dataclass
class _Running:
    """The span a device is running: its timeline, and where a cut asked it to stop."""

    span_id: int
    timeline: Timeline
    steps: int
    """Steps it makes (virtual clock: after the cuts so far; wall clock: planned, then cut)."""
    tokens: dict[int, list[int]] = field(default_factory=dict)
    margins: dict[int, float] = field(default_factory=dict)
    cut: Optional[asyncio.Event] = None
    stop_at_s: Optional[float] = None
    stream: Optional["_Streamer"] = None


class _Streamer:
    """Tokens a device reports as it makes them (serving streams them): ``(request, index in its
    output, token id or -1 when the backend makes none, time)``, sent to the sink at most every
    ``interval_s``."""

    def __init__(self, sink: Any, group_id: int, span_id: int, interval_s: float) -> None:
        self.sink, self.group_id, self.span_id, self.interval_s = sink, group_id, span_id, interval_s
        self._items: list[list[Any]] = []
        self._sent = time.monotonic()

    def add(self, request_id: int, index: int, token: int, t_s: float) -> None:
        self._items.append([request_id, index, token, t_s])

    def flush(self, force: bool = False) -> None:
        if self._items and (force or time.monotonic() - self._sent >= self.interval_s):
            self.sink.deliver.remote(pack("progress", group_id=self.group_id, span_id=self.span_id,
                                          tokens=self._items))
            self._items = []
            self._sent = time.monotonic()


def _bundles(exports: list[tuple[int, Any]]) -> list[ray.ObjectRef]:
    """A call's exported KV batches as one object this actor owns (none if it exported none)."""
    return [ray.put([batch for _, batch in exports])] if exports else []


def _void_report(incarnation: int, span_id: int = -1) -> bytes:
    """A report of nothing: the span was not run (another incarnation) or a cut was only noted."""
    return pack("span_report", span_id=span_id, start_s=0.0, end_s=0.0, steps=0, first_step_end_s=0.0,
                max_step_s=0.0, tokens={}, margins={}, exports=[], compute_s=0.0, incarnation=incarnation)


@ray.remote(num_cpus=0)
class DeviceGroupActor:
    """One device group: runs the spans the scheduler sends on its own clock and reports them.

    An async actor, so a cut (or a KV import) can reach it while a span runs. On the wall clock
    ``run_span`` holds the span — for the cost model's duration at this device's pace, or for
    as long as the backend really computes (``pace: real``) — and answers when it ends; a
    ``cut`` makes it stop at its first step boundary after the cut. On the virtual clock it
    answers at once with the span's timeline on the device's clock (computing numpy tokens
    eagerly), and a cut answers with the revised one (rolling the extra steps back).
    """

    def __init__(self, config: bytes, sink: Any = None) -> None:
        """``sink``: an actor with a ``deliver(progress message)`` method to stream tokens to as
        they are made (the serving front door), or None."""
        cfg = unpack(config, "configure")
        self._sink = sink
        self._progress_s = cfg["progress_interval_s"]
        self.group_id = cfg["group_id"]
        self.name = cfg["name"]
        self._backend_args = dict(kind=cfg["backend"], model=cfg["model"], seed=cfg["seed"],
                                  bytes_scale=cfg["bytes_scale"], block_size=cfg["block_size"])
        self.backend = make_backend(**self._backend_args)
        self.computes = cfg["backend"] == "numpy"
        self.clock = cfg["clock"]
        self.time_scale = cfg["time_scale"]
        self.real_pace = cfg["pace"] == "real"
        faults = cfg["faults"]
        self.pace = DevicePace(cfg["device_speed"], cfg["device_jitter"], cfg["seed"],
                               int(faults.get("short_steps", 0)) if faults.get("short_group") == self.name else 0)
        self.tracing: Optional[ProcessTracing] = (
            ProcessTracing(TraceSettings.from_dict(cfg["trace"]), instance=self.name) if cfg["trace"] else None)
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        """New each time Ray (re)starts this actor: a restart loses everything it held."""
        self._fetch_timeout_s = cfg["fetch_timeout_s"]
        self._origin_unix_s = time.time()
        self._spans = 0
        self._hang_at = 0 if faults.get("hang_group") != self.name or _restarted() \
            else int(faults.get("hang_at_span", 0))
        """Injected fault: this span's report never comes (once: not after Ray restarts the actor)."""
        self._error_at = int(faults.get("error_at_span", 1)) if faults.get("error_group") == self.name else 0
        """Injected fault: this span raises inside the actor (a device's own bug: the run fails, naming it)."""
        self._overpromise = 2.0 if faults.get("overpromise_group") == self.name else 1.0
        """Injected fault: the device says it is twice as slow as it runs (its reports come early)."""
        self._corrupt_every = int(faults.get("corrupt_every", 0))
        self._fault_rng = np.random.default_rng(int(faults.get("seed", 0)))
        self._exports = 0
        self._running: Optional[_Running] = None
        self._next_seq = 0
        self._turns = asyncio.Condition()
        """Ray does not keep an async actor's calls in order, but what one call does must
        happen before the next (a span's joiners need the imports sent before it): calls carry
        a sequence number (per incarnation), and each acts in its turn (:meth:`_in_turn`)."""
        self._measured: dict[int, dict[str, list[dict[str, Any]]]] = {}
        """Tracing: what this actor measured per request, until the request's spans arrive."""

    def _measure(self, request_id: int, kind: str, seconds: float, **attrs: Any) -> None:
        self._measured.setdefault(request_id, {}).setdefault(kind, []).append({"seconds": seconds, **attrs})

    async def begin(self, origin_unix_s: float) -> int:
        """The run's clock: run time 0 is ``origin_unix_s`` (wall clock); ordered calls count
        from 0 again. Returns the incarnation."""
        self._origin_unix_s = origin_unix_s
        self._next_seq = 0
        return self.incarnation

    @contextlib.asynccontextmanager
    async def _in_turn(self, seq: int) -> AsyncIterator[None]:
        """Act as the ``seq``-th ordered call: after every earlier one has acted (``seq`` < 0: an
        unordered call, which acts at once)."""
        if seq < 0:
            yield
            return
        async with self._turns:
            await self._turns.wait_for(lambda: self._next_seq == seq)
        try:
            yield
        finally:
            async with self._turns:
                self._next_seq = seq + 1
                self._turns.notify_all()

    def _now(self) -> float:
        return (time.time() - self._origin_unix_s) / self.time_scale

    SPIN_S = 0.0015
    """The event loop's timers fire up to a millisecond late (epoll's resolution): a hold sleeps
    until this much before its end and spins the rest, so a device holds a span for its time."""

    async def _sleep_until(self, t_s: float, interrupt: Optional[asyncio.Event] = None) -> bool:
        """Wait until run time ``t_s``; True if ``interrupt`` was set first."""
        target = self._origin_unix_s + t_s * self.time_scale
        delay = target - time.time() - self.SPIN_S
        if interrupt is not None and interrupt.is_set():
            return True
        if delay > 0:
            if interrupt is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(interrupt.wait(), timeout=delay)
                    return True
                except asyncio.TimeoutError:
                    pass
        while time.time() < target:
            if interrupt is not None and interrupt.is_set():
                return True
            await asyncio.sleep(0)               # let a cut in while spinning
        return False

    async def flush_traces(self) -> dict[str, int]:
        """Export every span this actor ended (bounded wait); its counts, for the run summary."""
        if self.tracing is None:
            return {}
        return dataclasses.asdict(self.tracing.flush())

    def __ray_shutdown__(self) -> None:
        # Graceful exit only (ray.kill skips it): the run flushes explicitly before killing.
        if self.tracing is not None:
            self.tracing.shutdown()

    async def incarnation_id(self) -> int:
        return self.incarnation

    async def pace_bounds(self) -> tuple[float, float, int]:
        """What this device promises about its reports: the least and most seconds it takes per
        modeled second, and how many decode steps short it may stop a span (a fault injected)."""
        lo, hi = self.pace.bounds()
        return lo * self._overpromise, hi * self._overpromise, self.pace.short_steps

    async def recover(self) -> int:
        """The handshake with a restarted scheduler: how many requests' KV this group held for
        the dead one. All of it is dropped (the new scheduler prefills those requests again) and
        the incarnation renewed, so a late step of the old scheduler runs none of its ops."""
        held = self.backend.held()
        self.backend = make_backend(**self._backend_args)
        self._measured.clear()
        self._running = None
        self._next_seq = 0
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        return held

    async def node_labels(self) -> dict[str, str]:
        """Where this actor landed (its node's labels), for placement checks."""
        return {k: str(v) for k, v in ray.get_runtime_context().get_node_labels().items()}

    async def held(self) -> int:
        """Requests whose KV this group still holds (0 after a clean run)."""
        return self.backend.held()

    # --- spans --------------------------------------------------------------------------------
    async def run_span(self, msg: bytes) -> tuple[bytes, list[ray.ObjectRef]]:
        """Run one span; answer with its report (and the KV bundle it exported, if any)."""
        report, exports = await self._span(unpack(msg, "span"))
        return report, _bundles(exports)

    @ray.method(num_returns=2)
    async def run_batch(self, msg: bytes, refs: list[ray.ObjectRef]) -> tuple[bytes, list[Any]]:
        """Virtual clock, a device that promised its pace exactly: a stretch of its calls —
        spans, cuts and KV steps, in order — in one Ray call, since one call per span costs
        more than the span. Answers every call's report, and (the second return) every KV
        batch the stretch exported, as one bundle in order; ``refs`` are the bundles its
        imports read (one list for the whole stretch)."""
        batch = unpack(msg, "batch")
        if batch["expect"] != self.incarnation:
            return pack("batch_report", reports=[], incarnation=self.incarnation), []
        t0 = time.perf_counter()
        bundles = [await self._fetch(ref) for ref in refs]
        fetch_s = time.perf_counter() - t0
        reports: list[bytes] = []
        exports: list[tuple[int, Any]] = []
        for data in batch["items"]:
            m = unpack_any(data, ("span", "cut", "step"))
            if m["kind"] == "span":
                report, made = await self._span(m)
            elif m["kind"] == "cut":
                report, made = await self._cut(m), []
            else:
                report, made, _ = await self._step(m, bundles, fetch_s, 0.0)
                fetch_s = 0.0
            reports.append(report)
            exports.extend(made)
        return pack("batch_report", reports=reports, incarnation=self.incarnation), [b for _, b in exports]

    async def _span(self, m: dict[str, Any]) -> tuple[bytes, list[tuple[int, Any]]]:
        """Run one span message; its report and the KV batches it exported."""
        if m["expect"] != self.incarnation:
            # restarted since this span was planned: the state it acts on died with the old
            # process, so run none of it and say so (the scheduler resumes those requests)
            return _void_report(self.incarnation), []
        virtual = self.clock == "virtual"
        async with self._in_turn(m["seq"]):   # after the calls sent before it: its KV and joiners are here
            span = m["span"]
            factor = self.pace.factor(self.group_id, span["span_id"])
            tl = Timeline.of(span, float(span["start_s"]) if virtual else self._now(), factor, self.pace.short_steps)
            run = _Running(span["span_id"], tl, tl.steps, cut=None if virtual else asyncio.Event())
            self._running = run
            t0 = time.perf_counter()
            stepwise = not virtual and span["kind"] == "decode" and self.computes
            exports = self._compute(span, run, 1 if stepwise else tl.steps)
            if self._sink is not None and not virtual:
                run.stream = _Streamer(self._sink, self.group_id, span["span_id"], self._progress_s)
        self._spans += 1
        if self._spans == self._error_at:
            raise RuntimeError(f"injected fault: span {span['span_id']} failed on {self.name}")
        if self._spans == self._hang_at:
            await asyncio.Event().wait()          # injected fault: this report never comes
        if virtual:
            times = tl.report(run.steps)
        elif span["kind"] == "decode":
            times = await self._wall_decode(span, run)
        else:
            if not self.real_pace:
                await self._sleep_until(tl.end_s())
            times = tl.report(run.steps, end_s=self._now())
            if run.stream is not None:
                self._stream_span(span, run, times["end_s"])
        if not virtual:
            self._running = None
        compute_s = time.perf_counter() - t0
        return self._report(run, times, [rid for rid, _ in exports], compute_s), exports

    def _report(self, run: _Running, times: dict[str, float], exports: list[int], compute_s: float) -> bytes:
        return pack("span_report", span_id=run.span_id, **times, tokens=run.tokens, margins=run.margins,
                    exports=exports, compute_s=compute_s, incarnation=self.incarnation)

    def _compute(self, span: dict[str, Any], run: _Running, steps: int) -> list[tuple[int, Any]]:
        """The span's work on the backend (all of it at once); the KV batches it exports."""
        kind = span["kind"]
        if kind in ("decode", "mixed") and steps:
            self._note(run, *self.backend.decode(span["joiners"], steps))
        exports: list[tuple[int, Any]] = []
        if kind in ("prefill", "mixed") and span["requests"]:
            t0 = time.perf_counter()
            self._note(run, *self.backend.prefill(span["requests"]))
            dt = time.perf_counter() - t0
            for item in span["requests"]:
                if self.tracing is not None:
                    self._measure(item["id"], "prefill", dt, **{"hetero.compute_s": dt})
                if item.get("export"):
                    exports.append((item["id"], self._export(item["id"], item["true_bytes"])))
        return exports

    @staticmethod
    def _note(run: _Running, tokens: dict[int, list[int]], margins: dict[int, float]) -> None:
        for rid, toks in tokens.items():
            run.tokens.setdefault(rid, []).extend(toks)
        for rid, margin in margins.items():
            run.margins[rid] = min(margin, run.margins.get(rid, margin))

    async def _wall_decode(self, span: dict[str, Any], run: _Running) -> dict[str, float]:
        """Decode steps in real time: computed one at a time (numpy; the first already is), each
        held until its modeled end unless the pace is real; or, with nothing to compute, one
        interruptible hold. A cut stops it at the first step boundary after the cut."""
        tl = run.timeline
        cut = run.cut
        assert cut is not None
        if not self.computes:
            stream = run.stream
            sent = 0
            end = tl.end_s()
            while True:       # one interruptible hold; a streaming device wakes to report steps
                wake = end if stream is None else min(end, self._now() + self._progress_s)
                if await self._sleep_until(wake, cut):
                    run.steps = tl.stop_at(max(run.stop_at_s or 0.0, self._now()))
                    await self._sleep_until(tl.step_end_s(run.steps))
                    break
                if stream is not None:
                    sent = self._stream_steps(span, run, sent, tl.steps_done_by(self._now()))
                if wake >= end:
                    break
            if stream is not None:
                self._stream_steps(span, run, sent, run.steps)
                stream.flush(force=True)
            return tl.report(run.steps, end_s=self._now())
        ends: list[float] = []
        stop: Optional[int] = None
        for j in range(1, tl.steps + 1):
            if j > 1:
                self._note(run, *self.backend.decode([], 1))
            if self.real_pace:
                await asyncio.sleep(0)            # let a cut in between steps
            else:
                await self._sleep_until(tl.step_end_s(j))
            ends.append(self._now())
            if run.stream is not None:
                for rid, index in span["running"].items():
                    run.stream.add(int(rid), index + j - 1, run.tokens[int(rid)][j - 1], ends[-1])
                run.stream.flush()
            if cut.is_set() and stop is None:     # a cut came during this step: where to stop
                stop = j if self.real_pace else max(j, tl.stop_at(run.stop_at_s or 0.0))
            if stop is not None and j >= stop:
                break
        run.steps = len(ends)
        if run.stream is not None:
            run.stream.flush(force=True)
        return measured_report(tl.start_s, ends, "decode")

    def _stream_steps(self, span: dict[str, Any], run: _Running, sent: int, done: int) -> int:
        """Report the tokens of modeled decode steps ``sent+1 .. done`` at their step ends."""
        assert run.stream is not None
        for j in range(sent + 1, done + 1):
            t = run.timeline.step_end_s(j)
            for rid, index in span["running"].items():
                run.stream.add(int(rid), index + j - 1, -1, t)
        run.stream.flush()
        return max(sent, done)

    def _stream_span(self, span: dict[str, Any], run: _Running, end_s: float) -> None:
        """A prefill or mixed span ended: its decode step's tokens and its finished prompts' first."""
        assert run.stream is not None
        if span["kind"] == "mixed" and run.steps:
            for rid, index in span["running"].items():
                toks = run.tokens.get(int(rid))
                run.stream.add(int(rid), index, toks[0] if toks else -1, end_s)
        for item in span["requests"]:
            if "end" in item and item["end"] < item["total"]:
                continue                              # a chunk short of the prompt's end: no token yet
            toks = run.tokens.get(item["id"])
            run.stream.add(item["id"], item["done"], toks[-1] if toks else -1, end_s)
        run.stream.flush(force=True)

    async def cut(self, msg: bytes) -> tuple[bytes, list[ray.ObjectRef]]:
        """Stop the running span at its first step boundary at or after ``at_s`` (and after now)."""
        return await self._cut(unpack(msg, "cut")), []

    async def _cut(self, m: dict[str, Any]) -> bytes:
        run = self._running
        if m["expect"] != self.incarnation:
            return _void_report(self.incarnation)
        if self.clock == "virtual":
            async with self._in_turn(m["seq"]):
                return self._virtual_cut(m["span_id"], float(m["at_s"]))
        if run is None or run.span_id != m["span_id"]:
            return _void_report(self.incarnation)            # over already: its report says how it ended
        run.stop_at_s = max(float(m["at_s"]), self._now())
        if run.cut is not None:
            run.cut.set()
        return _void_report(self.incarnation)

    def _virtual_cut(self, span_id: int, at_s: float) -> bytes:
        """The span's revised timeline, its steps past the cut undone (virtual clock)."""
        run = self._running
        if run is None or run.span_id != span_id:
            return _void_report(self.incarnation)
        steps = run.timeline.stop_at(at_s)
        if steps < run.steps:
            if self.computes:
                self.backend.rollback(run.steps - steps)
                for toks in run.tokens.values():
                    del toks[steps:]
            run.steps = steps
        return self._report(run, run.timeline.report(run.steps), [], 0.0)

    # --- KV hand-offs ---------------------------------------------------------------------------
    def _export(self, request_id: int, true_bytes: int) -> Any:
        t0 = time.perf_counter()
        batch = self.backend.export_kv(request_id, true_bytes)
        self._exports += 1
        if self._corrupt_every and self._exports % self._corrupt_every == 0:
            batch = flip_payload_bit(batch, int(self._fault_rng.integers(1 << 40)))   # injected fault
        if self.tracing is not None:
            dt = time.perf_counter() - t0
            self._measure(request_id, "encode", dt, **{"hetero.kv.encode_s": dt,
                                                       "hetero.kv.bytes_moved": int(batch.nbytes)})
        return batch

    async def step(self, msg: bytes, refs: list[ray.ObjectRef]) -> tuple[bytes, list[ray.ObjectRef]]:
        """Carry out KV hand-offs and bookkeeping, in order; report imports, return exports.

        ``refs`` are KV bundles (lists of per-request Arrow batches) read here — zero-copy on
        one node — with every checksum verified. A step's exports are ``ray.put`` as one bundle
        this actor owns: one object per step, not per request (a put costs ~1 ms).
        """
        step = unpack(msg, "step")
        t0 = time.perf_counter()
        if step["expect"] != self.incarnation:
            return (await self._step(step, [], 0.0, 0.0))[0], []
        async with self._in_turn(step["seq"]):     # in the order sent, spans included
            queued_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            bundles = [await self._fetch(ref) for ref in refs]
            report, exports, blocks = await self._step(step, bundles, time.perf_counter() - t0, queued_s, turn=False)
        out = _bundles(exports)
        if blocks:
            out.append(ray.put(blocks))
        return report, out

    async def _step(self, step: dict[str, Any], bundles: list[Optional[list[Any]]], fetch_s: float,
                    queued_s: float, turn: bool = True) -> tuple[bytes, list[tuple[int, Any]], list[Any]]:
        """A step message's operations (in its turn, unless the caller holds it): its report, the
        KV batches it exported, the prefix blocks it exported for the KV store. ``bundles``: the
        call's KV bundles, fetched (None: lost)."""
        imported: list[int] = []
        bad_kv: list[int] = []
        exports: list[tuple[int, Any]] = []
        blocks: list[Any] = []
        block_flows: list[int] = []
        store_bytes = 0
        import_bytes = 0
        import_s = 0.0
        if step["expect"] != self.incarnation:         # meant for an earlier incarnation: do none of it
            return pack("step_report", import_bytes=0, import_s=0.0, fetch_s=0.0, queued_s=0.0, imported=[], bad_kv=[],
                        exports=[], block_exports=[], store_bytes=0, incarnation=self.incarnation), [], []
        async with (self._in_turn(step["seq"]) if turn else contextlib.nullcontext()):
            for op in step["ops"]:
                kind = op["op"]
                if kind == "import":
                    t0 = time.perf_counter()
                    bundle = bundles[op["ref"]]
                    try:
                        if bundle is None:
                            raise KVCorruptionError(f"KV of request {op['id']}: its object was lost")
                        moved = self.backend.import_kv(op["id"], bundle[op["index"]], op["last"])
                    except KVCorruptionError:
                        bad_kv.append(op["id"])         # never decoded from: the scheduler sends it again
                        continue
                    dt = time.perf_counter() - t0
                    imported.append(op["id"])
                    import_bytes += moved
                    import_s += dt
                    if self.tracing is not None:
                        self._measure(op["id"], "decode", dt, **{"hetero.kv.decode_s": dt, "hetero.kv.bytes_moved": moved})
                elif kind == "export":
                    exports.append((op["id"], self._export(op["id"], op["true_bytes"])))
                elif kind == "trace":
                    measured = self._measured.pop(op["id"], {})
                    if self.tracing is not None:
                        emit_shipped(self.tracing.tracer, op["spans"], measured)
                elif kind == "export_blocks":
                    blocks.extend(self.backend.export_blocks(op["hashes"], op["block_bytes"]))
                    block_flows.append(op["flow"])
                elif kind == "import_blocks":
                    store_bytes += await self._import_blocks(op["id"], op["hashes"], bundles[op["ref"]])
                else:
                    self.backend.forget(op["ids"])
        report = pack("step_report", import_bytes=import_bytes, import_s=import_s, fetch_s=fetch_s, queued_s=queued_s,
                      imported=imported, bad_kv=bad_kv, exports=[rid for rid, _ in exports],
                      block_exports=block_flows, store_bytes=store_bytes, incarnation=self.incarnation)
        return report, exports, blocks

    async def _import_blocks(self, request_id: int, hashes: list[int], block_refs: Optional[list[Any]]) -> int:
        """Prefix blocks read from the KV store by ref, verified, into the backend's prefix cache.
        A block the store does not have (or cannot hand over) fails the step: the core counted it
        as a hit, and a silent recompute would hide the error."""
        if block_refs is None or len(block_refs) != len(hashes) or any(r is None for r in block_refs):
            raise KVCorruptionError(f"request {request_id}: the KV store lacks prefix blocks it should hold")
        batches = [await self._fetch(ref) for ref in block_refs]
        if any(b is None for b in batches):
            raise KVCorruptionError(f"request {request_id}: prefix blocks from the KV store were lost")
        return self.backend.import_blocks(hashes, batches)

    async def _fetch(self, ref: ray.ObjectRef) -> Optional[list[Any]]:
        """A KV bundle, or None if it is gone (its owner, the exporting actor, died) or unreadable."""
        try:
            return await asyncio.wait_for(ref, timeout=self._fetch_timeout_s)
        except (ray.exceptions.RayError, asyncio.TimeoutError):     # lost, its owner or maker died
            return None


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
            journal_path: Optional[str] = None, call_timeout_s: float = 120.0,
            verify_imports: bool = False, store_actors: Optional[list[Any]] = None) -> dict[str, Any]:
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
        first = float(workload.arrival_s[0]) if len(workload) else 0.0
        wall: Optional[WallClock] = WallClock(time_scale, recovered.origin_unix_s) if clock == "wall" else None
        origin = wall.origin_unix_s(first) if wall is not None else None
        ask_all(actors, "begin", call_timeout_s, origin if origin is not None else time.time())
        devices = RayDevices(actors, wall=wall, real_tokens=backend == "numpy", verify_imports=verify_imports,
                             journal=journal, call_timeout_s=call_timeout_s, store_actors=store_actors)
        devices.scheduler = scheduler
        devices.tokens.update(recovered.tokens)
        devices.failures[:] = recovered.failures
        devices.stats.kv_damaged = recovered.kv_damaged
        scheduler.hooks = devices
        scheduler.resumed = dict(recovered.resumed)
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
            attach_tracer(scheduler, tracing, model=exp.model, epoch_ns=epoch, remote=devices.ship_spans)

        metrics = LiveMetrics(scheduler, exp.slo_target, experiment=exp.name)
        before = len(recovered.rows)

        def progress(done: int) -> None:
            self._done = before + done
            metrics.update()

        finished = recovered.finished_ids
        requests = (r for r in workload.requests() if r.request_id not in finished) if finished else workload.requests()
        t0 = time.perf_counter()
        end_s = run_events(scheduler, requests, progress, progress_every=50, devices=devices, clock=wall)
        devices.finish()
        busy = [g.busy_s for g in scheduler.groups]
        if journal is not None:
            journal.commit(end_s, scheduler.decisions, busy)
            busy = journal.total_busy(busy)
            journal.close()
        metrics.update(force=True)
        span_counts: list[dict[str, int]] = []
        if tracing is not None:        # a run ends only once its spans are exported (or counted dropped)
            span_counts = [dataclasses.asdict(tracing.shutdown()), *ray.get([a.flush_traces.remote() for a in actors], timeout=120)]
        st = devices.stats
        kv = kv_summary(records_table([*recovered.rows, *scheduler.records]), scheduler.groups, scheduler.store, workload)
        return {
            "kv_cache": kv,
            "span_counts": span_counts,
            "records": [*recovered.rows, *scheduler.records],
            "decisions": recovered.whole_log(scheduler.decisions).state(),
            "usage": [(g.name, g.device, g.role.value, b, g.cost.dollars_per_hour, g.decode_seq_s, g.kv_block_s,
                       g.limits.max_num_seqs, g.kv.num_blocks) for g, b in zip(scheduler.groups, busy)],
            "tokens": devices.tokens,
            "stats": {"actor_calls": st.actor_calls, "span_reports": st.span_reports, "events_ahead": st.events_ahead, "transfers": st.transfers,
                      "bytes_moved": st.bytes_moved, "import_s": st.import_s, "min_margin": st.min_margin,
                      "import_fetch_s": st.fetch_s, "import_queued_s": st.queued_s,
                      "kv_damaged": st.kv_damaged, "stuck_actors": st.stuck, "kv_bad_unverified": st.unverified_bad,
                      "store_put_bytes": st.store_put_bytes, "store_read_bytes": st.store_read_bytes,
                      "store_puts": st.store_puts, "store_reads": st.store_reads,
                      "report_delay_s": st.report_delay_s, "dispatch_delay_s": st.dispatch_delay_s,
                      "device_pace": {scheduler.groups[g].name: float(np.median(r)) for g, r in sorted(st.pace.items())},
                      "lateness_s": wall.lateness_s if wall is not None else [],
                      "wall_s": time.perf_counter() - t0,
                      "scheduler_restarts_at_s": restarts,
                      "recovered_requests": len(recovered.resumed), "kv_dropped_at_restart": kv_dropped,
                      "failures": [{"time_s": t, "group": scheduler.groups[g].name, "restarted": back}
                                   for t, g, back in devices.failures]},
        }
