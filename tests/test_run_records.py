"""Issue 16 item 5, what a run records: each piece's end-of-training figures in
metrics.json (``final/<stat>``: the mean over the last logging window of training steps)
and the W&B summary; the W&B history keyed by the trainer's global step; tags from the
effective numerics; the host's threads and load."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from v4lab import build, tracking
from v4lab import metrics as registry
from v4lab.callbacks import PieceTail
from v4lab.config import load_run_config
from v4lab.io import compose
from v4lab.train import train

WINDOW = 5  # trainer.log_every_n_steps of the run below


class StepStats(Callback):
    """Every training step's piece statistics, read independently of PieceTail."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.loss_at: dict[int, float] = {}  # trainer.global_step during the batch -> train/loss
        self._step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in pl_module.last_stats.items()})
        self.loss_at[self._step] = float(trainer.callback_metrics["train/loss"])


class Recorder(Logger):
    """Stands in for the WandbLogger: the rows Lightning logs (step, metrics), the summary."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args, self.kwargs, self.rows = args, kwargs, []
        self.experiment = SimpleNamespace(summary={})

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, smoke_overrides):
    """MoE + Engram + sparse MLA (the `full` experiment) with mHC on, 12 steps, validated
    at steps 6 and 12; W&B replaced by a recorder of what it would get."""
    run_dir = tmp_path_factory.mktemp("full")
    cfg = compose(["+experiment=full", *smoke_overrides, "model.hc.enabled=true",
                   f"trainer.log_every_n_steps={WINDOW}"])
    steps, made = StepStats(), []

    def make_logger(*args, **kwargs):
        made.append(Recorder(args, kwargs))
        return made[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking, "make_logger", make_logger)
        train(cfg, run_dir, extra_callbacks=[steps])
    return json.loads((run_dir / "metrics.json").read_text()), steps, made[0]


def test_every_piece_writes_its_final_figures(full_run):
    m, steps, _ = full_run
    steps = steps.steps
    final = {k: v for k, v in m.items() if k.startswith("final/")}
    expected = {"moe/load_cv", "moe/max_over_mean", "moe/dead_experts", "moe/bias_min", "moe/bias_max",
                "engram/gate_mean", "engram/bucket_collision_rate", "sparse/recall",
                "sparse/indexer_kl", "hc/fwd_gain", "hc/bwd_gain"}
    assert {f"final/{n}" for n in expected} <= set(final)
    assert all(registry.known(k) and math.isfinite(v) for k, v in final.items())
    # the mean over the last WINDOW steps, by a loop over the steps' own values
    assert len(steps) == m["train/steps"] == 12
    for name in expected:
        tail = [s[name] for s in steps[-WINDOW:]]
        assert final[f"final/{name}"] == pytest.approx(sum(tail) / len(tail), rel=1e-9, abs=1e-12)


def test_final_figures_are_in_plausible_ranges(full_run):
    f = {k.removeprefix("final/"): v for k, v in full_run[0].items() if k.startswith("final/")}
    experts = 4  # conf/model/tiny.yaml
    assert f["moe/load_cv"] >= 0 and 1 <= f["moe/max_over_mean"] <= experts
    assert 0 <= f["moe/dead_experts"] <= experts and f["moe/bias_min"] <= f["moe/bias_max"]
    assert 0 < f["engram/gate_mean"] < 1 and 0 <= f["engram/bucket_collision_rate"] <= 1
    assert 0 <= f["sparse/recall"] <= 1 and f["sparse/indexer_kl"] >= 0
    assert f["hc/fwd_gain"] == pytest.approx(1, abs=0.05)  # mHC: doubly stochastic mixing
    assert f["hc/bwd_gain"] == pytest.approx(1, abs=0.05)


def test_wandb_history_is_keyed_by_the_global_step_and_gets_host_and_final_figures(full_run):
    """Every row's step is trainer.global_step when it is logged: a training row the
    updates including its batch's (the 5th batch's loss at step 5, as in curves.csv), a
    validation the updates before it (6 and 12 in fit, 12 for the final validation)."""
    m, steps, rec = full_run
    train_rows = sorted((s, row["train/loss"]) for s, row in rec.rows if "train/loss" in row)
    assert [s for s, _ in train_rows] == [WINDOW, 2 * WINDOW]
    for s, loss in train_rows:  # the loss of the batch that ran at global step s - 1
        assert loss == pytest.approx(steps.loss_at[s - 1], rel=1e-6)
    val_steps = sorted(s for s, row in rec.rows if "val/loss" in row)
    assert val_steps == [6, 12, 12]
    assert all(s is not None and 0 < s <= m["train/steps"] for s, _ in rec.rows)
    host = rec.args[4]  # make_logger(cfg, run_dir, config_dict, matmul_dtype, host)
    assert set(host) == {"host/threads", "host/usable_cpus", "host/busy_cpus_at_start"}
    assert host["host/threads"] == m["host/threads"] >= 1
    for key in ("host/threads", "host/busy_cpus_at_start", "final/moe/load_cv", "final/sparse/recall"):
        assert rec.experiment.summary[key] == m[key]


def test_tags_name_the_effective_numerics():
    """A V4 model's tag is its own cache dtype (v4.kv_dtype) after the chip's policy."""
    cfg = load_run_config(compose(["+experiment=v4", "profile=smoke", "chip=nvidia_h800",
                                   "model.attention.v4.kv_dtype=fp8",
                                   "model.attention.kv_cache.dtype=bf16"]))
    n = build.numerics(cfg, measure=False)
    cfg.model = n.model
    tags = tracking.run_tags(cfg, n.matmul_dtype)
    assert {"attn:v4", "kv:fp8", "chip:nvidia_h800", "matmul:bf16"} <= set(tags)


def test_the_window_travels_in_the_checkpoint():
    """A resumed run (or one evaluated again from its last checkpoint) reports the same."""
    tail = PieceTail(window=2)
    for v in (1.0, 2.0, 4.0):
        tail.tail.append({"moe/load_cv": torch.tensor(v)})
    tail.tail.append({"moe/load_cv": torch.tensor(8.0), "sparse/recall": torch.tensor(0.5)})
    assert tail.figures() == {"final/moe/load_cv": 6.0, "final/sparse/recall": 0.5}
    again = PieceTail(window=2)
    again.load_state_dict(tail.state_dict())
    assert again.figures() == tail.figures()
