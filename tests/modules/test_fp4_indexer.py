"""MXFP4 fake quantisation of the lightning indexers' q/k path (trainer.quantize,
target ``indexer_qk``) against a per-block loop written from the OCP MX spec."""

from __future__ import annotations

import math

import pytest
import torch

from v4lab.errors import ConfigError
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, SparseConfig
from v4lab.modules.compressor import LightningIndexerV4, rope_cos_sin, rope_inv_freq, rope_tail
from v4lab.modules.fp4 import FakeFP4, apply_fp4_qat, indexer_block, quantize_fp4_
from v4lab.modules.sparse import LightningIndexer

# e2m1 magnitudes and which of them have mantissa bit 0 (ties go there), from the bit layout
MAGS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
EVEN = {0.0, 1.0, 2.0, 4.0}


def ref_mxfp4(x: torch.Tensor, block: int) -> torch.Tensor:
    """Loop over blocks of ``block`` along the last dim: X = floor(log2 amax) - 2, nearest
    e2m1 magnitude by exhaustive search, ties to the even code, saturation at 6."""
    flat = x.detach().double().reshape(-1, block).tolist()
    out = []
    for blk in flat:
        amax = max(abs(v) for v in blk)
        scale = 2.0 ** (math.frexp(amax)[1] - 1 - 2) if amax > 0 else 1.0
        for v in blk:
            y = min(abs(v) / scale, 6.0)
            best = min(abs(y - m) for m in MAGS)
            ties = [m for m in MAGS if abs(y - m) == best]
            q = ties[0] if len(ties) == 1 else next(m for m in ties if m in EVEN)
            out.append(math.copysign(q * scale, v))
    return torch.tensor(out, dtype=torch.float64).view(x.shape).to(x.dtype)


def test_block_rule_min_32_head_dim():
    assert indexer_block(16) == 16          # the lab's small profiles: one block per vector
    assert indexer_block(8) == 8
    assert indexer_block(32) == 32 and indexer_block(64) == 32
    with pytest.raises(ConfigError, match="fp4.block_size=32 .*index_head_dim \\(48\\)"):
        indexer_block(48)


def _sparse_indexer(head_dim: int, seed: int = 0) -> LightningIndexer:
    torch.manual_seed(seed)
    cfg = SparseConfig(enabled=True, topk=4, index_n_heads=3, index_head_dim=head_dim,
                       index_rope_dim=4)
    return LightningIndexer(24, 16, cfg, 10000.0)


@pytest.mark.parametrize("head_dim", [16, 64])  # below the MX block, and two blocks of 32
def test_sparse_indexer_quantises_q_and_k_like_the_loop_with_identity_gradient(head_dim):
    idx = _sparse_indexer(head_dim)
    block = min(32, head_dim)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 3, head_dim, generator=g, requires_grad=True)
    k = torch.randn(2, 7, head_dim, generator=g, requires_grad=True)
    w = torch.randn(2, 5, 3, generator=g)
    plain = idx.scores(q, w, k)
    qr = ref_mxfp4(q, block).requires_grad_()
    kr = ref_mxfp4(k, block).requires_grad_()
    want = idx.scores(qr, w, kr)                        # no quantiser: the plain formula
    idx.qk_quant = FakeFP4(-1, indexer_block(head_dim))
    got = idx.scores(q, w, k)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    up = torch.randn(got.shape, generator=g)
    got.backward(up)
    want.backward(up)
    # straight-through: the gradient of the plain formula at the quantised point
    assert torch.equal(q.grad, qr.grad) and torch.equal(k.grad, kr.grad)
    idx.qk_quant.enabled = False
    assert torch.equal(idx.scores(q, w, k), plain)


