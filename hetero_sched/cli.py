"""`hetero-sched` — the command line.

Every command turns a :class:`~hetero_sched.errors.UserError` into one line on stderr and exit
status 2 (the same status click uses for bad flags); no traceback for bad input, unless
``--debug`` asks for it (a user's policy failing keeps its traceback for that).
"""

from __future__ import annotations

import inspect
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import typer

from hetero_sched.errors import RunFailed, UserError

if TYPE_CHECKING:      # imported where used: a command's startup pays only for what it needs
    from rich.console import Console

    from hetero_sched.catalog import GroupSpec

_CLICK = sys.modules[typer.BadParameter.__module__]
"""click's exceptions module (recent typer vendors its own click, so not ``import click``)."""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Schedule and simulate disaggregated LLM inference on heterogeneous accelerators.",
)


def _command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn`` as a command whose help is its docstring, each paragraph on one line.

    Recent typer keeps a docstring's line breaks in rich help, and rich then wraps each source
    line again at the terminal's width: ragged help, a break in the middle of every sentence.
    Paragraphs (blank-line separated) stay apart; rich wraps each to the terminal.
    """
    paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
    return app.command(help="\n\n".join(" ".join(p.split()) for p in paragraphs))(fn)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point (``argv``: the arguments, default ``sys.argv[1:]``).

    Bad input — a :class:`UserError` or a flag click rejects — is one line on stderr and exit
    status 2, not click's usage box or a traceback; ``--debug`` prints the traceback first.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in (args[:args.index("--")] if "--" in args else args)
    try:
        code = app(args=args, standalone_mode=False)
    except getattr(_CLICK, "NoArgsIsHelpError", ()) as exc:  # bare command: its help
        exc.show()
        sys.exit(exc.exit_code)
    except _CLICK.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except UserError as exc:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    except RunFailed as exc:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        typer.echo(f"run failed: {' '.join(str(exc).split())}", err=True)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)



DEBUG = typer.Option(False, "--debug", help="On an error, print the full traceback (with the cause) before the one-line message.")
SET = typer.Option(None, "--set", metavar="KEY=VALUE",
                   help="Set any field by its dotted path before validation, as sweeps do (repeatable): "
                        "--set workload.rate_per_s=8 --set groups.0.replicas=2 --set policy.params.fallback=true. "
                        "VALUE is YAML.")


def _import_from(folder: Path) -> None:
    """Make modules in ``folder`` (an experiment's, sweep's or plan's) importable — a policy
    ``my_policy:P`` in ``my_policy.py`` next to the file — here and in the Ray workers this
    process starts (they inherit ``PYTHONPATH``), as ``python script.py`` does for its folder."""
    where = str(folder.resolve())
    if where not in sys.path:
        sys.path.insert(0, where)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if where not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([where, *(p for p in paths if p)])


@contextmanager
def _progress(quiet: bool, total: Optional[int], *columns: Any, **fields: Any) -> Iterator[Optional[Callable[..., None]]]:
    """A transient progress bar on stderr, or None when quiet or stderr is not a terminal (a
    log file or a pipe gets no bar debris); yields ``update(completed, total=None, **fields)``."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("work", total=total, **fields)
        yield lambda done, total=None, **values: bar.update(task, completed=done, **({"total": total} if total else {}),
                                                             **values)


OTLP_ENDPOINT = typer.Option(
    None, "--otlp-endpoint", help="OTLP/HTTP collector base URL (e.g. Jaeger http://localhost:4318); overrides $OTEL_EXPORTER_OTLP_ENDPOINT.")
SERVICE_NAME = typer.Option(None, "--service-name", help="Service name of the traces; overrides $OTEL_SERVICE_NAME (default hetero-sched).")
TRACE_SAMPLE = typer.Option(None, "--trace-sample", help="Fraction of requests traced, 0-1; overrides $OTEL_TRACES_SAMPLER[_ARG].")


def _tracing(trace: Optional[bool], endpoint: Optional[str], service: Optional[str], sample: Optional[float]):  # noqa: ANN202
    from hetero_sched.tracing import trace_settings
    return trace_settings(trace=trace, endpoint=endpoint, service_name=service, sample=sample)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)


def _print_tracing(summary: dict) -> None:
    t = summary.get("tracing")
    if t is not None:
        typer.echo(f"traces: {t['spans_exported']:,} spans exported, {t['spans_dropped']:,} dropped "
                   f"({t['processes']} process{'es' if t['processes'] != 1 else ''}) -> {t['endpoint']}", err=True)


RUNS_DIR_ENV = "HETERO_SCHED_RUNS_DIR"


def _default_out(name: str) -> Path:
    """``<runs>/<name>-<time>``, runs = ``$HETERO_SCHED_RUNS_DIR``, else ``runs`` -- except in a Ray
    job (``ray job submit``), whose working directory is a copy Ray deletes: ``~/hetero-sched-runs``."""
    import os
    from datetime import datetime
    in_ray_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray for a submitted job's driver
    base = os.environ.get(RUNS_DIR_ENV) or (Path.home() / "hetero-sched-runs" if in_ray_job else "runs")
    return Path(base) / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@_command
