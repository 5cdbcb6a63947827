"""Token-level sparse attention (DeepSeek Sparse Attention style): the lightning indexer,
causal top-k selection, the indexer's KL loss and its recall.

The indexer scores every earlier token s for each query t with a few cheap heads j:

    I(t, s) = sum_j w(t, j) * ReLU(qI(t, j) . kI(s) / sqrt(d_I))

queries qI from the query latent, one key head kI shared by all indexer heads (LayerNorm,
then RoPE on its first ``index_rope_dim`` dims), per-head weights w from the hidden state
(scaled by 1/sqrt(n_heads)). Each query keeps its top-k tokens. Ties (the ReLU makes
exact zeros common) are broken towards the lower index by :func:`select_topk`, so the
same scores always give the same selection, whatever the tensor shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.modules.args import SparseConfig
from v4lab.modules.context import ForwardContext
from v4lab.modules.rope import apply_rope


class LightningIndexer(nn.Module):
    """Scores I(t, s) of keys s for queries t.

    x: [B, T, dim] hidden state; qr: [B, T, q_dim] query latent (or x when queries are
    full rank). ``keys`` -> [B, T, d_I]; ``queries`` -> (q [B, T, H_I, d_I], w [B, T, H_I]);
    ``scores(q, w, k [B, S, d_I])`` -> [B, T, S].
    """

    def __init__(self, dim: int, q_dim: int, cfg: SparseConfig, rope_theta: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.rope_theta = cfg.index_rope_dim, rope_theta
        self.wq = nn.Linear(q_dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.weights_proj = nn.Linear(dim, self.n_heads, bias=False)
        # MXFP4 fake quantiser of q and k (set by v4lab.modules.fp4 under trainer.quantize)
        self.qk_quant: nn.Module | None = None

    def _rope(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.rope_dim == 0:
            return x
        cos, sin = ctx.rope(self.rope_dim, self.rope_theta)
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim:]
        return torch.cat([apply_rope(rot, cos, sin), rest], -1)

    def keys(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self._rope(self.k_norm(self.wk(x)), ctx)

    def queries(self, x: torch.Tensor, qr: torch.Tensor,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self._rope(self.wq(qr).view(b, t, self.n_heads, self.head_dim), ctx)
        w = self.weights_proj(x) * self.n_heads ** -0.5
        return q, w

    def scores(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        qs, k = self._scaled(q, k)
        if torch.is_grad_enabled() and not torch.is_autocast_enabled(q.device.type):
            return _WeightedReluScores.apply(qs, k, w)
        return _weighted_relu_scores(qs, k, w)[0]

    def causal_scores(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """:meth:`scores` of a whole sequence (q, k at the same T positions) where only the
        causal part s <= t is used: blocks of queries score only the keys up to their last
        position (about 5/8 of the work at T = 4 blocks). Entries s > t are 0 or scores."""
        if torch.is_autocast_enabled(q.device.type):
            return self.scores(q, w, k)
        qs, k = self._scaled(q, k)
        return _CausalWeightedReluScores.apply(qs, k, w, max(64, q.shape[1] // 8))

    def _scaled(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qs [B, T*H_I, d] = q / sqrt(d), and k in q's dtype (both MXFP4-rounded if set)."""
        b, t, h, d = q.shape
        if self.qk_quant is not None:  # the RoPE'd q and k, as they enter the matmul
            q, k = self.qk_quant(q), self.qk_quant(k)
        return q.reshape(b, t * h, d) * d ** -0.5, k.to(q.dtype)


