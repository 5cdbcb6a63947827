"""The body of one run: config -> data -> model -> Lightning Trainer -> metrics.json.

Called by ``run.py`` (Hydra) with the composed config and Hydra's run directory; tests
call :func:`train` directly. Rerunning with the same run directory resumes from
``checkpoints/last.ckpt``.

A run folder belongs to one run: a rerun with another configuration is refused with the
differing keys named (:data:`v4lab.config.RESUME_FREE_KEYS` may change), a finished run
is not trained or rewritten again (``reevaluate=true`` evaluates it again), and a second
process running into the same folder at the same time stops at once (``run.lock``).

With several processes (``trainer.strategy=ddp|fsdp``) every rank runs this function;
only rank 0 writes config.yaml, metrics.json and checkpoints and opens the W&B run (see
:mod:`v4lab.distributed`, which also starts the extra local processes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from v4lab import accounting, chips, distributed, tracking
from v4lab.config import RunConfig, flatten, load_run_config, run_identity
from v4lab.data.canonical import build_canonical_ids
from v4lab.data.datamodule import CorpusDataModule
from v4lab.data.prepare import prepare, token_byte_lengths
from v4lab.data.tasks import TaskMix, TaskVocab
from v4lab.evaluate import check_lengths, evaluate
from v4lab.io import atomic_replace, atomic_write_text, config_hash, git_rev
from v4lab.lit import LitLM
from v4lab.modules.engram import engram_params
from v4lab.threads import choose_threads

log = logging.getLogger("v4lab")


class RunError(RuntimeError):
    """The run folder cannot take this run: another configuration's run, another process
    running in it, an unreadable or unwritable file. The message names the file or key
    and what to do."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


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
                f"{path} could not be written ({e.strerror or _first_line(e)}): "
                + ("the previous checkpoint is kept; free space (or fix the folder's permissions) and "
                   "rerun the same command to resume from it" if kept else
                   "no checkpoint is kept; free space (or fix the folder's permissions) and rerun")) from e


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run_dir>/run.lock`` (an fcntl lock, released when the process ends, however
    it ends) for the whole run: a second run into the same folder stops at once instead of
    sharing its checkpoints, metrics.json and W&B run."""
    path = run_dir / "run.lock"
    try:
        f = open(path, "a")
    except OSError as e:
        raise RunError(f"{path} cannot be opened ({e.strerror}): the run folder must be writable; "
                       "choose another with hydra.run.dir=DIR") from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{run_dir} is in use by another run (it holds {path}): wait for it to "
                           "finish, or run this one elsewhere with hydra.run.dir=DIR") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fmt(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)


_ABSENT = object()


def config_diff(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key=new (this folder's run: old)`` for every key of the run's identity that differs.
    A key the saved config lacks is no difference when the new value is the schema's
    default (a key added to the code since: the saved run ran as if it had it)."""
    a, b = run_identity(saved), run_identity(new)
    defaults = flatten(asdict(RunConfig()))

    def differs(k: str) -> bool:
        old, value = a.get(k, _ABSENT), b.get(k, _ABSENT)
        return old != value and not (old is _ABSENT and k in defaults and value == defaults[k])

    return [f"{k}={_fmt(b.get(k, _ABSENT))} (this folder's run: {_fmt(a.get(k, _ABSENT))})"
            for k in sorted(set(a) | set(b)) if differs(k)]


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at; a truncated or corrupt file is named
    (memory-mapped: the tensors are not read)."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception as e:
        raise RunError(f"{path} is truncated or corrupt ({_first_line(e)}): delete it to train this "
                       "run again from the start, or put back a good copy") from e


def check_run_folder(run_dir: Path, config_dict: dict[str, Any]) -> tuple[bool, int | None]:
    """Whether ``run_dir`` can take this run: (finished: metrics.json exists, the step of
    ``checkpoints/last.ckpt`` or None). Raises :class:`RunError` when the folder holds a
    run of another configuration (keys named) or files that cannot be read."""
    saved_path, metrics = run_dir / "config.yaml", run_dir / "metrics.json"
    last = run_dir / "checkpoints" / "last.ckpt"
    if saved_path.is_file():
        try:
            saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
            assert isinstance(saved, dict)
        except Exception as e:
            raise RunError(f"{saved_path} is unreadable ({_first_line(e)}): put back a good copy, or "
                           f"delete {run_dir} to start the run over") from e
        new = OmegaConf.to_container(OmegaConf.create(config_dict))
        assert isinstance(new, dict)
        diff = config_diff(saved, new)
        if diff:
            more = f"; and {len(diff) - 5} more" if len(diff) > 5 else ""
            raise RunError(
                f"{run_dir} holds a run of another configuration: {'; '.join(diff[:5])}{more}. "
                f"Run this one in a folder of its own (hydra.run.dir=DIR), or delete {run_dir} to "
                "start over (keys that may change on a rerun: v4lab.config.RESUME_FREE_KEYS)")
    elif metrics.exists() or last.exists():
        raise RunError(f"{run_dir} holds a run but no config.yaml, so which configuration it belongs "
                       f"to is unknown: put config.yaml back, or delete {run_dir} to start over")
    return metrics.is_file(), checkpoint_step(last) if last.is_file() else None


