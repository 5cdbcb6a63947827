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


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LitLM(L.LightningModule):
    """Next-token prediction on windows [B, T+1] of token ids."""

    def __init__(self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                 token_bytes: torch.Tensor) -> None:
        super().__init__()
        self.model = Transformer(model_cfg)
        self.tcfg = trainer_cfg
        self.register_buffer("token_bytes", token_bytes.long(), persistent=False)
        self._eval_sums: dict[str, torch.Tensor] = {}

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """Summed LM loss (nats), scored bytes, and the forward context."""
        x, y = batch[:, :-1], batch[:, 1:]
        step = int(self.global_step) if self._trainer is not None else None
        ctx = ForwardContext(positions=torch.arange(x.shape[1], device=x.device),
                             input_ids=x, step=step)
        logits = self.model(x, ctx)
        nbytes = self.token_bytes[y]
        scored = nbytes > 0
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="none").view_as(y)
        return (losses * scored).sum(), torch.stack([scored.sum(), nbytes.sum()]), ctx

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss_sum, counts, ctx = self._forward(batch)
        loss = loss_sum / counts[0].clamp(min=1)
        total = loss + sum(ctx.aux_losses.values(), torch.zeros((), device=loss.device))
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}; total with auxiliary losses "
                f"{total.item()}) at step {self.global_step}: stopping. The last good "
                "checkpoint is kept; lower trainer.lr or check the data.")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        for name, value in ctx.aux_losses.items():
            self.log(f"train/{name}", value)
        for name, value in ctx.mean_stats().items():
            self.log(name, value)
        return total

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to overwrite the last good checkpoint with non-finite weights."""
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"non-finite weights at step {self.global_step} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): not saving; the last good checkpoint "
                "is kept. Lower trainer.lr or check the data.")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.model.on_train_step_end()  # after the optimizer step (automatic optimization)

    def _eval_step(self, batch: torch.Tensor, split: str) -> None:
        loss_sum, counts, ctx = self._forward(batch)
        acc = self._eval_sums.setdefault(split, torch.zeros(3, dtype=torch.float64,
                                                            device=loss_sum.device))
        acc += torch.stack([loss_sum.double(), counts[0].double(), counts[1].double()])
        for name, value in ctx.mean_stats().items():
            self.log(f"{split}/{name}", value, on_epoch=True, on_step=False)

    def _eval_end(self, split: str) -> None:
        acc = self._eval_sums.pop(split)
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

    def configure_optimizers(self):
        t = self.tcfg
        groups = self.model.optimizer_groups(t.weight_decay)
        for g in groups:
            g["lr"] = t.lr * g.pop("lr_multiplier")
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
