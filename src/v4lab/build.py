"""The one build of a run's pieces from its :class:`~v4lab.config.RunConfig`, for training
(:func:`v4lab.train.train`) and for evaluation from a checkpoint
(:func:`v4lab.evaluate.load_run`): the chip's numerics, the prepared corpus and its
tokenizer, the training data, the model's canonical Engram ids, and what the built model
costs.

Order matters and is the caller's: a training run applies the numerics before its folder
accepts it (``config.yaml`` records the model the run builds), then seeds, then builds the
corpus, the data and the model (whose initial weights follow the seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from v4lab import accounting, chips
from v4lab.config import RunConfig
from v4lab.data.canonical import build_canonical_ids
from v4lab.data.datamodule import CorpusDataModule
from v4lab.data.prepare import prepare, token_byte_lengths
from v4lab.data.tasks import TaskMix, TaskVocab
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.engram import engram_params


# ---- numerics ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Numerics:
    """What the target chip gives a run: ``model``, the model config the run builds (KV-cache
    dtype or its fallback; ``config.yaml`` records it), ``requested_model`` (as configured,
    before the chip: ``chip/*`` metrics project it), the matmul dtype, the chip's notes."""

    model: ModelConfig
    requested_model: ModelConfig
    matmul_dtype: str
    notes: list[str]


def numerics(run_cfg: RunConfig, *, measure: bool = True) -> Numerics:
    """The chip's numerics for ``run_cfg.model``. ``measure``: resolve the chip first (a
    measured profile such as cpu_host times this host's peaks; what a run does when it is
    built). Without it (a saved run's config, already resolved) the numerics are only
    applied, which changes nothing more on a config that records them."""
    apply = chips.build_numerics if measure else chips.apply_numerics
    model, matmul_dtype, notes = apply(run_cfg.chip, run_cfg.model)
    return Numerics(model, run_cfg.model, matmul_dtype, notes)


def resolve_precision(precision: str, matmul_dtype: str) -> str:
    """'auto' runs the target chip's matmul dtype (``chip.matmul_dtype``: fp32 for this
    CPU host, bf16 for the accelerators; fp8/int8 products are emulated in bf16)."""
    return chips.training_precision(matmul_dtype) if precision == "auto" else precision


# ---- corpus and data --------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """The prepared corpus folder (``data.prepare``: idempotent, locked) and its tokenizer."""

    folder: Path
    tokenizer: Any  # tokenizers.Tokenizer

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes each token id stands for [V] (bits per byte divide by them)."""
        return torch.from_numpy(token_byte_lengths(self.tokenizer))

    def task_vocab(self) -> TaskVocab:
        """The long-context tasks' formats in this tokenizer's ids."""
        return TaskVocab.from_tokenizer(self.tokenizer)


def corpus(run_cfg: RunConfig) -> Corpus:
    """Prepare (or reuse) the run's corpus and load its tokenizer."""
    from tokenizers import Tokenizer

    folder = prepare(run_cfg.data)
    return Corpus(folder, Tokenizer.from_file(str(folder / "tokenizer.json")))


def datamodule(run_cfg: RunConfig, data: Corpus, task_vocab: TaskVocab) -> CorpusDataModule:
    """The training, validation and test batches. With ``eval.train_share`` > 0 a seeded
    share of training windows becomes task sequences (train-split haystack)."""
    t = run_cfg.trainer
    task_mix = None
    if run_cfg.eval.train_share > 0:
        task_mix = TaskMix(task_vocab, np.memmap(data.folder / "train.bin", dtype=np.uint16, mode="r"),
                           run_cfg.eval.mixed_tasks, run_cfg.eval.train_share, run_cfg.seed,
                           t.seq_len + 1)
    return CorpusDataModule(data.folder, t.seq_len, t.batch_size, t.max_steps, run_cfg.seed,
                            t.val_batches, t.test_batches, task_mix)


# ---- the model --------------------------------------------------------------------------
def canonical_ids(model: Transformer, data: Corpus) -> dict[str, float]:
    """Engram hashes canonical ids of the trained vocabulary: set them on ``model`` (when
    Engram is on) and return its ``engram/*`` figures (empty when it is off)."""
    if not model.cfg.engram.enabled:
        return {}
    canonical, ratio = build_canonical_ids(data.tokenizer)
    model.set_canonical_ids(canonical)
    return {"engram/params": float(engram_params(model)), "engram/canonical_vocab_ratio": ratio}


def model(model_cfg: ModelConfig, data: Corpus) -> Transformer:
    """A model of ``model_cfg`` (numerics applied) with its canonical Engram ids: what a
    checkpoint's weights are loaded into (training builds its own inside ``LitLM``)."""
    net = Transformer(model_cfg)
    canonical_ids(net, data)
    return net


def measure_costs(model: Transformer, seq_len: int) -> dict[str, float]:
    """Parameter counts, KV bytes per token from a real cache, and training FLOPs per token:
    analytic (the roofline model's count, causal attention) and, as a cross-check, counted
    by torch's FlopCounterMode on one forward + backward of one sequence (which prices
    causal attention as full; :func:`accounting.flop_counter` makes it see CPU attention)."""
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
    with accounting.flop_counter() as counter:
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
