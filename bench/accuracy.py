"""How well the cost model predicts public figures: the k-fold cross-validated accuracy table.

    python bench/accuracy.py            # ~1 min: every family's forms cross-validated

Prints the per-device summary (figures, chosen form, median and worst |held-out error|), then
one JSON list last: a row per published figure with ``device`` (the catalog device that predicts
it), ``family``, ``model``, ``figure``, ``metric``, ``source``, ``date``, ``published`` and
``predicted`` (seconds), ``rel_err``, ``held_out`` (true: the fit that predicted it did not see it),
``fold`` and ``form``. The figures are hetero_sched/data/figures.yaml.
"""

from __future__ import annotations

import json

from hetero_sched.accuracy import accuracy_rows, calibrate_published, summary_by_device


def main() -> None:
    rows = accuracy_rows()
    forms = {dev: r.chosen.form.name for dev, r in calibrate_published().items()}
    for dev, s in summary_by_device(rows).items():
        print(f"{dev:10s} {s['figures']:3d} figures  median |err| {s['median_abs_err']:6.1%}  "
              f"worst {s['worst_abs_err']:6.1%}  form: {forms[dev]}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
