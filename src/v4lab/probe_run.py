"""A probe run: ``python run.py +experiment=X probe=assoc_recall`` trains the experiment's
model on a synthetic probe task (:mod:`v4lab.data.probes`) instead of the corpus.

Called by :func:`v4lab.train.train` once the run folder has accepted the run; writes the
same files a corpus run does (``config.yaml``, ``metrics.json``, ``curves.csv``,
``checkpoints/``), so studies, DVC and the report treat both alike. What it measures:

- the held-out accuracy at the trained length and at each of ``probe.lengths`` x it,
  token by token through the model's own decode caches (what generation sees), with the
  number of answers behind it (the report pools them into a Clopper-Pearson interval);
- decode ms per token and the KV bytes held at each length;
- with ``probe.caches``: the same trained weights decoded with each other KV-cache dtype,
  answer by answer against the run's own cache (exact McNemar test);
- the learning curve (held-out accuracy every ``probe.eval_every`` steps) and the first
  step at >= 90%.

A probe run is short (seconds to a minute) and keeps no mid-run checkpoint: an
interrupted one starts over. The optimizer is the probe loop's AdamW
(:func:`v4lab.probe_train.train_probe`) whatever ``trainer.optimizer`` says.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from v4lab import tracking
from v4lab.config import RunConfig
from v4lab.evaluate import time_decode
from v4lab.io import atomic_replace, atomic_write_text, config_hash, git_rev
from v4lab.metrics import key
from v4lab.model import ModelConfig, Transformer
from v4lab.probe_train import ProbeResult, probe_hits, train_probe
from v4lab.stats import mcnemar_exact
from v4lab.threads import ThreadChoice

LEVEL = 0.9  # probe/steps_to_90
TIMING_STREAM = 0x71E  # the sequence decode speed is timed on


def probe_model_config(run_cfg: RunConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The experiment's model with the probe's vocabulary and a rotary range covering the
    longest evaluated length, checked against the trained sequence (V4 windows, blocks)."""
    p = run_cfg.probe
    longest = p.make(max(p.lengths)).seq_len
    cfg = replace(model_cfg, vocab_size=p.make().vocab_size, max_seq_len=longest).validate("model")
    cfg.attention.validate_sequence("model.attention", p.make().seq_len, cfg.n_layers,
                                    f"(probe seq_len={p.make().seq_len}, the training sequence)")
    return cfg


def new_model(cfg: ModelConfig) -> Transformer:
    """A probe model; Engram hashes token ids as they are (a probe has no tokenizer whose
    spellings to merge)."""
    model = Transformer(cfg)
    if cfg.engram.enabled:
        model.set_canonical_ids(torch.arange(cfg.vocab_size))
    return model


def with_cache(model: Transformer, dtype: str) -> Transformer:
    """A copy of ``model`` (same weights and buffers) whose KV cache stores ``dtype``."""
    attn = model.cfg.attention
    cfg = replace(model.cfg, attention=replace(attn, kv_cache=replace(attn.kv_cache, dtype=dtype)))
    other = new_model(cfg.validate("model"))
    other.load_state_dict(model.state_dict())
    return other.eval()


def length_metrics(model: Transformer, run_cfg: RunConfig, hits: torch.Tensor, length: int
                   ) -> dict[str, float]:
    """Accuracy, answers, decode ms/token and KV bytes held at ``length`` x the trained length."""
    p = run_cfg.probe
    probe = p.make(length)
    ctx = probe.seq_len
    tokens = torch.from_numpy(probe.sample(np.random.default_rng([run_cfg.seed, TIMING_STREAM]), 1).ids)
    ms, held = time_decode(model, tokens, steps=8, chunk=ctx)
    return {key("probe/acc@<context>", context=ctx): float(hits.float().mean()),
            key("probe/answers@<context>", context=ctx): float(hits.numel()),
            key("speed/decode_ms_per_token@<context>", context=ctx): ms,
            key("cost/kv_bytes@<context>", context=ctx): float(held)}


