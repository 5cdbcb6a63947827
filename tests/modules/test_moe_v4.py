"""DeepSeek-V4's MoE additions (modules/moe.py): hash routing and the SwiGLU clamp.

Against transformers' DeepseekV4TopKRouter / HashRouter / Experts / MLP / SparseMoeBlock
with copied weights, and against a float64 per-token loop of our own; the hash table's
determinism and checkpointing; the layers in the model (decode equals the full forward);
config errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from v4lab.errors import ConfigError
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, KVCacheConfig, MoEConfig
from v4lab.modules.context import ForwardContext
from v4lab.modules.ffn import SwiGLU
from v4lab.modules.moe import Gate, HashGate, MoE, hash_table

DIM, VOCAB, E, K, HID = 16, 50, 6, 2, 8


def moe_cfg(**kw) -> MoEConfig:
    base = dict(enabled=True, n_routed_experts=E, n_shared_experts=1, top_k=K, expert_dim=HID,
                first_dense_layers=0, score_func="sqrtsoftplus", route_scale=1.5,
                hash_layers=1, swiglu_limit=0.0)
    base.update(kw)
    cfg = MoEConfig(**base)
    cfg.validate("model.moe", 2)
    return cfg


def make_moe(hashed: bool = True, seed: int = 0, **kw) -> MoE:
    """Layer 0 is hash-routed (hash_layers=1), layer 1 is not."""
    torch.manual_seed(seed)
    moe = MoE(DIM, moe_cfg(**kw), layer_idx=0 if hashed else 1, vocab_size=VOCAB)
    with torch.no_grad():  # weights large enough that the clamp and the routing matter
        moe.gate.proj.weight.normal_(std=0.5)
        for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
            w.normal_(std=0.6)
        if moe.shared is not None:
            for lin in (moe.shared.w1, moe.shared.w3, moe.shared.w2):
                lin.weight.normal_(std=0.6)
        if not hashed:
            moe.gate.bias.copy_(torch.randn(E) * 0.1)
    return moe


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|: fp32 round-off of these sums is ~1e-7 of the scale."""
    a, b = a.detach().double(), b.detach().double()
    diff = float((a - b).abs().max()) / float(b.abs().max())
    print(f"max abs diff {float((a - b).abs().max()):.2e}, relative to max |ref| {diff:.2e}")
    return diff


def inputs(t: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, t, DIM, generator=g) * 2, torch.randint(0, VOCAB, (2, t), generator=g)


# ---- the reference ---------------------------------------------------------------------------
def v4_config(hashed: bool, limit: float):
    transformers = pytest.importorskip("transformers")
    return transformers.DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=DIM, moe_intermediate_size=HID, num_hidden_layers=1,
        num_attention_heads=2, head_dim=8, q_lora_rank=8, n_routed_experts=E,
        num_experts_per_tok=K, n_shared_experts=1, scoring_func="sqrtsoftplus",
        routed_scaling_factor=1.5, swiglu_limit=limit, o_groups=1, o_lora_rank=8,
        index_n_heads=2, index_head_dim=8, mlp_layer_types=["hash_moe" if hashed else "moe"])


def reference_block(moe: MoE, limit: float):
    """transformers' DeepseekV4SparseMoeBlock holding ``moe``'s weights."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    ref = DeepseekV4SparseMoeBlock(v4_config(moe.hashed, limit), 0)
    with torch.no_grad():
        ref.gate.weight.copy_(moe.gate.proj.weight)
        if moe.hashed:
            ref.gate.tid2eid.copy_(moe.gate.tid2eid)
        else:
            ref.gate.e_score_correction_bias.copy_(moe.gate.bias)
        w1, w3, w2 = moe.experts.w1, moe.experts.w3, moe.experts.w2
        ref.experts.gate_up_proj.copy_(torch.cat([w1.transpose(1, 2), w3.transpose(1, 2)], dim=1))
        ref.experts.down_proj.copy_(w2.transpose(1, 2))
        ref.shared_experts.gate_proj.weight.copy_(moe.shared.w1.weight)
        ref.shared_experts.up_proj.weight.copy_(moe.shared.w3.weight)
        ref.shared_experts.down_proj.weight.copy_(moe.shared.w2.weight)
    return ref


def by_expert(idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) with each row ordered by expert id (topk order is not part of
    the result: the reference asks for sorted=False)."""
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


