"""The body of one run: config -> data -> model -> Lightning Trainer -> metrics.json.

Called by ``run.py`` (Hydra) with the composed config and Hydra's run directory; tests
call :func:`train` directly. Rerunning with the same run directory resumes from
``checkpoints/last.ckpt``.

A run folder belongs to one run: a rerun with another configuration is refused with the
differing keys named (:data:`v4lab.config.RESUME_FREE_KEYS` may change), a finished run
is not trained or rewritten again (``reevaluate=true`` evaluates it again), and a second
process running into the same folder at the same time stops at once (``run.lock``):
:mod:`v4lab.folders` holds these rules. The pieces are built by :mod:`v4lab.build` (which
evaluation from a checkpoint uses too); the callbacks are in :mod:`v4lab.callbacks`.

With several processes (``trainer.strategy=ddp|fsdp``) every rank runs this function;
only rank 0 writes config.yaml, metrics.json and checkpoints and opens the W&B run (see
:mod:`v4lab.distributed`, which also starts the extra local processes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, OmegaConf

from v4lab import build, chips, distributed, probe_run, tracking
from v4lab.callbacks import AtomicCheckpointIO, CurveLog, PieceTail, PlainProgress, Throughput, TrainRecord
from v4lab.config import RunConfig, load_run_config
from v4lab.data.datamodule import CorpusDataModule
from v4lab.data.tasks import TaskVocab
from v4lab.evaluate import check_lengths, evaluate
from v4lab.folders import RunError, check_run_folder, finished_metrics, run_lock
from v4lab.io import atomic_write_text, config_hash, git_rev
from v4lab.lit import LitLM
from v4lab.threads import ThreadChoice, choose_threads

log = logging.getLogger("v4lab")


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
    numerics = build.numerics(run_cfg)
    run_cfg.model = numerics.model
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
            metrics = finished_metrics(run_dir / "metrics.json")
            if rank_zero:
                print(f"{run_dir}: already finished (metrics.json, step {metrics.get('train/steps')}); "
                      "nothing to do (reevaluate=true evaluates it again from its final checkpoint)",
                      flush=True)
            return metrics
        if finished and run_cfg.probe.enabled:
            raise RunError(f"{run_dir}: a probe run is not evaluated again (reevaluate=true): delete "
                           f"{run_dir / 'metrics.json'} to run it again")
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
        if run_cfg.probe.enabled:  # a synthetic task instead of the corpus (one process)
            return probe_run.run(run_cfg, numerics.model, threads, run_dir, config_dict)
        return _run(run_cfg, numerics, threads, run_dir, config_dict, extra_callbacks, rank_zero)


@dataclass(frozen=True)
class _Pieces:
    """What one run trains, evaluates and reports, built once its folder accepted it."""

    task_vocab: TaskVocab
    dm: CorpusDataModule
    lit: LitLM
    costs: dict[str, float]
    chip_figures: dict[str, Any]


def _build(run_cfg: RunConfig, numerics: build.Numerics, last: Path, rank_zero: bool) -> _Pieces:
    """Corpus, tokenizer, data, the LitLM (seeded weights), its measured costs and canonical
    Engram ids, the chip's figures for the model as requested."""
    t = run_cfg.trainer
    data = build.corpus(run_cfg)
    token_bytes = data.token_bytes()
    # Long-context tasks: formats checked against this tokenizer before anything trains;
    # a seeded share of training windows becomes task sequences (train-split haystack).
    task_vocab = data.task_vocab()
    if run_cfg.eval.enabled:
        check_lengths(run_cfg.eval, task_vocab)
    dm = build.datamodule(run_cfg, data, task_vocab)
    for note in numerics.notes:
        log.warning(note)
    chip_figures = chips.run_chip_metrics(run_cfg.chip, numerics.requested_model)
    lit = LitLM(run_cfg.model, t, token_bytes, run_cfg.eval.answer_loss_weight)
    lit.last_checkpoint = last  # its non-finite-loss message says whether one is kept
    costs = build.measure_costs(lit.model, t.seq_len) if rank_zero else {}
    costs |= build.canonical_ids(lit.model, data)  # Engram: canonical ids of the trained vocabulary
    return _Pieces(task_vocab, dm, lit, costs, chip_figures)


def _callbacks(run_cfg: RunConfig, run_dir: Path, extra_callbacks: list[Callback] | None
               ) -> tuple[list[Callback], Throughput, TrainRecord, bool]:
    """Checkpoints, throughput, the training record, the pieces' last-window figures,
    progress (a bar on a terminal, lines otherwise: the last value says which), the
    learning curves, the caller's extra callbacks."""
    t = run_cfg.trainer
    throughput, record = Throughput(t.batch_size * t.seq_len), TrainRecord()
    interactive = sys.stdout.isatty()
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=t.checkpoint_every_n_steps,
                        save_last=True, save_top_k=0),
        throughput, record, PieceTail(t.log_every_n_steps),
        RichProgressBar() if interactive else PlainProgress(t.log_every_n_steps, throughput),
        CurveLog(run_dir / "curves.csv", t.log_every_n_steps),
        *(extra_callbacks or []),
    ]
    return callbacks, throughput, record, interactive


