"""Issue 16 item 5: each piece's end-of-training figures reach metrics.json
(``final/<stat>``: the mean over the last logging window of training steps)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from v4lab import metrics as registry
from v4lab.callbacks import PieceTail
from v4lab.io import compose
from v4lab.train import train

WINDOW = 5  # trainer.log_every_n_steps of the run below


class StepStats(Callback):
    """Every training step's piece statistics, read independently of PieceTail."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in pl_module.last_stats.items()})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, smoke_overrides):
    """MoE + Engram + sparse MLA (the `full` experiment) with mHC on, 12 steps."""
    run_dir = tmp_path_factory.mktemp("full")
    cfg = compose(["+experiment=full", *smoke_overrides, "model.hc.enabled=true",
                   f"trainer.log_every_n_steps={WINDOW}"])
    steps = StepStats()
    train(cfg, run_dir, extra_callbacks=[steps])
    return json.loads((run_dir / "metrics.json").read_text()), steps.steps


def test_every_piece_writes_its_final_figures(full_run):
    m, steps = full_run
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
