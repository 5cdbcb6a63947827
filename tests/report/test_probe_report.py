"""A probe study's report: pooled accuracies with Clopper-Pearson intervals, the learning
curve of held-out accuracy and the accuracy-vs-length figure (with chance lines)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from statsmodels.stats.proportion import proportion_confint

from conftest import ROOT

LENGTHS = (32, 64, 128)


def _probe_study(root: Path) -> None:
    (root / "run.py").write_text("")
    (root / "conf").symlink_to(ROOT / "conf")
    (root / "src" / "v4lab").mkdir(parents=True)
    (root / "experiments").mkdir()
    data = {"name": "pr", "experiments": ["no_sparse_mla", "mha"], "seeds": [0, 1, 2],
            "baseline": "no_sparse_mla", "metrics": [f"probe/acc@{n}" for n in LENGTHS],
            "overrides": ["model=probe", "probe=assoc_recall"]}
    (root / "experiments" / "pr.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for e in data["experiments"]:
        for s in data["seeds"]:
            d = root / "outputs" / "pr" / f"{e}-s{s}"
            d.mkdir(parents=True)
            acc = {n: (0.9 if e == "no_sparse_mla" else 0.3) - 0.01 * s - 0.001 * n for n in LENGTHS}
            (d / "metrics.json").write_text(json.dumps({
                "experiment": e, "seed": s, "probe/chance": 1 / 16, "probe/baseline": 0.25,
                **{f"probe/acc@{n}": round(a * 1000) / 1000 for n, a in acc.items()},
                **{f"probe/answers@{n}": 1000.0 for n in LENGTHS}}))
            (d / "curves.csv").write_text(f"step,probe/acc\n100,0.25\n200,{acc[32]}\n")


def test_a_probe_study_is_published_with_pooled_intervals_and_its_figures(tmp_path, monkeypatch):
    from v4lab.report.publish import build
    from v4lab.studies import load_study

    monkeypatch.setenv("WANDB_MODE", "disabled")
    _probe_study(tmp_path)
    study = load_study("pr", tmp_path)
    build(study, tmp_path)
    figures = sorted(p.name for p in (tmp_path / "reports" / "figures" / "pr").glob("*.png"))
    assert figures == ["learning_curves.png", "probe_accuracy_vs_length.png"]
    import polars as pl

    table = {r["experiment"]: r for r in pl.read_csv(tmp_path / "reports" / "pr.csv").iter_rows(named=True)}
    correct = sum(round((0.3 - 0.01 * s - 0.032) * 1000) for s in range(3))
    lo, hi = proportion_confint(correct, 3000, method="beta")
    mha = table["mha"]
    assert abs(mha["probe/acc@32 lo"] - lo) < 1e-9 and abs(mha["probe/acc@32 hi"] - hi) < 1e-9
    assert table["mha"]["probe/acc@32 significant"]
