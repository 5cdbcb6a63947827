"""MLA, sparse MLA, VVPA and the quantised cache against naive computations, and the
decode paths against the training path."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, KVCacheConfig, SparseConfig
from v4lab.modules.context import ForwardContext
from v4lab.modules.mla import MultiHeadLatentAttention

DIM, THETA, EPS = 48, 10000.0, 1e-6


def attn_cfg(sparse: bool = False, vvpa: bool = False, kv: str = "fp32", topk: int = 4,
             scale_format: str = "fp32", q_lora_rank: int = 24, warmup: int = 3) -> AttentionConfig:
    return AttentionConfig(
        kind="mla", n_heads=2, q_lora_rank=q_lora_rank, kv_lora_rank=128, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, vvpa=vvpa,
        kv_cache=KVCacheConfig(dtype=kv, scale_format=scale_format),
        sparse=SparseConfig(enabled=sparse, topk=topk, index_n_heads=2, index_head_dim=8,
                            index_rope_dim=4, warmup_steps=warmup))


def make_mla(cfg: AttentionConfig, seed: int = 0, std: float = 0.3) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(DIM, cfg, THETA, EPS)
    with torch.no_grad():  # larger weights than the LM init: sharp, position-dependent attention
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


def ctx_for(t: int, start: int = 0, step: int | None = None) -> ForwardContext:
    return ForwardContext(positions=torch.arange(start, start + t), step=step)


# ---- independent naive reference ------------------------------------------------------
def rot(v: torch.Tensor, pos: float, theta: float = THETA) -> torch.Tensor:
    """Half-split rotary rotation of a 1-d vector by pos (naive, float64 angles)."""
    d = v.shape[-1]
    out = v.clone()
    for i in range(d // 2):
        a = pos * theta ** (-2 * i / d)
        c, s = math.cos(a), math.sin(a)
        out[..., i] = v[..., i] * c - v[..., i + d // 2] * s
        out[..., i + d // 2] = v[..., i] * s + v[..., i + d // 2] * c
    return out


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + EPS) * w


def naive_mla(m: MultiHeadLatentAttention, x: torch.Tensor, positions: list[int],
              keep=None) -> torch.Tensor:
    """Per-query, per-head MLA straight from the definitions (fp32 cache numerics).

    keep(b, t, s) -> bool restricts the keys of query t (sparse attention)."""
    B, T, _ = x.shape
    H, dn, dr, dv, r = m.n_heads, m.dn, m.dr, m.dv, m.kv_lora_rank
    out = torch.zeros(B, T, H * m.out_head_dim)
    for b in range(B):
        ckv, krope = [], []
        for s in range(T):
            kv = x[b, s] @ m.wkv_a.weight.T
            ckv.append(rms(kv[:r], m.kv_norm.weight))
            krope.append(rot(kv[r:], positions[s]))
        for t in range(T):
            qr = rms(x[b, t] @ m.wq_a.weight.T, m.q_norm.weight)
            q = (qr @ m.wq_b.weight.T).view(H, dn + dr)
            keys = [s for s in range(t + 1) if keep is None or keep(b, t, s)]
            for h in range(H):
                qn, qrope = q[h, :dn], rot(q[h, dn:], positions[t])
                scores, values, rvals = [], [], []
                for s in keys:
                    up = (ckv[s] @ m.wkv_b.weight.T).view(H, dn + dv)[h]
                    scores.append((qn @ up[:dn] + qrope @ krope[s]) / math.sqrt(dn + dr))
                    values.append(up[dn:])
                    rvals.append(krope[s])
                p = torch.softmax(torch.stack(scores), 0)
                o = (p[:, None] * torch.stack(values)).sum(0)
                if m.vvpa:
                    o_rope = rot((p[:, None] * torch.stack(rvals)).sum(0), -positions[t])
                    o = torch.cat([o, o_rope])
                out[b, t, h * m.out_head_dim:(h + 1) * m.out_head_dim] = o
    return out @ m.wo.weight.T


def naive_index_scores(m: MultiHeadLatentAttention, x: torch.Tensor,
                       positions: list[int]) -> torch.Tensor:
    """I(t, s) = sum_j w(t,j) relu(qI(t,j) . kI(s) / sqrt(d)) with LayerNorm + partial RoPE."""
    ix = m.indexer
    B, T, _ = x.shape
    nh, d, rd = ix.n_heads, ix.head_dim, ix.rope_dim
    out = torch.zeros(B, T, T)

    def prot(v, pos):
        return torch.cat([rot(v[:rd], pos), v[rd:]])

    for b in range(B):
        ks = []
        for s in range(T):
            k = x[b, s] @ ix.wk.weight.T
            k = (k - k.mean()) / torch.sqrt(k.var(unbiased=False) + ix.k_norm.eps)
            ks.append(prot(k * ix.k_norm.weight + ix.k_norm.bias, positions[s]))
        for t in range(T):
            qr = rms(x[b, t] @ m.wq_a.weight.T, m.q_norm.weight)
            q = (qr @ ix.wq.weight.T).view(nh, d)
            w = (x[b, t] @ ix.weights_proj.weight.T) / math.sqrt(nh)
            for s in range(T):
                qs = [prot(q[j], positions[t]) for j in range(nh)]
                out[b, t, s] = sum(w[j] * torch.relu(qs[j] @ ks[s] / math.sqrt(d))
                                   for j in range(nh))
    return out


def naive_topk(scores_row: list[float], k: int) -> set[int]:
    """k largest, ties to the lower index."""
    order = sorted(range(len(scores_row)), key=lambda s: (-scores_row[s], s))
    return set(order[:k])


# ---- training path against the naive definition ---------------------------------------
@pytest.mark.parametrize("vvpa", [False, True])
def test_training_path_matches_naive_mla(vvpa):
    m = make_mla(attn_cfg(vvpa=vvpa))
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        got = m(x, ctx_for(7))
        want = naive_mla(m, x, list(range(7)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_vvpa_off_is_plain_mla_and_on_differs():
    m_off = make_mla(attn_cfg(vvpa=False))
    m_on = make_mla(attn_cfg(vvpa=True))
    x = torch.randn(1, 6, DIM)
    with torch.no_grad():
        assert m_off.wo.in_features == 2 * 12 and m_on.wo.in_features == 2 * (12 + 8)
        # VVPA on, with W_O's rotary columns zeroed, is exactly plain MLA with the same weights
        m_on.load_state_dict({k: v for k, v in m_off.state_dict().items() if k != "wo.weight"},
                             strict=False)
        w = m_on.wo.weight.view(DIM, 2, 20).clone()
        w[:, :, :12] = m_off.wo.weight.view(DIM, 2, 12)
        w[:, :, 12:] = 0
        m_on.wo.weight.copy_(w.view(DIM, 40))
        torch.testing.assert_close(m_on(x, ctx_for(6)), m_off(x, ctx_for(6)), atol=1e-6, rtol=0)
        w[:, :, 12:] = 0.3
        m_on.wo.weight.copy_(w.view(DIM, 40))
        assert (m_on(x, ctx_for(6)) - m_off(x, ctx_for(6))).abs().max() > 1e-2


@pytest.mark.parametrize("sparse", [False, True])
def test_vvpa_invariant_to_position_shift(sparse):
    m = make_mla(attn_cfg(vvpa=True, sparse=sparse, topk=3))
    x = torch.randn(2, 9, DIM)
    with torch.no_grad():
        a = m(x, ctx_for(9, start=0))
        b = m(x, ctx_for(9, start=1000))
        plain = make_mla(attn_cfg(vvpa=False, sparse=sparse, topk=3))
        c = plain(x, ctx_for(9, start=0))
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert (a - c).abs().max() > 1e-2  # VVPA did change the output


def test_vvpa_value_carries_relative_position():
    """Without VVPA a position shift of one key alone leaves values blind to position;
    with VVPA the rotary value part makes the output depend on s - t (naive check above),
    so moving the query relative to the keys changes the rotary output."""
    m = make_mla(attn_cfg(vvpa=True))
    x = torch.randn(1, 5, DIM)
    with torch.no_grad():
        a = m(x, ForwardContext(positions=torch.tensor([0, 1, 2, 3, 4])))
        b = m(x, ForwardContext(positions=torch.tensor([0, 1, 2, 3, 9])))
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4], b[:, 4], atol=1e-3)


# ---- decode paths -----------------------------------------------------------------------
@pytest.mark.parametrize("vvpa,sparse,q_lora_rank", [
    (False, False, 24), (True, False, 24), (False, True, 24), (True, True, 24), (True, True, 0)])
def test_absorbed_decode_matches_training_path(vvpa, sparse, q_lora_rank):
    m = make_mla(attn_cfg(vvpa=vvpa, sparse=sparse, topk=3, q_lora_rank=q_lora_rank))
    x = torch.randn(2, 10, DIM)
    with torch.no_grad():
        train = m(x, ctx_for(10))
        # (a) prefill of the empty cache (dense: the fused training-path shortcut), then steps
        cache = m.new_cache(2, 10)
        prefill = m(x[:, :4], ctx_for(4), cache)
        steps = [m(x[:, i:i + 1], ctx_for(1, start=i), cache) for i in range(4, 10)]
        # (b) one token, then a multi-token chunk through the absorbed path (causal mask)
        cache_b = m.new_cache(2, 10)
        first = m(x[:, :1], ctx_for(1), cache_b)
        chunk = m(x[:, 1:4], ctx_for(3, start=1), cache_b)
        steps_b = [m(x[:, i:i + 1], ctx_for(1, start=i), cache_b) for i in range(4, 10)]
    assert train.abs().max() > 1  # outputs of order one: the tolerance below is tight
    torch.testing.assert_close(torch.cat([prefill] + steps, 1), train, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([first, chunk] + steps_b, 1), train, atol=3e-5, rtol=1e-4)


def test_sparse_training_path_matches_naive_selection():
    m = make_mla(attn_cfg(sparse=True, topk=3))
    x = torch.randn(2, 8, DIM)
    pos = list(range(8))
    with torch.no_grad():
        scores = naive_index_scores(m, x, pos)
        got_scores = m.indexer.scores(*m.indexer.queries(x, m.q_norm(m.wq_a(x)), ctx_for(8)),
                                      m.indexer.keys(x, ctx_for(8)))
        torch.testing.assert_close(got_scores, scores, atol=1e-5, rtol=1e-4)
        sel = {(b, t): naive_topk(scores[b, t, : t + 1].tolist(), 3)
               for b in range(2) for t in range(8)}
        want = naive_mla(m, x, pos, keep=lambda b, t, s: s in sel[(b, t)])
        got = m(x, ctx_for(8))  # step None: final (sparse) mode
        dense = naive_mla(m, x, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - dense).abs().max() > 1e-3  # the selection really removed keys


def test_sparse_with_full_topk_equals_dense_exactly():
    dense = make_mla(attn_cfg(sparse=False, vvpa=True, kv="fp8"))
    sparse = make_mla(attn_cfg(sparse=True, vvpa=True, kv="fp8", topk=12))
    sparse.load_state_dict(dense.state_dict(), strict=False)
    x = torch.randn(2, 12, DIM)
    with torch.no_grad():
        assert torch.equal(sparse(x, ctx_for(12)), dense(x, ctx_for(12)))
        cd, cs = dense.new_cache(2, 12), sparse.new_cache(2, 12)
        for i in range(12):
            assert torch.equal(sparse(x[:, i:i + 1], ctx_for(1, i), cs),
                               dense(x[:, i:i + 1], ctx_for(1, i), cd))


def test_sparse_decode_gathers_only_topk():
    m = make_mla(attn_cfg(sparse=True, topk=3))
    cache = m.new_cache(1, 16)
    x = torch.randn(1, 16, DIM)
    calls = []
    orig_gather, orig_latent = cache.gather, cache.latent
    cache.gather = lambda idx, dtype: calls.append(("gather", idx.shape)) or orig_gather(idx, dtype)
    cache.latent = lambda end, dtype: calls.append(("latent", end)) or orig_latent(end, dtype)
    with torch.no_grad():
        m(x[:, :3], ctx_for(3), cache)  # 3 keys <= topk: dense path
        m(x[:, 3:4], ctx_for(1, 3), cache)
    assert calls == [("latent", 3), ("gather", torch.Size([1, 1, 3]))]


# ---- sparse training phases -------------------------------------------------------------
def test_sparse_phases_losses_and_gradients():
    m = make_mla(attn_cfg(sparse=True, topk=3, warmup=5))
    dense = make_mla(attn_cfg(sparse=False))
    dense.load_state_dict(m.state_dict(), strict=False)
    x = torch.randn(2, 10, DIM)
    indexer = {n for n, _ in m.named_parameters() if n.startswith("indexer.")}
    for step, is_dense in [(0, True), (4, True), (5, False), (50, False)]:
        ctx = ctx_for(10, step=step)
        out = m(x, ctx)
        assert torch.equal(out, dense(x, ctx_for(10))) == is_dense
        assert set(ctx.aux_losses) == {"sparse/indexer_kl"}
        stats = ctx.mean_stats()
        assert set(stats) == {"sparse/indexer_kl", "sparse/recall"}
        assert 0.0 <= stats["sparse/recall"] <= 1.0 and stats["sparse/indexer_kl"] >= 0
        # the LM output never reaches the indexer ...
        m.zero_grad()
        out.square().sum().backward(retain_graph=True)
        for n, p in m.named_parameters():
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (n not in indexer), n
        # ... and the KL reaches only the indexer (its input is detached)
        m.zero_grad()
        ctx.aux_losses["sparse/indexer_kl"].backward()
        for n, p in m.named_parameters():
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in indexer), n
    with torch.no_grad():  # plain inference: nothing logged
        ctx = ctx_for(10)
        m(x, ctx)
        assert ctx.aux_losses == {} and ctx.stats == {}


def test_indexer_kl_value_in_both_phases():
    """The logged KL equals KL(p || softmax(I)) computed naively: over all causal keys
    with the dense attention in warm-up, over the selected keys in the sparse phase."""
    m = make_mla(attn_cfg(sparse=True, topk=3, warmup=1))
    x = torch.randn(1, 6, DIM)
    pos = list(range(6))
    with torch.no_grad():
        scores = naive_index_scores(m, x, pos)
        H, dn, dv = m.n_heads, m.dn, m.dv
        qr = m.q_norm(m.wq_a(x))
        q = m.wq_b(qr).view(1, 6, H, -1)
        kv = m.wkv_a(x)
        c, kr_raw = m.kv_norm(kv[..., :128]), kv[..., 128:]
        up = m.wkv_b(c).view(1, 6, H, dn + dv)
        for step in (0, 1):
            kls = []
            for t in range(6):
                keys = list(range(t + 1)) if step == 0 else sorted(
                    naive_topk(scores[0, t, : t + 1].tolist(), 3))
                p = torch.zeros(len(keys))
                for h in range(H):
                    lg = torch.stack([
                        (q[0, t, h, :dn] @ up[0, s, h, :dn]
                         + rot(q[0, t, h, dn:], t) @ rot(kr_raw[0, s], s)) / math.sqrt(dn + m.dr)
                        for s in keys])
                    p += torch.softmax(lg, 0)
                p /= p.sum()
                logq = torch.log_softmax(scores[0, t, keys], 0)
                kls.append((p * (p.log() - logq)).sum())
            ctx = ctx_for(6, step=step)
            m(x, ctx)
            assert math.isclose(ctx.mean_stats()["sparse/indexer_kl"],
                                float(torch.stack(kls).mean()), rel_tol=1e-4, abs_tol=1e-6)


# ---- whole model: token-by-token decoding == full forward ------------------------------
COMBOS = [("mha", False, False, kv) for kv in ("fp32", "bf16")] + [
    ("mla", sp, vv, kv) for sp, vv, kv in
    itertools.product([False, True], [False, True], ["fp32", "bf16", "fp8", "int8"])] + [
    ("mla", True, True, "fp8-ue8m0"), ("mla", True, False, "int8-ue8m0")]


def tiny_model(kind: str, sparse: bool, vvpa: bool, kv: str, seed: int = 0) -> Transformer:
    kv, _, scale_format = kv.partition("-")
    att = attn_cfg(sparse=sparse, vvpa=vvpa, kv=kv, topk=4, scale_format=scale_format or "fp32")
    att.kind, att.head_dim = kind, 24
    cfg = ModelConfig(vocab_size=97, dim=DIM, n_layers=2, ffn_dim=64, max_seq_len=64,
                      init_std=0.2, attention=att)
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _storage_step(stored: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """One grid step of the cache format at each stored value: [B, T, r] (fp32).

    int8: the block scale. e4m3: 2^(e - 3) * scale for a value of exponent e (3 mantissa
    bits), with e floored at -6 (subnormals)."""
    s = scale.float().repeat_interleave(stored.shape[-1] // scale.shape[-1], -1)
    if fmt == "int8":
        return s
    mag = (stored.abs() / s).clamp_min(2.0 ** -6)
    return torch.exp2(torch.floor(torch.log2(mag)) - 3) * s


def _forward_reading_stored_cache(m: Transformer, ids: torch.Tensor, caches: list[dict]):
    """The full forward with each MLA layer's cache rounding replaced by the values the
    decode cache actually stored. Returns (logits, [(own rounding, stored) per layer])."""
    t, pairs = ids.shape[1], []
    for blk, cache in zip(m.blocks, caches):
        own = blk.attn._cache_numerics

        def stored(c_kv, k_rope, own=own, cache=cache["attn"]):
            kv, kr = cache.latent(t, c_kv.dtype)
            pairs.append((own(c_kv, k_rope)[0], kv))
            return kv, kr

        blk.attn._cache_numerics = stored
    try:
        return m(ids), pairs
    finally:
        for blk in m.blocks:
            del blk.attn._cache_numerics


@pytest.mark.parametrize("kind,sparse,vvpa,kv", COMBOS)
def test_token_by_token_decoding_matches_full_forward(kind, sparse, vvpa, kv):
    m = tiny_model(kind, sparse, vvpa, kv)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
        caches = m.new_caches(2, 12)
        steps = [m.forward_cached(ids[:, i:i + 1], caches, i, history=ids[:, : i + 1])
                 for i in range(12)]
    decoded = torch.cat(steps, 1)
    # fp32 round-off only: logits of magnitude ~10 from sums of at most a few hundred fp32
    # products differ by well under 1e-5 between a batched and a one-row computation, so
    # 5e-5 (abs and rel) holds on any kernel set (AVX-512, AVX2, default).
    fp32_tol = 5e-5
    assert full.abs().max() > 1
    if kv.startswith("fp32") or kind == "mha":
        tol = fp32_tol if kv == "fp32" else 1e-3
        torch.testing.assert_close(decoded, full, atol=tol, rtol=tol)
    else:
        # A stored bf16/fp8/int8 value can differ between the two paths: the batched and the
        # one-row matmul round c_kv to different sides of a rounding boundary of the storage
        # format, and one grid step (1/127 of a block's max in int8) moves a logit by up to
        # ~3e-3. So compare against the full forward that reads the *same stored* values
        # (then only fp32 round-off is left), and bound the storage differences: rare, and
        # at most one grid step each.
        with torch.no_grad():
            same, pairs = _forward_reading_stored_cache(m, ids, caches)
        torch.testing.assert_close(decoded, same, atol=fp32_tol, rtol=fp32_tol)
        fmt = kv.partition("-")[0]
        for (own, stored), cache in zip(pairs, caches):
            # fp32 block scales (amax / 448) differ by round-off too, which moves every value
            # by ~1e-7 relative: a "moved" value is one that moved by more than that.
            differ = (own - stored).abs() > 1e-5 * stored.abs() + 1e-6
            assert differ.float().mean() <= 0.02, "more than 2% of stored cache values moved"
            if fmt in ("fp8", "int8"):
                step = _storage_step(stored, cache["attn"].scale[:, :12], fmt)
            else:  # bf16: 8 significant bits
                step = torch.exp2(torch.floor(torch.log2(stored.abs().clamp_min(1e-30))) - 7)
            # one step, plus the fp32 round-off of c_kv itself (RMS-normed, entries ~1: a
            # value near zero can be several of its own ulps away, but not 1e-5 absolute)
            assert ((own - stored).abs() <= step * 1.001 + 1e-5)[differ].all(), "moved > 1 step"
    if "ue8m0" in kv:
        assert caches[0]["attn"].scale.dtype == torch.float8_e8m0fnu
    out = m.generate(ids[:, :5], 4)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], ids[:, :5])
    # greedy generation picks the argmax of the full forward over its own output
    with torch.no_grad():
        assert torch.equal(m(out)[:, 4:-1].argmax(-1), out[:, 5:])


def test_model_kv_bytes_per_token_from_stored_tensors():
    for kind, sparse, vvpa, kv_name in COMBOS:
        m = tiny_model(kind, sparse, vvpa, kv_name)
        kv, _, scale_format = kv_name.partition("-")
        caches = m.new_caches(1, 4)
        if kind == "mha":
            want = 2 * 2 * 24 * {"fp32": 4, "bf16": 2}[kv]
        else:
            scale_bytes = 1 if scale_format == "ue8m0" else 4
            latent = {"fp32": 4 * 128, "bf16": 2 * 128, "fp8": 128 + scale_bytes,
                      "int8": 128 + scale_bytes}[kv]
            rope_bytes = 4 if kv == "fp32" else 2
            want = latent + rope_bytes * 8 + (rope_bytes * 8 if sparse else 0)
            att = caches[0]["attn"]
            assert att.kv.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16,
                                    "fp8": torch.float8_e4m3fn, "int8": torch.int8}[kv]
        assert m.kv_bytes_per_token(caches) == 2 * want, (kind, sparse, vvpa, kv_name)


def test_cache_stores_real_float8_after_decoding():
    m = tiny_model("mla", True, True, "fp8")
    ids = torch.randint(0, 97, (1, 6))
    caches = m.new_caches(1, 6)
    with torch.no_grad():
        m.forward_cached(ids, caches, 0)
    c = caches[0]["attn"]
    assert c.kv.dtype == torch.float8_e4m3fn and c.kv.element_size() == 1
    assert c.scale.dtype == torch.float32 and c.k_rope.dtype == torch.bfloat16
    assert c.kv[:, :6].float().abs().amax() == 448.0  # each block's largest value maps to 448


def test_fp8_training_numerics_match_cache_and_train():
    """Training sees exactly the fp8-rounded latent (vs an fp32 cache it differs) and the
    straight-through gradient reaches the latent projection."""
    m8 = make_mla(attn_cfg(kv="fp8", scale_format="ue8m0"))
    m32 = make_mla(attn_cfg(kv="fp32"))
    x = torch.randn(1, 6, DIM)
    out = m8(x, ctx_for(6))
    assert 1e-4 < (out - m32(x, ctx_for(6))).abs().max() < 0.2 * out.abs().max()
    out.sum().backward()
    assert m8.wkv_a.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dq,dv", [(24, 16), (16, 24), (16, 16)])
def test_causal_attention_padding_matches_naive(dq, dv):
    """The zero-padded fused SDPA call equals naive causal softmax attention, with gradients."""
    from v4lab.modules.mla import _causal_attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, dq, generator=g), torch.randn(2, 3, 7, dq, generator=g)
    v = torch.randn(2, 3, 7, dv, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _causal_attention(*leaves, 0.3)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    qr, kr, vr = ref_leaves
    s = (qr @ kr.transpose(-1, -2)) * 0.3
    s = s.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    ref = s.softmax(-1) @ vr
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(ref.shape, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_over_cache_match_naive(dtype):
    """Both formulations of q . keys (chosen by dtype) equal the naive per-pair sum."""
    from v4lab.modules.mla import _scores_over_cache

    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    out = _scores_over_cache(q.to(dtype), keys.to(dtype))
    qn, kn = q.to(dtype).double(), keys.to(dtype).double()
    ref = torch.tensor([[[[float((qn[b, t, h] * kn[b, s]).sum()) for s in range(5)]
                          for h in range(4)] for t in range(3)] for b in range(2)],
                       dtype=torch.float64)
    assert out.shape == (2, 3, 4, 5) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_biased_attention_matches_naive_and_gradcheck():
    """One score product serves the attention and the KL target: outputs and probabilities
    equal naive softmax attention under the bias (-1e30 off the selection, as mask_bias),
    and the hand-written backward passes gradcheck in float64 (finite differences)."""
    from v4lab.modules.mla import _BiasedAttention
    from v4lab.modules.sparse import mask_bias

    g = torch.Generator().manual_seed(0)
    b, h, t, dq, dv = 2, 3, 7, 5, 4
    q, k = (torch.randn(b, h, t, dq, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64)
    keep = (torch.rand(b, t, t, generator=g) < 0.6) & torch.ones(t, t, dtype=torch.bool).tril()
    keep |= torch.eye(t, dtype=torch.bool)  # every query keeps a key
    bias = mask_bias(keep, torch.float64)
    o, p = _BiasedAttention.apply(q, k, v, bias, 0.4)
    ref_p = ((q @ k.transpose(-1, -2)) * 0.4).masked_fill(~keep[:, None], float("-inf")).softmax(-1)
    torch.testing.assert_close(p, ref_p, atol=1e-12, rtol=0)
    torch.testing.assert_close(o, ref_p @ v, atol=1e-12, rtol=0)
    assert not p.requires_grad
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *a: _BiasedAttention.apply(*a, bias, 0.4)[0], leaves)
