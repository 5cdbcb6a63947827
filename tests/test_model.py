"""The plain decoder's pieces against naive computations."""

from __future__ import annotations

import math

import pytest
import torch

from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, KVCacheConfig
from v4lab.modules.attention import MultiHeadAttention, round_through
from v4lab.modules.context import ForwardContext
from v4lab.modules.ffn import SwiGLU
from v4lab.modules.norm import RMSNorm
from v4lab.modules.rope import apply_rope, rope_angles


def plain_cfg(kv: str = "fp32", **kw) -> ModelConfig:
    attn = AttentionConfig(kind="mha", n_heads=4, head_dim=16, kv_cache=KVCacheConfig(dtype=kv))
    return ModelConfig(vocab_size=97, dim=64, n_layers=2, ffn_dim=96, max_seq_len=64,
                       attention=attn, **kw)


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_is_a_complex_rotation_and_composes():
    torch.manual_seed(0)
    d, theta = 8, 100.0
    x = torch.randn(1, 6, 2, d)
    pos = torch.arange(3, 9)
    cos, sin = rope_angles(pos, d, theta)
    out = apply_rope(x, cos, sin)
    # naive: pair (x[i], x[i + d/2]) as a complex number times exp(i * pos * theta^(-2i/d))
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    freqs = theta ** (-torch.arange(0, d, 2).double() / d)
    rot = torch.polar(torch.ones(6, d // 2, dtype=torch.float64), pos[:, None].double() * freqs)
    zr = z * rot[None, :, None, :]
    torch.testing.assert_close(out, torch.cat([zr.real, zr.imag], -1).float())
    back = apply_rope(out, cos, -sin)  # inverse rotation
    torch.testing.assert_close(back, x, atol=1e-6, rtol=1e-5)


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    f = SwiGLU(6, 10)
    x = torch.randn(4, 6)
    a, b = x @ f.w1.weight.T, x @ f.w3.weight.T
    torch.testing.assert_close(f(x), (a * torch.sigmoid(a) * b) @ f.w2.weight.T)


def test_mha_matches_a_per_query_loop():
    torch.manual_seed(0)
    cfg = AttentionConfig(kind="mha", n_heads=2, head_dim=8, kv_cache=KVCacheConfig(dtype="fp32"))
    attn = MultiHeadAttention(16, cfg, rope_theta=10000.0)
    b, t = 2, 7
    x = torch.randn(b, t, 16)
    ctx = ForwardContext(positions=torch.arange(t))
    out = attn(x, ctx)
    cos, sin = rope_angles(torch.arange(t), 8, 10000.0)
    q = apply_rope((x @ attn.wq.weight.T).view(b, t, 2, 8), cos, sin)
    k = apply_rope((x @ attn.wk.weight.T).view(b, t, 2, 8), cos, sin)
    v = (x @ attn.wv.weight.T).view(b, t, 2, 8)
    heads = torch.zeros(b, t, 2, 8)
    for i in range(t):
        for h in range(2):
            s = (k[:, : i + 1, h] @ q[:, i, h, :, None]).squeeze(-1) / math.sqrt(8)
            heads[:, i, h] = (s.softmax(-1)[..., None] * v[:, : i + 1, h]).sum(1)
    torch.testing.assert_close(out, heads.reshape(b, t, 16) @ attn.wo.weight.T, atol=1e-5, rtol=1e-4)


def test_model_is_causal():
    torch.manual_seed(0)
    model = Transformer(plain_cfg()).eval()
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 97
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])
    assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:])


@pytest.mark.parametrize("kv", ["fp32", "bf16"])
def test_token_by_token_decoding_matches_full_forward(kv):
    torch.manual_seed(0)
    model = Transformer(plain_cfg(kv)).eval()
    x = torch.randint(0, 97, (2, 16))
    full = model(x)
    caches = model.new_caches(2, 16)
    steps = [model.forward_cached(x[:, :5], caches, 0, history=x[:, :5])]  # a prefill chunk
    steps += [model.forward_cached(x[:, i : i + 1], caches, i, history=x[:, : i + 1])
              for i in range(5, 16)]
    tol = 1e-5 if kv == "fp32" else 2e-2  # bf16: a matmul's round-off can flip a bf16 ulp
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=tol, rtol=tol)
    assert caches[0]["attn"].k.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[kv]
    assert model.kv_bytes_per_token(caches) == 2 * 2 * 4 * 16 * (4 if kv == "fp32" else 2)


def test_greedy_generate_equals_repeated_full_forward_argmax():
    torch.manual_seed(0)
    model = Transformer(plain_cfg()).eval()
    prompt = torch.randint(0, 97, (2, 4))
    out = model.generate(prompt, 6)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_round_through_is_exact_with_identity_gradient():
    x = torch.randn(100, requires_grad=True)
    y = round_through(x, torch.bfloat16)
    assert torch.equal(y, x.detach().bfloat16().float())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(100))


def test_parameter_accounting_and_optimizer_groups():
    cfg = plain_cfg()
    model = Transformer(cfg)
    per_layer = 4 * 64 * 64 + 3 * 64 * 96 + 2 * 64
    assert model.num_params() == 2 * 97 * 64 + 2 * per_layer + 64
    assert model.num_active_params() == model.num_params() - 97 * 64 + 64
    groups = model.optimizer_groups(0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay_lr1", "no_decay_lr1"}
    assert all(p.dim() == 1 for p in by_name["no_decay_lr1"]["params"])
    assert by_name["no_decay_lr1"]["weight_decay"] == 0.0
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()


def test_positions_beyond_max_seq_len_are_rejected():
    model = Transformer(plain_cfg())
    with pytest.raises(ValueError, match="beyond model.max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_forward_context_phase_is_explicit_with_a_default_from_the_step():
    pos = torch.arange(3)
    assert ForwardContext(pos).phase == "infer" and not ForwardContext(pos).records
    assert ForwardContext(pos, step=5).phase == "train"
    assert ForwardContext(pos, step=5, phase="eval").records  # validation records statistics too
    with pytest.raises(ValueError, match="phase='decode' is not one of"):
        ForwardContext(pos, phase="decode")
