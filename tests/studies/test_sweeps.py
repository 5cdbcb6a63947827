"""Study sweep axes (``sweep: {<config group or key>: [values]}``): one label per run used
alike by the run folder (Hydra, one run or a multirun), the DVC stage, the finder and the
report's rows; bad axes are refused naming the file, the key, the value and what is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import ROOT, TINY_DATA
from v4lab.errors import ConfigError
from v4lab.io import compose
from v4lab.report.figures import curves
from v4lab.report.runs import load_runs
from v4lab.report.table import markdown_table, summarize
from v4lab.studies import collect, dvcyaml, load_study, multirun_command

CHIPS = ["cpu_host", "nvidia_h800"]


def _checkout(tmp_path: Path, **changes) -> Path:
    """A checkout as the studies see it: run.py, conf/, src/v4lab/, experiments/sw.yaml."""
    (tmp_path / "run.py").write_text("")
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "src" / "v4lab").mkdir(parents=True)
    (tmp_path / "experiments").mkdir()
    data = {"name": "sw", "experiments": ["baseline", "mha"], "sweep": {"chip": CHIPS},
            "seeds": [0, 1], "baseline": "baseline-chip_cpu_host", "metrics": ["val/bpb"],
            "overrides": ["profile=smoke", "chip.on_unsupported=fallback"], **changes}
    (tmp_path / "experiments" / "sw.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp_path


def _load(tmp_path: Path, **changes):
    root = _checkout(tmp_path, **changes)
    return load_study("sw", root), root


def test_sweep_expands_experiments_x_values_x_seeds(tmp_path):
    study, _ = _load(tmp_path)
    assert study.rows() == ["baseline-chip_cpu_host", "baseline-chip_nvidia_h800",
                            "mha-chip_cpu_host", "mha-chip_nvidia_h800"]
    runs = study.runs()
    assert [r.name for r in runs] == [f"{row}-s{s}" for row in study.rows() for s in (0, 1)]
    assert (runs[2].experiment, runs[2].seed, runs[2].row) == ("baseline", 0, "baseline-chip_nvidia_h800")
    assert runs[2].overrides() == ["chip=nvidia_h800", "variant=-chip_nvidia_h800"]
    assert multirun_command(study)[1:] == [
        "run.py", "-m", "+experiment=baseline,mha", "seed=0,1", "study=sw", "chip=cpu_host,nvidia_h800",
        "variant=-chip_${hydra:runtime.choices.chip}", "profile=smoke", "chip.on_unsupported=fallback"]


def test_without_a_sweep_rows_are_the_experiments(tmp_path):
    study, _ = _load(tmp_path, sweep=None, baseline="baseline")
    assert study.rows() == ["baseline", "mha"] and study.runs()[0].overrides() == []
    assert [r.name for r in study.runs()] == ["baseline-s0", "baseline-s1", "mha-s0", "mha-s1"]
    assert not any("variant" in a for a in multirun_command(study))


def test_a_key_axis_is_labelled_by_the_last_part_of_its_key(tmp_path):
    study, _ = _load(tmp_path, sweep={"trainer.lr": [0.001, 1.0e-5]}, baseline="mha-lr_0.001")
    assert study.rows()[:2] == ["baseline-lr_0.001", "baseline-lr_1e-05"]
    assert study.runs()[0].overrides() == ["trainer.lr=0.001", "variant=-lr_0.001"]
    assert "variant=-lr_${trainer.lr}" in multirun_command(study)


def _folder(overrides: list[str], key: str = "hydra.run.dir") -> str:
    """The run folder Hydra derives from ``overrides`` (conf/config.yaml's hydra.run.dir or,
    for a multirun job, hydra.sweep.subdir), resolved as Hydra does for a job."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return str(OmegaConf.select(cfg, key))


@pytest.mark.parametrize(("sweep", "value"), [({"chip": CHIPS}, "nvidia_h800"),
                                              ({"trainer.lr": [0.003, 1.0e-5]}, "1e-05")])
def test_one_run_and_a_multirun_job_land_in_the_folder_named_by_the_run(tmp_path, sweep, value):
    """A DVC stage passes the run's overrides; a multirun job resolves ``variant`` from its own
    sweep value: both give the folder the finder looks in (Run.name)."""
    (key,) = sweep
    label = key.rsplit(".", 1)[-1]
    study, _ = _load(tmp_path, sweep=sweep, baseline=f"baseline-{label}_{sweep[key][0]}")
    run = next(r for r in study.runs() if r.axes == ((key, value),) and r.experiment == "mha" and r.seed == 1)
    assert run.name == f"mha-{label}_{value}-s1"
    base = ["+experiment=mha", "seed=1", "study=sw", *study.overrides]
    assert _folder([*base, *run.overrides()]) == f"outputs/sw/{run.name}"
    variant = next(a for a in study.multirun_args() if a.startswith("variant="))
    job = [*base, f"{key}={value}", variant]  # what the basic sweeper passes one job
    assert _folder(job, "hydra.sweep.subdir") == run.name