def _finished_metrics(path: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text())
        assert isinstance(metrics, dict)
        return metrics
    except (OSError, ValueError, AssertionError) as e:
        raise RunError(f"{path} is unreadable ({_first_line(e)}): rerun with reevaluate=true to "
                       "write it again from the final checkpoint") from e


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


def resolve_precision(precision: str, matmul_dtype: str) -> str:
    """'auto' runs the target chip's matmul dtype (``chip.matmul_dtype``: fp32 for this
    CPU host, bf16 for the accelerators; fp8/int8 products are emulated in bf16)."""
    return chips.training_precision(matmul_dtype) if precision == "auto" else precision


def measure_costs(lit: LitLM, seq_len: int) -> dict[str, float]:
    """Parameter counts, KV bytes per token from a real cache, and training FLOPs per token:
    analytic (the roofline model's count, causal attention) and, as a cross-check, counted
    by torch's FlopCounterMode on one forward + backward of one sequence (which prices
    causal attention as full)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = lit.model
    was_training = model.training
    # Training forwards update running state (MoE's load count); leave it as it was found.
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.eval()
    with torch.no_grad():
        probe = model.kv_probe_tokens()  # V4: a complete block of every compressed layer
        caches = model.new_caches(1, probe + 2)
        model.forward_cached(torch.zeros(1, probe, dtype=torch.long), caches, 0)
        kv_bytes = model.kv_bytes_per_token(caches)
    model.train()
    x = torch.zeros(1, seq_len, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x).float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return {
        "cost/params_total": float(model.num_params()),
        "cost/params_active": float(model.num_active_params()),
        "cost/kv_bytes_per_token": float(kv_bytes),
        "cost/train_flops_per_token": accounting.train_flops_per_token(model.cfg, seq_len),
        "cost/train_flops_per_token_counted": counter.get_total_flops() / seq_len,
    }


def _quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*on_train_batch_end.*",
                    ".*Checkpoint directory.*exists and is not empty.*",
                    ".*`training_step` returned `None`.*", ".*LeafSpec.*",
                    ".*your dataloader is not resumable.*",
                    # val/test loss and bpb are summed over ranks (all_gather) before logging
                    ".*sync_dist=True.*when logging on epoch level in distributed.*",
                    ".*all_gather is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def train(cfg: DictConfig | RunConfig, run_dir: str | Path,
          extra_callbacks: list[Callback] | None = None, *, worker: bool = False,
          on_start: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run one experiment end to end; returns the metrics written to ``metrics.json``
    (by rank 0; other ranks of a multi-process run return them without writing).

    A finished run (metrics.json) is not run again: its metrics are returned as they are,
    unless ``reevaluate=true``. ``worker``: a local DDP process started by rank 0, which
    has already checked and locked the folder. ``on_start(run_dir)`` is called on rank 0
    once the folder has accepted the run, before anything is written (run.py records
    Hydra's ``.hydra/`` there).
    """
    run_cfg = cfg if isinstance(cfg, RunConfig) else load_run_config(cfg)
    t = run_cfg.trainer
    # Threads first: the host's peaks (cpu_host) are timed at the run's own thread count.
    threads = choose_threads(t.num_threads, t.devices if t.accelerator == "cpu" else 1)
    if threads.threads:
        torch.set_num_threads(threads.threads)
        if t.world_size > 1:  # or Lightning sets cpu_count / processes threads per process
            os.environ.setdefault("OMP_NUM_THREADS", str(threads.threads))
    # The target chip decides the numerics: KV-cache dtype (or its fallback) and matmul dtype
    # (cpu_host's peaks are measured here); config.yaml records the model the run builds.
    requested_model = run_cfg.model
    run_cfg.model, matmul_dtype, notes = chips.build_numerics(run_cfg.chip, requested_model)
    built = Built(requested_model, matmul_dtype, notes, threads)
    t.check_hardware()
    rank_zero = distributed.is_rank_zero()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = asdict(run_cfg)
    config_dict.pop("reevaluate")  # a request, not part of the run
    with run_lock(run_dir) if rank_zero and not worker else contextlib.nullcontext():
        # Every rank checks (read only): under SLURM they all start alike and must agree.
        finished, step = (False, None) if worker else check_run_folder(run_dir, config_dict)
        if finished and not run_cfg.reevaluate:
            metrics = _finished_metrics(run_dir / "metrics.json")
            if rank_zero:
                print(f"{run_dir}: already finished (metrics.json, step {metrics.get('train/steps')}); "
                      "nothing to do (reevaluate=true evaluates it again from its final checkpoint)",
                      flush=True)
            return metrics
        if finished and step is None:
            raise RunError(f"{run_dir / 'checkpoints' / 'last.ckpt'} is missing: a finished run is "
                           "evaluated again from its final checkpoint; without it, delete "
                           f"{run_dir / 'metrics.json'} to train the run again")
        if step is not None and step >= run_cfg.trainer.max_steps and rank_zero:
            print(f"{run_dir}: trained to step {step}; evaluating from checkpoints/last.ckpt "
                  "without training", flush=True)
        if rank_zero:
            if on_start is not None:
                on_start(run_dir)
            # also what the extra local DDP processes start from
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config_dict)))
        return _run(run_cfg, built, run_dir, config_dict, extra_callbacks, rank_zero)


