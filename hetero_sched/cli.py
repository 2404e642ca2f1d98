"""`hetero-sched` — the command line.

Every command turns a :class:`~hetero_sched.errors.UserError` into one line on stderr and exit
status 2 (the same status click uses for bad flags); no traceback for bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from hetero_sched.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Schedule and simulate disaggregated LLM inference on heterogeneous accelerators.",
)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)



def _default_out(name: str) -> Path:
    from datetime import datetime
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@app.command()
def simulate(
    experiment: Optional[Path] = typer.Argument(None, help="Experiment YAML (default: the shipped Trn2 -> CS-3 Llama-3.1-70B experiment)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<name>-<time>)."),
    seed: Optional[int] = typer.Option(None, help="Override the experiment's seed."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; print the run folder only."),
) -> None:
    """Simulate an experiment in virtual time: progress bar, summary table, run folder.

    The run folder holds requests.parquet (one row per request), decisions.parquet (every
    placement, span, transfer, preemption and rejection, in order) and summary.json (stamped
    with the resolved assumptions, package version and git revision).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from hetero_sched.experiment import build_workload
    from hetero_sched.report import summary_table
    from hetero_sched.sim import resolve, simulate as run_sim

    exp, base = resolve(experiment)
    if seed is not None:
        exp = exp.model_copy(update={"seed": seed})
    workload = build_workload(exp.workload, exp.seed, base)
    console = Console(stderr=True)
    if quiet:
        result = run_sim(exp, workload=workload)
    else:
        columns = (TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
                   TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("sim", total=len(workload))
            result = run_sim(exp, workload=workload, progress=lambda done: bar.update(task, completed=done))
    folder = result.write(out or _default_out(exp.name))
    if not quiet:
        Console().print(summary_table(result.summary))
    typer.echo(str(folder) if quiet else f"run folder: {folder}")



RUN_DEFAULT_REQUESTS = 100
"""`run` with no experiment replays this many requests of the shipped workload (< 60 s here)."""


@app.command()
def run(
    experiment: Optional[Path] = typer.Argument(None, help=f"Experiment YAML (default: the shipped one, first {RUN_DEFAULT_REQUESTS} requests)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to use ('auto', host:port; default: $RAY_ADDRESS, else start a local labelled cluster)."),
    clock: str = typer.Option("wall", help="wall: spans take their modeled time x time-scale; virtual: simulated time, same actors and KV bytes."),
    backend: str = typer.Option("modeled", help="modeled: cost-model durations, synthetic KV bytes; numpy: a real tiny Llama computes and decodes from real KV."),
    time_scale: float = typer.Option(1.0, help="Wall seconds per modeled second (wall clock)."),
    bytes_scale: float = typer.Option(1e-3, help="Real KV bytes moved per modeled byte (modeled backend)."),
    num_requests: Optional[int] = typer.Option(None, help="Replay only the first N requests of the workload."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<name>-<time>)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; print the run folder only."),
) -> None:
    """Run an experiment live on Ray: one actor per device group, KV as Arrow through the object store.

    Starts a local cluster of labelled nodes (Trainium nodes with neuron_cores, CS-3 nodes with
    a cs3 resource) unless --address or RAY_ADDRESS names one, places the actors by resources
    and labels, replays the workload, prints the summary and writes the run folder (as
    `simulate` does, plus the runtime's overheads and where each actor ran).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hetero_sched.experiment import build_workload
    from hetero_sched.report import summary_table
    from hetero_sched.runtime.live import run_live
    from hetero_sched.sim import resolve
    from hetero_sched import workload as wl

    if num_requests is not None and num_requests < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--num-requests")
    exp, base = resolve(experiment)
    if experiment is None and num_requests is None:
        num_requests = RUN_DEFAULT_REQUESTS
    work = build_workload(exp.workload, exp.seed, base)
    if num_requests is not None:
        work = wl.head(work, num_requests)
    console = Console(stderr=True)
    kwargs = dict(address=address, clock=clock, backend=backend, time_scale=time_scale,
                  bytes_scale=bytes_scale, workload=work)
    if quiet:
        result = run_live(exp, **kwargs)  # type: ignore[arg-type]
    else:
        columns = (TextColumn(f"running live ({clock} clock)"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("requests"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("run", total=len(work))
            result = run_live(exp, progress=lambda done, total: bar.update(task, completed=done), **kwargs)  # type: ignore[arg-type]
    folder = result.write(out or _default_out(exp.name))
    if not quiet:
        rt = result.summary["runtime"]
        Console().print(summary_table(result.summary))
        Console().print(f"  runtime           {rt['actor_calls']:,} actor calls in {rt['flushes']:,} batched steps (p50 {rt['flush_ms_p50']:.2f} ms), "
                        f"{rt['transfers']:,} KV transfers, {rt['bytes_moved'] / 2**20:,.1f} MiB moved, "
                        f"lateness p99 {rt['lateness_ms_p99']:.1f} ms, KV held after run: {rt['kv_held_after_run']}")
    typer.echo(str(folder) if quiet else f"run folder: {folder}")


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


@app.command()
def catalog(
    device: Optional[str] = typer.Option(None, help="Predict for this device (e.g. trn2)."),
    model: Optional[str] = typer.Option(None, help="Predict for this model (e.g. llama-3.1-70b)."),
    tp: int = typer.Option(1, help="Tensor-parallel degree (Trainium: logical NeuronCores, LNC=2)."),
    pp: int = typer.Option(1, help="Pipeline stages."),
    count: Optional[int] = typer.Option(None, help="Chips in the group (default: tp*pp / units per chip)."),
    prompt: int = typer.Option(2048, help="Prompt tokens for the prefill prediction."),
    profile: Optional[Path] = typer.Option(None, help="A profile file from `hetero-sched calibrate`."),
) -> None:
    """List devices and models with every number and its source, or predict for one group."""
    from rich.console import Console
    from rich.table import Table

    from hetero_sched.catalog import resolve_assumptions, resolve_catalog
    from hetero_sched.costmodel import RooflineCost, build_group_cost, kink_contexts, step_time_s

    console = Console()
    cat = resolve_catalog()
    if device is None and model is None:
        t = Table(title="Devices (per chip; CS-3: per system)")
        for col in ("device", "ray resource", "BF16 TFLOP/s", "FP8 TFLOP/s", "memory GB", "mem TB/s",
                    "scale-up GB/s", "network GB/s", "W", "$/h"):
            t.add_column(col)
        for d in cat.devices.values():
            t.add_row(d.name, f"{d.units_per_chip} {d.ray_resource}", f"{d.bf16_flops_per_s / 1e12:,.0f}",
                      f"{d.fp8_flops_per_s / 1e12:,.0f}", f"{d.memory_bytes / 1e9:,.0f} {d.memory_kind}",
                      f"{d.memory_bytes_per_s / 1e12:,.1f}", f"{d.scale_up_bytes_per_s / 1e9:,.0f}",
                      f"{d.network_bytes_per_s / 1e9:,.0f}", f"{d.watts:,.0f}", f"{cat.cost(d.name).dollars_per_hour:.2f}")
        console.print(t)
        t = Table(title="Models")
        for col in ("model", "layers", "hidden", "heads/kv", "head_dim", "ffn", "experts", "params B (active)",
                    "KV bytes/token (bf16)", "weights GB (bf16)"):
            t.add_column(col)
        for m in cat.models.values():
            t.add_row(m.name, str(m.num_layers), str(m.hidden_size), f"{m.num_heads}/{m.num_kv_heads}", str(m.head_dim),
                      str(m.ffn_size), f"{m.experts_per_token}/{m.num_experts}",
                      f"{m.total_params / 1e9:.2f} ({m.active_params / 1e9:.2f})", f"{m.kv_bytes_per_token():,.0f}",
                      f"{m.weight_bytes / 1e9:.1f}")
        console.print(t)
        t = Table(title="Every number and its source")
        for col in ("key", "value", "status", "source"):
            t.add_column(col, overflow="fold")
        for key, entry in resolve_assumptions().items():
            t.add_row(key, _fmt(entry["value"]), entry["status"], entry["source"])
        console.print(t)
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
    t = Table(title=f"Decode step vs batch (context {prompt:,} tokens per sequence)")
    for col in ("batch", "step ms", "tok/s per user", "tok/s total", "lines (intercept ms, slope ns/token)", "kink at total context"):
        t.add_column(col)
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        lines = cost.decode_step_lines(b)
        step = step_time_s(lines, b * prompt)
        kinks = kink_contexts(lines)
        t.add_row(str(b), f"{step * 1e3:.3f}", f"{1 / step:,.0f}", f"{b / step:,.0f}",
                  ", ".join(f"({a * 1e3:.3f}, {s * 1e9:.3f})" for a, s in lines),
                  ", ".join(f"{k:,.0f}" for k in kinks) or "none")
    console.print(t)
    t = Table(title=f"Cost parameters of {device}")
    for col in ("parameter", "value", "status", "source"):
        t.add_column(col, overflow="fold")
    for key, entry in resolve_assumptions(devices_used=[device], models_used=[]).items():
        if key.startswith("cost."):
            t.add_row(key, _fmt(entry["value"]), entry["status"], entry["source"])
    console.print(t)
    if not isinstance(cost, RooflineCost):
        console.print("(fitted-coefficient profile: lines come from its coefficients)")


@app.command()
def calibrate(
    measurements: Optional[Path] = typer.Argument(None, help="CSV with columns kind,batch,tokens,context,ms[,label]."),
    device: Optional[str] = typer.Option(None, help="Name of the calibrated device (new names need --like)."),
    like: Optional[str] = typer.Option(None, help="Catalog device whose spec numbers a new device starts from."),
    model: str = typer.Option("llama-3.1-8b", help="Model the measurements were taken with."),
    tp: int = typer.Option(1, help="Tensor-parallel degree of the measured group."),
    pp: int = typer.Option(1, help="Pipeline stages of the measured group."),
    count: Optional[int] = typer.Option(None, help="Chips in the measured group (default tp*pp / units per chip)."),
    kind: str = typer.Option("roofline", help="roofline (device parameters) or fitted (coefficients)."),
    fit: str = typer.Option(",".join(("compute_efficiency", "memory_efficiency", "layer_latency_s")),
                            help="Roofline parameters to fit, comma-separated."),
    pieces: str = typer.Option("", help="fitted: decode piece max-batch boundaries, e.g. 8,64."),
    out: Optional[Path] = typer.Option(None, help="Profile file to write (default DEVICE-profile.json)."),
    published: bool = typer.Option(False, "--published", help="Fit on the catalog's published figures and show hold-outs."),
) -> None:
    """Fit a device profile from measured step times; print per-point and leave-one-out error."""
    from rich.console import Console
    from rich.table import Table

    from hetero_sched import calibrate as cal
    from hetero_sched.catalog import device_names
    from hetero_sched.catalog.figures import published_figures
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
        for dev, result in cal.calibrate_published().items():
            report(f"{dev}: fit on published figures", result)
        t = Table(title="Hold-out figures (never fitted on), catalog parameters")
        for col in ("figure", "published ms", "predicted ms", "error", "source"):
            t.add_column(col, overflow="fold")
        for fig in published_figures():
            if fig.role == "holdout":
                pred = cal.predict_figure(fig)
                t.add_row(fig.name, f"{fig.value_s * 1e3:.3f}", f"{pred * 1e3:.3f}", f"{pred / fig.value_s - 1:+.1%}", fig.source)
        console.print(t)
        return
    if measurements is None or device is None:
        raise UserError("calibrate needs MEASUREMENTS.csv and --device (or --published)")
    base = like or device
    if base not in device_names():
        raise UserError(f"unknown device {device!r}: pass --like <catalog device> to start from its spec numbers "
                        f"(known: {', '.join(device_names())})")
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
    target = out or Path(f"{device}-profile.json")
    save_profile(cal.make_profile(result, device, group, model, str(measurements)), target)
    console.print(f"wrote {target}")
