"""Cached decode cost vs context: v4lab's V4 attention against transformers' DeepSeek-V4 (issue 14).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/v4_decode.py \
        [--contexts 1024 2048 ... 65536] [--steps 16] [--layers 4] [--kv fp32] [--models ...] [--publish NAME]

Four models of the same shape outside attention: a residual stack of ``--layers``
attention layers (token embedding, pre-norm, ``x + attn(norm(x))`` per layer, final
norm, LM head; no FFN, so the time is the attention's), one object shared by all four:

- ``v4lab V4``: ``V4Attention`` at conf/model/small.yaml's ``attention.v4`` shapes, layer
  kinds from the V4-Flash pattern (``v4_layer_ratios``: sliding layers, then CSA / HCA);
- ``transformers V4``: ``DeepseekV4Attention`` modules of the same config holding the same
  weights (random, copied with tests/v4_reference.py's ``randomize`` / ``copy_attention``),
  run as ``DeepseekV4Model.forward`` runs them (its DynamicCache with the V4 cache layers,
  its sliding-window mask, its rotary embeddings; eager attention, the only one it ships);
- ``v4lab MLA`` and ``v4lab sparse MLA``: ``MultiHeadLatentAttention`` at small.yaml's
  ``attention`` shapes (sparse top-k on / off), v4lab only.

For each context in ascending order every model is prefilled up to it (chunks of
``--chunk`` tokens, continuing the same caches: a context's prefill starts where the
previous one's decode steps ended), then ``--steps`` decode steps are timed, the models
taking turns step by step so that machine load hits all alike; ms/token is the median.
Input tokens are one fixed random sequence, the same for every model. At each context the
logits of the first decode step of the two V4 implementations are compared (max abs
diff; fp32 round-off, ~1e-6, unless ``--kv`` rounds v4lab's caches). During prefill only,
transformers' CSA indexer breaks exact score ties toward the lower index as v4lab's does
(``index_order_ties``): the ReLU scores tie at 0 often enough in the first few hundred
tokens that the two histories would otherwise differ by a pick (logits ~1e-3 apart).
Printed: the table (context, ms/token per model, transformers / v4lab V4 ratio) and the
least-squares slope of log(ms/token) vs log(context) per model (1 = linear in context,
0 = flat). One thread (``torch.set_num_threads(1)``), fp32 compute,
``--kv`` the format of all v4lab caches (fp32 by default: transformers stores fp32).
``--publish NAME`` writes the report to benchmarks/results/NAME.md; nothing is written
without it. ``--models`` picks the models (the V4 pair always runs).

Runtime (an estimate, not measured): the defaults (up to 64K, 16 steps) take roughly
10-30 minutes on one thread (longer on a loaded machine), most of it the dense MLA prefill to 64K
(O(L^2) over the chunks); peak memory about 2-3 GB. ``--contexts 64 128 --steps 2`` is a
seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attention_decode
import common
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from v4lab.io import git_rev
from v4lab.modules.args import v4_layer_ratios
from v4lab.modules.context import ForwardContext
from v4lab.modules.mla import MultiHeadLatentAttention
from v4lab.modules.norm import RMSNorm
from v4lab.modules.v4_attention import V4Attention
from v4lab.modules.v4_config import V4AttentionConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the weight-copy helpers the V4 tests check with
from v4_reference import copy_attention, randomize  # noqa: E402

MODELS = ("v4lab V4", "transformers V4", "v4lab MLA", "v4lab sparse MLA")
HF_TYPES = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
            "hca": "heavily_compressed_attention"}
VOCAB = 512
# Step = (ids [1, T] at the model's next positions) -> logits [1, T, vocab]
Step = Callable[[torch.Tensor], torch.Tensor]


class Stack(nn.Module):
    """Embedding, per-layer pre-norm and residual, final norm, head: shared by every model,
    so only the attention layers (``run(i, h)``) differ."""

    def __init__(self, dim: int, n_layers: int, vocab: int = VOCAB) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(n_layers))
        self.out_norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, run: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = self.emb(ids)
        for i, norm in enumerate(self.norms):
            x = x + run(i, norm(x))
        return self.head(self.out_norm(x))


# ---------------------------------------------------------------- the models

def small_v4() -> tuple[int, V4AttentionConfig]:
    node = OmegaConf.load(ROOT / "conf/model/small.yaml")
    cfg = V4AttentionConfig(**OmegaConf.to_container(node.attention.v4))
    return int(node.dim), cfg


def hf_config(dim: int, v4: V4AttentionConfig, kinds: list[str], max_len: int):
    """transformers' DeepseekV4Config of the same attention (its MoE fields are unused here)."""
    from transformers import DeepseekV4Config

    rope = None
    if v4.yarn_factor > 1:
        rope = {"rope_type": "yarn", "factor": v4.yarn_factor,
                "original_max_position_embeddings": v4.yarn_original_len}
    return DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=dim, num_hidden_layers=len(kinds), num_attention_heads=v4.n_heads,
        head_dim=v4.head_dim, q_lora_rank=v4.q_lora_rank, partial_rotary_factor=v4.rope_dim / v4.head_dim,
        compress_rates={"compressed_sparse_attention": v4.csa_ratio,
                        "heavily_compressed_attention": v4.hca_ratio},
        sliding_window=v4.window, o_groups=v4.o_groups, o_lora_rank=v4.o_lora_rank,
        index_n_heads=v4.index_n_heads, index_head_dim=v4.index_head_dim, index_topk=v4.csa_topk,
        rope_theta=v4.rope_theta, compress_rope_theta=v4.compress_rope_theta, rope_parameters=rope,
        max_position_embeddings=max_len, rms_norm_eps=v4.norm_eps,
        layer_types=[HF_TYPES[k] for k in kinds], attn_implementation="eager",
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def v4_pair(dim: int, v4: V4AttentionConfig, kinds: list[str], max_len: int):
    """(v4lab layers, transformers layers, transformers config, rotary embedding), same weights."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref

    cfg = hf_config(dim, v4, kinds, max_len)
    theirs = [ref.DeepseekV4Attention(cfg, i).eval() for i in range(len(kinds))]
    mine = []
    for i, (kind, layer) in enumerate(zip(kinds, theirs)):
        randomize(layer, 100 + i)
        mine.append(V4Attention(dim, v4, kind).eval())
        copy_attention(mine[-1], layer)
    return mine, theirs, cfg, ref.DeepseekV4RotaryEmbedding(cfg)


def mla_layers(n_layers: int, sparse: bool, kv: str) -> tuple[int, list[MultiHeadLatentAttention]]:
    dim, a = attention_decode.small_attention()
    a.sparse.enabled, a.kv_cache.dtype = sparse, kv
    torch.manual_seed(1)
    return dim, [MultiHeadLatentAttention(dim, a, 10000.0, 1e-6).eval() for _ in range(n_layers)]


# ---------------------------------------------------------------- one decode step each

def lab_v4(stack: Stack, layers: list[V4Attention]) -> Step:
    caches = [layer.new_cache() for layer in layers]
    return lambda ids: stack(ids, lambda i, h: layers[i](h, cache=caches[i]))


def lab_mla(stack: Stack, layers: list[MultiHeadLatentAttention], max_len: int) -> Step:
    caches = [layer.new_cache(1, max_len) for layer in layers]
    pos = [0]

    def step(ids: torch.Tensor) -> torch.Tensor:
        ctx = ForwardContext(positions=torch.arange(pos[0], pos[0] + ids.shape[1]))
        pos[0] += ids.shape[1]
        return stack(ids, lambda i, h: layers[i](h, ctx, caches[i]))

    return step


def hf_v4(stack: Stack, layers: list[nn.Module], cfg, rotary: nn.Module) -> Step:
    """What DeepseekV4Model.forward does around its attention modules, minus mHC and MoE."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_sliding_window_causal_mask

    cache = DynamicCache(config=cfg)

    def step(ids: torch.Tensor) -> torch.Tensor:
        seen = cache.get_seq_length()
        pos = (torch.arange(ids.shape[1]) + seen)[None]
        x = stack.emb(ids)
        mask = create_sliding_window_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None,
                                                 past_key_values=cache, position_ids=pos)
        emb = {k: rotary(x, pos, layer_type=k) for k in ("main", "compress")}
        return stack(ids, lambda i, h: layers[i](h, emb, pos, mask, past_key_values=cache)[0])

    return step