def _trainer(run_cfg: RunConfig, numerics: build.Numerics, run_dir: Path, callbacks: list[Callback],
             interactive: bool, logger, strategy) -> L.Trainer:
    """The Lightning Trainer of the run: the chip's precision, deterministic, no sanity check."""
    t = run_cfg.trainer
    return L.Trainer(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=strategy, use_distributed_sampler=False,
        precision=build.resolve_precision(t.precision, numerics.matmul_dtype),
        gradient_clip_val=t.grad_clip or None,
        val_check_interval=t.val_every_n_steps, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=logger if logger is not None else False,
        callbacks=callbacks, enable_progress_bar=interactive, enable_model_summary=False,
        log_every_n_steps=t.log_every_n_steps, deterministic=True,
        default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO(), *distributed.cluster_plugins()],
    )


def _fit(trainer: L.Trainer, p: _Pieces, record: TrainRecord, last: Path, max_steps: int,
         checkpoint_every: int) -> tuple[float, float, dict[str, Any], dict[str, Any]]:
    """Fit (resuming from ``last``), keep the final weights, validate and test: (training
    seconds, last training loss, validation figures, test figures)."""
    trainer.fit(p.lit, datamodule=p.dm, ckpt_path=str(last) if last.is_file() else None)
    if record.trained and trainer.global_step == max_steps and max_steps % checkpoint_every:
        # The final weights as a checkpoint too (ModelCheckpoint saved only the steps
        # that are multiples): a run killed during its evaluation resumes right there.
        trainer.save_checkpoint(last)
    train_seconds, train_loss = record.seconds, record.loss
    val = trainer.validate(p.lit, datamodule=p.dm, verbose=False)[0]
    test = trainer.test(p.lit, datamodule=p.dm, verbose=False)[0]
    return train_seconds, train_loss, val, test


def _metrics(run_cfg: RunConfig, config_dict: dict[str, Any], trainer: L.Trainer, p: _Pieces,
             fitted: tuple[float, float, dict[str, Any], dict[str, Any]], throughput: Throughput,
             threads: ThreadChoice) -> dict[str, Any]:
    """The run's metrics.json, before the long-context evaluation."""
    train_seconds, train_loss, val, test = fitted
    metrics: dict[str, Any] = {
        "experiment": run_cfg.experiment, "study": run_cfg.study, "seed": run_cfg.seed,
        "config_hash": config_hash(config_dict), "git_rev": git_rev(),
        "torch_version": torch.__version__, "corpus_sha256": p.dm.manifest["corpus_sha256"],
        "train/steps": int(trainer.global_step),
        "train/loss": train_loss,
        "val/loss": float(val["val/loss"]), "val/bpb": float(val["val/bpb"]),
        "test/loss": float(test["test/loss"]), "test/bpb": float(test["test/bpb"]),
        "val/unigram_bpb": float(p.dm.manifest["unigram_val_bpb"]),
        **p.costs,
        "speed/train_tokens_per_s": throughput.tokens_per_s,
        "time/train_s": train_seconds,
        **threads.metrics(),
        **p.chip_figures,
    }
    for key, value in {**val, **test}.items():  # each piece's own figures (sparse/, moe/, ...)
        metrics.setdefault(key, float(value))
    for callback in trainer.callbacks:  # and at the end of training (final/moe/load_cv, ...)
        if isinstance(callback, PieceTail):
            metrics |= callback.figures()
    if trainer.world_size > 1:  # the processes that took part (the gloo/NCCL group's size)
        metrics |= {"train/processes": int(trainer.world_size), "train/strategy": run_cfg.trainer.strategy}
    return metrics


def _write(metrics: dict[str, Any], run_cfg: RunConfig, p: _Pieces, run_dir: Path, logger) -> None:
    """Rank 0: evaluate the long-context tasks through the real decode path, write
    metrics.json, update the W&B summary, print the report."""
    if run_cfg.eval.enabled:
        t1 = time.perf_counter()
        metrics |= evaluate(p.lit.model, p.task_vocab, run_cfg.eval, p.dm.shard("test"),
                            run_cfg.trainer.seq_len, log=lambda line: print(line, flush=True))
        metrics["time/eval_s"] = time.perf_counter() - t1
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if logger is not None:
        logger.experiment.summary.update({k: v for k, v in metrics.items()})
    report(metrics, run_dir, run_cfg)


def _run(run_cfg: RunConfig, numerics: build.Numerics, threads: ThreadChoice, run_dir: Path,
         config_dict: dict[str, Any], extra_callbacks: list[Callback] | None,
         rank_zero: bool) -> dict[str, Any]:
    """The run itself, once the folder has accepted it (resuming from its last.ckpt)."""
    t = run_cfg.trainer
    _quiet_lightning()
    L.seed_everything(run_cfg.seed, workers=True, verbose=False)
    last = run_dir / "checkpoints" / "last.ckpt"
    p = _build(run_cfg, numerics, last, rank_zero)
    callbacks, throughput, record, interactive = _callbacks(run_cfg, run_dir, extra_callbacks)
    # Lightning's WandbLogger opens its run on rank 0 only (the other ranks get a no-op).
    logger = tracking.make_logger(run_cfg, run_dir, config_dict, numerics.matmul_dtype, threads.metrics())
    strategy = distributed.make_strategy(t, run_dir)
    ok = False
    try:
        trainer = _trainer(run_cfg, numerics, run_dir, callbacks, interactive, logger, strategy)
        if logger is not None:
            tracking.key_by_global_step(logger, trainer)
        fitted = _fit(trainer, p, record, last, t.max_steps, t.checkpoint_every_n_steps)
        metrics = _metrics(run_cfg, config_dict, trainer, p, fitted, throughput, threads)
        if trainer.is_global_zero:
            _write(metrics, run_cfg, p, run_dir, logger)
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
