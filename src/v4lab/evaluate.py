"""Long-context evaluation: synthetic tasks decoded with the KV cache, decode speed, KV bytes.

For every (task, context length) of an :class:`EvalConfig` grid, ``n_examples`` held-out
examples (test-split haystack, ``eval.seed``) are generated (``v4lab.data.tasks``); the
model reads each prompt through its decode path (``forward_cached`` on a KV cache, in
chunks; dense or sparse attention as configured, FP8 cache if configured) and greedily
decodes as many tokens as the answer has. Score: exact match of all answer tokens.

Metrics (flat floats):

    task/<task>@<context>/acc           exact-match accuracy of one cell
    task/<task>@<context>/chance        a uniform guess's accuracy there
    task/<task>@<context>/answers       examples behind the accuracy (all: summed over tasks)
    task/<task>@<context>/extrapolated  1 beyond the trained length (needs allow_extrapolation)
    task/<task>/acc_trained_lengths     mean over contexts <= the training sequence length
    task/<task>/acc_extrapolated        mean over longer contexts (if any)
    task/all@<context>/acc              mean over tasks
    speed/decode_ms_per_token@<context> median wall ms of one decode step, batch 1, at that context
                                        (one thread on CPU)
    cost/kv_bytes@<context>             KV-cache bytes held for one sequence of that length
                                        (all layers, read off the stored cache tensors)

A context length counts the whole sequence (prompt + answer). Contexts beyond the
trained length (``train_len``: the run's trainer.seq_len) or the model's ``max_seq_len``
(its rotary range) need ``allow_extrapolation``; the report marks those cells.

CLI (rebuilds the model from the run's config.yaml next to the checkpoint):

    python -m v4lab.evaluate ckpt=outputs/adhoc/full-s0 tasks=[niah_single] contexts=[256,1024]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from v4lab.data.config import EvalConfig
from v4lab.data.tasks import (
    DEFAULT_PARAMS,
    TASKS,
    Haystack,
    TaskParams,
    TaskVocab,
    generate,
    min_length,
)
from v4lab.errors import ConfigError, require
from v4lab.metrics import key


def check_lengths(cfg: EvalConfig, vocab: TaskVocab, params: TaskParams = DEFAULT_PARAMS,
                  path: str = "eval") -> None:
    """Every context must hold every task: ConfigError naming the shortest allowed."""
    for t in cfg.tasks:
        need = min_length(t, vocab, params)
        short = [c for c in cfg.contexts if c < need]
        require(not short, f"{path}.contexts", cfg.contexts,
                f"lengths >= {need} for task {t!r} (its lines, query and answer plus a little "
                f"haystack); {short} are too short")


# ---- decoding (Transformer.generate / prefill: the one decode loop) ---------------
def exact_match(generated: list[int], answer: list[int]) -> bool:
    """The scoring rule: every answer token, in order, and nothing else."""
    return list(generated) == list(answer)


def cache_bytes(caches: list) -> int:
    """KV bytes held for one sequence: per-token bytes of the stored tensors x tokens held
    (a V4 attention cache reports the bytes it holds, window included)."""
    return sum(c["attn"].nbytes() if hasattr(c["attn"], "nbytes") else
               c["attn"].bytes_per_token() * c["attn"].length for c in caches)


@torch.no_grad()
def time_decode(model, tokens: torch.Tensor, steps: int, chunk: int) -> tuple[float, int]:
    """Median ms of one decode step at the end of ``tokens`` [1, C] (batch 1; the last
    ``steps`` tokens are fed one at a time after prefilling the rest and one untimed
    warm-up step), and the KV bytes held once all C tokens are in the cache.

    On CPU the steps run on one thread (restored afterwards): a shared machine makes
    multi-threaded latencies of tiny matmuls meaningless."""
    c = tokens.shape[1]
    steps = max(1, min(steps, c - 2))
    caches = model.new_caches(1, c)
    model.prefill(tokens[:, : c - steps - 1], caches, chunk)
    threads = torch.get_num_threads()
    if tokens.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        times = []
        for pos in range(c - steps - 1, c):
            t0 = time.perf_counter()
            model.forward_cached(tokens[:, pos:pos + 1], caches, pos, history=tokens[:, :pos + 1])
            if tokens.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times[1:]), cache_bytes(caches)


def task_examples(task: str, context: int, cfg: EvalConfig, vocab: TaskVocab, haystack: Haystack,
                  params: TaskParams = DEFAULT_PARAMS) -> list:
    """The held-out examples of one cell: example i is a function of (eval seed, task, context, i)."""
    t_idx = TASKS.index(task)
    return [generate(task, context, vocab, haystack, np.random.default_rng([cfg.seed, t_idx, context, i]),
                     params) for i in range(cfg.n_examples)]


def cell_marks(task: str, context: int, answers: int, train_len: int | None) -> dict[str, float]:
    """How many examples a cell's accuracy rests on and whether it is extrapolation (its
    context beyond the trained length); the report pools the first and marks the second."""
    out = {key("task/<task>@<context>/answers", task=task, context=context): float(answers)}
    if train_len is not None:
        beyond = float(context > train_len)
        out[key("task/<task>@<context>/extrapolated", task=task, context=context)] = beyond
    return out


def evaluate(model, tokenizer, cfg: EvalConfig, haystack: np.ndarray, train_len: int | None = None,
             params: TaskParams = DEFAULT_PARAMS, log=None) -> dict[str, float]:
    """Run the grid; returns the metrics described in the module docstring.

    model: a :class:`~v4lab.model.Transformer` (or anything with new_caches /
    forward_cached); tokenizer: a ``tokenizers.Tokenizer`` or a :class:`TaskVocab`;
    haystack: corpus token ids (the test split); train_len: the training sequence length
    (contexts beyond it are reported as extrapolated).
    """
    vocab = tokenizer if isinstance(tokenizer, TaskVocab) else TaskVocab.from_tokenizer(tokenizer)
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    cfg.validate("eval", max_len, train_len)
    check_lengths(cfg, vocab, params)
    hay = Haystack(haystack)
    device = next(iter(model.parameters()), torch.empty(0)).device if hasattr(model, "parameters") \
        else torch.device("cpu")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    if max_len is not None and cfg.allow_extrapolation:
        model.cfg.max_seq_len = max(max_len, max(cfg.contexts))
    metrics: dict[str, float] = {}
    try:
        for context in sorted(cfg.contexts):
            t0 = time.perf_counter()
            accs = []
            for task in cfg.tasks:
                exs = task_examples(task, context, cfg, vocab, hay, params)
                correct = 0
                for s in range(0, len(exs), cfg.batch_size):
                    batch = exs[s:s + cfg.batch_size]
                    prompts = torch.tensor([e.prompt for e in batch], dtype=torch.long, device=device)
                    gen = model.generate(prompts, len(batch[0].answer),
                                         prefill_chunk=cfg.prefill_chunk)[:, prompts.shape[1]:]
                    correct += sum(exact_match(g, e.answer) for g, e in zip(gen.tolist(), batch))
                acc = correct / len(exs)
                metrics[key("task/<task>@<context>/acc", task=task, context=context)] = acc
                metrics[key("task/<task>@<context>/chance", task=task, context=context)] = float(
                    np.mean([e.chance for e in exs]))
                metrics |= cell_marks(task, context, len(exs), train_len)
                accs.append(acc)
            metrics[key("task/<task>@<context>/acc", task="all", context=context)] = float(np.mean(accs))
            metrics |= cell_marks("all", context, len(exs) * len(cfg.tasks), train_len)
            first = torch.tensor([exs[0].tokens], dtype=torch.long, device=device)
            ms, held = time_decode(model, first, cfg.timing_tokens, cfg.prefill_chunk)
            metrics[key("speed/decode_ms_per_token@<context>", context=context)] = ms
            metrics[key("cost/kv_bytes@<context>", context=context)] = float(held)
            if log is not None:
                log(f"eval @{context}: " + "  ".join(
                    f"{t} {metrics[f'task/{t}@{context}/acc']:.2f}" for t in cfg.tasks)
                    + f"  ({time.perf_counter() - t0:.1f} s, decode {ms:.2f} ms/token)")
        for task in cfg.tasks:
            for label, keep in (("acc_trained_lengths", lambda c: train_len is None or c <= train_len),
                                ("acc_extrapolated", lambda c: train_len is not None and c > train_len)):
                vals = [metrics[key("task/<task>@<context>/acc", task=task, context=c)]
                        for c in cfg.contexts if keep(c)]
                if vals:
                    metrics[key(f"task/<task>/{label}", task=task)] = float(np.mean(vals))
    finally:
        if max_len is not None:
            model.cfg.max_seq_len = max_len
        if was_training:
            model.train()
    return metrics


# ---- from a checkpoint ----------------------------------------------------------------
def load_run(ckpt: str | Path, map_location: str = "cpu"):
    """Rebuild (model, tokenizer, run config, prepared data folder) from a run directory or
    its ``checkpoints/last.ckpt`` (the run's ``config.yaml`` sits in the run directory)."""
    from omegaconf import OmegaConf

    from v4lab import build
    from v4lab.config import load_run_config

    path = Path(ckpt).expanduser()
    if path.is_dir():
        run_dir, path = path, path / "checkpoints" / "last.ckpt"
    else:
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no checkpoint at {path}")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no config.yaml in the run directory {run_dir}")
    run_cfg = load_run_config(OmegaConf.load(run_dir / "config.yaml"))
    # The same build as training's: the saved config already records the chip's numerics
    # (applied again, they change nothing), the corpus and tokenizer, canonical Engram ids.
    numerics = build.numerics(run_cfg, measure=False)
    data = build.corpus(run_cfg)
    model = build.model(numerics.model, data)
    state = torch.load(path, map_location=map_location, weights_only=False)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    return model, data.tokenizer, run_cfg, data.folder


