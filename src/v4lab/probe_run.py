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

Another run's weights, evaluated again without training (:func:`evaluate_run`; a study
with ``evaluates:``, e.g. ``kv_cache`` decoding ``recall``'s dense-MLA weights with other
caches)::

    python -m v4lab.probe_run --source outputs/recall/no_sparse_mla-s0 \
        --out outputs/kv_cache/no_sparse_mla-s0 +experiment=no_sparse_mla seed=0 ... probe.caches=[fp32]

The evaluation's config may differ from the trained run's only in what is evaluated
(:data:`EVAL_ONLY_KEYS`); the same weights give the same answers as the run's own evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from v4lab import tracking
from v4lab.build import numerics
from v4lab.config import MEASURED_CHIP_KEYS, RunConfig, differences, load_run_config, run_identity
from v4lab.errors import ConfigError
from v4lab.evaluate import time_decode
from v4lab.io import atomic_replace, atomic_write_text, compose, config_hash, git_rev
from v4lab.metrics import key
from v4lab.model import ModelConfig, Transformer
from v4lab.probe_train import ProbeResult, probe_hits, train_probe
from v4lab.stats import mcnemar_exact
from v4lab.threads import ThreadChoice, choose_threads

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
        metrics = base_metrics(run_cfg, config_dict, model, result, threads)
        metrics |= evaluation(model, run_cfg)
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


def evaluation(model: Transformer, run_cfg: RunConfig) -> dict[str, float]:
    """The end-of-run figures of trained weights: per length, per other cache, the time."""
    p, t0, out = run_cfg.probe, time.perf_counter(), {}
    own = probe_hits(model, p.make(), run_cfg.seed, p.eval_sequences, decode=True)
    for n in p.lengths:
        hits = own if n == 1 else probe_hits(model, p.make(n), run_cfg.seed, p.eval_sequences,
                                             decode=True)
        out |= length_metrics(model, run_cfg, hits, n)
    out |= cache_metrics(model, run_cfg, own)
    out["time/eval_s"] = time.perf_counter() - t0
    return out


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


# What an evaluation of a trained run may set otherwise: what is evaluated (and where it
# is recorded), never what was trained. Everything else must equal the run's config.yaml.
EVAL_ONLY_KEYS = ("study", "variant", "probe.lengths", "probe.caches")
# What an evaluation recomputes; the rest of the trained run's metrics.json is kept.
EVAL_KEYS = tuple(p.split("<")[0] for p in (
    "probe/acc@<context>", "probe/answers@<context>", "speed/decode_ms_per_token@<context>",
    "cost/kv_bytes@<context>", "probe/kv_<dtype>/acc", "time/eval_s"))  # (kv_: every cache figure)


# Of the trained run's metrics, what describes its machine and time, not the weights: an
# evaluation records its own (a report's training time counts the runs trained only).
NOT_KEPT = ("time/", "speed/", "host/")


def training_differences(trained: dict[str, Any], evaluating: dict[str, Any]) -> list[str]:
    """The keys (with both values) in which two run configs train differently: everything
    but :data:`EVAL_ONLY_KEYS` and what a resumed run may change (``run_identity``)."""
    a, b = run_identity(trained), run_identity(evaluating)
    # a measured chip's (cpu_host) figures: timed when a run is built, absent before
    timed = tuple(f[:-2] for f in MEASURED_CHIP_KEYS) if trained.get("chip", {}).get("measured") else ()
    return differences(a, b, ignore=lambda k: k in EVAL_ONLY_KEYS or k.startswith(timed))


def evaluate_run(run_cfg: RunConfig, source: Path, out: Path, threads: ThreadChoice | None = None
                 ) -> dict[str, Any]:
    """Evaluate the trained probe run in ``source`` (checkpoints/final.pt) as ``run_cfg``
    asks, without training, into ``out``: config.yaml, its curves.csv (the same weights'
    learning curve) and metrics.json (the trained run's figures, the evaluation's own)."""
    run_cfg.model = numerics(run_cfg, measure=False).model
    config_dict = asdict(run_cfg)
    config_dict.pop("reevaluate")
    trained = yaml.safe_load((source / "config.yaml").read_text())
    diff = training_differences(trained, config_dict)
    if diff:
        raise ConfigError(f"{source}: trained otherwise than this evaluation asks ({'; '.join(diff)}); "
                          f"only {', '.join(EVAL_ONLY_KEYS)} may differ")
    saved = torch.load(source / "checkpoints" / "final.pt", map_location="cpu", weights_only=False)
    cfg = saved["model"]
    need = run_cfg.probe.make(max(run_cfg.probe.lengths)).seq_len
    if need > cfg.max_seq_len:
        raise ConfigError(f"probe.lengths={run_cfg.probe.lengths} is not allowed: {source}'s model "
                          f"covers {cfg.max_seq_len} tokens (its rotary range), the longest asks {need}")
    model = new_model(cfg)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    kept = {k: v for k, v in json.loads((source / "metrics.json").read_text()).items()
            if not k.startswith((*EVAL_KEYS, *NOT_KEPT))}
    metrics = {**kept, "study": run_cfg.study, "config_hash": config_hash(config_dict),
               "git_rev": git_rev(), "source_run": str(source), **(threads.metrics() if threads else {}),
               **evaluation(model, run_cfg)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))
    shutil.copyfile(source / "curves.csv", out / "curves.csv")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m v4lab.probe_run --source RUN --out DIR [hydra overrides]``: see above."""
    parser = argparse.ArgumentParser(prog="python -m v4lab.probe_run", description=evaluate_run.__doc__)
    parser.add_argument("--source", type=Path, required=True, help="the trained probe run's folder")
    parser.add_argument("--out", type=Path, required=True, help="where the evaluation is written")
    args, overrides = parser.parse_known_args(argv)
    try:
        run_cfg = load_run_config(compose(overrides))
        if not run_cfg.probe.enabled:
            raise ConfigError(f"probe={run_cfg.probe.name} is not allowed: a probe (probe=<name>)")
        threads = choose_threads(run_cfg.trainer.num_threads, 1)  # as the run would
        if threads.threads:
            torch.set_num_threads(threads.threads)
        evaluate_run(run_cfg, args.source, args.out, threads)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"evaluated {args.source} -> {args.out / 'metrics.json'}")
    return 0


__all__ = ["EVAL_ONLY_KEYS", "evaluate_run", "probe_model_config", "run", "training_differences",
           "with_cache"]


if __name__ == "__main__":
    sys.exit(main())