def test_dvc_stages_finder_and_report_rows_use_the_run_names(tmp_path):
    study, root = _load(tmp_path)
    stages = dvcyaml.dvc_stages(root)["stages"]
    train = stages["train"]
    assert list(train["foreach"]) == [f"sw-{r.name}" for r in study.runs()]
    item = train["foreach"]["sw-mha-chip_nvidia_h800-s1"]
    assert item["run"] == "mha-chip_nvidia_h800-s1" and item["experiment"] == "mha" and item["seed"] == 1
    assert item["overrides"] == ("chip=nvidia_h800 variant=-chip_nvidia_h800 profile=smoke "
                                 "chip.on_unsupported=fallback")
    assert train["do"]["outs"][0] == "outputs/${item.study}/${item.run}/config.yaml"
    assert "outputs/sw/mha-chip_nvidia_h800-s1/metrics.json" in stages["sw"]["deps"]

    # the finder and the report: one row per experiment and chip, in manifest order
    for r in study.runs():
        d = root / "outputs" / "sw" / r.name
        d.mkdir(parents=True)
        bpb = 3.0 + 0.1 * (r.experiment == "mha") + 0.01 * r.seed + 0.5 * (r.axes[0][1] == "nvidia_h800")
        (d / "metrics.json").write_text(json.dumps({"experiment": r.experiment, "seed": r.seed,
                                                    "val/bpb": bpb}))
        (d / "curves.csv").write_text(f"step,val/bpb\n10,{bpb}\n")
    found, missing = collect(study, root)
    assert not missing and list(found) == [r.name for r in study.runs()]
    runs = load_runs(study, root)
    table = summarize(study, runs)
    assert table["experiment"].to_list() == study.rows()
    row = {r["experiment"]: r for r in table.iter_rows(named=True)}["mha-chip_nvidia_h800"]
    assert row["val/bpb mean"] == pytest.approx(3.605) and row["val/bpb delta"] == pytest.approx(0.6)
    md = markdown_table(study, table)
    assert "| **baseline-chip_cpu_host** (reference) | 2 |" in md and "| mha-chip_nvidia_h800 | 2 |" in md
    assert sorted(set(curves(study, runs)["experiment"].to_list())) == sorted(study.rows())


def test_a_swept_study_is_published_with_one_row_and_colour_per_chip(tmp_path, monkeypatch):
    from v4lab.report.publish import build

    monkeypatch.setenv("WANDB_MODE", "disabled")
    study, root = _load(tmp_path, experiments=["full"], baseline="full-chip_cpu_host", seeds=[0, 1],
                        metrics=["val/bpb", "chip/v3_671b/proj_train_tokens_per_s"])
    for r in study.runs():
        d = root / "outputs" / "sw" / r.name
        d.mkdir(parents=True)
        chip = r.axes[0][1]
        (d / "metrics.json").write_text(json.dumps({
            "experiment": "full", "seed": r.seed, "chip/name": chip, "val/bpb": 3.0 + r.seed / 10,
            "cost/params_active": 800.0, "chip/v3_671b/proj_train_tokens_per_s": 10.0 + (chip == "cpu_host"),
            "chip/v3_671b/proj_decode_tokens_per_s@32768": 100.0}))
        (d / "curves.csv").write_text("step,val/bpb\n10,3.5\n20,3.1\n")
    build(study, root)
    md = (root / "reports" / "sw.md").read_text()
    assert "| **full-chip_cpu_host** (reference) | 2 |" in md and "| full-chip_nvidia_h800 | 2 |" in md
    assert "x chip ['cpu_host', 'nvidia_h800'] x seeds [0, 1]" in md
    figures = sorted(p.name for p in (root / "reports" / "figures" / "sw").glob("*.png"))
    # every chip has the same cost/params_active: no cost-vs-quality panel to draw
    assert figures == ["chip_projections.png", "learning_curves.png"]
    prov = json.loads((root / "reports" / "sw.json").read_text())
    assert prov["sweep"] == {"chip": CHIPS} and prov["baseline"] == "full-chip_cpu_host"