def test_v4_indexer_quantises_roped_q_and_keys_like_the_loop():
    torch.manual_seed(2)
    inv_freq = rope_inv_freq(4, 10000.0)
    idx = LightningIndexerV4(24, 12, 2, 16, 4, True, inv_freq)
    g = torch.Generator().manual_seed(3)
    x, q_latent = torch.randn(1, 9, 24, generator=g), torch.randn(1, 9, 12, generator=g)
    keys = torch.randn(1, 4, 16, generator=g)
    cos, sin = rope_cos_sin(torch.arange(9), inv_freq)
    plain = idx.scores(x, q_latent, keys, cos, sin)
    # independent: RoPE'd q and the keys through the loop, then the score formula
    q = rope_tail(idx.wq(q_latent).view(1, 9, 2, 16), cos, sin)
    dots = (ref_mxfp4(q, 16)[..., None, :] * ref_mxfp4(keys, 16)[:, None, None]).sum(-1)
    w = idx.weights_proj(x) * 2 ** -0.5
    want = (dots.relu() * 16 ** -0.5 * w[..., None]).sum(2)
    idx.qk_quant = FakeFP4(-1, indexer_block(16))
    got = idx.scores(x, q_latent, keys, cos, sin)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3
    idx.qk_quant.enabled = False
    assert torch.equal(idx.scores(x, q_latent, keys, cos, sin), plain)


def _sparse_model() -> Transformer:
    torch.manual_seed(4)
    attn = AttentionConfig(kind="mla", n_heads=2, q_lora_rank=24, kv_lora_rank=32,
                           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                           sparse=SparseConfig(enabled=True, topk=3, index_n_heads=2,
                                               index_head_dim=16, index_rope_dim=4))
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, ffn_dim=32,
                                   max_seq_len=16, attention=attn)).eval()


def _v4_model() -> Transformer:
    from test_v4_model import build, model_cfg, v4_cfg

    return build(model_cfg(v4_cfg(index_head_dim=16)))


@pytest.mark.parametrize("make, t", [(_sparse_model, 14), (_v4_model, 40)],
                         ids=["sparse_mla", "v4_csa"])  # t: more candidates than top-k
def test_qat_switch_and_posthoc_on_whole_models(make, t):
    import copy

    model = make()
    ids = torch.randint(0, 64, (2, t), generator=torch.Generator().manual_seed(5))
    keys = set(model.state_dict())
    with torch.no_grad():
        plain = model(ids)
    posthoc = copy.deepcopy(model)
    fakes = apply_fp4_qat(model, targets=("indexer_qk",))   # no MoE: indexers only
    n_idx = sum(getattr(m, "qk_quant", None) is not None for m in model.modules())
    assert len(fakes) == n_idx > 0 and all(f.block == 16 for f in fakes)
    assert set(model.state_dict()) == keys                 # checkpoints unchanged
    with torch.no_grad():
        on = model(ids)
        for f in fakes:
            f.enabled = False
        off = model(ids)
    assert torch.equal(off, plain)                          # QAT off: bit-identical
    assert not torch.equal(on, plain)                       # on: the indexers' q/k changed
    assert quantize_fp4_(posthoc, targets=("indexer_qk",)) == n_idx
    with torch.no_grad():
        assert torch.equal(posthoc(ids), on)                # post-hoc = QAT's forward


def test_default_targets_include_the_indexer_and_check_its_block():
    fakes = apply_fp4_qat(_sparse_model())                  # default targets, no experts
    assert len(fakes) == 2
    with pytest.raises(ConfigError, match="fp4.block_size=32 .*index_head_dim \\(48\\)"):
        apply_fp4_qat(_v4_model_with_head_dim(48))


def _v4_model_with_head_dim(d: int) -> Transformer:
    from test_v4_model import build, model_cfg, v4_cfg

    return build(model_cfg(v4_cfg(index_head_dim=d)))


@pytest.mark.parametrize("mode", ["fp4_qat", "fp4_posthoc"])
def test_trainer_quantize_switches_the_indexers_on_the_expert_schedule(mode):
    """trainer.quantize drives the indexers with the experts' switch: QAT from step
    floor(qat_start * max_steps) and at the end; post-hoc only after training."""
    from v4lab.config import TrainerConfig
    from v4lab.lit import LitLM

    tcfg = TrainerConfig(max_steps=10, quantize=mode, qat_start=0.5)
    lit = LitLM(_sparse_model().cfg, tcfg, torch.ones(64, dtype=torch.long))
    indexers = [m for m in lit.modules() if isinstance(m, LightningIndexer)]

    def on() -> list:
        return [m.qk_quant is not None and m.qk_quant.enabled for m in indexers]

    assert len(indexers) == 2 and on() == [False, False]
    if mode == "fp4_qat":
        lit._set_qat(4)
        assert on() == [False, False]
        lit._set_qat(5)
        assert on() == [True, True]
        lit._set_qat(0)
    lit.on_fit_end()
    assert on() == [True, True]