def main(argv: list[str] | None = None) -> int:
    """``python -m v4lab.evaluate ckpt=PATH [tasks=[..]] [contexts=[..]] [n_examples=N]
    [allow_extrapolation=true] [threads=N] [out=FILE]``; other keys are EvalConfig fields.
    Defaults come from the run's own ``eval`` config. Writes ``<run dir>/eval.json``."""
    from omegaconf import OmegaConf

    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    args = OmegaConf.to_container(args, resolve=True)
    try:
        ckpt = args.pop("ckpt", None)
        if not ckpt:
            raise ConfigError("ckpt=None is not allowed: ckpt=<run dir or checkpoints/last.ckpt>")
        threads = int(args.pop("threads", 1))
        out = args.pop("out", None)
        torch.set_num_threads(threads)
        model, tokenizer, run_cfg, folder = load_run(ckpt)
        unknown = sorted(set(args) - set(asdict(EvalConfig())))
        if unknown:
            raise ConfigError(f"{unknown[0]}={args[unknown[0]]!r} is not allowed: an unknown key; "
                              f"use ckpt, threads, out or {', '.join(asdict(EvalConfig()))}")
        merged = OmegaConf.merge(OmegaConf.structured(run_cfg.eval), args)
        cfg: EvalConfig = OmegaConf.to_object(merged)
        hay = np.memmap(folder / "test.bin", dtype=np.uint16, mode="r")
        t0 = time.perf_counter()
        metrics = evaluate(model, tokenizer, cfg, hay, run_cfg.trainer.seq_len,
                           log=lambda s: print(s, flush=True))
        metrics["time/eval_s"] = time.perf_counter() - t0
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    run_dir = Path(ckpt)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent.parent
    dest = Path(out) if out else run_dir / "eval.json"
    from v4lab.io import atomic_write_text

    record: dict[str, Any] = {"ckpt": str(ckpt), "eval": asdict(cfg), **metrics}
    atomic_write_text(dest, json.dumps(record, indent=2) + "\n")
    print(f"eval {metrics['time/eval_s']:.1f} s -> {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
