"""ForwardContext.diagnose: the training steps whose statistics nobody reads skip the
indexers' recall (and the dense attention only it needs). Nothing else may change: every
step Lightning logs still has its statistics, and a run's metrics are bit-identical to a
run that computes them on every step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from torch.utils.data import DataLoader

from conftest import deterministic
from v4lab.io import compose
from v4lab.lit import LitLM, reads_stats
from v4lab.modules import mla, v4_attention
from v4lab.train import train


class _Recorder(Logger):
    """Keeps every metrics dict Lightning emits."""

    def __init__(self) -> None:
        super().__init__()
        self.emitted: list[dict[str, float]] = []

    name, version = "recorder", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.emitted.append(dict(metrics))


class _LogsItsStep(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.log("step_of_value", float(self.global_step))
        return (self.w - batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("every, steps", [(5, 23), (3, 10), (1, 4)])
def test_every_step_lightning_logs_is_one_whose_statistics_are_computed(every, steps):
    recorder = _Recorder()
    trainer = L.Trainer(max_steps=steps, log_every_n_steps=every, logger=recorder,
                        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(_LogsItsStep(), DataLoader(torch.ones(100, 1), batch_size=1))
    logged = [int(m["step_of_value"]) for m in recorder.emitted if "step_of_value" in m]
    assert len(logged) >= steps // every
    assert all(reads_stats(s, every, steps) for s in logged), logged
    # and the rule skips something whenever the logging interval leaves room to
    assert every == 1 or not all(reads_stats(s, every, steps) for s in range(steps))


@pytest.mark.parametrize("experiment, module, stat", [
    ("full", mla, "final/sparse/recall"),       # also Engram's collision rate
    ("v4", v4_attention, "final/v4/recall")])   # also mHC's gains
def test_skipping_unread_statistics_changes_no_metric(experiment, module, stat, tmp_path,
                                                      smoke_overrides, monkeypatch):
    cfg = compose([f"+experiment={experiment}", *smoke_overrides])
    calls = []
    real = module.recall
    monkeypatch.setattr(module, "recall", lambda *a, **k: calls.append(1) or real(*a, **k))
    skipped = train(cfg, tmp_path / "skipped")
    n_skipped = len(calls)
    monkeypatch.setattr(LitLM, "reads_stats", lambda self, step: True)
    every_step = train(cfg, tmp_path / "every_step")
    n_every = len(calls) - n_skipped
    assert 0 < n_skipped < n_every  # it skipped some (smoke: 12 of 20 training steps)
    assert stat in skipped
    assert deterministic(skipped) == deterministic(every_step)
