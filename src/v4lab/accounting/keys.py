"""Which cache entries a query uses: V4 layer kinds, block ratios and key counts.

The bottom of the cost model: :mod:`~v4lab.accounting.kv` (bytes a decode step reads) and
:mod:`~v4lab.accounting.flops` (attention FLOPs) both count with these. A query attends to
``keys`` cache entries; for V4 attention a query's keys are its sliding window plus
compressed entries (HCA: every complete block; CSA: the indexer's top-k of the complete
blocks, the indexer scoring all of them), counted per layer kind by :func:`v4_key_counts`.
"""

from __future__ import annotations

import math
from typing import Any


def v4_layer_kinds(cfg: Any) -> list[str]:
    """'sliding' | 'csa' | 'hca' of every main layer (kind v4), as the model builds them."""
    return cfg.attention.layer_kinds("model.attention", cfg.n_layers)


def v4_mtp_kind(cfg: Any) -> str:
    """Kind of the MTP block's V4 attention layer (model.v4_layer_kind at index n_layers)."""
    return "sliding" if cfg.attention.v4.use_window else v4_layer_kinds(cfg)[-1]


def v4_ratio(v: Any, kind: str) -> int:
    """Block length of a V4 layer kind (0: sliding only)."""
    return {"sliding": 0, "csa": v.csa_ratio, "hca": v.hca_ratio}[kind]


def mean_causal_keys(seq_len: int, topk: int | None = None) -> float:
    """Mean number of keys a query attends to in a causal sequence of ``seq_len``
    (query t sees t + 1 keys, or min(topk, t + 1) with top-k sparse attention)."""
    if topk is None or topk >= seq_len:
        return (seq_len + 1) / 2
    # t + 1 <= topk for t < topk, then topk
    return (topk * (topk + 1) / 2 + (seq_len - topk) * topk) / seq_len


def sparse_topk(cfg: Any) -> int | None:
    """Keys a query keeps under sparse attention (None: dense)."""
    a = cfg.attention
    return a.sparse.topk if (a.kind == "mla" and a.sparse.enabled) else None


def _floor_sum(n: int, m: int) -> int:
    """sum_{i=1}^{n} floor(i / m) (complete blocks seen by queries at 1..n visible tokens)."""
    q, r = divmod(n, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def v4_key_counts(v: Any, kind: str, context: float) -> dict[str, float]:
    """Entries one query of a V4 layer of ``kind`` uses when it sees ``context`` tokens
    (itself included): window keys min(W, context); compressed entries attended (HCA:
    every complete block, floor(context / m'); CSA: min(top-k, floor(context / m)));
    indexer keys scored (CSA: every complete block)."""
    window = float(min(v.window, context)) if v.use_window else 0.0
    if kind == "sliding":
        return {"window": window, "compressed": 0.0, "scored": 0.0}
    blocks = float(math.floor(context / v4_ratio(v, kind)))
    if kind == "hca":
        return {"window": window, "compressed": blocks, "scored": 0.0}
    return {"window": window, "compressed": min(float(v.csa_topk), blocks), "scored": blocks}


def v4_causal_key_counts(v: Any, kind: str, seq_len: int) -> dict[str, float]:
    """:func:`v4_key_counts` averaged over the queries t = 0 .. seq_len - 1 of a causal
    sequence (query t sees t + 1 tokens), in closed form."""
    window = mean_causal_keys(seq_len, v.window) if v.use_window else 0.0
    if kind == "sliding":
        return {"window": window, "compressed": 0.0, "scored": 0.0}
    m = v4_ratio(v, kind)
    blocks = _floor_sum(seq_len, m) / seq_len
    if kind == "hca":
        return {"window": window, "compressed": blocks, "scored": 0.0}
    k = v.csa_topk  # min(k, floor(n / m)) reaches k at n = k m
    last = min(seq_len, k * m - 1)
    attended = (_floor_sum(last, m) + k * max(0, seq_len - k * m + 1)) / seq_len
    return {"window": window, "compressed": attended, "scored": blocks}