@contextlib.contextmanager
def index_order_ties(layers: list[nn.Module]):
    """While active, transformers' CSA indexer breaks exact score ties toward the lower entry
    index, as v4lab's top-k does (torch.topk breaks them in no fixed order; ReLU scores tie at
    0 often at a few hundred tokens): every score minus index * 1e-37, which moves exact ties
    only (an fp32 score of magnitude > 1e-29 is unchanged). Used during prefill only, so that
    both caches hold the same history; the timed decode steps run transformers unmodified."""
    def hook(module, args, out):
        return out - torch.arange(out.shape[-1], dtype=out.dtype) * 1e-37

    handles = [layer.compressor.indexer.scorer.register_forward_hook(hook) for layer in layers
               if getattr(layer.compressor, "indexer", None) is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- measuring

def loglog_slope(contexts: list[int], ms: list[float]) -> float:
    """Least-squares slope of log(ms/token) on log(context): the exponent of a power law."""
    if len(contexts) < 2:
        return float("nan")
    return float(np.polyfit(np.log(contexts), np.log(ms), 1)[0])


@torch.no_grad()
def run(models: dict[str, Step], ids: torch.Tensor, contexts: list[int], steps: int, chunk: int,
        prefill_mode=contextlib.nullcontext):
    """Per context: (ms/token per model, max abs diff of the V4 pair's first-step logits,
    the logits' scale); the prefill runs inside ``prefill_mode()``."""
    pos, rows = 0, []
    for ctx_len in contexts:
        with prefill_mode():
            for start in range(pos, ctx_len, chunk):  # prefill up to the context
                piece = ids[:, start:min(start + chunk, ctx_len)]
                for step in models.values():
                    step(piece)
        times: dict[str, list[float]] = {name: [] for name in models}
        first = {}
        for s in range(steps):
            tok = ids[:, ctx_len + s:ctx_len + s + 1]
            for name, step in models.items():
                t0 = time.perf_counter()
                logits = step(tok)
                times[name].append((time.perf_counter() - t0) * 1e3)
                if s == 0:
                    first[name] = logits
        pos = ctx_len + steps
        diff = float((first["v4lab V4"] - first["transformers V4"]).abs().max())
        ms = {name: statistics.median(t) for name, t in times.items()}
        rows.append((ctx_len, ms, diff, float(first["transformers V4"].abs().max())))
        print(f"context {ctx_len}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items())
              + f"; V4 first-step logits max abs diff {diff:.1e}", flush=True)
    return rows


def report(a: argparse.Namespace, dim: int, v4: V4AttentionConfig, mla, kinds: list[str], rows,
           load0, load1) -> list[str]:
    import transformers

    names = list(rows[0][1])
    contexts = [r[0] for r in rows]
    slopes = {n: loglog_slope(contexts, [r[1][n] for r in rows]) for n in names}
    lines = [
        "# Cached decode vs context: v4lab V4 attention vs transformers' DeepSeek-V4", "",
        f"Command: `PYTHONPATH=src python benchmarks/v4_decode.py --contexts {' '.join(map(str, contexts))} "
        f"--steps {a.steps} --layers {a.layers} --kv {a.kv} --chunk {a.chunk} --models {' '.join(names)}` "
        f"(code at git "
        f"{git_rev(short=True)})", "",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, 1 thread; load "
        f"average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end (shared machine: the ratios, "
        "measured in turns in one process, are what counts)",
        f"- attention-only residual stack, dim {dim}, {a.layers} layers, vocab {VOCAB}, batch 1, fp32; "
        f"V4 layer kinds {kinds} at small.yaml's attention.v4 (heads {v4.n_heads} x {v4.head_dim}, rope "
        f"{v4.rope_dim}, window {v4.window}, m {v4.csa_ratio}, m' {v4.hca_ratio}, top-k {v4.csa_topk}); "
        f"v4lab caches {a.kv} (transformers: fp32); MLA / sparse MLA at small.yaml's attention "
        f"(kv rank {mla.kv_lora_rank}, rope {mla.qk_rope_head_dim}, top-k {mla.sparse.topk})",
        f"- median ms/token of {a.steps} decode steps per context, models in turns step by step", "",
        "| context | " + " | ".join(f"{n} ms/token" for n in names)
        + " | transformers / v4lab V4 | V4 first-step max abs diff (logit scale) |",
        "|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for ctx_len, ms, diff, scale in rows:
        lines.append(f"| {ctx_len} | " + " | ".join(f"{ms[n]:.2f}" for n in names)
                     + f" | {ms['transformers V4'] / ms['v4lab V4']:.2f}x | {diff:.1e} ({scale:.1f}) |")
    lines += ["", "Slope of log(ms/token) vs log(context), least squares over the contexts "
              "(1 = linear, 0 = flat):", ""]
    lines += [f"- {n}: {slopes[n]:.3f}" for n in names]
    ratios = [r[1]["transformers V4"] / r[1]["v4lab V4"] for r in rows]
    lines += ["", f"transformers V4 ms/token / v4lab V4 ms/token: {min(ratios):.2f}x to {max(ratios):.2f}x "
              f"over the contexts (acceptance: >= 2x); v4lab V4 slope {slopes['v4lab V4']:.3f} "
              "(acceptance: sub-linear, < 1).", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per context")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kv", default="fp32", choices=["fp32", "bf16", "fp8"], help="v4lab caches' format")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk length")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help="which models to time (the V4 pair always): dense MLA's chunked prefill "
                         "grows as context^2, minutes at 64K")
    ap.add_argument("--publish", default="", metavar="NAME",
                    help="write benchmarks/results/NAME.md (e.g. v4_decode)")
    a = ap.parse_args()
    contexts = sorted(a.contexts)
    torch.set_num_threads(1)
    dim, v4 = small_v4()
    v4.kv_dtype = a.kv
    kinds = [v4.layer_kind("ratio", r) for r in v4_layer_ratios(a.layers, v4, 2, ["csa", "hca"])]
    max_len = contexts[-1] + a.steps + 1
    mla_dim, dense = mla_layers(a.layers, False, a.kv)
    _, sparse = mla_layers(a.layers, True, a.kv)
    if mla_dim != dim:
        raise SystemExit(f"small.yaml: MLA and V4 at different widths ({mla_dim}, {dim})")
    mine, theirs, cfg, rotary = v4_pair(dim, v4, kinds, max_len)
    torch.manual_seed(0)
    stack = Stack(dim, a.layers).eval()
    makers = {"v4lab V4": lambda: lab_v4(stack, mine),
              "transformers V4": lambda: hf_v4(stack, theirs, cfg, rotary),
              "v4lab MLA": lambda: lab_mla(stack, dense, max_len),
              "v4lab sparse MLA": lambda: lab_mla(stack, sparse, max_len)}
    models = {n: makers[n]() for n in MODELS if n in {*a.models, *MODELS[:2]}}
    ids = torch.randint(0, VOCAB, (1, max_len), generator=torch.Generator().manual_seed(0))
    load0 = os.getloadavg()
    rows = run(models, ids, contexts, a.steps, a.chunk, lambda: index_order_ties(theirs))
    lines = report(a, dim, v4, sparse[0].cfg, kinds, rows, load0, os.getloadavg())
    if a.publish:
        common.publish(ROOT / "benchmarks/results" / f"{a.publish}.md", lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