def cache_metrics(model: Transformer, run_cfg: RunConfig, own: torch.Tensor) -> dict[str, float]:
    """Each of ``probe.caches`` on the same weights and answers as the run's own cache."""
    p, out = run_cfg.probe, {}
    for dtype in p.caches:
        hits = probe_hits(with_cache(model, dtype), p.make(), run_cfg.seed, p.eval_sequences, decode=True)
        test = mcnemar_exact(hits.numpy(), own.numpy())
        out |= {key("probe/kv_<dtype>/acc", dtype=dtype): float(hits.float().mean()),
                key("probe/kv_<dtype>/discordant", dtype=dtype): float(test.n10 + test.n01),
                key("probe/kv_<dtype>/mcnemar_p", dtype=dtype): float(test.p)}
    return out


def write_outputs(run_dir: Path, model: Transformer, result: ProbeResult) -> None:
    """checkpoints/final.pt (weights and model config) and curves.csv (held-out accuracy)."""
    atomic_replace(run_dir / "checkpoints" / "final.pt",
                   lambda tmp: torch.save({"state_dict": model.state_dict(), "model": model.cfg}, tmp))
    rows = [{"step": s, "probe/acc": a} for s, a in result.curve]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "probe/acc"])
            w.writeheader()
            w.writerows(rows)

    atomic_replace(run_dir / "curves.csv", write)


def run(run_cfg: RunConfig, model_cfg: ModelConfig, threads: ThreadChoice, run_dir: Path,
        config_dict: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one probe run in ``run_dir`` (accepted and locked by the caller)."""
    p = run_cfg.probe
    torch.manual_seed(run_cfg.seed)
    model = new_model(probe_model_config(run_cfg, model_cfg))
    logger = tracking.make_logger(run_cfg, run_dir, config_dict)
    ok = False
    try:
        result = train_probe(model, p.make(), steps=p.steps, batch=p.batch, lr=p.lr,
                             weight_decay=p.weight_decay, warmup=p.warmup, seed=run_cfg.seed,
                             eval_sequences=p.eval_sequences, eval_every=p.eval_every)
        model.eval()
        t0 = time.perf_counter()
        metrics = base_metrics(run_cfg, config_dict, model, result, threads)
        own = probe_hits(model, p.make(), run_cfg.seed, p.eval_sequences, decode=True)
        for n in p.lengths:
            hits = own if n == 1 else probe_hits(model, p.make(n), run_cfg.seed, p.eval_sequences,
                                                 decode=True)
            metrics |= length_metrics(model, run_cfg, hits, n)
        metrics |= cache_metrics(model, run_cfg, own)
        metrics["time/eval_s"] = time.perf_counter() - t0
        write_outputs(run_dir, model, result)
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if logger is not None:
            for step, acc in result.curve:
                logger.log_metrics({"probe/acc": acc}, step=step)
            logger.experiment.summary.update(metrics)
        ok = True
        return metrics
    finally:
        tracking.finish(exit_code=0 if ok else 1)


def base_metrics(run_cfg: RunConfig, config_dict: dict[str, Any], model: Transformer,
                 result: ProbeResult, threads: ThreadChoice) -> dict[str, Any]:
    """What every probe run records besides the per-length and per-cache figures."""
    reached = result.steps_to(LEVEL)
    tail = result.losses[-50:]
    return {
        "experiment": run_cfg.experiment, "study": run_cfg.study, "seed": run_cfg.seed,
        "config_hash": config_hash(config_dict), "git_rev": git_rev(),
        "torch_version": torch.__version__, "probe/name": run_cfg.probe.name,
        "train/steps": result.steps, "train/loss": sum(tail) / len(tail),
        "probe/chance": result.chance, "probe/baseline": result.baseline,
        "probe/steps_to_90": float(reached if reached is not None else result.steps),
        "probe/reached_90": float(reached is not None),
        "cost/params_total": float(model.num_params()),
        "cost/params_active": float(model.num_active_params()),
        "time/train_s": result.wall_s,
        **threads.metrics(),
    }


__all__ = ["probe_model_config", "run", "with_cache"]
