"""Decoding one token through a DeepSeek-V4 attention layer: the lean path.

:meth:`V4Attention.forward` with a cache and a single fp32 token, without autograd, comes
here. It computes what the general path computes (tests/modules/test_v4_decode_path.py
compares the two, token after token, for every switch), with a third of its operators:
at lab size a decode step costs per operator, not per FLOP, and the general path pays for
masks, per-chunk position grids and cos/sin tables that one token does not need.

- Every key the cache returns is visible to the newest token: the window store holds
  exactly its W - 1 predecessors, and every stored compressed entry has its block
  complete. No mask is built.
- All projections of x (W_QA, W_KV, the compressors' W_KV and W_Z, the indexer's head
  weights) are one matmul against their stacked weights; the cache takes the stacked and
  transposed matrices at its first step (``V4LayerCache.decode_weights``) and keeps them,
  as it keeps keys computed with the weights of that time.
- RoPE is one complex product in place (:func:`rotate_tail_`), with R(+-t) read from a
  per-layer table of positions (``layer.turns``).
- CSA scores every stored entry with the indexer and gathers only its top-k (ties in index
  order, as the general path breaks them); HCA attends to every stored entry.
- Attention over the shared K=V is two batched products, the sink one extra logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v4lab.modules.compressor import rotate_tail_
from v4lab.modules.sparse import topk_indices
from v4lab.modules.v4_cache import V4LayerCache


def applies(layer, x: torch.Tensor) -> bool:
    """Whether one token x takes this path: no autograd, fp32 without autocast (the in-place
    complex RoPE needs fp32), no FP4 fake quantiser on the indexer (the general path has it)."""
    return (not torch.is_grad_enabled() and x.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
            and (layer.indexer is None or layer.indexer.qk_quant is None))


def decode_weights(layer) -> dict:
    """The layer's matrices transposed for ``x @ W`` on [B, features] rows: "x" stacks every
    projection of x (W_QA, W_KV, then the compressor's W_KV and W_Z, then the indexer's
    compressor W_KV and W_Z and its head weights; "sizes" their widths), "q" W_QB, "o" W_OB,
    "iq" the indexer's query, "wo_a" the output groups; also the norms' gains and the sinks
    (a module attribute look-up costs as much as a small operator)."""
    ws = [layer.wq_a.weight, layer.wkv.weight]
    if layer.compressor is not None:
        ws += [layer.compressor.wkv.weight, layer.compressor.wgate.weight]
    ix = layer.indexer
    if ix is not None:
        ws += [ix.compressor.wkv.weight, ix.compressor.wgate.weight, ix.weights_proj.weight]
    return {"x": torch.cat(ws).t(), "sizes": [w.shape[0] for w in ws],
            "q": layer.wq_b.weight.t(), "o": layer.wo_b.weight.t(),
            "iq": ix.wq.weight.t() if ix is not None else None, "wo_a": layer.wo_a.transpose(1, 2),
            "q_norm": layer.q_norm.weight, "kv_norm": layer.kv_norm.weight,
            "sink": None if layer.sinks is None else layer.sinks.view(1, -1, 1)}


def rotations(layer, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R(t) and R(-t) at position ``pos``: complex factors e^{+-i t theta_j} [rope_dim / 2],
    from the layer's table, grown in blocks of 1,024 positions (angles as rope_cos_sin
    computes them: fp32 position times inv_freq)."""
    freq = layer.inv_freq
    if pos >= layer.turns.shape[0] or layer.turns.device != freq.device:
        ang = torch.arange((pos // 1024 + 1) * 1024, device=freq.device, dtype=torch.float)[:, None] * freq
        one = torch.ones_like(ang)
        layer.turns = torch.stack([torch.polar(one, ang), torch.polar(one, -ang)], 1)
    return layer.turns[pos].unbind(0)


def decode_one(layer, x: torch.Tensor, cache: V4LayerCache) -> torch.Tensor:
    """The layer's output for one token x [B, 1, dim] at ``cache.pos``; advances the cache."""
    cfg, b = layer.cfg, x.shape[0]
    turn, back = rotations(layer, cache.pos)
    if cache.decode_weights is None:
        cache.decode_weights = decode_weights(layer)
    mats = cache.decode_weights
    proj = torch.mm(x.view(b, -1), mats["x"]).split_with_sizes(mats["sizes"], -1)  # [B, width] each
    eps, d = cfg.norm_eps, cfg.head_dim  # F.rms_norm: RMSNorm's formula in one call (fp32 here)
    q_latent = F.rms_norm(proj[0], (proj[0].shape[-1],), mats["q_norm"], eps)
    q = torch.mm(q_latent, mats["q"]).view(b, cfg.n_heads, d)
    q = rotate_tail_(F.rms_norm(q, (d,), eps=eps), turn)
    kv = rotate_tail_(F.rms_norm(proj[1], (d,), mats["kv_norm"], eps), turn)
    keys = []
    if cfg.use_window:
        keys.append(cache.window.extend(kv.view(b, 1, -1), keep=cfg.window - 1))
    if layer.compressor is not None:
        keys.append(compressed_keys(layer, proj[2:], q_latent, mats["iq"], cache, turn))
    cache.pos += 1
    keys = torch.cat(keys, 1) if len(keys) > 1 else keys[0]  # [B, S, d], also the values
    o = attend(q, keys, mats["sink"])
    o = rotate_tail_(o, back).view(b, cfg.o_groups, -1).transpose(0, 1)  # R(-t)
    o = torch.bmm(o, mats["wo_a"]).transpose(0, 1)  # [B, groups, o_lora_rank]
    return torch.mm(o.reshape(b, -1), mats["o"]).view(b, 1, -1)


def compressed_keys(layer, proj: tuple[torch.Tensor, ...], q_latent: torch.Tensor,
                    wq_t: torch.Tensor | None, cache: V4LayerCache, turn: torch.Tensor) -> torch.Tensor:
    """The compressed entries the newest token attends to, [B, n, d] (HCA: all; CSA: the
    indexer's top-k). proj: [B, width] projections of x: the compressor's kv and gate, then
    (CSA) the indexer's compressor's kv and gate and its head weights."""
    b = q_latent.shape[0]
    new = layer.compressor.pool(proj[0][:, None], proj[1][:, None], cache.comp)
    ix = layer.indexer
    if ix is None:
        return cache.entries.extend(new)
    cache.entries.append(new)
    index_keys = cache.index_keys.extend(ix.compressor.pool(proj[2][:, None], proj[3][:, None], cache.index))
    n = index_keys.shape[1]  # [B, N, index head dim]
    if n == 0:
        return q_latent.new_zeros(b, 0, layer.cfg.head_dim)
    if n <= layer.cfg.csa_topk:  # every entry is picked
        return cache.entries.read()
    qi = rotate_tail_(torch.mm(q_latent, wq_t).view(b, ix.n_heads, ix.head_dim), turn)
    dots = torch.bmm(qi, index_keys.transpose(1, 2)).relu_().mul_(ix.head_dim ** -0.5)
    scores = torch.bmm(proj[4].view(b, 1, ix.n_heads) * ix.n_heads ** -0.5, dots)  # [B, 1, N]
    return cache.entries.gather(topk_indices(scores, layer.cfg.csa_topk)[:, 0])


def attend(q: torch.Tensor, keys: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q [B, H, d] over keys [B, S, d] (all visible; also the values),
    the sink logit [1, H, 1] in the denominator; [B, H, d]. No key and no sink: zeros, as
    ``attend_with_sink`` gives."""
    b, h, d = q.shape
    if keys.shape[1] == 0:
        return torch.zeros_like(q)
    logits = torch.bmm(q, keys.transpose(1, 2)).mul_(d ** -0.5)  # [B, H, S]
    if sink is None:
        return torch.bmm(logits.softmax(-1), keys)
    logits = torch.cat([logits, sink.expand(b, h, 1)], -1)
    return torch.bmm(logits.softmax(-1)[..., :-1], keys)
