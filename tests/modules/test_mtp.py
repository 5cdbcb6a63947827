"""Depth-1 multi-token prediction (v4lab.modules.mtp): shapes, the shift-by-2 targets
against a per-position loop, the V3 formula, shared embedding and head, bad config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from v4lab.errors import ConfigError
from v4lab.model import Block, ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, EngramConfig, MoEConfig
from v4lab.modules.mtp import MTP, MTPConfig

V = 50


def _setup(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, ffn_dim=48, max_seq_len=32,
                      attention=AttentionConfig(kind="mha", n_heads=2, head_dim=16),
                      moe=MoEConfig(enabled=False), engram=EngramConfig(enabled=False))
    model = Transformer(cfg)
    mtp = MTP(cfg.dim, Block(cfg, cfg.n_layers), model.tok_emb, model.lm_head, cfg.norm_eps)
    for p in mtp.block.parameters():  # a trained-looking block, not an identity at init
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.2)
    tokens = torch.randint(0, V, (2, 11))
    return cfg, model, mtp, tokens


def _hidden(model, ids):
    """Main model's last block output (before the final norm) for inputs ids [B, T]."""
    from v4lab.modules.context import ForwardContext

    ctx = ForwardContext(positions=torch.arange(ids.shape[1]), input_ids=ids)
    x = model.tok_emb(ids)
    for blk in model.blocks:
        x = blk(x, ctx)
    return x


def test_shapes_and_that_h_is_the_pre_norm_state():
    cfg, model, mtp, tokens = _setup()
    h = _hidden(model, tokens[:, :-1])
    assert torch.allclose(model.lm_head(model.norm(h)), model(tokens[:, :-1]), atol=1e-6)
    logits = mtp(h[:, :-1], tokens[:, 1:-1])
    assert logits.shape == (2, 9, V)
    loss = mtp.loss(h, tokens)
    assert loss.shape == () and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"\[B, T\+1\]"):
        mtp.loss(h, tokens[:, :-1])


def test_loss_targets_are_shifted_by_two_against_a_per_position_loop():
    """Naive: for every sequence and every t, run the module on the prefix h_0..h_t with
    tokens 1..t+1 alone (so causality is checked too), take its last logits and score them
    on token t+2. fp32, a one-block model on 9 positions: agreement to 1e-5."""
    cfg, model, mtp, tokens = _setup(1)
    mtp.loss_weight = 0.3
    with torch.no_grad():
        h = _hidden(model, tokens[:, :-1])
        got = mtp.loss(h, tokens)
        terms = []
        for b in range(tokens.shape[0]):
            for t in range(h.shape[1] - 1):
                logits = mtp(h[b:b + 1, :t + 1], tokens[b:b + 1, 1:t + 2])[0, -1]
                terms.append(F.cross_entropy(logits[None], tokens[b, t + 2][None]))
        naive = 0.3 * torch.stack(terms).mean()
        assert abs(got.item() - naive.item()) < 1e-5
        # scoring on the next token instead (shift by 1) is a different number
        wrong = 0.3 * F.cross_entropy(mtp(h[:, :-1], tokens[:, 1:-1]).reshape(-1, V),
                                      tokens[:, 1:-1].reshape(-1))
        assert abs(wrong.item() - got.item()) > 1e-3


def test_forward_is_the_v3_formula():
    """With the block replaced by the identity: Head(RMSNorm(W_p [RMSNorm(e); RMSNorm(h)]))
    written out by hand (own RMS norm, explicit concatenation order)."""
    cfg, model, mtp, tokens = _setup(2)

    class Identity(nn.Module):
        def forward(self, x, ctx):
            return x

    mtp.block = Identity()
    for norm in (mtp.enorm, mtp.hnorm, mtp.norm):
        nn.init.uniform_(norm.weight, 0.5, 1.5)

    def rms(x, w):
        return x / x.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt() * w

    h = torch.randn(2, 6, cfg.dim)
    nxt = tokens[:, :6]
    e = model.tok_emb.weight[nxt]
    x = torch.cat([rms(e, mtp.enorm.weight), rms(h, mtp.hnorm.weight)], -1) @ mtp.proj.weight.T
    want = rms(x, mtp.norm.weight) @ model.lm_head.weight.T
    assert (mtp(h, nxt) - want).abs().max() < 1e-5


def test_embedding_and_head_are_shared_not_copied():
    cfg, model, mtp, tokens = _setup(3)
    assert mtp.embed.weight is model.tok_emb.weight
    assert mtp.head.weight is model.lm_head.weight
    both = nn.ModuleDict({"model": model, "mtp": mtp})
    own = sum(p.numel() for p in mtp.parameters()) - model.tok_emb.weight.numel() \
        - model.lm_head.weight.numel()
    assert sum(p.numel() for p in both.parameters()) == sum(p.numel() for p in model.parameters()) + own
    # the MTP loss trains the shared tensors (and reaches the main model through h)
    h = _hidden(model, tokens[:, :-1])
    mtp.loss(h, tokens).backward()
    assert model.tok_emb.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.wq.weight.grad.abs().sum() > 0