def test_a_misplaced_run_in_a_swept_study_is_named(tmp_path):
    study, root = _load(tmp_path)
    d = root / "outputs" / "sw" / "mha-chip_cpu_host-s0"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"experiment": "baseline", "seed": 0}))
    from v4lab.studies import scan

    assert scan(study, root).bad == [f"{d / 'metrics.json'}: holds experiment='baseline' seed=0, "
                                     "expected 'mha' seed 0"]
    # right experiment and seed, but another chip's run (its config.yaml says which)
    (d / "metrics.json").write_text(json.dumps({"experiment": "mha", "seed": 0}))
    (d / "config.yaml").write_text("experiment: mha\nvariant: -chip_nvidia_h800\nseed: 0\n")
    assert scan(study, root).bad == [f"{d / 'config.yaml'}: holds variant='-chip_nvidia_h800', "
                                     "expected '-chip_cpu_host' (the sweep values of mha-chip_cpu_host-s0)"]
    (d / "config.yaml").write_text("experiment: mha\nvariant: -chip_cpu_host\nseed: 0\n")
    assert scan(study, root).bad == [] and list(scan(study, root).runs) == ["mha-chip_cpu_host-s0"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"sweep": {"chips": ["x"]}}, r"sw.yaml: sweep key 'chips' is neither a config group \(one of .*chip"),
    ({"sweep": {"chip": ["nvidia_h900"]}},
     r"sw.yaml: sweep: chip value 'nvidia_h900' does not exist \(conf/chip/nvidia_h900.yaml\); "
     r"available: ascend_910b, .*nvidia_h800"),
    ({"sweep": {"trainer.lr": ["fast"]}}, r"sw.yaml: sweep: trainer.lr value 'fast' is not allowed: a float"),
    ({"sweep": {"trainer.max_steps": [1.5]}},
     r"sw.yaml: sweep: trainer.max_steps value 1.5 is not allowed: an? int"),
    ({"sweep": {"model.attention": [1]}}, r"sw.yaml: sweep: model.attention is a section, not allowed"),
    ({"sweep": {"logger.project": ["true"]}},
     r"sw.yaml: sweep: logger.project value 'true' is not allowed: Hydra reads logger.project=true as True"),
    ({"sweep": {"logger.project": ["a/b"]}},
     r"sw.yaml: sweep: logger.project value 'a/b' is not allowed: letters, digits"),
    ({"sweep": {"chip": ["cpu_host", "cpu_host"]}},
     r"sw.yaml: sweep: chip lists \['cpu_host'\] more than once"),
    ({"sweep": {"chip": []}}, r"sw.yaml: sweep: chip=\[\] is not allowed: a non-empty list"),
    ({"sweep": ["chip"]}, r"sw.yaml: sweep=\['chip'\] is not allowed: a mapping"),
    ({"sweep": {"seed": [1, 2]}}, r"sw.yaml: sweep key 'seed' is not allowed: a config group"),
    ({"sweep": {"hydra.job.name": ["x"]}}, r"sw.yaml: sweep key 'hydra.job.name' is not allowed"),
    ({"sweep": {"chip": CHIPS}, "overrides": ["chip=cpu_host"]},
     r"sw.yaml: sweep key 'chip' is also set in overrides"),
    ({"sweep": {"trainer.lr": [0.1], "optim.lr": [0.2]}}, r"sweep key 'optim.lr' is neither"),
    ({"baseline": "baseline"}, r"sw.yaml: baseline='baseline' is not allowed: one of the study's rows "
                               r"\(baseline-chip_cpu_host, baseline-chip_nvidia_h800, mha-"),
])
def test_a_bad_sweep_is_refused_naming_file_key_and_value(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, **changes)


def test_two_axes_ending_in_the_same_name_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sw.yaml: sweep keys \['trainer.batch_size', 'eval.batch_size'\] "
                                          r"are not allowed together: two end in the same name"):
        _load(tmp_path, sweep={"trainer.batch_size": [2], "eval.batch_size": [4]})


def test_a_swept_key_cannot_be_overridden_when_launching(tmp_path):
    study, _ = _load(tmp_path)
    with pytest.raises(ConfigError, match=r"override 'chip=ascend_910c' is not allowed: the study sets "
                                          r"experiment, seed, study, variant, chip"):
        multirun_command(study, "basic", ["chip=ascend_910c"])


@pytest.mark.process
def test_swept_study_runs_as_one_multirun_into_the_named_folders(tmp_path, data_root):
    """End to end through Hydra's basic launcher: two chips x one experiment at a few smoke
    steps; each run in its own folder, each metrics.json the run of its chip."""
    root = _checkout(tmp_path, experiments=["baseline"], seeds=[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled"}
    sweep_dir = tmp_path / "multirun" / "sw"
    r = subprocess.run([sys.executable, "-m", "v4lab.studies", "run", str(root / "experiments" / "sw.yaml"),
                        f"hydra.sweep.dir={sweep_dir}", f"data.root={data_root}", *TINY_DATA,
                        "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.val_every_n_steps=3",
                        "trainer.seq_len=48", "tasks=off", f"logger.dir={tmp_path / 'logs'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    study = load_study("sw", root)
    found, missing = collect(study, root)
    assert not missing and list(found) == ["baseline-chip_cpu_host-s0", "baseline-chip_nvidia_h800-s0"]
    for name, metrics in found.items():
        assert metrics["chip/name"] == name.split("chip_")[1][:-3] and metrics["experiment"] == "baseline"
        saved = yaml.safe_load((sweep_dir / name / "config.yaml").read_text())
        assert saved["variant"] == name[len("baseline"):-3]
