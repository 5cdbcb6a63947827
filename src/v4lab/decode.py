"""Self-speculative greedy decoding with the MTP block as a one-token draft.

``Transformer.generate(..., speculative=True)`` calls :func:`generate_speculative`; the
plain decode loop and the prompt's prefill stay on the model (``Transformer.generate`` /
``prefill`` are the entry points). The functions here take the model as an argument and
use only its public decode surface (``new_caches``, ``forward`` with a
:class:`ForwardContext`, the ``mtp`` block), so this module sits below ``model`` and
imports nothing of it.
"""

from __future__ import annotations

import torch
from torch import nn

from v4lab.modules.context import ForwardContext


def hidden_cached(model: nn.Module, ids: torch.Tensor, caches: list, start: int,
                  history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model.forward_cached that also returns h [B, T, dim], the MTP block's input."""
    ctx = ForwardContext(positions=torch.arange(start, start + ids.shape[1], device=ids.device),
                         input_ids=ids, caches=caches, history_ids=history)
    return model.forward(ids, ctx), ctx.hidden


def mtp_draft(model: nn.Module, h: torch.Tensor, next_ids: torch.Tensor, mtp_caches: list,
              start: int) -> torch.Tensor:
    """Advance the MTP block over positions start.. (h [B, n, dim] with the verified tokens
    after them, next_ids [B, n]) through its own cache; the draft for the token after
    next_ids[:, -1]: [B, 1]."""
    ctx = ForwardContext(positions=torch.arange(start, start + h.shape[1], device=h.device),
                         input_ids=next_ids, caches=mtp_caches)
    return model.mtp(h, next_ids, ctx)[:, -1:].argmax(-1)


def generate_speculative(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                         prefill_chunk: int | None = None) -> torch.Tensor:
    """Greedy decoding of ``model`` (a Transformer with an MTP block) with the MTP block as
    a one-token draft. prompt: [B, T0] -> [B, T0 + max_new_tokens].

    Each step feeds the next token (verified) and the draft after it through the main
    model at once. If the main model's greedy choice after the next token is the draft
    (in every row), both are kept and its choice after the draft comes for free: two
    tokens for one two-token forward. Otherwise the caches are put back as they were
    before the step (every cache replaces its tensors or writes past its old length,
    so restoring the attributes is enough) and the next token runs alone, exactly as
    plain greedy decoding runs it. The output is plain greedy's, up to fp32 round-off
    of a two-token chunk vs a one-token step deciding a near-tie of the argmax.
    Counts: ``model.speculative_stats`` = {"drafted", "accepted"}. Runs under
    ``Transformer.generate``'s ``torch.no_grad``.
    """
    b, t0 = prompt.shape
    total = t0 + max_new_tokens
    caches = model.new_caches(b, total + 1)
    mtp_caches = [None] * model.cfg.n_layers + [
        {"attn": model.mtp.block.attn.new_cache(b, total + 1, prompt.device)}]
    chunk = prefill_chunk or t0
    hs, logits = [], None
    for s in range(0, t0, chunk):
        e = min(s + chunk, t0)
        logits, h = hidden_cached(model, prompt[:, s:e], caches, s, prompt[:, :e])
        hs.append(h)
    nxt = logits[:, -1:].argmax(-1)  # token t0, verified
    draft = mtp_draft(model, torch.cat(hs, 1), torch.cat([prompt[:, 1:], nxt], 1), mtp_caches, 0)
    out, pos = prompt, t0  # nxt sits at position pos, the MTP block has seen positions < pos
    drafted = accepted = 0
    while out.shape[1] < total:
        if out.shape[1] + 1 == total:  # one token left: nothing to verify
            out = torch.cat([out, nxt], 1)
            break
        saved = cache_state(caches)
        pair = torch.cat([nxt, draft], 1)
        logits, h = hidden_cached(model, pair, caches, pos, torch.cat([out, pair], 1))
        drafted += 1
        if bool((logits[:, 0].argmax(-1) == draft[:, 0]).all()):
            accepted += 1
            new = logits[:, 1:].argmax(-1)
            out = torch.cat([out, pair], 1)
            draft = mtp_draft(model, h, torch.cat([draft, new], 1), mtp_caches, pos)
            pos += 2
        else:
            restore_cache_state(saved)
            logits, h = hidden_cached(model, nxt, caches, pos, torch.cat([out, nxt], 1))
            new = logits.argmax(-1)
            out = torch.cat([out, nxt], 1)
            draft = mtp_draft(model, h, new, mtp_caches, pos)
            pos += 1
        nxt = new
    model.speculative_stats = {"drafted": drafted, "accepted": accepted}
    return out[:, :total]


def cache_state(caches: list) -> list[tuple[object, dict]]:
    """The attributes of every decode-state object in ``caches`` (and of the objects they
    hold: entry stores, compressor states), dicts copied one level: enough to put a cache
    back, since caches replace their tensors or write past their old length."""
    saved, todo = [], [c for layer in caches if layer is not None for c in layer.values()]
    while todo:
        obj = todo.pop()
        attrs = {k: dict(v) if isinstance(v, dict) else v for k, v in vars(obj).items()}
        saved.append((obj, attrs))
        todo += [v for v in attrs.values()
                 if hasattr(v, "__dict__") and not isinstance(v, (torch.Tensor, nn.Module))]
    return saved


def restore_cache_state(saved: list[tuple[object, dict]]) -> None:
    """Put back the attributes :func:`cache_state` recorded."""
    for obj, attrs in saved:
        vars(obj).update(attrs)