def test_mtp_config_bad_input():
    assert MTPConfig(depth=1).validate().enabled
    assert not MTPConfig(depth=0).validate().enabled  # 0 = off
    with pytest.raises(ConfigError, match="model.mtp.depth=2 .*only depth 1 is built"):
        MTPConfig(depth=2).validate()
    with pytest.raises(ConfigError, match="model.mtp.depth=-1"):
        MTPConfig(depth=-1).validate()
    with pytest.raises(ConfigError, match="model.mtp.loss_weight=-0.1"):
        MTPConfig(loss_weight=-0.1).validate()


# ---------------------------------------------------------------- wired in the model (model.mtp)

def _wired(depth=1, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, ffn_dim=48, max_seq_len=32,
                      attention=AttentionConfig(kind="mha", n_heads=2, head_dim=16),
                      moe=MoEConfig(enabled=False), engram=EngramConfig(enabled=False),
                      mtp=MTPConfig(depth=depth), **kw)
    return Transformer(cfg)


def test_model_builds_the_mtp_block_from_its_own_block_sharing_embedding_and_head():
    assert _wired(depth=0).mtp is None
    model = _wired()
    assert isinstance(model.mtp.block, Block) and model.mtp.block.layer_idx == 2
    assert model.mtp.embed is model.tok_emb and model.mtp.head is model.lm_head
    # the MTP block's residual output projection gets the GPT-2 scaled init too
    assert model.mtp.block.attn.wo.weight.std() < 0.02 / math.sqrt(4) * 1.2
    # the shared tensors are counted once; the MTP block's own parameters are added
    own = sum(p.numel() for n, p in model.mtp.named_parameters() if not n.startswith(("embed.", "head.")))
    assert model.num_params() == _wired(depth=0).num_params() + own
    # a state dict round trip (the shared tensors appear under both names)
    again = _wired()
    again.load_state_dict(model.state_dict())
    assert again.mtp.head.weight is again.lm_head.weight


def test_mtp_loss_of_the_model_equals_the_module_on_the_main_hidden_state():
    """Transformer.forward leaves h (the pre-norm output) in ctx; mtp_loss = MTP.ce on it."""
    from v4lab.modules.context import ForwardContext

    model = _wired()
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    x = tokens[:, :-1]
    ctx = ForwardContext(positions=torch.arange(11), input_ids=x)
    model(x, ctx)
    h = _hidden(model, x)
    torch.testing.assert_close(ctx.hidden, h, atol=0, rtol=0)
    got = model.mtp_loss(ctx, tokens)
    assert abs(got.item() - model.mtp.ce(h, tokens).item()) < 1e-6


def test_objective_adds_the_weighted_mtp_loss_and_the_weight_drops_when_lr_decays():
    from v4lab.config import TrainerConfig
    from v4lab.lit import LitLM, lr_lambda

    model_cfg = _wired().cfg
    tcfg = TrainerConfig(max_steps=20, warmup_steps=4)
    torch.manual_seed(0)
    lit = LitLM(model_cfg, tcfg, torch.ones(V, dtype=torch.long))
    plain_cfg = _wired(depth=0).cfg
    torch.manual_seed(0)
    plain = LitLM(plain_cfg, tcfg, torch.ones(V, dtype=torch.long))
    plain.model.load_state_dict({k: v for k, v in lit.model.state_dict().items() if not k.startswith("mtp.")})
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(6))
    total, lm, _ = lit.objective(tokens)
    total_plain, lm_plain, _ = plain.objective(tokens)
    assert lm.item() == lm_plain.item()  # the LM loss itself is unchanged
    mtp_ce = lit.last_mtp
    assert mtp_ce is not None and plain.last_mtp is None
    assert abs(total.item() - (total_plain.item() + 0.3 * mtp_ce.item())) < 1e-5
    # 0.3 while the learning rate is flat or warming up, 0.1 once it decays
    assert [lit.mtp_weight(s) for s in (None, 0, 3, 4, 5, 19)] == [0.3, 0.3, 0.3, 0.3, 0.1, 0.1]
    assert lr_lambda(4, 4, 20, 0.1) == 1.0 and lr_lambda(5, 4, 20, 0.1) < 1.0
    total.backward()
    assert lit.model.mtp.proj.weight.grad.abs().sum() > 0


def test_muon_split_covers_the_mtp_block_not_the_shared_embedding_and_head():
    from v4lab.optim import split_params

    model = _wired()
    muon, adamw = split_params(model)
    muon_names = {n for n, _ in muon}
    adamw_names = {n for n, _ in adamw}
    assert not muon_names & adamw_names
    assert {id(p) for _, p in muon} | {id(p) for _, p in adamw} == {id(p) for p in model.parameters()}
    assert {"mtp.proj.weight", "mtp.block.attn.wq.weight", "mtp.block.ffn.w1.weight"} <= muon_names
    assert "mtp.enorm.weight" in adamw_names and "mtp.block.attn_norm.weight" in adamw_names
    assert "lm_head.weight" in adamw_names and "tok_emb.weight" in adamw_names
    assert not any(n.startswith(("mtp.embed", "mtp.head")) for n in muon_names)
