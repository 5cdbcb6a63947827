"""KV-cache bytes one sequence holds at 1K / 8K / 64K / 1M tokens of context: DeepSeek-V3's
MLA (bf16 and fp8 latent), V3.2-style sparse MLA (fp8 latent + indexer keys) and the
released DeepSeek-V4-Flash attention, all from ``v4lab.accounting`` (pure arithmetic, no
model is built; tests/test_accounting.py checks the same arithmetic against the bytes of
real stored cache tensors).

Layouts (bytes per token and layer, or per stored entry):
- MLA bf16: 512 + 64 values x 2 = 1152; MLA fp8: 512 e4m3 + 4 fp32 scales + 64 bf16 = 656.
- Sparse MLA (V3.2-style): + the indexer key, 128 values in bf16 = 256 (the lab's format);
  V3.2 as released keeps its indexer keys in FP8 (128 e4m3 + one fp32 scale = 132 B),
  priced by hand in one extra row (the lab's caches do not store that format).
- V4-Flash: per compressed entry 448 e4m3 + 7 fp32 scales + 64 bf16 = 604 B; CSA layers
  (21) one entry + one 128-wide bf16 indexer key (256 B) per 4 tokens, HCA layers (20) one
  entry per 128 tokens, sliding windows of 127 stored entries in all 43 layers (fixed).

Usage: PYTHONPATH=src python3 benchmarks/kv_bytes.py [--out benchmarks/results/kv_bytes.md]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from common import publish

from v4lab import accounting
from v4lab.chips.presets import load_model_preset
from v4lab.modules.args import KVCacheConfig

CONTEXTS = {"1K": 1024, "8K": 8192, "64K": 65536, "1M": 1048576}
V32_FP8_INDEX_KEY = 128 + 4  # e4m3 values + one fp32 scale (hand arithmetic, see docstring)


def _gb(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def rows() -> list[tuple[str, int, float, int, dict[str, float]]]:
    """(name, layers, bytes per token (growth), fixed bytes, {context: bytes held})."""
    v3 = load_model_preset("v3_671b")
    bf16 = copy.deepcopy(v3)
    bf16.attention.kv_cache = KVCacheConfig(dtype="bf16")
    fp8 = copy.deepcopy(v3)
    fp8.attention.kv_cache = KVCacheConfig(dtype="fp8")
    sparse = copy.deepcopy(fp8)
    sparse.attention.sparse.enabled = True
    flash = load_model_preset("v4_flash")
    out = []
    for name, cfg in [("V3 MLA, bf16 latent", bf16), ("V3 MLA, fp8 latent", fp8),
                      ("V3.2-style sparse MLA (fp8 latent + bf16 indexer keys)", sparse),
                      ("V4-Flash attention (fp8 entries + bf16 indexer keys)", flash)]:
        held = {c: float(accounting.kv_bytes_held(cfg, n)) for c, n in CONTEXTS.items()}
        out.append((name, cfg.n_layers, accounting.kv_bytes_per_token(cfg),
                    accounting.v4_window_bytes(cfg), held))
    per_tok = sparse.n_layers * (accounting.kv_bytes_per_token_layer(sparse) + V32_FP8_INDEX_KEY)
    out.insert(3, ("V3.2 as released (fp8 latent + fp8 indexer keys; hand arithmetic)", sparse.n_layers,
                   float(per_tok), 0, {c: float(per_tok * n) for c, n in CONTEXTS.items()}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kv_bytes.md"))
    args = ap.parse_args()
    table = rows()
    lines = ["# KV-cache bytes held per sequence: MLA, sparse MLA, V4-Flash attention", "",
             "Pure arithmetic (`benchmarks/kv_bytes.py`, `v4lab.accounting.kv_bytes_held`); "
             "tests/test_accounting.py checks it against the bytes of real stored cache tensors "
             "(V4-Flash entry layout, every layer kind). V3 rows: 61 layers of DeepSeek-V3 "
             "(`conf/model/v3_671b.yaml`); V4-Flash: 43 layers (`conf/model/v4_flash.yaml`: 2 "
             "sliding, 21 CSA, 20 HCA). 'per token' is the growth rate (`cost/kv_bytes_per_token`); "
             "'fixed' the V4 sliding windows (127 stored entries x 604 B x 43 layers), "
             "included in the bytes held. The compressors' buffers of at most one incomplete "
             "block are not counted.", "",
             "| attention | layers | per token (B) | fixed | " + " | ".join(CONTEXTS) + " |",
             "|---|---|---|---|" + "---|" * len(CONTEXTS)]
    for name, layers, per_tok, fixed, held in table:
        lines.append(f"| {name} | {layers} | {per_tok:,.1f} | {_gb(fixed) if fixed else '-'} | "
                     + " | ".join(_gb(held[c]) for c in CONTEXTS) + " |")
    flash = table[-1]
    lines += ["", "## V4-Flash as a fraction of the others", "",
              "| V4-Flash / ... | " + " | ".join(CONTEXTS) + " | per layer @1M |",
              "|---|" + "---|" * (len(CONTEXTS) + 1)]
    for name, layers, _, _, held in table[:-1]:
        per_layer = (flash[4]["1M"] / flash[1]) / (held["1M"] / layers)
        lines.append(f"| {name} | " + " | ".join(f"{flash[4][c] / held[c]:.1%}" for c in CONTEXTS)
                     + f" | {per_layer:.1%} |")
    v32_lab, v32_fp8 = table[2][4]["1M"], table[3][4]["1M"]
    lines += ["", "## The report's claim", "",
              "The V4 report says V4's KV cache at 1M tokens is a small fraction of V3.2's. The "
              f"lab's arithmetic: V4-Flash holds {_gb(flash[4]['1M'])} per 1M-token sequence, "
              f"{flash[4]['1M'] / v32_fp8:.1%} of V3.2 as released ({_gb(v32_fp8)}, fp8 indexer "
              f"keys) and {flash[4]['1M'] / v32_lab:.1%} of the lab's V3.2-style sparse MLA "
              f"({_gb(v32_lab)}, bf16 indexer keys). Part of it is depth: V4-Flash has 43 layers "
              "to V3.2's 61; per layer (last column above) the ratio is higher. At 1K tokens the "
              f"fixed windows are {flash[3] / flash[4]['1K']:.0%} of V4-Flash's cache, so the "
              "fraction is larger there.",
              "", "Assumptions: the lab's V4 entry layout (604 B: e4m3 with fp32 scales per 64 "
              "values, bf16 rope part) and bf16 indexer keys; the released kernels may pack "
              "scales and indexer keys more tightly, which would lower V4's figure a little."]
    publish(args.out, lines)


if __name__ == "__main__":
    main()