@pytest.mark.peer
def test_topk_router_matches_transformers():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

    moe = make_moe(hashed=False)
    assert isinstance(moe.gate, Gate)
    ref = DeepseekV4TopKRouter(v4_config(False, 10.0))
    with torch.no_grad():
        ref.weight.copy_(moe.gate.proj.weight)
        ref.e_score_correction_bias.copy_(moe.gate.bias)
    x, _ = inputs(t=20)
    flat = x.reshape(-1, DIM)
    with torch.no_grad():
        _, w_ref, i_ref = ref(flat)
        gates, idx, _ = moe.gate(flat)
    i_ref, w_ref = by_expert(i_ref, w_ref)
    idx, gates = by_expert(idx, gates)
    assert torch.equal(idx, i_ref)
    assert float((gates - w_ref).abs().max()) < 1e-6  # same fp32 ops; gates are O(1)


@pytest.mark.peer
def test_hash_router_matches_transformers():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HashRouter

    moe = make_moe(hashed=True)
    assert isinstance(moe.gate, HashGate)
    ref = DeepseekV4HashRouter(v4_config(True, 10.0))
    with torch.no_grad():
        ref.weight.copy_(moe.gate.proj.weight)
        ref.tid2eid.copy_(moe.gate.tid2eid)
    x, ids = inputs(t=20)
    with torch.no_grad():
        _, w_ref, i_ref = ref(x, ids)
        gates, idx, _ = moe.gate(x.reshape(-1, DIM), ids.reshape(-1))
    assert torch.equal(idx, i_ref)
    assert float((gates - w_ref).abs().max()) < 1e-6


@pytest.mark.peer
@pytest.mark.parametrize("limit", [0.0, 1.0])
def test_mlp_and_experts_with_clamp_match_transformers(limit):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts, DeepseekV4MLP

    cfg = v4_config(False, limit if limit > 0 else float("inf"))
    moe = make_moe(hashed=False, swiglu_limit=limit)
    x, _ = inputs(t=20)
    flat = x.reshape(-1, DIM)
    ref_mlp = DeepseekV4MLP(cfg)
    ref_experts = reference_block(moe, cfg.swiglu_limit).experts
    with torch.no_grad():
        ref_mlp.gate_proj.weight.copy_(moe.shared.w1.weight)
        ref_mlp.up_proj.weight.copy_(moe.shared.w3.weight)
        ref_mlp.down_proj.weight.copy_(moe.shared.w2.weight)
        assert rel_diff(moe.shared(flat), ref_mlp(flat)) < 1e-6
        gates, idx, _ = moe.gate(flat)
        moe.shared = None  # the routed experts alone
        routed = moe(x)
        routed_ref = ref_experts(flat, idx, gates).view_as(x)
        assert isinstance(ref_experts, DeepseekV4Experts)
    # fp32, sums of 8 and 16 terms: round-off ~1e-7 of the output scale
    assert rel_diff(routed, routed_ref) < 1e-6
    assert float(routed.abs().max()) > 1.0


@pytest.mark.peer
@pytest.mark.parametrize("hashed", [True, False])
def test_sparse_moe_block_matches_transformers_forward_and_input_grad(hashed):
    limit = 1.0
    moe = make_moe(hashed=hashed, swiglu_limit=limit)
    ref = reference_block(moe, limit)
    x, ids = inputs(t=9)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = moe(x1, input_ids=ids)
    y_ref = ref(x2, input_ids=ids)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert rel_diff(y, y_ref) < 1e-6
    assert rel_diff(x1.grad, x2.grad) < 1e-6
    # the clamp is active: without it the output is clearly different
    unclamped = make_moe(hashed=hashed, swiglu_limit=0.0)
    with torch.no_grad():
        assert float((unclamped(x, input_ids=ids) - y).abs().max()) > 0.1