def _weighted_relu_scores(qs: torch.Tensor, k: torch.Tensor,
                          w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """I = sum_j w_j ReLU(qs_j . k): qs [B, T*H, d] (scaled), k [B, S, d], w [B, T, H]
    -> (I [B, T, S], ReLU(qs k^T) [B, T, H, S])."""
    b, t, h = w.shape
    qk = torch.matmul(qs, k.transpose(1, 2)).relu_().view(b, t, h, -1)  # [B, T, H_I, S]
    return torch.matmul(w.unsqueeze(-2), qk).squeeze(-2), qk


class _WeightedReluScores(torch.autograd.Function):
    """:func:`_weighted_relu_scores` with a hand-written backward: the same products as
    autograd's, but the gradient of the per-head scores, w_j g(t, s) where the ReLU passed,
    comes from one broadcast product instead of a batch of [H, 1] x [1, S] matrix products
    (the same values: each is one multiplication)."""

    @staticmethod
    def forward(ctx, qs: torch.Tensor, k: torch.Tensor,  # type: ignore[override]
                w: torch.Tensor) -> torch.Tensor:
        scores, qk = _weighted_relu_scores(qs, k, w)
        ctx.save_for_backward(qs, k, w, qk)
        return scores

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        qs, k, w, qk = ctx.saved_tensors
        b, t, h, s = qk.shape
        grad_w = torch.matmul(grad.unsqueeze(-2), qk.transpose(-1, -2)).squeeze(-2)
        grad_qk = torch.ops.aten.threshold_backward(w.unsqueeze(-1) * grad.unsqueeze(-2), qk, 0)
        grad_qk = grad_qk.view(b, t * h, s)
        return grad_qk @ k, grad_qk.transpose(1, 2) @ qs, grad_w


class _CausalWeightedReluScores(torch.autograd.Function):
    """:class:`_WeightedReluScores` by blocks of ``chunk`` queries, each against the keys up
    to its block's end only (square causal scores; the rest of the output is 0). Exact
    where s <= t; the key gradient sums the blocks' parts (round-off differs from one
    product). Every later use of s > t masks it (-inf / -1e30), so its gradient there is 0.
    """

    @staticmethod
    def forward(ctx, qs: torch.Tensor, k: torch.Tensor, w: torch.Tensor,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        b, t, h = w.shape
        out = qs.new_zeros(b, t, k.shape[1])
        qks = []
        for c0 in range(0, t, chunk):
            c1 = min(t, c0 + chunk)
            out[:, c0:c1, :c1], qk = _weighted_relu_scores(qs[:, c0 * h: c1 * h], k[:, :c1],
                                                           w[:, c0:c1])
            qks.append(qk)
        ctx.save_for_backward(qs, k, w, *qks)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        qs, k, w, *qks = ctx.saved_tensors
        b, t, h = w.shape
        grad_qs, grad_k, grad_w = torch.empty_like(qs), torch.zeros_like(k), torch.empty_like(w)
        for i, c0 in enumerate(range(0, t, ctx.chunk)):
            c1 = min(t, c0 + ctx.chunk)
            g = grad[:, c0:c1, :c1]
            grad_w[:, c0:c1] = torch.matmul(g.unsqueeze(-2), qks[i].transpose(-1, -2)).squeeze(-2)
            gq = torch.ops.aten.threshold_backward(w[:, c0:c1].unsqueeze(-1) * g.unsqueeze(-2),
                                                   qks[i], 0).view(b, (c1 - c0) * h, c1)
            grad_qs[:, c0 * h: c1 * h] = gq @ k[:, :c1]
            grad_k[:, :c1] += gq.transpose(1, 2) @ qs[:, c0 * h: c1 * h]
        return grad_qs, grad_k, grad_w, None


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row, [..., 1]: the smallest of an unsorted top-k (the
    same value as a sorted top-k's last; about 40% cheaper on CPU, which sorts otherwise)."""
    return scores.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask [..., S] with exactly ``min(k, S)`` True per row: the largest scores,
    ties at the k-th value taken in index order (deterministic). Masked entries should be
    -inf; they are picked only when a row has fewer than k finite scores."""
    k = min(k, scores.shape[-1])
    thr = kth_largest(scores, k)
    above = scores > thr
    tied = scores == thr
    need = k - above.sum(-1, keepdim=True, dtype=torch.int32)
    return above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= need))


def select_topk_causal(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``select_topk(scores, k) & causal`` for square causal scores [B, T, T] (-inf above
    the diagonal), without ranking the first k rows: query t < k sees at most k keys and
    keeps all of them; a later query sees more than k finite scores, so its top k are causal.
    """
    t = scores.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=scores.device).tril()
    if k >= t:
        return causal.expand_as(scores)
    head = causal[:k].expand(scores.shape[0], k, t)
    return torch.cat([head, select_topk(scores[:, k:], k)], 1)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., min(k, S)] of :func:`select_topk`'s selection (in no fixed order).

    Fast path: when no tie straddles the k-th place (the k-th and (k+1)-th largest
    differ in every row) the top-k set is unique and ``topk`` alone gives it."""
    s = scores.shape[-1]
    if k < s:
        vals, idx = scores.topk(k + 1, dim=-1)
        if bool((vals[..., k - 1] != vals[..., k]).all()):
            return idx[..., :k]
    k = min(k, s)
    return select_topk(scores, k).nonzero()[:, -1].view(*scores.shape[:-1], k)


def head_summed_distribution(probs: torch.Tensor) -> torch.Tensor:
    """Main attention probs [B, H, T, S] -> summed over heads, L1-normalised [B, T, S]."""
    p = probs.sum(1)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


class _IndexerKL(torch.autograd.Function):
    """Mean over rows of KL(target || softmax(scores + bias)), gradient to scores only.

    One log-softmax forward; the backward is the closed form (softmax(I) sum(target) -
    target) / rows, which autograd would otherwise reach through two masked copies, an
    xlogy and the log-softmax backward. Masked keys score -1e30 (:func:`mask_bias`), the
    same softmax as -inf, so the zero targets there need no second mask.
    """

    @staticmethod
    def forward(ctx, target: torch.Tensor, scores: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor) -> torch.Tensor:
        masked = scores + bias
        log_q = F.log_softmax(masked, dim=-1)
        # target log target: 0 at target = 0 (the floor keeps log out of its slow path at 0;
        # it changes only subnormal targets, by less than 1e-36 each)
        log_t = target.clamp_min(torch.finfo(target.dtype).tiny).log()
        ctx.save_for_backward(target, masked)
        ctx.scores_dtype = scores.dtype
        return (target * (log_t - log_q)).sum(-1).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        target, masked = ctx.saved_tensors
        rows = masked.numel() // masked.shape[-1]
        # softmax, not exp(log q): CPU exp of the masked entries takes a slow path
        g = (masked.softmax(-1) * target.sum(-1, keepdim=True) - target) * (grad / rows)
        return None, g.to(ctx.scores_dtype), None


def mask_bias(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive bias of a boolean mask: 0 where True, -1e30 where False (in ``dtype``).

    A finite stand-in for -inf: added to scores of ordinary size it gives -1e30, whose exp
    (after subtracting any row maximum) is exactly 0, as -inf's is; so softmax, attention
    and the KL see the same distribution (rows keep at least one True). Built with
    arithmetic, because masked_fill / where over a mask of irregular pattern (a top-k
    selection) are several times slower on CPU than a vectorised pass."""
    return mask.float().sub_(1.0).mul_(1e30).to(dtype)


def indexer_kl_biased(target: torch.Tensor, index_scores: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """:func:`indexer_kl` with the keys given as :func:`mask_bias` of the mask."""
    return _IndexerKL.apply(target.detach(), index_scores, bias)


def indexer_kl(target: torch.Tensor, index_scores: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target || softmax(I)) restricted to ``mask``.

    target: [B, T, S] distribution over the masked keys (zero elsewhere, detached);
    index_scores: [B, T, S]; mask: [B, T, S] or [T, S] bool (keys each query may use).
    The gradient reaches ``index_scores`` only.
    """
    return indexer_kl_biased(target, index_scores, mask_bias(mask, index_scores.dtype))


@torch.no_grad()
def recall(main_probs: torch.Tensor, selected: torch.Tensor, causal: torch.Tensor,
           topk: int) -> torch.Tensor:
    """Fraction of the main attention's own top-k keys (per query) the indexer selected.

    main_probs: [B, T, S] dense head-summed main attention; selected: [B, T, S] bool
    indexer selection; causal: [T, S] bool. Counts only queries that see more than
    ``topk`` keys (for the others every key is selected); 1.0 when there are none.
    Returns a 0-d tensor (no host sync; ``causal`` is a host-side mask of the shape).
    """
    visible = causal.sum(-1)  # [T]
    rows = (visible > topk).nonzero().flatten()  # host-side: causal is a mask of the shape
    if rows.numel() == 0:
        return torch.ones((), device=main_probs.device)
    if int(rows[-1] - rows[0]) + 1 == rows.numel():  # a range (causal): views, no copies
        rows = slice(int(rows[0]), int(rows[-1]) + 1)
    main_probs, selected, causal = main_probs[:, rows], selected[:, rows], causal[rows]
    main_sel = select_topk(main_probs.masked_fill(~causal, float("-inf")), topk) & causal
    hit = (main_sel & selected).sum(-1).float()  # [B, rows]
    return (hit / topk).mean()
