"""`hetero-sched report`: tables and PNGs from a sweep folder; utilization from spans."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from hetero_sched import cli, plots
from hetero_sched.plots import busy_intervals
from hetero_sched.sweep import parse_sweep, run_sweep

from helpers import colocated_experiment, disagg_experiment


def test_busy_intervals_apply_cuts():
    t = pa.table({"time_s": [0.0, 1.0, 1.5, 2.0], "kind": ["prefill", "decode", "cut", "place"],
                  "group_id": [0, 1, 1, 0], "request_id": [None, None, None, 3],
                  "duration_s": [0.5, 2.0, None, None], "end_s": [None, None, 1.8, None]})
    assert busy_intervals(t) == {0: [(0.0, 0.5)], 1: [(1.0, 1.8)]}


def test_report_writes_plots_and_a_table(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    doc = {"name": "r", "experiment": disagg_experiment(workload={"kind": "synthetic", "num_requests": 100,
                                                                   "rate_per_s": 10.0}),
           "axes": {"setup": {"disagg": {"policy.name": "disagg"},
                              "colocated": {"policy.name": "colocated",
                                            "groups": colocated_experiment()["groups"]}}},
           "goodput": {"tiers": ["standard", "high-speed"], "rel_tol": 0.1}}
    run_sweep(parse_sweep(doc, tmp_path), tmp_path / "s", use_ray=False)
    monkeypatch.setattr(sys, "argv", ["hetero-sched", "report", str(tmp_path / "s")])
    try:
        cli.main()
    except SystemExit as exc:   # typer may exit 0 after a successful command
        assert not exc.code
    out = capsys.readouterr().out
    for name in ("attainment_vs_rate", "goodput_per_dollar", "latency_cdf", "utilization"):
        png = tmp_path / "s" / "plots" / f"{name}.png"
        assert png.stat().st_size > 10_000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "goodput" in out and "colocated" in out and "disagg" in out


def test_report_of_a_non_sweep_folder_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["hetero-sched", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2 and "not a sweep folder" in capsys.readouterr().err


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    doc = {"name": "r", "experiment": disagg_experiment(workload={"kind": "synthetic", "num_requests": 50,
                                                                   "rate_per_s": 10.0})}
    run_sweep(parse_sweep(doc, tmp_path), tmp_path / "s", use_ray=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(sys, "argv", ["hetero-sched", "report", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pip install 'hetero-sched[plot]'" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- what a person would misread (issue 16)

def _figures(monkeypatch):
    """Capture the figures the plot functions save (drawn, so ticks and legends are laid out)."""
    pytest.importorskip("matplotlib")
    figs = []

    def keep(fig, path):
        fig.canvas.draw()
        figs.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return plots, figs


def _row(setup, rate, points=None, good=1.0e6, bound=2.0e6):
    row = {"setup": setup, "workload.rate_per_s": rate, "status": "ok", "cluster_dollars_per_hour": 100.0,
           "goodput_rps_standard": 10.0 if points else 0.0, "goodput_tokens_per_dollar_standard": good,
           "bound_tokens_per_s_standard": bound * 100.0 / 3600, "pct_of_bound_standard": 50.0}
    row["goodput_points_standard"] = json.dumps(points or [])
    return row


def _overlaps(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def test_attainment_plot_names_axes_merges_identical_curves_and_lists_zero_goodput(monkeypatch):
    plots, figs = _figures(monkeypatch)
    same = [[1.0, 1.0], [10.0, 0.95], [20.0, 0.5]]
    rows = [_row("a", 4, same), _row("a", 8, same), _row("b", 4, [[1.0, 1.0], [5.0, 0.2]]), _row("c", 4, None)]
    plots.attainment_vs_rate(rows, ["setup", "workload.rate_per_s"], Path("x.png"))
    fig = figs[0]
    ax = fig.axes[0]
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "setup=b, rate_per_s=4" in labels                                    # the axis is named, not just "4"
    assert "setup=a, rate_per_s=4 = setup=a, rate_per_s=8 (identical)" in labels  # drawn once, both named
    assert len(ax.get_lines()) == 3                                             # 2 curves + the 90% line
    assert any("setup=c, rate_per_s=4" in t.get_text() and "no rate meets" in t.get_text() for t in ax.texts)
    renderer = fig.canvas.get_renderer()
    for legend in fig.legends:                                                  # never over the data
        assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
    assert all(t.get_text() == "" for t in ax.xaxis.get_minorticklabels())


def test_latency_cdf_ticks_are_plain_and_never_collide(monkeypatch):
    plots, figs = _figures(monkeypatch)
    t = pa.table({"ttft_s": [0.01, 0.1, 1.0], "tpot_s": [0.0015, 0.004, 0.03]})
    plots.latency_cdfs([("setup=a", t), ("setup=b", t.slice(0, 2))], None, Path("x.png"))
    ax = figs[0].axes[1]
    majors = [x.get_text() for x in ax.xaxis.get_majorticklabels() if x.get_text()]
    assert "2" in majors and "5" in majors and "10" in majors and not any("10^" in m or "times" in m for m in majors)
    assert all(x.get_text() == "" for x in ax.xaxis.get_minorticklabels())   # the colliding "3×10⁰ 4×10⁰" labels
    renderer = figs[0].canvas.get_renderer()
    boxes = [x.get_window_extent(renderer) for x in ax.xaxis.get_majorticklabels() if x.get_text()]
    assert not any(_overlaps(p, q) for p, q in zip(boxes, boxes[1:]))


def test_goodput_bars_have_no_offset_multiplier_and_name_a_zero(monkeypatch):
    plots, figs = _figures(monkeypatch)
    rows = [_row("a", 4, [[1.0, 1.0]], good=2.5e6, bound=4e6), _row("b", 4, None, good=0.0, bound=3e6)]
    plots.goodput_bars(rows, ["setup", "workload.rate_per_s"], Path("x.png"))
    ax = figs[0].axes[0]
    assert ax.yaxis.get_offset_text().get_text() == ""                          # no "1e6" next to the title
    assert any("," in x.get_text() for x in ax.yaxis.get_majorticklabels())
    assert any(a.get_text().startswith("0: no rate meets") for a in ax.texts)


def test_utilization_draws_replicas_as_one_band_not_six_hidden_lines(monkeypatch):
    plots, figs = _figures(monkeypatch)
    dec = pa.table({"time_s": [0.0, 0.0, 0.0], "kind": ["prefill", "prefill", "decode"], "group_id": [0, 1, 2],
                    "duration_s": [1.0, 1.0, 2.0], "end_s": [None, None, None]})
    plots.utilization_over_time([("setup=a", dec, ["p-0", "p-1", "d"])], Path("x.png"), bins=4)
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("p ×2") and labels[1] == "d" and len(ax.get_lines()) == 2