# ---- against a per-token loop ------------------------------------------------------------------
def naive_moe(moe: MoE, x: torch.Tensor, ids: torch.Tensor, limit: float) -> torch.Tensor:
    """Token by token in float64: table lookup, scores, gates, clamped SwiGLU experts."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    wg = moe.gate.proj.weight.detach().double()
    w1, w3, w2 = (w.detach().double() for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2))
    s1, s3, s2 = (lin.weight.detach().double() for lin in (moe.shared.w1, moe.shared.w3,
                                                            moe.shared.w2))
    table = moe.gate.tid2eid.tolist()

    def act(a, b):
        a, b = a.clamp(max=limit), b.clamp(-limit, limit)
        return a * torch.sigmoid(a) * b

    for bi in range(x.shape[0]):
        for ti in range(x.shape[1]):
            h = x[bi, ti].double()
            s = [math.sqrt(math.log1p(math.exp(float(u)))) for u in wg @ h]
            chosen = table[int(ids[bi, ti])]
            total = sum(s[e] for e in chosen)
            y = s2 @ act(s1 @ h, s3 @ h)
            for e in chosen:
                y = y + 1.5 * s[e] / total * (act(h @ w1[e], h @ w3[e]) @ w2[e])
            out[bi, ti] = y
    return out


def test_hash_routed_clamped_moe_matches_per_token_loop():
    moe = make_moe(hashed=True, swiglu_limit=1.0)
    x, ids = inputs(t=6)
    with torch.no_grad():
        y = moe(x, ForwardContext(positions=torch.arange(6), input_ids=ids))
    ref = naive_moe(moe, x, ids, 1.0)
    assert rel_diff(y, ref) < 1e-6  # fp32 against float64


@pytest.mark.parametrize("grouped", [False, True])
def test_clamp_is_the_same_in_both_dispatch_paths(grouped):
    moe = make_moe(hashed=False, swiglu_limit=0.5)
    moe.experts.use_grouped_mm = grouped
    x, _ = inputs()
    ref = make_moe(hashed=False, swiglu_limit=0.5)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), ref(x), rtol=1e-5, atol=1e-5)
        huge = make_moe(hashed=False, swiglu_limit=1e9)  # never reached: the unclamped layer
        torch.testing.assert_close(huge(x), make_moe(hashed=False)(x), rtol=0, atol=0)


def test_shared_swiglu_clamp():
    torch.manual_seed(0)
    plain, clamped = SwiGLU(DIM, HID), SwiGLU(DIM, HID, limit=0.3)
    clamped.load_state_dict(plain.state_dict())
    x = torch.randn(5, DIM) * 10
    a, b = plain.w1(x), plain.w3(x)
    ref = plain.w2(F.silu(a.clamp(max=0.3)) * b.clamp(-0.3, 0.3))
    torch.testing.assert_close(clamped(x), ref)
    assert not torch.allclose(clamped(x), plain(x))


# ---- the hash table ----------------------------------------------------------------------------
def test_hash_table_is_deterministic_distinct_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    a = hash_table(VOCAB, E, K, seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(0)
    b = hash_table(VOCAB, E, K, seed=7)
    assert torch.equal(torch.rand(3), after_a)  # the global generator did not move
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (VOCAB, K)
    assert not torch.equal(a, hash_table(VOCAB, E, K, seed=8))
    assert all(len(set(row)) == K for row in a.tolist())
    assert int(a.min()) >= 0 and int(a.max()) < E
    big = hash_table(4096, 8, 2, seed=0)  # roughly uniform use of the experts
    counts = torch.bincount(big.flatten(), minlength=8).double()
    assert float(counts.max() / counts.min()) < 1.15


def tiny_model(hash_layers: int = 2, **moe_kw) -> Transformer:
    moe = dict(enabled=True, n_routed_experts=4, n_shared_experts=1, top_k=2, expert_dim=8,
               first_dense_layers=1, hash_layers=hash_layers, score_func="sqrtsoftplus",
               swiglu_limit=0.5)
    moe.update(moe_kw)
    cfg = ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=4, ffn_dim=24, max_seq_len=32,
                      moe=MoEConfig(**moe),
                      attention=AttentionConfig(kind="mha", n_heads=2, head_dim=8,
                                                kv_cache=KVCacheConfig(dtype="fp32")))
    torch.manual_seed(0)
    return Transformer(cfg)


def test_model_hash_layers_tables_in_checkpoint_and_stats():
    model = tiny_model(hash_layers=2)
    kinds = [type(b.ffn.gate).__name__ if isinstance(b.ffn, MoE) else "dense"
             for b in model.blocks]
    assert kinds == ["dense", "HashGate", "HashGate", "Gate"]
    t1, t2 = model.blocks[1].ffn.gate.tid2eid, model.blocks[2].ffn.gate.tid2eid
    assert not torch.equal(t1, t2)  # a table per layer
    state = model.state_dict()
    assert "blocks.1.ffn.gate.tid2eid" in state and "blocks.1.ffn.gate.bias" not in state
    torch.manual_seed(123)  # rebuilt elsewhere: the same tables, whatever the global seed
    clone = Transformer(model.cfg)
    assert torch.equal(clone.blocks[1].ffn.gate.tid2eid, t1)
    with torch.no_grad():
        state["blocks.1.ffn.gate.tid2eid"] = torch.flip(t1, dims=[0]).clone()
    clone.load_state_dict(state)  # the checkpoint's table wins
    assert torch.equal(clone.blocks[1].ffn.gate.tid2eid, torch.flip(t1, dims=[0]))
    # hash layers change nothing else: the learned-routing model has the same parameters
    plain = tiny_model(hash_layers=0)
    for (n, p), (n2, p2) in zip(model.named_parameters(), plain.named_parameters()):
        assert n == n2 and torch.equal(p, p2)
    ids = torch.randint(0, VOCAB, (2, 8))
    model.train()
    ctx = ForwardContext(positions=torch.arange(8), step=0)
    model(ids, ctx)
    assert {"moe/load_cv", "moe/bias_min"} <= set(ctx.mean_stats())
    model.on_train_step_end()
    assert model.blocks[3].ffn.gate.bias.abs().sum() > 0


def test_hash_routing_needs_ids():
    moe = make_moe(hashed=True)
    x, ids = inputs()
    with pytest.raises(ValueError, match="token ids"):
        moe(x)
    with pytest.raises(ValueError, match="do not match"):
        moe(x, input_ids=ids[:, :3])
    ctx = ForwardContext(positions=torch.arange(7), input_ids=ids)
    torch.testing.assert_close(moe(x, ctx), moe(x, input_ids=ids), rtol=0, atol=0)


def test_decode_token_by_token_equals_full_forward_with_hash_routing():
    model = tiny_model(hash_layers=2).double().eval()
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 13)
        outs = [model.forward_cached(ids[:, :4], caches, 0)]
        for t in range(4, 13):
            outs.append(model.forward_cached(ids[:, t:t + 1], caches, t))
    # RMSNorm and routing compute in fp32 (norm.py, moe.py): fp32-level agreement
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, key", [
    (dict(hash_layers=4), "model.moe.hash_layers"),  # 4 layers, the first dense: 3 MoE layers
    (dict(hash_layers=-1), "model.moe.hash_layers"),
    (dict(swiglu_limit=-1.0), "model.moe.swiglu_limit"),
])
def test_bad_config(kw, key):
    cfg = ModelConfig(n_layers=4, moe=MoEConfig(enabled=True, first_dense_layers=1, **kw))
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not allowed: "):
        cfg.validate()
    ModelConfig(n_layers=4, moe=MoEConfig(enabled=True, first_dense_layers=1,
                                          hash_layers=3)).validate()
