"""End-to-end runs at smoke size: outputs, determinism, resume, non-finite loss, run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import ROOT, Crash, deterministic
from v4lab.io import compose
from v4lab.lit import NonFiniteLossError, lr_lambda
from v4lab.train import train

IDENTITY = ("experiment", "seed", "config_hash", "git_rev", "torch_version", "corpus_sha256")
REQUIRED = IDENTITY + ("val/loss", "val/bpb", "test/bpb", "cost/params_total",
                       "cost/params_active", "cost/kv_bytes_per_token",
                       "cost/train_flops_per_token", "speed/train_tokens_per_s")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, smoke_overrides):
    run_dir = tmp_path_factory.mktemp("run_a")
    cfg = compose(["+experiment=baseline", *smoke_overrides])
    return run_dir, train(cfg, run_dir)


def test_run_writes_config_metrics_and_checkpoint(first_run):
    run_dir, metrics = first_run
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk.keys() == metrics.keys()
    for key in REQUIRED:
        assert key in on_disk, key
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert on_disk["experiment"] == "baseline" and on_disk["train/steps"] == 12
    # nothing half-written is left behind
    assert not [p for p in run_dir.rglob(".*") if p.is_file()]
    # it learned something: below the uniform model's loss over a 512-token vocabulary
    assert on_disk["val/loss"] < torch.log(torch.tensor(512.0)).item()


def test_same_seed_same_metrics_other_seed_differs(first_run, tmp_path, smoke_overrides):
    _, metrics = first_run
    again = train(compose(["+experiment=baseline", *smoke_overrides]), tmp_path / "b")
    assert deterministic(again) == deterministic(metrics)
    other = train(compose(["+experiment=baseline", "seed=1", *smoke_overrides]), tmp_path / "c")
    assert other["val/loss"] != metrics["val/loss"]



def test_kill_and_resume_gives_the_same_final_metrics(first_run, tmp_path, smoke_overrides):
    first_dir, metrics = first_run
    cfg = compose(["+experiment=baseline", *smoke_overrides])
    run_dir = tmp_path / "resumed"
    # Lightning turns KeyboardInterrupt into a graceful stop; the run ends early, unfinished.
    with pytest.raises((KeyboardInterrupt, SystemExit, Exception)):
        train(cfg, run_dir, extra_callbacks=[Crash(at=7)])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # the last checkpoint before the crash
    resumed = train(cfg, run_dir)
    assert resumed["train/steps"] == 12
    assert resumed["val/loss"] == metrics["val/loss"]
    assert deterministic(resumed) == deterministic(metrics)
    # the learning curve travels in the checkpoint: the resumed run writes the whole curve
    curve = (first_dir / "curves.csv").read_text()
    assert curve.startswith("step,train/loss,train/answer_loss,val/loss,val/bpb\n5,")
    assert curve.count("\n") == 5  # header + steps 5, 6, 10, 12
    assert (run_dir / "curves.csv").read_text() == curve


class Poison(Callback):
    """Makes the weights NaN after step ``at`` so the next loss is non-finite."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.model.tok_emb.weight.fill_(float("nan"))


@pytest.mark.parametrize(
    ("at", "message", "last_good"),
    [(9, "non-finite training loss.*step 9", 8),  # caught by the next loss
     (8, "non-finite weights at step 8.*not saving", 4)],  # caught when checkpointing
)
def test_non_finite_stops_with_message_and_keeps_last_good_checkpoint(
        tmp_path, smoke_overrides, at, message, last_good):
    cfg = compose(["+experiment=baseline", *smoke_overrides])
    with pytest.raises(NonFiniteLossError, match=message):
        train(cfg, tmp_path, extra_callbacks=[Poison(at=at)])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == last_good
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.process
def test_run_py_acceptance_command_with_offline_wandb(tmp_path, data_root):
    """The README's command at smoke size, as a user runs it, with W&B offline."""
    from conftest import TINY_DATA

    env = {**os.environ, "WANDB_MODE": "offline"}
    r = subprocess.run(
        [sys.executable, "run.py", "+experiment=baseline", "profile=smoke",
         f"hydra.run.dir={tmp_path / 'run'}", f"data.root={data_root}", *TINY_DATA,
         f"logger.dir={tmp_path / 'logs'}", "trainer.max_steps=6", "trainer.val_every_n_steps=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["experiment"] == "baseline"
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs
    assert "val/bpb" in r.stdout


def test_answer_loss_objective_matches_a_naive_per_row_computation():
    """LM mean over scored targets + w * mean over each row's last answer_len targets."""
    from v4lab.config import load_run_config
    from v4lab.lit import LitLM

    cfg = load_run_config(compose(["+experiment=baseline", "profile=smoke"]))
    torch.manual_seed(0)
    token_bytes = torch.ones(cfg.model.vocab_size, dtype=torch.long)
    token_bytes[0] = 0  # token 0 is not scored
    lit = LitLM(cfg.model, cfg.trainer, token_bytes, answer_loss_weight=2.5)
    tokens = torch.randint(0, cfg.model.vocab_size, (3, 17))
    tokens[1, 5] = 0
    answer_len = torch.tensor([3, 0, 5])
    total, _, _ = lit.objective(tokens, answer_len)

    logits = lit.model(tokens[:, :-1])
    lm_terms, answer_terms = [], []
    for b in range(3):
        for j in range(16):
            target = int(tokens[b, j + 1])
            nll = -torch.log_softmax(logits[b, j].double(), -1)[target]
            if target != 0:
                lm_terms.append(nll)
            if j >= 16 - int(answer_len[b]):
                answer_terms.append(nll)
    assert len(answer_terms) == 8
    expected = torch.stack(lm_terms).mean() + 2.5 * torch.stack(answer_terms).mean()
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    assert lit.last_answer[1] == 8
    lit.answer_loss_weight = 0.0  # logged, not trained on
    assert float(lit.objective(tokens, answer_len)[0]) == pytest.approx(
        float(torch.stack(lm_terms).mean()), rel=1e-5)


@pytest.mark.parametrize("precision, fused", [("32-true", True), ("bf16-mixed", None)])
def test_adamw_is_fused_in_full_precision_and_clipping_works_either_way(
        precision, fused, smoke_overrides):
    """Full precision: torch's fused AdamW kernel. Mixed precision: Lightning refuses gradient
    clipping with a fused optimizer, so the plain one (a clipped bf16 step must train)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from v4lab.config import load_run_config
    from v4lab.lit import LitLM

    cfg = load_run_config(compose(["+experiment=baseline", *smoke_overrides]))
    torch.manual_seed(0)
    lit = LitLM(cfg.model, cfg.trainer, torch.ones(cfg.model.vocab_size, dtype=torch.long))
    before = {n: p.detach().clone() for n, p in lit.named_parameters()}
    trainer = L.Trainer(max_steps=2, precision=precision, gradient_clip_val=1.0, logger=False,
                        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    batches = torch.randint(0, cfg.model.vocab_size, (4, 17))
    trainer.fit(lit, DataLoader(batches, batch_size=2))
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is fused
    assert any(not torch.equal(p, before[n]) for n, p in lit.named_parameters())
