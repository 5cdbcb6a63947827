"""Rows that share runs (``shared_runs``: chips with the same numerics): each class trains
once per seed; the table keeps one row per chip, its measured columns from its class's runs,
its chip/* figures its own; the classes are checked against the code by composing the real
configs; the statistics treat a class's rows as one set of runs, not as replications."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats
from statsmodels.stats.multitest import multipletests

from conftest import ROOT, deterministic
from v4lab.errors import ConfigError
from v4lab.io import compose
from v4lab.report.runs import load_runs, with_shared_rows
from v4lab.report.table import findings, markdown_table, method_text, summarize
from v4lab.studies import dvcyaml, load_study, multirun_command
from v4lab.studies.classes import check_classes, row_figures
from v4lab.train import train

CHIPS = ["nvidia_h800", "nvidia_h20", "ascend_910b", "ascend_910c", "cpu_host"]
CLASSES = {"bf16_fp8": ["nvidia_h800", "nvidia_h20"], "bf16_int8": ["ascend_910b", "ascend_910c"],
           "fp32_fp8": ["cpu_host"]}


def _checkout(tmp_path: Path, **changes) -> Path:
    (tmp_path / "run.py").write_text("")
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "src" / "v4lab").mkdir(parents=True)
    (tmp_path / "experiments").mkdir()
    data = {"name": "sh", "experiments": ["full"], "sweep": {"chip": CHIPS}, "shared_runs": {"chip": CLASSES},
            "seeds": [0, 1, 2], "baseline": "full-chip_nvidia_h800",
            "metrics": ["val/bpb", "chip/kv_dtype_effective", "chip/v3_671b/devices_needed"],
            "overrides": ["profile=smoke", "chip.on_unsupported=fallback"], **changes}
    (tmp_path / "experiments" / "sh.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp_path


def test_the_chips_study_trains_each_numerics_class_once_per_seed():
    study = load_study("chips", ROOT)
    assert len(study.rows()) == 9 and len(study.row_runs()) == 27
    assert [r.name for r in study.runs()] == [f"full-chip_{c}-s{s}" for c in
                                              ("nvidia_h800", "ascend_910b", "cpu_host") for s in (0, 1, 2)]
    assert study.source_row("full-chip_cambricon_mlu370") == "full-chip_ascend_910b"
    assert study.numerics_class("full-chip_ascend_950") == "bf16_fp8"
    assert "chip=nvidia_h800,ascend_910b,cpu_host" in multirun_command(study)
    check_classes(study, ROOT)  # the real configs: the declared classes are what trains alike


@pytest.mark.parametrize(("classes", "message"), [
    ({**CLASSES, "fp32_fp8": ["cpu_host", "nvidia_h800"]}, "is in classes 'bf16_fp8' and 'fp32_fp8'"),
    ({k: v for k, v in CLASSES.items() if k != "fp32_fp8"}, "['cpu_host'] are in no class"),
    ({**CLASSES, "x": ["ascend_950"]}, "'ascend_950', which is not allowed: one of the swept values"),
    ({**CLASSES, "bad label": ["cpu_host"]}, "class 'bad label' is not allowed"),
])
def test_bad_classes_are_refused_naming_file_key_and_value(tmp_path, classes, message):
    if "bad label" in classes:
        classes.pop("fp32_fp8")
    root = _checkout(tmp_path, shared_runs={"chip": classes})
    with pytest.raises(ConfigError, match="sh.yaml: shared_runs") as e:
        load_study("sh", root)
    assert message in str(e.value)


def test_only_the_chip_axis_may_share_runs(tmp_path):
    root = _checkout(tmp_path, sweep={"trainer.lr": [0.001, 0.003]}, baseline="full-lr_0.001",
                     shared_runs={"lr": {"a": [0.001, 0.003]}})
    with pytest.raises(ConfigError, match="shared_runs key 'lr' is not allowed: a swept axis among chip"):
        load_study("sh", root)


@pytest.mark.parametrize(("classes", "message"), [
    ({"bf16_fp8": ["nvidia_h800", "nvidia_h20", "cpu_host"], "bf16_int8": ["ascend_910b", "ascend_910c"]},
     "cpu_host trains unlike nvidia_h800 (full): trainer.precision: 'bf16-mixed' vs '32-true'"),
    ({"bf16_fp8": ["nvidia_h800", "ascend_910b", "nvidia_h20"], "bf16_int8": ["ascend_910c"],
      "fp32_fp8": ["cpu_host"]},
     "ascend_910b trains unlike nvidia_h800 (full): model.attention.kv_cache.dtype: 'fp8' vs 'int8'"),
    ({"a": ["nvidia_h800"], "b": ["nvidia_h20"], "bf16_int8": ["ascend_910b", "ascend_910c"],
      "fp32_fp8": ["cpu_host"]}, "classes a and b train alike (full): merge them"),
])
def test_classes_the_code_does_not_train_alike_are_refused(tmp_path, classes, message):
    root = _checkout(tmp_path, shared_runs={"chip": classes})
    with pytest.raises(ConfigError, match="sh.yaml: shared_runs") as e:
        dvcyaml.dvc_stages(root)
    assert message in str(e.value)


def test_dvc_trains_only_each_class_s_first_chip(tmp_path):
    root = _checkout(tmp_path)
    stages = dvcyaml.dvc_stages(root)["stages"]
    trained = {v["run"] for v in stages["train"]["foreach"].values()}
    assert trained == {f"full-chip_{c}-s{s}" for c in ("nvidia_h800", "ascend_910b", "cpu_host")
                       for s in (0, 1, 2)}
    deps = stages["sh"]["deps"]  # the report computes the shared rows' chip figures
    assert "outputs/sh/full-chip_nvidia_h20-s0/metrics.json" not in deps
    assert {"conf/chip", "conf/model", "src/v4lab/report"} <= set(deps)  # (this checkout: no src)


def _fake_runs(root: Path, study) -> dict[str, float]:
    """Trained runs with val/bpb per class and seed; returns the values by run name."""
    shift = {"nvidia_h800": 0.0, "ascend_910b": 0.03, "cpu_host": 0.004}
    values = {}
    for r in study.runs():
        chip = r.axes[0][1]
        d = root / "outputs" / "sh" / r.name
        d.mkdir(parents=True)
        v = 2.5 + shift[chip] + [0.0, 0.011, -0.007][r.seed] + 0.002 * r.seed * (chip == "cpu_host")
        values[r.name] = v
        cell = next(c for c in study.cells() if c.row == r.row)
        figures = (row_figures(study, cell, root) if chip != "cpu_host"  # cpu_host: timed by its runs
                   else {"chip/kv_dtype_effective": "fp8", "chip/v3_671b/devices_needed": 239.0})
        (d / "metrics.json").write_text(json.dumps({"experiment": "full", "seed": r.seed, "val/bpb": v,
                                                    **figures}))
        (d / "config.yaml").write_text(yaml.safe_dump({"variant": r.variant}))
    return values


def test_shared_rows_show_their_class_s_runs_and_are_tested_once_per_class(tmp_path):
    root = _checkout(tmp_path)
    study = load_study("sh", root)
    values = _fake_runs(root, study)
    runs = with_shared_rows(study, load_runs(study, root), root)
    assert len(runs) == 15 and runs["full-chip_ascend_910c-s1"][0].name == "full-chip_ascend_910b-s1"
    table = {r["experiment"]: r for r in summarize(study, runs).iter_rows(named=True)}

    groups = {c: [values[f"full-chip_{c}-s{s}"] for s in (0, 1, 2)]
              for c in ("nvidia_h800", "ascend_910b", "cpu_host")}
    # independent: a t-test with the variance pooled over the 3 trained rows only (df 6)
    ss = sum(((np.array(g) - np.mean(g)) ** 2).sum() for g in groups.values())
    sd, df = math.sqrt(ss / 6), 6
    ref = np.mean(groups["nvidia_h800"])
    p = {c: 2 * stats.t.sf(abs(np.mean(g) - ref) / (sd * math.sqrt(2 / 3)), df)
         for c, g in groups.items() if c != "nvidia_h800"}
    holm = dict(zip(p, multipletests(list(p.values()), method="holm")[1]))
    for chip, src in [("ascend_910b", "ascend_910b"), ("ascend_910c", "ascend_910b"),
                      ("cpu_host", "cpu_host")]:
        row = table[f"full-chip_{chip}"]
        assert row["runs"] == f"full-chip_{src}"
        assert row["val/bpb mean"] == pytest.approx(np.mean(groups[src]))
        assert row["val/bpb p"] == pytest.approx(p[src], rel=1e-9)
        assert row["val/bpb p_holm"] == pytest.approx(holm[src], rel=1e-9)
    h20 = table["full-chip_nvidia_h20"]  # the reference's own runs: no test, not a replication
    assert h20["val/bpb same_runs"] and math.isnan(h20["val/bpb p"]) and h20["val/bpb delta"] == 0
    assert h20["class"] == "bf16_fp8" and h20["runs"] == "full-chip_nvidia_h800"
    # chip figures are the row's own chip's, not its class's first chip's
    devices = "chip/v3_671b/devices_needed mean"
    assert h20[devices] != table["full-chip_nvidia_h800"][devices]
    assert table["full-chip_ascend_910c"]["chip/kv_dtype_effective"] == "int8"

    summary = summarize(study, runs)
    md = markdown_table(study, summary)
    assert "| full-chip_nvidia_h20 | 3 | `full-chip_nvidia_h800` | bf16_fp8 |" in md
    assert "= reference (same runs)" in md
    lines = findings(study, summary)
    assert lines[0].startswith("Rows sharing runs are the same runs, not independent results")
    assert "`full-chip_nvidia_h20` show `full-chip_nvidia_h800`'s runs (the reference's" in lines[0]
    assert not any(line.startswith("`full-chip_ascend_910c`: val/bpb") for line in lines)
    assert "pooled over all 3 rows of the study with runs of their own" in method_text(study, summary)


def test_a_shared_chip_trains_like_its_class_and_its_figures_are_what_its_run_records(
        tmp_path, smoke_overrides):
    """Two chips of one class train to the same numbers (all but their chip/* figures), and a
    row's computed chip/* figures equal the ones its own run records."""
    root = _checkout(tmp_path, overrides=[*smoke_overrides, "chip.on_unsupported=fallback"])
    study = load_study("sh", root)
    base = ["+experiment=full", "seed=0", "study=sh", *study.overrides]
    a, b = (deterministic(train(compose([*base, f"chip={c}", f"variant=-chip_{c}"]), tmp_path / c))
            for c in ("ascend_910b", "ascend_910c"))
    assert {k: v for k, v in a.items() if not k.startswith("chip/") and k != "config_hash"} == \
           {k: v for k, v in b.items() if not k.startswith("chip/") and k != "config_hash"}
    cell = next(c for c in study.cells() if c.row == "full-chip_ascend_910c")
    assert row_figures(study, cell, root) == {k: v for k, v in b.items() if k.startswith("chip/")}
