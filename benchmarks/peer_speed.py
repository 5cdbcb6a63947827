"""v4lab against transformers' DeepseekV3ForCausalLM, side by side in one process.

    PYTHONPATH=src python3 benchmarks/peer_speed.py [--threads 2] [--repeats 3] [--out reports/perf.md]

Both models hold the same random weights (built as a DeepseekV3ForCausalLM from a small
DeepseekV3Config, converted with v4lab.peer; the fp32 logits are checked to agree before
anything is timed). On the same config, batch, precision and thread count it times:

1. one training step, forward + backward of the cross-entropy loss (no optimizer), on a
   [batch, seq] batch: median seconds over ``--repeats`` runs after one warm-up, the two
   implementations alternating run by run so that machine load hits both alike;
2. greedy decoding of ``--new`` tokens one at a time after a ``--prompt``-token prompt
   (batch 1): v4lab's absorbed MLA cache path (Transformer.forward_cached) against
   transformers' DynamicCache path (model(tok, past_key_values=...)), both in a plain
   Python loop (no generate() overhead on either side); the prompt's prefill is timed
   separately.

Each in fp32 and under bf16 autocast (torch.autocast("cpu", torch.bfloat16), weights
fp32). It prints the ratio and the model FLOP utilisation (MFU) of each: analytic model
FLOPs (``v4lab.accounting``, the project's one FLOP model, via ``benchmarks/common.py``:
matrix products and attention, 2 per multiply-add, training = 3x forward for matrix
products and 3.5x for the attention core, causal attention counted over the keys each
query sees) per second, divided by this machine's matmul rate measured here in the same
dtype and thread count (square fp32 / bf16 GEMMs, ``common.matmul_flops``).
Decode MFU uses the FLOPs of the absorbed algorithm for both; transformers executes more
(it re-expands every cached latent through kv_b_proj each step), shown separately.
The KV cache bytes per token are read off the stored cache tensors of both.

Results go to ``--out`` (markdown) with the machine, load average, torch and transformers
versions and the config.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import common
import torch
import torch.nn.functional as F

from v4lab.io import git_rev
from v4lab.model import Transformer
from v4lab.peer import to_v4lab

ROOT = Path(__file__).resolve().parents[1]


def hf_config(a: argparse.Namespace):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
        moe_intermediate_size=a.expert_dim, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads,
        n_routed_experts=a.experts, n_shared_experts=a.shared, num_experts_per_tok=a.topk,
        n_group=a.groups, topk_group=a.topk_groups, first_k_dense_replace=a.dense_layers,
        q_lora_rank=a.rank, kv_lora_rank=a.rank, qk_nope_head_dim=a.nope,
        qk_rope_head_dim=a.rope, v_head_dim=a.v, routed_scaling_factor=2.5,
        max_position_embeddings=max(a.prompt + a.new, a.seq), initializer_range=0.02)


# ---- analytic FLOPs ---------------------------------------------------------------------
def hf_decode_flops(cfg, context: int) -> float:
    """What transformers executes per decode token (``cfg``: the v4lab ModelConfig of the
    same model): the up-projected forward over ``context`` keys, plus every other cached
    latent re-expanded through kv_b_proj."""
    a = cfg.attention
    return common.forward_flops(cfg, context) + 2.0 * cfg.n_layers * (context - 1) * \
        a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)


# ---- timed work -------------------------------------------------------------------------
def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def is_hf(model) -> bool:
    return not isinstance(model, Transformer)


def train_step(model, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    """Seconds for forward + backward of the LM loss; gradients cleared afterwards."""
    t0 = time.perf_counter()
    with autocast(bf16):
        logits = model(x).logits if is_hf(model) else model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    dt = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    return dt


@torch.no_grad()
def decode(model, prompt: torch.Tensor, new: int, bf16: bool
           ) -> tuple[float, float, list[int], int]:
    """Greedy decoding: (prefill s, ms per new token, tokens, KV bytes per token)."""
    p = prompt.shape[1]
    out_tokens = []
    with autocast(bf16):
        t0 = time.perf_counter()
        if is_hf(model):
            out = model(prompt, use_cache=True, logits_to_keep=1)
            past, logits = out.past_key_values, out.logits[:, -1]
        else:
            caches = model.new_caches(1, p + new)
            logits = model.forward_cached(prompt, caches, 0)[:, -1]
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(new):
            tok = logits.argmax(-1, keepdim=True)
            out_tokens.append(int(tok))
            if is_hf(model):
                out = model(tok, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
            else:
                logits = model.forward_cached(tok, caches, p + i)[:, -1]
        per_token = (time.perf_counter() - t0) / new * 1e3
    if is_hf(model):
        total = sum(t.numel() * t.element_size() for layer in past.layers
                    for t in (layer.keys, layer.values))
        kv_bytes = total // past.layers[0].keys.shape[-2]  # [B=1, 1, tokens, r]
    else:
        kv_bytes = model.kv_bytes_per_token(caches)
    return prefill, per_token, out_tokens, kv_bytes


def add_model_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark model's DeepseekV3Config sizes as command-line flags."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--nope", type=int, default=64)
    ap.add_argument("--rope", type=int, default=32)
    ap.add_argument("--v", type=int, default=64)
    ap.add_argument("--rank", type=int, default=128, help="q_lora_rank = kv_lora_rank")
    # V3's proportions at hidden 256: dense 18432/7168 x hidden = 683, experts 2048/7168 x
    # hidden = 73 -> 64 (V3: 7168 hidden, 18432 dense, 2048 per expert).
    ap.add_argument("--ffn", type=int, default=683, help="dense layers' intermediate size")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--expert-dim", dest="expert_dim", type=int, default=64)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--topk-groups", dest="topk_groups", type=int, default=2)
    ap.add_argument("--dense-layers", dest="dense_layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=256)
    return ap


def default_pair(seq: int = 512) -> tuple:
    """(config args, transformers model, v4lab model) at the default sizes, same weights."""
    import transformers

    a = add_model_args(argparse.ArgumentParser()).parse_args([])
    a.seq = seq
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_config(a))
    return a, hf, to_v4lab(hf)[0]


def report_header(title: str, command: str, threads: int, load0, load1) -> list[str]:
    """The common head of the side-by-side training-step reports."""
    import transformers

    return [
        f"# {title}", "", f"Command: `{command}`", "",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} "
        f"logical CPUs, torch.set_num_threads({threads}); load average {load0[0]:.1f} at the "
        f"start, {load1[0]:.1f} at the end",
        "- config: benchmarks/peer_speed.py defaults (hidden 256, 4 layers, 16 routed experts "
        "top-4 + 1 shared, q/kv ranks 128), fp32, forward + backward of the LM loss",
    ]


def main() -> None:
    ap = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-repeats", dest="decode_repeats", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the torch.profiler breakdown")
    ap.add_argument("--out", default=str(ROOT / "reports/perf.md"))
    a = ap.parse_args()
    a.git_rev = git_rev(short=True)  # the code this run loads (a commit made meanwhile is not it)

    import transformers

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = hf_config(a)
    hf = transformers.DeepseekV3ForCausalLM(cfg)
    v4, v4cfg = to_v4lab(hf)
    models = {"transformers": hf, "v4lab": v4}
    # transformers' per-expert Python loop (its `eager` experts), for the training step only:
    # the dispatch earlier transformers releases used; 5.x defaults to grouped_mm.
    hf_eager = copy.deepcopy(hf)
    hf_eager.set_experts_implementation("eager")
    train_models = {**models, "transformers (experts=eager)": hf_eager}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    y = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    prompt = torch.randint(0, a.vocab, (1, a.prompt), generator=g)
    with torch.no_grad():
        check = float((hf.eval()(x[:1, :128]).logits - v4.eval()(x[:1, :128])).abs().max())
    print(f"fp32 logits max abs diff before timing: {check:.2e}")
    load0 = os.getloadavg()
    rates = {p: common.matmul_flops(torch.float32 if p == "fp32" else torch.bfloat16)
             for p in a.precisions}
    train_flops = a.batch * a.seq * common.train_flops(v4cfg, a.seq)
    mid = a.prompt + a.new // 2
    dec_flops = common.forward_flops(v4cfg, mid, absorbed=True)
    hf_dec_flops = hf_decode_flops(v4cfg, mid)

    rows, dec_rows, kv = [], [], {}
    for prec in a.precisions:
        bf16 = prec == "bf16"
        for m in train_models.values():
            m.train()
        times = {n: [] for n in train_models}
        for rep in range(a.repeats + 1):  # the first round is the warm-up
            for name, m in train_models.items():
                dt = train_step(m, x, y, bf16)
                if rep:
                    times[name].append(dt)
            print(f"{prec} train round {rep}: " + ", ".join(
                f"{n} {t[-1]:.2f}s" for n, t in times.items() if t and rep))
        med = {n: statistics.median(t) for n, t in times.items()}
        for name in train_models:
            tps = a.batch * a.seq / med[name]
            rows.append((prec, name, med[name], tps, min(times[name]), max(times[name]),
                         train_flops / med[name] / rates[prec], med["transformers"] / med[name]))
        for m in models.values():
            m.eval()
        dec = {n: [] for n in models}
        toks = {}
        for _ in range(a.decode_repeats):
            for name, m in models.items():
                pre, ms, tk, kvb = decode(m, prompt, a.new, bf16)
                dec[name].append((pre, ms))
                toks[name], kv[(prec, name)] = tk, kvb
                print(f"{prec} decode {name}: prefill {pre:.2f}s, {ms:.2f} ms/token")
        same = sum(u == w for u, w in zip(toks["transformers"], toks["v4lab"]))
        med_ms = {n: statistics.median(ms for _, ms in d) for n, d in dec.items()}
        for name in models:
            pre = statistics.median(p for p, _ in dec[name])
            dec_rows.append((prec, name, pre, med_ms[name], min(ms for _, ms in dec[name]),
                             dec_flops / (med_ms[name] / 1e3) / rates[prec],
                             med_ms["transformers"] / med_ms[name], same))
    prof = profile_breakdown(models, x, y, prompt, a.precisions) if a.profile else []
    load1 = os.getloadavg()
    write_report(a, cfg, rows, dec_rows, kv, rates, load0, load1, check, train_flops,
                 dec_flops, hf_dec_flops, transformers.__version__, prof)


# ---- where the time goes ----------------------------------------------------------------
CATEGORIES = {  # aten op (self time) -> category
    "matrix products": {"aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm",
                        "aten::baddbmm", "aten::linear_backward"},
    "fused attention (flash, CPU)": {"aten::_scaled_dot_product_flash_attention_for_cpu",
                                     "aten::_scaled_dot_product_flash_attention_for_cpu_backward"},
    "unfused attention (softmax, masks)": {"aten::_softmax", "aten::_softmax_backward_data",
                                           "aten::where", "aten::isneginf", "aten::masked_fill_",
                                           "aten::logical_not", "aten::all"},
    "loss (log-softmax, nll)": {"aten::_log_softmax", "aten::_log_softmax_backward_data",
                                "aten::nll_loss_forward", "aten::nll_loss_backward"},
    "data movement (copy, cat, index, sort, fill)": {
        "aten::copy_", "aten::cat", "aten::index", "aten::index_add_", "aten::_index_put_impl_",
        "aten::gather", "aten::scatter_", "aten::scatter_add_", "aten::fill_", "aten::zero_",
        "aten::clone", "aten::sort", "aten::topk", "aten::embedding_dense_backward",
        "aten::index_select", "aten::histc", "aten::constant_pad_nd", "aten::_to_copy",
        "aten::bincount", "aten::argsort", "aten::new_zeros", "aten::zeros_like",
        "aten::embedding", "aten::one_hot", "aten::nonzero", "aten::empty"},
}


def profile_breakdown(models: dict, x: torch.Tensor, y: torch.Tensor, prompt: torch.Tensor,
                      precisions: list[str]) -> list[tuple[str, str, float, dict[str, float], list]]:
    """torch.profiler over one training step of each model in each precision (a ratio
    missed in bf16 needs its own breakdown) and 16 fp32 decode steps:
    (phase, name, total ms, ms per category, top ops [(op, ms)])."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for name, m in models.items():
        m.train()
        for prec in precisions:
            train_step(m, x, y, prec == "bf16")
            with profile(activities=[ProfilerActivity.CPU]) as p:
                train_step(m, x, y, prec == "bf16")
            out.append((f"train step, {prec}", name, *_categorise(p)))
        m.eval()
        p = _profile_decode(m, prompt, 16)
        total, cats, top = _categorise(p)
        out.append(("decode per token, fp32", name, total / 16, {k: v / 16 for k, v in cats.items()},
                    [(op, ms / 16) for op, ms in top]))
    return out


