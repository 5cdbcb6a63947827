"""Lightning callbacks and plugins of a run: atomic checkpoints, throughput, the training
record (last loss, training seconds), the pieces' end-of-training figures, plain progress
lines, and the learning curves (``curves.csv``).

Each callback with state carries it in the checkpoint (``state_dict``), so a resumed run
reports the speed, time and curve of all its training, not of its last segment.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from v4lab.folders import RunError, first_line
from v4lab.io import atomic_replace, atomic_write_text


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file unique to this process and renamed:
    never half-written; a failed write (disk full) leaves no temporary file and the
    previous checkpoint as it was."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        kept = path.is_file()
        try:
            atomic_replace(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(
                checkpoint, tmp, storage_options))
        except OSError as e:
            raise RunError(
                f"{path} could not be written ({e.strerror or first_line(e)}): "
                + ("the previous checkpoint is kept; free space (or fix the folder's permissions) and "
                   "rerun the same command to resume from it" if kept else
                   "no checkpoint is kept; free space (or fix the folder's permissions) and rerun")) from e



class Throughput(Callback):
    """Training tokens per second, wall clock between step ends (data, forward, backward,
    optimizer), skipping the first ``skip`` steps of each (re)start as warm-up."""

    def __init__(self, tokens_per_step: int, skip: int = 2) -> None:
        self.tokens_per_step, self.skip = tokens_per_step, skip
        self.steps, self.seconds, self._last, self._seen = 0, 0.0, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._seen += 1
        if self._last is not None and self._seen > self.skip:
            self.steps, self.seconds = self.steps + 1, self.seconds + (now - self._last)
        self._last = now

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not training time

    @property
    def tokens_per_s(self) -> float:
        return self.steps * self.tokens_per_step / self.seconds if self.seconds > 0 else float("nan")

    # Carried in the checkpoint: a resumed run (or one evaluated again from its final
    # checkpoint) reports the speed of all its training, not of an empty last segment.
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.seconds = int(state_dict["steps"]), float(state_dict["seconds"])


class TrainRecord(Callback):
    """The last training loss and the wall-clock seconds of training up to its last step
    (validation between steps included, the final evaluation not), summed over the run's
    segments: a resumed run's earlier ones travel in the checkpoint. ``trained``: whether
    this segment trained a step (a run resumed at ``max_steps`` trains none)."""

    def __init__(self) -> None:
        self.loss, self.before, self.t0, self.trained = float("nan"), 0.0, None, False

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter() if trainer.global_step < trainer.max_steps else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained = True
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.loss = float(loss)
        if trainer.global_step >= trainer.max_steps:  # the clock stops at the last step
            self.before, self.t0 = self.seconds, None

    @property
    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self.t0 if self.t0 is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss, self.before = float(state_dict["loss"]), float(state_dict["seconds"])


class PieceTail(Callback):
    """Each piece's end-of-training figures (MoE load balance, Engram gate, indexer
    recall, mHC gains: the ``ForwardContext`` statistics a training step logs): the mean
    of each over the last ``window`` training steps (the last logging window), written to
    metrics.json as ``final/<stat>`` (:meth:`figures`).

    It keeps the 0-d tensors ``LitLM.training_step`` left in ``last_stats`` as they are
    (on the device): nothing waits for the device during training; the one transfer is
    in :meth:`figures` (and when a checkpoint is written, which carries the window so a
    resumed run reports the same figures). Rank 0's own batches under DDP."""

    def __init__(self, window: int) -> None:
        self.tail: deque[dict[str, Any]] = deque(maxlen=max(1, window))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = getattr(pl_module, "last_stats", None)
        if stats:
            self.tail.append(dict(stats))

    def figures(self) -> dict[str, float]:
        """``final/<stat>``: the mean over the steps of the window that report the stat."""
        names = sorted({n for step in self.tail for n in step})
        out = {}
        for name in names:
            values = [torch.as_tensor(s[name]).detach().double().cpu() for s in self.tail if name in s]
            out[f"final/{name}"] = float(torch.stack(values).mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"tail": [{k: float(v) for k, v in step.items()} for step in self.tail]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tail.clear()
        self.tail.extend(dict(step) for step in state_dict.get("tail", []))


class PlainProgress(Callback):
    """One line every ``every`` steps when stdout is not a terminal (logs, CI, DVC)."""

    def __init__(self, every: int, throughput: Throughput) -> None:
        self.every, self.throughput = every, throughput

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if step % self.every == 0 or step == trainer.max_steps:
            loss = trainer.callback_metrics.get("train/loss")
            tps = self.throughput.tokens_per_s
            print(f"step {step}/{trainer.max_steps}  train/loss {float(loss):.4f}  "
                  f"{tps:,.0f} tok/s", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        if "val/loss" in m and not trainer.sanity_checking and trainer.is_global_zero:
            print(f"step {trainer.global_step}  val/loss {float(m['val/loss']):.4f}  "
                  f"val/bpb {float(m['val/bpb']):.4f}", flush=True)


CURVE_COLUMNS = ("step", "train/loss", "train/answer_loss", "val/loss", "val/bpb")


class CurveLog(Callback):
    """Learning curves for reports and DVC plots: ``curves.csv`` (step, train/loss every
    ``every`` steps, train/answer_loss = the mean loss on task answer tokens since the
    previous row (empty without a task mix), val/loss and val/bpb at each validation) in
    the run directory.

    The history travels in the checkpoint (``state_dict``), so a resumed run writes the
    whole curve; the file is rewritten atomically at the end of fit (rank 0 only).
    """

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every
        self.rows: dict[int, dict[str, float]] = {}
        self.answer = [0.0, 0]  # answer loss summed since the last row, answer tokens

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        total, count = getattr(pl_module, "last_answer", (0.0, 0))
        self.answer = [self.answer[0] + total, self.answer[1] + count]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and (step % self.every == 0 or step == trainer.max_steps):
            row = self.rows.setdefault(step, {})
            row["train/loss"] = float(loss)
            if self.answer[1]:
                row["train/answer_loss"] = self.answer[0] / self.answer[1]
            self.answer = [0.0, 0]

    def on_validation_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        if trainer.sanity_checking or "val/loss" not in m or trainer.state.fn != "fit":
            return
        row = self.rows.setdefault(trainer.global_step, {})
        row.update({"val/loss": float(m["val/loss"]), "val/bpb": float(m["val/bpb"])})

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        lines = [",".join(CURVE_COLUMNS)]
        for step in sorted(self.rows):
            row = self.rows[step]
            cells = [repr(row[c]) if c in row else "" for c in CURVE_COLUMNS[1:]]
            lines.append(",".join([str(step), *cells]))
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"rows": {int(k): dict(v) for k, v in self.rows.items()}, "answer": list(self.answer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = {int(k): dict(v) for k, v in state_dict.get("rows", {}).items()}
        self.answer = list(state_dict.get("answer", [0.0, 0]))