@dataclass(frozen=True)
class Built:
    """What ``train`` decided before the folder accepted the run: the model as requested
    (before the chip's numerics), the matmul dtype, the chip's notes, the thread choice."""

    requested_model: Any
    matmul_dtype: str
    notes: list[str]
    threads: Any


def _run(run_cfg: RunConfig, built: Built, run_dir: Path, config_dict: dict[str, Any],
         extra_callbacks: list[Callback] | None, rank_zero: bool) -> dict[str, Any]:
    """The run itself, once the folder has accepted it (resuming from its last.ckpt)."""
    t = run_cfg.trainer
    requested_model, matmul_dtype, notes, threads = (built.requested_model, built.matmul_dtype,
                                                      built.notes, built.threads)
    _quiet_lightning()
    L.seed_everything(run_cfg.seed, workers=True, verbose=False)

    folder = prepare(run_cfg.data)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    token_bytes = torch.from_numpy(token_byte_lengths(tokenizer))
    # Long-context tasks: formats checked against this tokenizer before anything trains;
    # a seeded share of training windows becomes task sequences (train-split haystack).
    task_vocab = TaskVocab.from_tokenizer(tokenizer)
    if run_cfg.eval.enabled:
        check_lengths(run_cfg.eval, task_vocab)
    task_mix = None
    if run_cfg.eval.train_share > 0:
        task_mix = TaskMix(task_vocab, np.memmap(folder / "train.bin", dtype=np.uint16, mode="r"),
                           run_cfg.eval.mixed_tasks, run_cfg.eval.train_share, run_cfg.seed,
                           t.seq_len + 1)
    dm = CorpusDataModule(folder, t.seq_len, t.batch_size, t.max_steps, run_cfg.seed,
                          t.val_batches, t.test_batches, task_mix)
    model_cfg = run_cfg.model
    for note in notes:
        log.warning(note)
    chip_figures = chips.chip_metrics(run_cfg.chip, requested_model,
                                      presets={"v3_671b": chips.load_model_preset("v3_671b")})
    lit = LitLM(model_cfg, t, token_bytes, run_cfg.eval.answer_loss_weight)
    last = run_dir / "checkpoints" / "last.ckpt"
    lit.last_checkpoint = last  # its non-finite-loss message says whether one is kept
    costs = measure_costs(lit, t.seq_len) if rank_zero else {}
    if model_cfg.engram.enabled:  # Engram hashes canonical ids of the trained vocabulary
        canonical, ratio = build_canonical_ids(tokenizer)
        lit.model.set_canonical_ids(canonical)
        costs |= {"engram/params": float(engram_params(lit.model)),
                  "engram/canonical_vocab_ratio": ratio}

    throughput, record = Throughput(t.batch_size * t.seq_len), TrainRecord()
    interactive = sys.stdout.isatty()
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=t.checkpoint_every_n_steps,
                        save_last=True, save_top_k=0),
        throughput, record,
        RichProgressBar() if interactive else PlainProgress(t.log_every_n_steps, throughput),
        CurveLog(run_dir / "curves.csv", t.log_every_n_steps),
        *(extra_callbacks or []),
    ]
    # Lightning's WandbLogger opens its run on rank 0 only (the other ranks get a no-op).
    logger = tracking.make_logger(run_cfg, run_dir, config_dict)
    strategy = distributed.make_strategy(t, run_dir)
    ok = False
    try:
        trainer = L.Trainer(
            max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices,
            num_nodes=t.num_nodes, strategy=strategy, use_distributed_sampler=False,
            precision=resolve_precision(t.precision, matmul_dtype), gradient_clip_val=t.grad_clip or None,
            val_check_interval=t.val_every_n_steps, check_val_every_n_epoch=None,
            num_sanity_val_steps=0, logger=logger if logger is not None else False,
            callbacks=callbacks, enable_progress_bar=interactive, enable_model_summary=False,
            log_every_n_steps=t.log_every_n_steps, deterministic=True,
            default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO(), *distributed.cluster_plugins()],
        )
        trainer.fit(lit, datamodule=dm, ckpt_path=str(last) if last.is_file() else None)
        if record.trained and trainer.global_step == t.max_steps and t.max_steps % t.checkpoint_every_n_steps:
            # The final weights as a checkpoint too (ModelCheckpoint saved only the steps
            # that are multiples): a run killed during its evaluation resumes right there.
            trainer.save_checkpoint(last)
        train_seconds, train_loss = record.seconds, record.loss
        val = trainer.validate(lit, datamodule=dm, verbose=False)[0]
        test = trainer.test(lit, datamodule=dm, verbose=False)[0]

        metrics: dict[str, Any] = {
            "experiment": run_cfg.experiment, "study": run_cfg.study, "seed": run_cfg.seed,
            "config_hash": config_hash(config_dict), "git_rev": git_rev(),
            "torch_version": torch.__version__, "corpus_sha256": dm.manifest["corpus_sha256"],
            "train/steps": int(trainer.global_step),
            "train/loss": train_loss,
            "val/loss": float(val["val/loss"]), "val/bpb": float(val["val/bpb"]),
            "test/loss": float(test["test/loss"]), "test/bpb": float(test["test/bpb"]),
            "val/unigram_bpb": float(dm.manifest["unigram_val_bpb"]),
            **costs,
            "speed/train_tokens_per_s": throughput.tokens_per_s,
            "time/train_s": train_seconds,
            **threads.metrics(),
            **chip_figures,
        }
        for key, value in {**val, **test}.items():  # each piece's own figures (sparse/, moe/, ...)
            metrics.setdefault(key, float(value))
        if trainer.world_size > 1:  # the processes that took part (the gloo/NCCL group's size)
            metrics |= {"train/processes": int(trainer.world_size), "train/strategy": t.strategy}
        if trainer.is_global_zero:
            if run_cfg.eval.enabled:  # long-context tasks through the real decode path
                t1 = time.perf_counter()
                metrics |= evaluate(lit.model, task_vocab, run_cfg.eval, dm.shard("test"),
                                    t.seq_len, log=lambda line: print(line, flush=True))
                metrics["time/eval_s"] = time.perf_counter() - t1
            atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            if logger is not None:
                logger.experiment.summary.update({k: v for k, v in metrics.items()})
            report(metrics, run_dir, run_cfg)
        ok = True
        return metrics
    finally:
        tracking.finish(exit_code=0 if ok else 1)  # a failed run is recorded as failed
        distributed.finish_launch(strategy, ok)


def report(metrics: dict[str, Any], run_dir: Path, cfg: RunConfig) -> None:
    """A short rich table of the headline metrics and where to look."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cfg.experiment} (seed {cfg.seed})", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("val/loss", "val/bpb", "test/bpb", "val/unigram_bpb", "cost/params_total",
                "cost/params_active", "cost/kv_bytes_per_token", "speed/train_tokens_per_s",
                *(k for k in metrics if k.startswith("task/all@"))):
        v = metrics.get(key)
        table.add_row(key, f"{v:,.4f}" if isinstance(v, float) and abs(v) < 1e4 else f"{v:,.0f}")
    console = Console()
    console.print(table)
    console.print(f"run dir     {run_dir}\nmetrics     {run_dir / 'metrics.json'}\n"
                  f"checkpoint  {run_dir / 'checkpoints' / 'last.ckpt'}\n"
                  f"W&B         {Path(cfg.logger.dir) / 'wandb'} ({tracking.wandb_mode(cfg)}; "
                  "view with `wandb leet logs/wandb`, upload with `wandb sync`)")