@torch.no_grad()
def _profile_decode(m, prompt: torch.Tensor, steps: int):
    """Prefill ``prompt``, then profile ``steps`` one-token decode steps."""
    from torch.profiler import ProfilerActivity, profile

    n = prompt.shape[1]
    tok = prompt[:, -1:]
    if is_hf(m):
        past = m(prompt, use_cache=True, logits_to_keep=1).past_key_values
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(steps):
                m(tok, past_key_values=past, use_cache=True)
    else:
        caches = m.new_caches(1, n + steps)
        m.forward_cached(prompt, caches, 0)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for i in range(steps):
                m.forward_cached(tok, caches, n + i)
    return p


def _categorise(p) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    events = [e for e in p.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    cats = {c: 0.0 for c in CATEGORIES} | {"elementwise and other": 0.0}
    for e in events:
        cat = next((c for c, ops in CATEGORIES.items() if e.key in ops), "elementwise and other")
        cats[cat] += e.self_cpu_time_total / 1e3
    top = sorted(((e.key, e.self_cpu_time_total / 1e3) for e in events), key=lambda t: -t[1])[:6]
    return total, cats, top


def write_report(a, cfg, rows, dec_rows, kv, rates, load0, load1, check, train_flops,
                 dec_flops, hf_dec_flops, tf_version, prof) -> None:
    r, dr, h = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    per_head = cfg.num_hidden_layers * h * (cfg.qk_nope_head_dim + dr + cfg.v_head_dim) * 4
    lines = [
        "# v4lab vs transformers' DeepseekV3ForCausalLM: speed side by side",
        "",
        f"Command: `PYTHONPATH=src python3 benchmarks/peer_speed.py {' '.join(sys.argv[1:])}` "
        f"(code at git {a.git_rev}, read when the run started)",
        "",
        f"- machine: {common.host_key()}, {os.cpu_count()} logical CPUs, "
        f"{platform.platform()}; transformers {tf_version}, "
        f"python {platform.python_version()}",
        f"- threads: torch.set_num_threads({a.threads}) for both; load average (1/5/15 min) "
        f"{'/'.join(f'{v:.1f}' for v in load0)} at the start, "
        f"{'/'.join(f'{v:.1f}' for v in load1)} at the end (a shared machine: ratios from one "
        "process, alternating runs, are what counts)",
        f"- measured matmul rate ({a.threads} threads, 1024^3 GEMM, best within 1 s): "
        + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in rates.items()),
        f"- config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers "
        f"({cfg.first_k_dense_replace} dense, intermediate {cfg.intermediate_size}), "
        f"{h} heads (nope {cfg.qk_nope_head_dim}, rope {dr}, v {cfg.v_head_dim}), "
        f"q/kv ranks {cfg.q_lora_rank}/{r}, {cfg.n_routed_experts} routed experts top-"
        f"{cfg.num_experts_per_tok} ({cfg.n_group} groups, {cfg.topk_group} kept) + "
        f"{cfg.n_shared_experts} shared, expert width {cfg.moe_intermediate_size}, vocab "
        f"{cfg.vocab_size}; random weights (same in both, fp32 logits max abs diff {check:.1e})",
        f"- transformers defaults: attention `{cfg._attn_implementation}`, experts "
        f"`{cfg._experts_implementation}`; v4lab: MLA training path (SDPA), sorted-segment MoE, "
        "absorbed decode with an fp32 latent cache",
        "",
        f"## Training step (forward + backward), batch {a.batch} x {a.seq}",
        "",
        f"Median of {a.repeats} after a warm-up; model FLOPs {train_flops / 1e9:.1f} GFLOP per step.",
        "",
        "| precision | implementation | s / step | tokens/s | min-max s | MFU | speed-up vs transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for prec, name, med, tps, lo, hi, mfu, ratio in rows:
        lines.append(f"| {prec} | {name} | {med:.3f} | {tps:,.0f} | {lo:.3f}-{hi:.3f} | "
                     f"{mfu:.1%} | {ratio:.2f}x |")
    lines += [
        "",
        f"## Decoding {a.new} tokens after a {a.prompt}-token prompt (batch 1, greedy)",
        "",
        f"Median of {a.decode_repeats}. Model FLOPs per token at context {a.prompt + a.new // 2} "
        f"(absorbed algorithm) {dec_flops / 1e6:.1f} MFLOP; transformers executes "
        f"{hf_dec_flops / 1e6:.1f} MFLOP (re-expands the cached latents every step).",
        "",
        "| precision | implementation | prefill s | ms / token | min ms | MFU | speed-up "
        "| same greedy tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for prec, name, pre, ms, lo, mfu, ratio, same in dec_rows:
        lines.append(f"| {prec} | {name} | {pre:.2f} | {ms:.2f} | {lo:.2f} | {mfu:.2%} | "
                     f"{ratio:.2f}x | {same}/{a.new} |")
    lines += [
        "",
        "## KV cache per token (all layers), read off the stored tensors",
        "",
        "| precision | implementation | bytes / token | values / token and layer |",
        "|---|---|---|---|",
    ]
    for (prec, name), b in kv.items():
        lines.append(f"| {prec} | {name} | {b:,} | {b // 4 // cfg.num_hidden_layers} |")
    lines += [
        "",
        f"Both hold the latent and the rotary key ({r} + {dr} = {r + dr} fp32 values per token "
        "and layer): transformers 5.x caches the compressed latent as well. Per-head keys and "
        f"values (what transformers 4.x cached) would be {per_head:,} bytes per token at this "
        "config (analytic).",
        "",
    ]
    if prof:
        cats = list(prof[0][3])
        lines += [
            "## Where the time goes (torch.profiler, self CPU time of aten ops, ms)",
            "",
            "One training step per precision and the mean of 16 fp32 decode steps at the "
            "prompt's context, profiled after the timed runs (the profiler adds its own "
            "overhead; shares are what it shows).",
            "",
            "| phase | implementation | total | " + " | ".join(cats) + " |",
            "|---|---|---|" + "---|" * len(cats),
        ]
        for phase, name, total, c, _ in prof:
            lines.append(f"| {phase} | {name} | {total:.1f} | "
                         + " | ".join(f"{c[k]:.1f} ({c[k] / total:.0%})" for k in cats) + " |")
        lines += ["", "Largest ops (self ms):", ""]
        for phase, name, _, _, top in prof:
            lines.append(f"- {phase}, {name}: " + ", ".join(f"{op[6:]} {ms:.1f}" for op, ms in top))
        lines.append("")
    common.publish(a.out, lines)


if __name__ == "__main__":
    main()
