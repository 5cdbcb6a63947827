"""The analytic counts against a built model (tests point it at every experiment), and
torch's FLOP counter made to see attention on CPU (:func:`flop_counter`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from v4lab.accounting.kv import kv_bytes_per_token, v4_window_bytes
from v4lab.accounting.params import param_counts


def cross_check_model(model: Any, include_indexer: bool = True) -> dict[str, tuple[float, float]]:
    """Analytic vs measured counts of a built Transformer: {name: (analytic, measured)}
    for total and active params and KV bytes per token (from real caches, which after a
    short decode hold real fp8/int8 tensors). ``include_indexer``: whether the MLA
    cache's bytes_per_token counts the sparse indexer's key cache.

    V4 attention: the decode first runs enough tokens to complete one block of every
    compressed layer and fill every window, and ``kv_window_bytes`` (the windows' fixed
    bytes, :func:`v4_window_bytes`) is compared as well."""
    cfg = model.cfg
    p = param_counts(cfg)
    v4 = cfg.attention.kind == "v4"
    n = model.kv_probe_tokens()
    if v4 and cfg.attention.v4.use_window:
        n = max(n, cfg.attention.v4.window - 1)
    caches = model.new_caches(1, max(8, n))
    with torch.no_grad():
        model.forward_cached(torch.zeros(1, n, dtype=torch.long), caches, 0)
    measured_kv = model.kv_bytes_per_token(caches)
    out = {"params_total": (p["total"], model.num_params()),
           "params_active": (p["active"], model.num_active_params()),
           "kv_bytes_per_token": (kv_bytes_per_token(cfg, include_indexer), measured_kv)}
    if v4:
        out["kv_window_bytes"] = (v4_window_bytes(cfg),
                                  sum(c["attn"].window_bytes() for c in caches))
    return out


def _sdpa_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with the CPU attention kernels priced. torch registers
    formulas for the CUDA flash/efficient SDPA kernels only, so on CPU every
    ``scaled_dot_product_attention`` (forward and backward) counted as 0 FLOPs; these are
    torch's own SDPA formulas (causal priced as full, as on CUDA) for the CPU kernels."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd})
