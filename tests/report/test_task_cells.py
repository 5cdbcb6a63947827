"""Long-context task cells in a report: accuracies pooled over seeds with an exact
Clopper-Pearson interval on the recorded example counts, cells beyond the trained length
marked as extrapolation (table and figure), cells under 100 examples per run marked as no
result."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import yaml
from statsmodels.stats.proportion import proportion_confint

from conftest import ROOT

CELLS = {"task/niah_single@256/acc": (100, 0), "task/niah_single@512/acc": (100, 1),
         "task/mqar@256/acc": (4, 0)}  # (examples per run, extrapolated)


def _task_study(root: Path) -> dict:
    (root / "run.py").write_text("")
    (root / "conf").symlink_to(ROOT / "conf")
    (root / "src" / "v4lab").mkdir(parents=True)
    (root / "experiments").mkdir()
    data = {"name": "tc", "experiments": ["full", "mha"], "seeds": [0, 1, 2], "baseline": "full",
            "metrics": list(CELLS), "overrides": ["profile=study"]}
    (root / "experiments" / "tc.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    correct = {}
    for e in data["experiments"]:
        for s in data["seeds"]:
            d = root / "outputs" / "tc" / f"{e}-s{s}"
            d.mkdir(parents=True)
            m = {"experiment": e, "seed": s}
            for metric, (n, beyond) in CELLS.items():
                k = min(n, 40 + 7 * s + 20 * (e == "mha")) if n == 100 else s
                correct[(e, metric)] = correct.get((e, metric), 0) + k
                cell = metric[:-len("/acc")]
                m |= {metric: k / n, f"{cell}/answers": float(n), f"{cell}/extrapolated": float(beyond)}
            (d / "metrics.json").write_text(json.dumps(m))
            (d / "curves.csv").write_text("step,val/bpb\n10,3.0\n")
    return correct


def test_task_cells_get_pooled_exact_intervals_and_their_marks(tmp_path, monkeypatch):
    from v4lab.report.publish import build
    from v4lab.studies import load_study

    monkeypatch.setenv("WANDB_MODE", "disabled")
    correct = _task_study(tmp_path)
    study = load_study("tc", tmp_path)
    build(study, tmp_path)
    table = {r["experiment"]: r for r in pl.read_csv(tmp_path / "reports" / "tc.csv").iter_rows(named=True)}
    for metric, (n, _) in CELLS.items():
        lo, hi = proportion_confint(correct[("mha", metric)], 3 * n, method="beta")
        row = table["mha"]
        assert abs(row[f"{metric} lo"] - lo) < 1e-9 and abs(row[f"{metric} hi"] - hi) < 1e-9, metric
        assert row[f"{metric} answers"] == 3 * n and row[f"{metric} per_run"] == n
    assert [table["full"][f"{m} extrapolated"] for m in CELLS] == [False, True, False]
    md = (tmp_path / "reports" / "tc.md").read_text()
    assert "(300 answers; extrapolated)" in md and "(300 answers)" in md
    assert "(12 answers; 4 per run < 100: not a result)" in md
    assert "a cell with fewer than 100 examples in a run is marked as not a result" in md
    assert "grey: contexts beyond the trained length, extrapolation" in md
