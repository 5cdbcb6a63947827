"""Top-k selection, the indexer KL and recall against naive computations."""

from __future__ import annotations

import math

import torch

from v4lab.modules.args import SparseConfig
from v4lab.modules.sparse import (
    LightningIndexer,
    indexer_kl,
    recall,
    select_topk,
    select_topk_causal,
    topk_indices,
)


def naive_select(row: list[float], k: int) -> set[int]:
    return set(sorted(range(len(row)), key=lambda s: (-row[s], s))[:k])


def test_select_topk_ties_go_to_lower_index_and_count_is_exact():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-2, 3, (3, 7, 11), generator=g).float()  # many ties
    scores[0, 0, 5:] = float("-inf")  # fewer finite scores than k in one row
    distinct = torch.randn(3, 7, 11, generator=g)  # no ties: the topk fast path
    for k in (1, 4, 10):
        for b in range(3):
            for t in range(7):
                want = naive_select(distinct[b, t].tolist(), k)
                assert set(topk_indices(distinct, k)[b, t].tolist()) == want
    for k in (1, 4, 11, 20):
        mask = select_topk(scores, k)
        assert torch.equal(mask.sum(-1), torch.full((3, 7), min(k, 11)))
        idx = topk_indices(scores, k)
        for b in range(3):
            for t in range(7):
                want = naive_select(scores[b, t].tolist(), k)
                assert set(torch.nonzero(mask[b, t]).flatten().tolist()) == want
                assert set(idx[b, t].tolist()) == want


def test_selection_does_not_depend_on_row_length():
    """The decode path sees a row of length t+1, training a row of length T with -inf after t."""
    row = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 0.0])
    padded = torch.cat([row, torch.full((4,), float("-inf"))])
    assert torch.equal(select_topk(row, 4), select_topk(padded, 4)[:6])


def test_indexer_kl_matches_naive():
    g = torch.Generator().manual_seed(1)
    t = 5
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = causal & (torch.rand(2, t, t, generator=g) > 0.3)
    mask[:, torch.arange(t), torch.arange(t)] = True
    p = torch.rand(2, t, t, generator=g) * mask
    p = p / p.sum(-1, keepdim=True)
    scores = torch.randn(2, t, t, generator=g)
    kls = []
    for b in range(2):
        for i in range(t):
            keys = [s for s in range(t) if mask[b, i, s]]
            z = sum(math.exp(scores[b, i, s]) for s in keys)
            kls.append(sum(float(p[b, i, s])
                           * math.log(float(p[b, i, s]) / (math.exp(scores[b, i, s]) / z))
                           for s in keys if p[b, i, s] > 0))
    assert math.isclose(float(indexer_kl(p, scores, mask)), sum(kls) / len(kls), rel_tol=1e-5)
    assert float(indexer_kl(p, torch.log(p + 1e-30), mask)) < 1e-4


def test_recall_matches_naive():
    g = torch.Generator().manual_seed(2)
    t, k = 8, 3
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = torch.rand(1, t, t, generator=g) * causal
    noise = torch.randn(1, t, t, generator=g).masked_fill(~causal, float("-inf"))
    sel = select_topk(noise, k) & causal
    hits = []
    for i in range(k, t):  # queries that see more than k keys
        main = naive_select(probs[0, i, : i + 1].tolist(), k)
        hits.append(len(main & set(torch.nonzero(sel[0, i]).flatten().tolist())) / k)
    assert math.isclose(recall(probs, sel, causal, k), sum(hits) / len(hits), rel_tol=1e-6)
    own = select_topk(probs.masked_fill(~causal, float("-inf")), k) & causal
    assert recall(probs, own, causal, k) == 1.0
    assert recall(probs, sel, causal, t) == 1.0  # nothing to select: trivially complete


def test_causal_selection_equals_masked_selection():
    """select_topk_causal skips ranking the first k rows: the same mask as ranking them."""
    g = torch.Generator().manual_seed(3)
    t = 12
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for scores in (torch.randn(2, t, t, generator=g),
                   torch.randint(0, 3, (2, t, t), generator=g).float()):  # many ties
        masked = scores.masked_fill(~causal, float("-inf"))
        for k in (1, 3, 5, 11, 12, 20):
            want = select_topk(masked, k) & causal
            assert torch.equal(select_topk_causal(masked, k), want)


def test_indexer_kl_gradient_matches_autograd_of_the_definition():
    """The closed-form backward equals autograd through log_softmax of the masked scores;
    only the scores get a gradient."""
    g = torch.Generator().manual_seed(4)
    t = 6
    mask = torch.ones(t, t, dtype=torch.bool).tril() & (torch.rand(2, t, t, generator=g) > 0.4)
    mask[:, torch.arange(t), torch.arange(t)] = True
    p = torch.rand(2, t, t, generator=g, dtype=torch.float64) * mask
    p = p / p.sum(-1, keepdim=True)
    scores = torch.randn(2, t, t, generator=g, dtype=torch.float64, requires_grad=True)
    indexer_kl(p, scores, mask).backward()
    ref = scores.detach().clone().requires_grad_(True)
    log_q = torch.log_softmax(ref.masked_fill(~mask, float("-inf")), -1).masked_fill(~mask, 0.0)
    (torch.xlogy(p, p) - p * log_q).sum(-1).mean().backward()
    torch.testing.assert_close(scores.grad, ref.grad, atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda s: indexer_kl(p, s, mask), (scores.detach().requires_grad_(),))


def _scores_against_formula(seed: int, t: int, h: int, d: int, causal_blocks: bool) -> None:
    """The indexer's scores (``scores`` or ``causal_scores``) against autograd of the formula
    I(t, s) = sum_j w(t, j) ReLU(q(t, j) . k(s) / sqrt(d)) written as one einsum, in float64:
    values and gradients; with ``causal_blocks`` only where s <= t (the rest is never read)."""
    g = torch.Generator().manual_seed(seed)
    b = 2
    idx = LightningIndexer(16, 16, SparseConfig(index_n_heads=h, index_head_dim=d,
                                                index_rope_dim=0), 10000.0)
    q, w, k = (torch.randn(*s, generator=g, dtype=torch.float64)
               for s in ((b, t, h, d), (b, t, h), (b, t, d)))
    leaves = [x.clone().requires_grad_(True) for x in (q, w, k)]
    got = (idx.causal_scores if causal_blocks else idx.scores)(*leaves)
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, w, k)]
    rq, rw, rk = ref_leaves
    ref = (torch.einsum("bthd,bsd->bths", rq, rk) / math.sqrt(d)).relu()
    ref = (ref * rw.unsqueeze(-1)).sum(-2)
    keep = torch.ones(t, t, dtype=torch.bool)
    if causal_blocks:
        keep = keep.tril()
    torch.testing.assert_close(got * keep, ref * keep, atol=1e-12, rtol=1e-10)
    up = torch.randn(b, t, t, generator=g, dtype=torch.float64) * keep
    (got * up).sum().backward()
    (ref * up).sum().backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-12, rtol=1e-10)


def test_index_scores_values_and_gradients_match_the_formula():
    """Through the indexer's hand-written backward (scores of every pair)."""
    _scores_against_formula(5, t=7, h=3, d=8, causal_blocks=False)


def test_causal_index_scores_match_the_formula_where_causal():
    """causal_scores (blocks of 64 queries against the keys up to their block's end; three
    blocks here) equals the formula for s <= t, and so do the gradients of any loss that
    reads only s <= t."""
    _scores_against_formula(6, t=150, h=2, d=4, causal_blocks=True)
