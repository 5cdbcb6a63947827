"""LightningModule: the LM loss, auxiliary losses, optimizer groups, logged metrics.

Training concerns live here; the network itself is :class:`v4lab.model.Transformer`.
Losses are in nats per predicted token; bits per byte divide the summed loss by ln 2 and
by the UTF-8 bytes the predicted tokens stand for (special tokens are not scored), which
makes it comparable across tokenizers.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from v4lab.config import TrainerConfig
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.context import ForwardContext


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def reads_stats(step: int, every: int, max_steps: int) -> bool:
    """Whether anything reads training step ``step``'s piece statistics: Lightning logs a
    step's values when (step + 1) is a multiple of ``log_every_n_steps`` (its logger
    connector's rule, with one optimizer step per batch as here), and
    ``callbacks.PieceTail`` averages the last ``log_every_n_steps`` steps into
    metrics.json. On the other steps the costly statistics are skipped
    (``ForwardContext.diagnose``)."""
    return (step + 1) % every == 0 or step >= max_steps - every


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LitLM(L.LightningModule):
    """Next-token prediction on windows [B, T+1] of token ids.

    Training batches are ``(tokens [B, T+1], answer_len [B])`` (see
    :class:`~v4lab.data.datamodule.TrainWindows`): the last ``answer_len`` tokens of a task
    sequence are its answer. Their mean loss is logged as ``train/answer_loss`` and, with
    ``answer_loss_weight`` w > 0, added to the objective: LM mean + w * answer mean (the
    answer is 3 of ~1K tokens, so in the plain LM mean its gradient is tiny).
    """

    def __init__(self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                 token_bytes: torch.Tensor, answer_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.model = Transformer(model_cfg)
        self.tcfg = trainer_cfg
        self.answer_loss_weight = answer_loss_weight
        self.last_answer = (0.0, 0)  # this step's (summed answer loss, answer tokens)
        self.last_mtp: torch.Tensor | None = None  # this step's MTP cross-entropy
        self.last_stats: dict[str, torch.Tensor] = {}  # this step's piece statistics (0-d, on device)
        self.diagnose = True  # this training step's ForwardContext.diagnose (reads_stats)
        self.register_buffer("token_bytes", token_bytes.long(), persistent=False)
        self._eval_sums: dict[str, torch.Tensor] = {}
        # FP4 (trainer.quantize): QAT reads the routed-expert weights (and the indexers read
        # their q/k) through MXFP4 fake quantisation (parametrizations registered now, before
        # any checkpoint is loaded, so resumed state dicts match); post-hoc only checks the
        # block size now.
        self.fp4_qat: list = []
        if trainer_cfg.quantize != "none":
            from v4lab.modules.fp4 import apply_fp4_qat, check_fp4

            check_fp4(self.model)
            if trainer_cfg.quantize == "fp4_qat":
                self.fp4_qat = apply_fp4_qat(self.model)
                self._set_qat(0)

    def _token_losses(self, batch: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """Per-target LM loss [B, T] (nats), bytes per target [B, T], forward context."""
        x, y = batch[:, :-1], batch[:, 1:]
        step = int(self.global_step) if self._trainer is not None else None
        phase = "infer" if step is None else ("train" if self.training else "eval")
        ctx = ForwardContext(positions=torch.arange(x.shape[1], device=x.device), input_ids=x,
                             step=step, phase=phase, diagnose=self.diagnose or phase != "train")
        logits = self.model(x, ctx)
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="none").view_as(y)
        return losses, self.token_bytes[y], ctx

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """Summed LM loss (nats), [scored tokens, scored bytes], and the forward context."""
        losses, nbytes, ctx = self._token_losses(batch)
        scored = nbytes > 0
        return (losses * scored).sum(), torch.stack([scored.sum(), nbytes.sum()]), ctx

    def _global_mean(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``total / count`` over the global batch, as the objective of one rank.

        DDP averages gradients over ranks; scaling by world / (count on all ranks) makes
        that average the gradient of the global batch's mean, exactly what one process
        computes from the same batch."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return total / count.clamp(min=1)
        count = self.trainer.strategy.reduce(count.float(), reduce_op="sum")
        return total * world / count.clamp(min=1)

    def objective(self, tokens: torch.Tensor, answer_len: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """(training objective, LM mean loss, forward context) for tokens [B, T+1].

        Sets ``last_answer`` = (summed answer loss, answer tokens) of this batch. With an
        MTP block the objective adds ``mtp_weight(step)`` x its cross-entropy (``last_mtp``).
        """
        self.last_answer = (0.0, 0)
        self.last_mtp = None
        losses, nbytes, ctx = self._token_losses(tokens)
        scored = nbytes > 0
        loss_sum, n_scored = (losses * scored).sum(), scored.sum()
        objective = self._global_mean(loss_sum, n_scored)
        if answer_len is not None:
            # Target j predicts window token j+1, so a row's answer is its last n targets.
            cols = torch.arange(losses.shape[1], device=losses.device)
            is_answer = cols[None, :] >= losses.shape[1] - answer_len.to(losses.device)[:, None]
            answer_sum, n_answer = (losses * is_answer).sum(), is_answer.sum()
            if self.answer_loss_weight > 0:
                objective = objective + self.answer_loss_weight * self._global_mean(answer_sum, n_answer)
            self.last_answer = (float(answer_sum.detach()), int(n_answer))
        if self.model.mtp is not None:
            mtp_ce = self.model.mtp_loss(ctx, tokens)
            self.last_mtp = mtp_ce.detach()
            objective = objective + self.mtp_weight(ctx.step) * mtp_ce
        total = objective + sum(ctx.aux_losses.values(), torch.zeros((), device=losses.device))
        return total, loss_sum.detach() / n_scored.clamp(min=1), ctx

    def mtp_weight(self, step: int | None) -> float:
        """The MTP loss weight at ``step``: ``model.mtp.loss_weight`` until the learning rate
        starts to decay, ``decay_loss_weight`` after (V4: 0.3, then 0.1). In this schedule
        (:func:`lr_lambda`) the warm-up peaks at step ``warmup_steps`` and the cosine decay
        starts right after it."""
        cfg = self.model.cfg.mtp
        return cfg.loss_weight if step is None or step <= self.tcfg.warmup_steps else cfg.decay_loss_weight

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        tokens, answer_len = batch if isinstance(batch, (list, tuple)) else (batch, None)
        total, loss, ctx = self.objective(tokens, answer_len)
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}; total with auxiliary losses "
                f"{total.item()}) at step {self.global_step}: stopping. {self._kept()}; "
                "lower trainer.lr or check the data.")
        self.log("train/loss", loss, prog_bar=True)
        if self.last_answer[1] > 0:
            self.log("train/answer_loss", self.last_answer[0] / self.last_answer[1])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        for name, value in ctx.aux_losses.items():
            self.log(f"train/{name}", value)
        self.last_stats = ctx.stat_tensors()  # callbacks.PieceTail keeps the last window
        for name, value in self.last_stats.items():  # reduced by Lightning when it logs
            self.log(name, value)
        if self.last_mtp is not None:
            self.log("train/mtp_loss", self.last_mtp)  # unweighted cross-entropy (nats)
        return total

    def _set_qat(self, step: int) -> None:
        start = math.floor(self.tcfg.qat_start * self.tcfg.max_steps)
        for fake in self.fp4_qat:
            fake.enabled = step >= start

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._set_qat(int(self.global_step))
        self.diagnose = self.reads_stats(int(self.global_step))

    def reads_stats(self, step: int) -> bool:
        """:func:`reads_stats` of this run's logging interval and length."""
        return reads_stats(step, self.tcfg.log_every_n_steps, self.tcfg.max_steps)

    def on_fit_end(self) -> None:
        """The model is evaluated (and deployed) in FP4: QAT's quantiser on for good, or the
        post-hoc round trip of the trained weights (after the last checkpoint was written,
        so checkpoints keep the full-precision weights)."""
        if self.tcfg.quantize == "fp4_qat":
            self._set_qat(self.tcfg.max_steps)
        elif self.tcfg.quantize == "fp4_posthoc":
            from v4lab.modules.fp4 import quantize_fp4_

            quantize_fp4_(self.model)

    def _kept(self) -> str:
        """What a non-finite loss leaves behind: the last good checkpoint, where one exists
        (``last_checkpoint``, set by v4lab.train)."""
        path = getattr(self, "last_checkpoint", None)
        if path is not None and path.is_file():
            return f"The last good checkpoint is kept ({path})"
        return "No checkpoint was written before it (none is kept)"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to overwrite the last good checkpoint with non-finite weights."""
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"non-finite weights at step {self.global_step} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): not saving. {self._kept()}; lower "
                "trainer.lr or check the data.")

    def optimizer_step(self, *args, **kwargs) -> None:
        """The step, then the pieces' running state (MoE's bias). Here rather than in
        on_train_batch_end: ModelCheckpoint saves in its own on_train_batch_end, which runs
        first, so a checkpoint would miss that step's update and a resumed run diverge."""
        super().optimizer_step(*args, **kwargs)
        self.model.on_train_step_end()

    def _eval_step(self, batch: torch.Tensor, split: str) -> None:
        loss_sum, counts, ctx = self._forward(batch)
        acc = self._eval_sums.setdefault(split, torch.zeros(3, dtype=torch.float64,
                                                            device=loss_sum.device))
        acc += torch.stack([loss_sum.double(), counts[0].double(), counts[1].double()])
        for name, value in ctx.stat_tensors().items():
            self.log(f"{split}/{name}", value, on_epoch=True, on_step=False)

    def _eval_end(self, split: str) -> None:
        # A rank that drew no windows (more ranks than windows) still joins the all_gather.
        acc = self._eval_sums.pop(split, None)
        if acc is None:
            acc = torch.zeros(3, dtype=torch.float64, device=self.device)
        acc = self.all_gather(acc).reshape(-1, 3).sum(0) if self.trainer.world_size > 1 else acc
        loss_sum, tokens, nbytes = acc.tolist()
        self.log(f"{split}/loss", loss_sum / max(tokens, 1), sync_dist=False)
        self.log(f"{split}/bpb", loss_sum / math.log(2) / max(nbytes, 1), sync_dist=False)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def _fused_adamw(self) -> bool | None:
        """torch's fused AdamW kernel for full-precision training: the same update in one
        pass over each tensor instead of about ten elementwise ops: 10 vs 32 ms a step for
        the full model's 5.9M parameters at one thread, equal up to fp32 rounding.
        Not under mixed precision: Lightning refuses gradient clipping with an optimizer
        that may unscale gradients itself, as fused ones can."""
        trainer = self._trainer  # None outside a Trainer (benchmarks, tests)
        precision = str(trainer.precision) if trainer is not None else "32-true"
        return True if precision in ("32-true", "32") and self.device.type in ("cpu", "cuda") else None

    def configure_optimizers(self):
        t = self.tcfg
        if t.optimizer == "muon":
            from v4lab.optim import build_muon_adamw

            opt = build_muon_adamw(self.model, t.lr, t.weight_decay, betas=(t.beta1, t.beta2))
        else:
            groups = self.model.optimizer_groups(t.weight_decay)
            for g in groups:
                g["lr"] = t.lr * g.pop("lr_multiplier")
            opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
                                    fused=self._fused_adamw())
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