def simulate(
    experiment: Optional[Path] = typer.Argument(None, help="Experiment YAML (default: the shipped Trn2 -> CS-3 Llama-3.1-70B experiment)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<name>-<time>)."),
    seed: Optional[int] = typer.Option(None, min=0, help="Override the experiment's seed."),
    sets: Optional[list[str]] = SET,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; print the run folder only."),
    trace: bool = typer.Option(False, "--trace", help="Export one OpenTelemetry trace per request (virtual times laid onto the wall clock)."),
    otlp_endpoint: Optional[str] = OTLP_ENDPOINT,
    service_name: Optional[str] = SERVICE_NAME,
    trace_sample: Optional[float] = TRACE_SAMPLE,
    debug: bool = DEBUG,
) -> None:
    """Simulate an experiment in virtual time: progress bar, summary table, run folder.

    The run folder holds requests.parquet (one row per request), decisions.parquet (every
    placement, span, transfer, preemption and rejection, in order) and summary.json (stamped
    with the resolved assumptions, package version and git revision). Both Parquet files are
    written in chunks while the run goes, so memory stays bounded by the requests in flight
    however long the run (ten million requests fit in under 2 GB). With --trace, every
    request becomes a trace in an OTLP collector (OTEL_EXPORTER_OTLP_ENDPOINT, default
    localhost:4318); the spans exported and dropped are counted and printed. A policy module
    next to the experiment file can be named as my_module:MyPolicy.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from hetero_sched.configfile import parse_sets
    from hetero_sched.experiment import build_workload, load_experiment
    from hetero_sched.report import summary_table
    from hetero_sched.results import ensure_folder
    from hetero_sched.sim import simulate as run_sim

    tracing = _tracing(True, otlp_endpoint, service_name, trace_sample) if trace or otlp_endpoint else None
    exp, base = load_experiment(experiment, parse_sets(sets or []))
    _import_from(base)
    if seed is not None:
        exp = exp.model_copy(update={"seed": seed})
    folder = ensure_folder(out or _default_out(exp.name), "--out")
    workload = build_workload(exp.workload, exp.seed, base)
    columns = (TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"), TimeRemainingColumn())
    with _progress(quiet, len(workload), *columns) as update:   # streamed: memory bounded by what is in flight
        result = run_sim(exp, workload=workload, trace=tracing, progress=update, out=folder)
    if not quiet:
        Console().print(summary_table(result.summary))
    _warn(result.summary.get("warnings", []))
    _print_tracing(result.summary)
    typer.echo(str(folder) if quiet else f"run folder: {folder}")



RUN_DEFAULT_REQUESTS = 100
"""`run` with no experiment replays this many requests of the shipped workload (< 60 s here)."""


@_command
def run(
    experiment: Optional[Path] = typer.Argument(None, help=f"Experiment YAML (default: the shipped one, first {RUN_DEFAULT_REQUESTS} requests)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to use ('auto', host:port; default: $RAY_ADDRESS, else start a local labelled cluster)."),
    clock: str = typer.Option("wall", help="wall: spans take their modeled time x time-scale; virtual: simulated time, same actors and KV bytes."),
    backend: str = typer.Option("modeled", help="modeled: cost-model durations, synthetic KV bytes; numpy: a real tiny Llama computes and decodes from real KV."),
    time_scale: float = typer.Option(1.0, help="Wall seconds per modeled second (wall clock)."),
    bytes_scale: float = typer.Option(1e-3, help="Real KV bytes moved per modeled byte (modeled backend)."),
    num_requests: Optional[int] = typer.Option(None, help="Replay only the first N requests of the workload."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<name>-<time>; in a Ray job ~/hetero-sched-runs/<name>-<time>)."),
    pace: str = typer.Option("modeled", help="modeled: devices hold each span for the cost model's duration; real: a span takes the backend's compute time (numpy backend, wall clock)."),
    device_speed: float = typer.Option(1.0, help="Every device's speed against the cost model (0.8: 20% slower): what-if runs and tests."),
    device_jitter: float = typer.Option(0.0, help="Relative standard deviation of each span's duration on every device (seeded)."),
    call_timeout_s: float = typer.Option(120.0, help="A device report this many seconds past its span's expected end (or any actor call this late) means the actor is stuck: it is restarted and its requests resumed."),
    sets: Optional[list[str]] = SET,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; print the run folder only."),
    trace: Optional[bool] = typer.Option(None, "--trace/--no-trace", help="One OpenTelemetry trace per request (default: on when an OTLP endpoint is configured)."),
    otlp_endpoint: Optional[str] = OTLP_ENDPOINT,
    service_name: Optional[str] = SERVICE_NAME,
    trace_sample: Optional[float] = TRACE_SAMPLE,
    debug: bool = DEBUG,
) -> None:
    """Run an experiment live on Ray: one actor per device group, KV as Arrow through the object store.

    Starts a local cluster of labelled nodes (Trainium nodes with neuron_cores, CS-3 nodes with
    a cs3 resource) unless --address or RAY_ADDRESS names one, places the actors by resources
    and labels, replays the workload, prints the summary and writes the run folder (as
    `simulate` does, plus the runtime's overheads and where each actor ran). Each device actor
    runs the spans the scheduler plans on its own clock and reports them; the results are what
    the devices reported. The scheduler actor journals the run to scheduler.journal in the run
    folder; if it dies, Ray restarts it and it recovers the run from there. A policy module next
    to the experiment file is importable by the actors of a cluster this command starts (on an
    existing cluster, submit with `ray job submit --working-dir`).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from hetero_sched.configfile import parse_sets
    from hetero_sched.experiment import build_workload, load_experiment
    from hetero_sched.report import summary_table
    from hetero_sched.results import ensure_folder
    from hetero_sched.runtime.live import run_live
    from hetero_sched import workload as wl

    if num_requests is not None and num_requests < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--num-requests")
    exp, base = load_experiment(experiment, parse_sets(sets or []))
    _import_from(base)
    if experiment is None and num_requests is None:
        num_requests = RUN_DEFAULT_REQUESTS
    work = build_workload(exp.workload, exp.seed, base)
    if num_requests is not None:
        work = wl.head(work, num_requests)
    tracing = _tracing(True if otlp_endpoint and trace is None else trace, otlp_endpoint, service_name, trace_sample)
    folder = ensure_folder(Path(out) if out is not None else _default_out(exp.name), "--out")
    journal = folder / "scheduler.journal"
    try:
        journal.unlink(missing_ok=True)             # an earlier run's, in a reused --out folder
    except OSError as exc:
        raise UserError(f"{journal}: cannot replace the run's journal ({exc.strerror or exc})") from None
    kwargs = dict(address=address, clock=clock, backend=backend, time_scale=time_scale,
                  bytes_scale=bytes_scale, pace=pace, device_speed=device_speed, device_jitter=device_jitter,
                  workload=work, trace=tracing, journal=journal, call_timeout_s=call_timeout_s)
    columns = (TextColumn("running live ({task.fields[clock]} clock)", markup=False), BarColumn(), MofNCompleteColumn(),
               TextColumn("requests"), TimeElapsedColumn())
    with _progress(quiet, len(work), *columns, clock=clock) as update:   # a field: a bad --clock is not a format string
        result = run_live(exp, progress=update, **kwargs)  # type: ignore[arg-type]
    folder = result.write(folder)
    if not quiet:
        rt = result.summary["runtime"]
        Console().print(summary_table(result.summary))
        Console().print(f"  runtime           {rt['span_reports']:,} span reports, {rt['actor_calls']:,} actor calls, "
                        f"report delay p50 {rt['report_delay_ms_p50']:.2f} ms, "
                        f"{rt['transfers']:,} KV transfers, {rt['bytes_moved'] / 2**20:,.1f} MiB moved, "
                        f"lateness p99 {rt['lateness_ms_p99']:.1f} ms, KV held after run: {rt['kv_held_after_run']}")
    _warn(result.summary.get("warnings", []))
    _print_tracing(result.summary)
    typer.echo(str(folder) if quiet else f"run folder: {folder}")


@_command
def serve(
    experiment: Optional[Path] = typer.Argument(None, help="Experiment YAML (default: the shipped one); its workload is not used."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to use ('auto', host:port; default: $RAY_ADDRESS, else start a local labelled cluster)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (loopback by default; 0.0.0.0 exposes the server)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free one; the URL printed says which)."),
    backend: str = typer.Option("modeled", help="modeled: cost-model timing, placeholder text; numpy: a real tiny Llama writes the tokens."),
    pace: str = typer.Option("modeled", help="modeled: devices hold each span for the cost model's duration; real: the backend's compute time (numpy)."),
    device_speed: float = typer.Option(1.0, help="Every device's speed against the cost model (0.8: 20% slower)."),
    device_jitter: float = typer.Option(0.0, help="Relative standard deviation of each span's duration on every device (seeded)."),
    bytes_scale: float = typer.Option(1e-3, help="Real KV bytes moved per modeled byte (modeled backend)."),
    progress_interval_ms: float = typer.Option(2.0, help="Devices send the tokens they made at most this often (each keeps its own time)."),
    call_timeout_s: float = typer.Option(120.0, help="A device report this many seconds past its span's expected end means the actor is stuck: it is restarted."),
    prefix_block_tokens: int = typer.Option(16, help="Prefix caching's granularity: prompts are hashed in blocks of this many tokens, chained (0: no prefix caching)."),
    sets: Optional[list[str]] = SET,
    trace: Optional[bool] = typer.Option(None, "--trace/--no-trace", help="One OpenTelemetry trace per request, rooted at its HTTP request (default: on when an OTLP endpoint is configured)."),
    otlp_endpoint: Optional[str] = OTLP_ENDPOINT,
    service_name: Optional[str] = SERVICE_NAME,
    trace_sample: Optional[float] = TRACE_SAMPLE,
    debug: bool = DEBUG,
) -> None:
    """Serve an experiment's cluster behind an OpenAI-compatible API until Ctrl-C.

    The experiment's groups, policy, SLO and admission serve live requests: a Trainium prefill
    actor prefills, the KV moves as Arrow through the object store, a CS-3 decode actor streams
    the tokens it makes. Endpoints: POST /v1/completions and /v1/chat/completions (SSE with
    "stream": true), GET /v1/models, /health, /ready, /metrics (Prometheus, vLLM's names).
    Rejections for load are 429 with Retry-After; bad requests, and requests no group can ever
    hold, are 400. The tokenizer clients load is `hetero-sched tokenizer` (byte-level, 256 ids).
    With tracing, each request is one trace rooted at its HTTP request (under a client's W3C
    traceparent). Also as a Ray job:
    `ray job submit --address ADDR -- hetero-sched serve EXPERIMENT.yaml --address auto`.
    """
    import signal
    import threading

    from hetero_sched.configfile import parse_sets
    from hetero_sched.experiment import load_experiment
    from hetero_sched.runtime.live import with_absolute_paths
    from hetero_sched.serve.engine import EngineOptions
    from hetero_sched.serve.ingress import ServeOptions
    from hetero_sched.serve.server import serve_until

    if backend not in ("modeled", "numpy"):
        raise typer.BadParameter(f"must be modeled or numpy, got {backend!r}", param_hint="--backend")
    if pace not in ("modeled", "real") or (pace == "real" and backend != "numpy"):
        raise typer.BadParameter("must be modeled, or real with --backend numpy", param_hint="--pace")
    if not 0 <= port <= 65535:
        raise typer.BadParameter(f"must be 0-65535, got {port}", param_hint="--port")
    for name, value in (("--device-speed", device_speed), ("--bytes-scale", bytes_scale),
                        ("--progress-interval-ms", progress_interval_ms), ("--call-timeout-s", call_timeout_s)):
        if not 0 < value < float("inf"):
            raise typer.BadParameter(f"must be finite and > 0, got {value}", param_hint=name)
    if not 0 <= device_jitter < float("inf"):
        raise typer.BadParameter(f"must be finite and >= 0, got {device_jitter}", param_hint="--device-jitter")
    if prefix_block_tokens < 0:
        raise typer.BadParameter(f"must be >= 0 (0: no prefix caching), got {prefix_block_tokens}",
                                 param_hint="--prefix-block-tokens")
    exp, base = load_experiment(experiment, parse_sets(sets or []))
    _import_from(base)
    options = EngineOptions(backend, pace, device_speed, device_jitter, bytes_scale, call_timeout_s,  # type: ignore[arg-type]
                            progress_interval_ms / 1e3, prefix_block_tokens=prefix_block_tokens)
    tracing = _tracing(True if otlp_endpoint and trace is None else trace, otlp_endpoint, service_name, trace_sample)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve_until(with_absolute_paths(exp, base), stop, address=address, options=options,
                listen=ServeOptions(host, port, trace=tracing),
                ready=lambda url: typer.echo(f"serving {exp.model} ({exp.name}, {backend}) at {url}/v1 — Ctrl-C to stop",
                                             err=True))


def _group(device: str, tp: int, pp: int, count: Optional[int]) -> "GroupSpec":
    from hetero_sched.catalog import GroupSpec, get_device

    units = get_device(device).units_per_chip
    if count is None:
        if (tp * pp) % units:
            raise UserError(f"--tp {tp} x --pp {pp} is not a whole number of {device} chips ({units} units per chip)")
        count = tp * pp // units
    return GroupSpec(device, count, tp=tp, pp=pp)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_sources(console: "Console", title: str, entries: dict[str, dict[str, Any]]) -> None:
    """Catalog numbers with their status and source: a table on a wide terminal, else one
    entry per line with its source (a URL) wrapped below, so no override key is ever cut."""
    from hetero_sched.report import compact_table

    rows = [(key, _fmt(e["value"]), e["status"], e["source"]) for key, e in entries.items()]
    if console.width >= 140:
        console.print(compact_table(title, ("key", "value", "status", "source"), rows, text=("source",)))
        return
    from rich.text import Text

    console.print(Text(title, style="italic"), justify="center")
    for key, value, status, source in rows:
        console.print(Text.assemble((key, "bold"), f" = {value}  ({status})"), no_wrap=True, overflow="ignore")
        console.print(Text("    " + source, style="dim"))


TP = typer.Option(1, min=1, help="Tensor-parallel degree (Trainium: logical NeuronCores, LNC=2).")
PP = typer.Option(1, min=1, help="Pipeline stages.")
COUNT = typer.Option(None, min=1, help="Chips in the group (default: tp*pp / units per chip).")


@_command
def catalog(
    device: Optional[str] = typer.Option(None, help="Predict for this device (e.g. trn2)."),
    model: Optional[str] = typer.Option(None, help="Predict for this model (e.g. llama-3.1-70b)."),
    tp: int = TP,
    pp: int = PP,
    count: Optional[int] = COUNT,
    prompt: int = typer.Option(2048, min=1, max=1_000_000_000, help="Prompt tokens for the prefill prediction."),
    profile: Optional[Path] = typer.Option(None, help="A profile file from `hetero-sched calibrate`."),
    debug: bool = DEBUG,
) -> None:
    """List devices and models with every number and its source, or predict for one group."""
    from rich.console import Console

    from hetero_sched.catalog import resolve_assumptions, resolve_catalog
    from hetero_sched.costmodel import RooflineCost, build_group_cost, kink_contexts, step_time_s
    from hetero_sched.report import compact_table

    console = Console()
    cat = resolve_catalog()
    if device is None and model is None:
        devs, models = list(cat.devices.values()), list(cat.models.values())
        tables: list[tuple[str, tuple[str, ...], Callable[[Any], tuple[str, ...]], list[Any]]] = [
            ("Devices: compute and memory (per chip; CS-3: per system)",
             ("device", "BF16 TFLOP/s", "FP8 TFLOP/s", "memory GB", "memory", "memory TB/s"),
             lambda d: (d.name, f"{d.bf16_flops_per_s / 1e12:,.0f}", f"{d.fp8_flops_per_s / 1e12:,.0f}",
                        f"{d.memory_bytes / 1e9:,.0f}", d.memory_kind, f"{d.memory_bytes_per_s / 1e12:,.1f}"), devs),
            ("Devices: Ray resource, links, power, price",
             ("device", "Ray resource per chip", "scale-up GB/s", "network GB/s", "W", "$/h"),
             lambda d: (d.name, f"{d.units_per_chip} {d.ray_resource}", f"{d.scale_up_bytes_per_s / 1e9:,.0f}",
                        f"{d.network_bytes_per_s / 1e9:,.0f}", f"{d.watts:,.0f}",
                        f"{cat.cost(d.name).dollars_per_hour:.2f}"), devs),
            ("Models: architecture", ("model", "layers", "hidden", "heads/kv", "head dim", "ffn", "experts"),
             lambda m: (m.name, str(m.num_layers), str(m.hidden_size), f"{m.num_heads}/{m.num_kv_heads}",
                        str(m.head_dim), str(m.ffn_size), f"{m.experts_per_token} of {m.num_experts}"), models),
            ("Models: size and context window (bf16)",
             ("model", "params B", "active B", "KV bytes/token", "weights GB", "context tokens"),
             lambda m: (m.name, f"{m.total_params / 1e9:.2f}", f"{m.active_params / 1e9:.2f}",
                        f"{m.kv_bytes_per_token():,.0f}", f"{m.weight_bytes / 1e9:.1f}", f"{m.max_context_tokens:,}"),
             models),
        ]
        for title, columns, row, items in tables:
            console.print(compact_table(title, columns, [row(x) for x in items]))
        _print_sources(console, "Every number and its source (override any by its key)", resolve_assumptions())
        return
    if device is None or model is None:
        raise UserError("--device and --model go together (or give neither to list the catalog)")
    group = _group(device, tp, pp, count)
    cost = build_group_cost(group, model, profile=profile)
    spec = cat.model(model)
    console.print(f"[bold]{model}[/] on {group.count} x {device} (tp={group.tp}, pp={group.pp}); "
                  f"Ray resources {group.ray_resources()}, node labels {group.node_labels()}")
    console.print(f"prefill of {prompt:,} tokens: [bold]{cost.prefill_time_s([prompt], [0]) * 1e3:,.1f} ms[/]")
    console.print(f"KV bytes/token: {cost.transfer_bytes_per_token:,} unique (moved), {cost.kv_bytes_per_token:,} held "
                  f"(TP replicas); KV capacity {cost.kv_capacity_tokens:,} tokens; weights {spec.weight_bytes / 1e9:,.1f} GB")
    rows = []
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        lines = cost.decode_step_lines(b)
        step = step_time_s(lines, b * prompt)
        kinks = kink_contexts(lines)
        rows.append((str(b), f"{step * 1e3:.3f}", f"{1 / step:,.0f}", f"{b / step:,.0f}",
                     ", ".join(f"({a * 1e3:.3f}, {s * 1e9:.3f})" for a, s in lines),
                     ", ".join(f"{k:,.0f}" for k in kinks) or "none"))
    lines_col = "lines (intercept ms, slope ns/token)"
    console.print(compact_table(f"Decode step vs batch (context {prompt:,} tokens per sequence)",
                         ("batch", "step ms", "tok/s per user", "tok/s total", lines_col, "kink at total context"),
                         rows, text=(lines_col, "kink at total context")))
    _print_sources(console, f"Cost parameters of {device}",
                   {k: e for k, e in resolve_assumptions(devices_used=[device], models_used=[]).items()
                    if k.startswith("cost.")})
    if not isinstance(cost, RooflineCost):
        console.print("(fitted-coefficient profile: lines come from its coefficients)")


@_command
def calibrate(
    measurements: Optional[Path] = typer.Argument(None, help="CSV with columns kind,batch,tokens,context,ms[,label]."),
    device: Optional[str] = typer.Option(None, help="Name of the calibrated device (new names need --like)."),
    like: Optional[str] = typer.Option(None, help="Catalog device whose spec numbers a new device starts from."),
    model: str = typer.Option("llama-3.1-8b", help="Model the measurements were taken with."),
    tp: int = typer.Option(1, min=1, help="Tensor-parallel degree of the measured group."),
    pp: int = typer.Option(1, min=1, help="Pipeline stages of the measured group."),
    count: Optional[int] = typer.Option(None, min=1, help="Chips in the measured group (default tp*pp / units per chip)."),
    kind: str = typer.Option("roofline", help="roofline (device parameters) or fitted (coefficients)."),
    fit: str = typer.Option(",".join(("compute_efficiency", "memory_efficiency", "layer_latency_s")),
                            help="Roofline parameters to fit, comma-separated."),
    pieces: str = typer.Option("", help="fitted: decode piece max-batch boundaries, e.g. 8,64."),
    out: Optional[Path] = typer.Option(None, help="Profile file to write (default DEVICE-profile.json; a folder: DEVICE-profile.json in it)."),
    force: bool = typer.Option(False, "--force", help="Write the profile even if the fit is refused (too few points, a point still >25% off, a parameter out of physical range); the profile and every result using it say so."),
    published: bool = typer.Option(False, "--published", help="Cross-validate the cost model on the published figures (hetero_sched/data/figures.yaml): the accuracy table, per-device median and worst error, the chosen form and its fitted values."),
    debug: bool = DEBUG,
) -> None:
    """Fit a device profile from measured step times; print per-point and leave-one-out error.

    A fit is refused (one line, exit 2, no profile written) when it cannot be trusted: fewer
    points than parameters (no leave-one-out check), a point the fitted model still misses by
    more than 25%, an efficiency above 1 or a latency pinned at zero. The profile's device name
    can be used as a group's device in an experiment (with the profile next to it).
    """
    from rich.console import Console
    from rich.table import Table

    from hetero_sched import calibrate as cal
    from hetero_sched.catalog import device_names
    from hetero_sched.catalog.profiles import save_profile

    console = Console()

    def report(title: str, result: "cal.FitResult") -> None:
        t = Table(title=title)
        for col in ("point", "measured ms", "fitted ms", "fit error", "leave-one-out error"):
            t.add_column(col)
        for p in result.points:
            t.add_row(p.label, f"{p.measured_s * 1e3:.3f}", f"{p.fitted_s * 1e3:.3f}", f"{p.fit_error:+.1%}",
                      "n/a (too few points)" if p.loo_error is None else f"{p.loo_error:+.1%}")
        console.print(t)
        console.print("fitted: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in result.params.items()))

    if published:
        from hetero_sched.accuracy import accuracy_rows, calibrate_published, summary_by_device

        rows = accuracy_rows()
        t = Table(title="Accuracy: every published figure predicted by a fit that did not see it (k-fold)")
        for col in ("device", "figure", "fold", "published ms", "predicted ms", "error", "source"):
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(r["device"], r["figure"], str(r["fold"]), f"{r['published'] * 1e3:.3f}",
                      f"{r['predicted'] * 1e3:.3f}", f"{r['rel_err']:+.1%}", r["source"])
        console.print(t)
        results = calibrate_published()
        t = Table(title="Per device: the model form chosen by cross-validation, median and worst |held-out error|")
        for col in ("device", "figures", "median |error|", "worst |error|", "form", "fitted on all figures (k-fold range)"):
            t.add_column(col, overflow="fold")
        for dev, summ in summary_by_device(rows).items():
            res = results[dev]
            fitted = ", ".join(f"{k} = {_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"
                               for (k, v), (lo, hi) in zip(res.values.items(), res.ranges().values()))
            t.add_row(dev, str(int(summ["figures"])), f"{summ['median_abs_err']:.1%}", f"{summ['worst_abs_err']:.1%}",
                      res.chosen.form.name, fitted)
        console.print(t)
        return
    if measurements is None or device is None:
        raise UserError("calibrate needs MEASUREMENTS.csv and --device (or --published)")
    base = like or device
    if base not in device_names():
        raise UserError(f"unknown device {device!r}: pass --like <catalog device> to start from its spec numbers "
                        f"(known: {', '.join(device_names())})")
    target = out or Path(f"{device}-profile.json")
    if target.is_dir():
        target = target / f"{device}-profile.json"
    rows = cal.read_measurements(measurements)
    group = _group(base, tp, pp, count)
    if kind == "roofline":
        result = cal.fit_roofline(rows, group, model, tuple(n.strip() for n in fit.split(",") if n.strip()))
    elif kind == "fitted":
        try:
            bounds = tuple(int(x) for x in pieces.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--pieces: expected comma-separated integers, got {pieces!r}") from None
        result = cal.fit_coefficients(rows, bounds)
    else:
        raise UserError(f"--kind must be roofline or fitted, got {kind!r}")
    report(f"{device} ({kind}) from {measurements}", result)
    problems = cal.fit_problems(result)
    if problems and not force:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"not writing a profile: {problems[0]}{more}; --force writes it anyway, stamped as forced")
    save_profile(cal.make_profile(result, device, group, model, str(measurements), forced=problems), target)
    console.print(f"wrote {target}" + (f" (forced past: {'; '.join(problems)})" if problems else ""))


@_command
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML: a base experiment, axes (any config field), optional goodput tiers."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder: points/<id>/ per point, sweep.parquet at the end. Rerunning skips finished points."),
    address: Optional[str] = typer.Option(None, help="Ray cluster ('auto', host:port; default: $RAY_ADDRESS, else a local Ray)."),
    no_ray: bool = typer.Option(False, "--no-ray", help="Run the points one by one in this process."),
    points_per_task: Optional[int] = typer.Option(None, "--points-per-task", min=1, help="Points per Ray task (default: about 4 tasks per CPU of the cluster, at most 32 points each)."),
    sets: Optional[list[str]] = SET,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; print the table path only."),
    debug: bool = DEBUG,
) -> None:
    """Run a grid of experiments as Ray tasks: progress bar with points/min, resumable, one Parquet.

    Points run in batches (one CPU per task, a bounded number in flight); each task writes its
    points' rows and run folders itself, so the driver stays idle however large the sweep.
    --set changes the base experiment (after the file's own set:). Prints the points table
    (as `hetero-sched report` does, without the plots), how many points ran at how many points
    per minute, and the path of sweep.parquet.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hetero_sched.configfile import parse_sets
    from hetero_sched.report import sweep_tables
    from hetero_sched.results import ensure_folder
    from hetero_sched.sweep import PointsRate, expand, load_sweep, run_sweep

    spec = load_sweep(sweep_file, parse_sets(sets or []))
    _import_from(Path(spec.source).parent)
    ensure_folder(out, "--out")
    points = expand(spec)                       # every point validated before anything runs
    columns = (TextColumn(f"sweep {spec.name}", markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("points"),
               TextColumn("{task.fields[rate]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn())
    with _progress(quiet, len(points), *columns, rate="") as update:
        rate = PointsRate()
        tick = None if update is None else (lambda done, total: update(done, total, rate=rate.text(done)))
        outcome = run_sweep(spec, out, address=address, use_ray=not no_ray, progress=tick, points=points,
                            points_per_task=points_per_task)
    errors = [r for r in outcome.rows if r.get("status") != "ok"]
    if not quiet:
        for table in sweep_tables(outcome.rows, [a.name for a in spec.axes] or ["policy", "cluster"],
                                  list(spec.goodput.tiers) if spec.goodput else []):
            Console().print(table)
        speed = (f" in {outcome.run_s:.1f} s ({outcome.points_per_min:,.0f} points/min)"
                 if outcome.points_per_min is not None else "")
        typer.echo(f"{len(outcome.rows)} points: {outcome.computed} run now{speed}, {outcome.reused} reused from {out}"
                   + (f"; {len(errors)} could not run (see the error column), e.g. {errors[0]['error']}" if errors else ""))
    _warn(outcome.warnings)
    typer.echo(str(outcome.table_path))


@_command
def sensitivity(
    sweep_file: Path = typer.Argument(..., help="A sweep YAML (its points, goodput tiers and ratios) or an experiment YAML."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder: points/<id>/ per design point, sensitivity.parquet, sensitivity.json, tornado PNGs. Rerunning skips finished points."),
    samples: int = typer.Option(16, min=0, max=10_000, help="Latin-hypercube designs varying every parameter jointly."),
    seed: int = typer.Option(0, min=0, help="Seed of the Latin hypercube."),
    params: str = typer.Option("", "--params", help="Only parameters whose key starts with one of these (comma-separated, e.g. cost.cs3.,speculative.)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster ('auto', host:port; default: $RAY_ADDRESS, else a local Ray)."),
    no_ray: bool = typer.Option(False, "--no-ray", help="Run the design points one by one in this process."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; print the summary path only."),
    debug: bool = DEBUG,
) -> None:
    """Vary every assumed or fitted parameter over its range (one at a time and jointly) and report
    intervals on goodput, goodput per dollar and the sweep's ratios, with a tornado plot per output.

    Parameters are the catalog numbers with a stated range that the experiments' devices use
    (`hetero-sched catalog` shows each range and its reason) and the speculative acceptance rate
    of speculating groups. Design points run as Ray tasks like `sweep` (or in-process with --no-ray).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from hetero_sched.sensitivity import SUMMARY, run_sensitivity, tornado_png
    from hetero_sched.sweep import load_sweep_or_experiment

    spec = load_sweep_or_experiment(sweep_file)
    include = tuple(p.strip() for p in params.split(",") if p.strip())
    kwargs = dict(samples=samples, seed=seed, include=include, address=address, use_ray=not no_ray)
    if quiet:
        outcome = run_sensitivity(spec, out, **kwargs)  # type: ignore[arg-type]
    else:
        columns = (TextColumn(f"sensitivity {spec.name}"), BarColumn(), MofNCompleteColumn(), TextColumn("points"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("sens", total=None)
            outcome = run_sensitivity(spec, out, progress=lambda d, t: bar.update(task, completed=d, total=t),
                                      **kwargs)  # type: ignore[arg-type]
    names = list(outcome.summary["outputs"])
    pngs = []
    for i, name in enumerate(names):
        if outcome.summary["outputs"][name]["baseline"] is not None:
            pngs.append(tornado_png(outcome.summary, name, Path(out) / f"tornado-{i:02d}.png"))
    if not quiet:
        t = Table(title=f"{spec.name}: baseline, joint 5-95% interval ({outcome.summary['outputs'][names[0]]['joint_samples']} "
                        f"Latin-hypercube designs) and the parameter that moves it most")
        for col in ("output", "baseline", "joint 5%", "joint 50%", "joint 95%", "largest one-at-a-time swing"):
            t.add_column(col, overflow="fold")
        for name in names:
            e = outcome.summary["outputs"][name]
            j = e["joint"] or {}
            top = e["one_at_a_time"][0] if e["one_at_a_time"] else None
            swing = (f"{top['param']}: {_fmt(top['at_low'])} .. {_fmt(top['at_high'])}" if top and top["swing"] is not None else "-")
            t.add_row(name, _fmt(e["baseline"]), _fmt(j.get("p5")), _fmt(j.get("p50")), _fmt(j.get("p95")), swing)
        Console(width=max(160, Console().width)).print(t)
        typer.echo(f"{outcome.computed} points run now, {outcome.reused} reused from {out}")
    for p in pngs:
        typer.echo(str(p))
    typer.echo(str(Path(out) / SUMMARY))


@_command
def plan(
    plan_file: Path = typer.Argument(..., help="Plan YAML: devices with counts (and prices via overrides), model, workload, SLO, budget."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write every simulated candidate to OUT/plan.parquet (OUT is a folder)."),
    sets: Optional[list[str]] = SET,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    debug: bool = DEBUG,
) -> None:
    """Find the group counts and parallelism with the most goodput per dollar (bound-pruned search)."""
    from rich.console import Console

    from hetero_sched.configfile import parse_sets
    from hetero_sched.planner import load_plan, plan_search
    from hetero_sched.report import plan_table
    from hetero_sched.results import ensure_folder

    spec, base = load_plan(plan_file, parse_sets(sets or []))
    _import_from(base)
    if out is not None:
        ensure_folder(out, "--out")             # before the simulations, not after them
    console = Console(stderr=True)
    report = None if quiet else (lambda n, label: console.print(f"  simulated {n}: {label}", markup=False))
    result = plan_search(spec, base, progress=report)
    Console().print(plan_table(result, spec.top))
    if result.stopped_early:
        typer.echo(f"note: stopped after {result.evaluated} simulations (max_evaluations); an unevaluated candidate's "
                   f"bound still allowed {result.best_unevaluated_bound_per_dollar:,.1f} req/$")
    prices = {k: v for k, v in spec.overrides.items() if k.endswith("dollars_per_hour")}
    typer.echo("prices: catalog $/h per chip" + (f", overridden: {prices}" if prices else "")
               + " (CS-3 has no public price: `hetero-sched catalog` shows the assumption)")
    _warn(result.warnings)
    if out is not None:
        import pyarrow.parquet as pq

        from hetero_sched.sweep import rows_table

        rows = [{"rank": i, "configuration": e.candidate.label(), "dollars_per_hour": e.candidate.dollars_per_hour,
                 **e.goodput.row(), "why": e.why()} for i, e in enumerate(result.ranked, 1)]
        try:
            pq.write_table(rows_table(rows), out / "plan.parquet")
        except OSError as exc:
            raise UserError(f"{out / 'plan.parquet'}: cannot write ({exc.strerror or exc})") from None
        typer.echo(str(out / "plan.parquet"))


@_command
def report(
    folder: Path = typer.Argument(..., help="A sweep folder (from `hetero-sched sweep --out`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder the PNGs go to (default FOLDER/plots)."),
    debug: bool = DEBUG,
) -> None:
    """Tables and PNG plots of a sweep: attainment vs rate, TTFT/TPOT CDFs, goodput per $, utilization."""
    from rich.console import Console

    from hetero_sched.report import sweep_report

    tables, written = sweep_report(folder, out)
    for table in tables:
        Console().print(table)
    for p in written:
        typer.echo(str(p))


@_command
def tokenizer(
    folder: Optional[Path] = typer.Argument(None, help="Write the tokenizer's files into this folder (created). Default: print the packaged copy's folder."),
    hf_cache: bool = typer.Option(False, "--hf-cache", help="Make FOLDER a Hugging Face hub cache holding the tokenizer as hetero-sched/byte-256 (for HF_HUB_OFFLINE=1 HF_HUB_CACHE=FOLDER); prints the id."),
    debug: bool = DEBUG,
) -> None:
    """The byte-level tokenizer of the tiny model (vocabulary 256, no special tokens), as Hugging Face files.

    `transformers.AutoTokenizer.from_pretrained(FOLDER)` and load generators load it offline;
    the server counts prompt tokens with it. Prints the folder (with --hf-cache: the repository
    id to pass as --tokenizer, e.g. to aiperf, whose offline workers accept only hub ids).
    """
    from hetero_sched.serve.tokenizer import packaged_tokenizer_dir, write_hf_cache, write_tokenizer

    if folder is None:
        if hf_cache:
            raise UserError("--hf-cache needs a FOLDER")
        typer.echo(str(packaged_tokenizer_dir()))
        return
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    try:
        typer.echo(write_hf_cache(folder) if hf_cache else str(write_tokenizer(folder)))
    except OSError as exc:
        raise UserError(f"{folder}: cannot write the tokenizer ({exc.strerror or exc})") from None
