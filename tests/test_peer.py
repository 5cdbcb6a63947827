"""v4lab against the reference: transformers' DeepseekV3ForCausalLM with the same weights.

A tiny V3 (hidden 64, 3 layers, the first dense, 8 routed experts in 4 groups of which 2
stay eligible, top-2, one shared expert) with random weights and a random balancing bias
is converted with v4lab.peer; logits, gradients of a loss, and cached decoding must agree
within fp32 round-off. transformers is a dev extra (CI installs .[dev]).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers  # a dev extra (pyproject [dev]); CI installs it

from v4lab.errors import ConfigError
from v4lab.peer import from_v4lab, hf_state_to_v4lab, model_config_from_hf, to_hf_config, to_v4lab

pytestmark = pytest.mark.peer

VOCAB = 256
TOL = 1e-4  # fp32 round-off at these sizes is ~1e-6; a wrong mapping is off by ~1e-1


def tiny_config(**overrides):
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, n_group=4, topk_group=2, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5,
        initializer_range=0.1,  # larger than V3's 0.02: routing and attention far from uniform
        max_position_embeddings=128)
    fields.update(overrides)
    return transformers.DeepseekV3Config(**fields)


def reference(seed: int = 0, **overrides):
    """A random DeepseekV3ForCausalLM (eval mode) with a random e_score_correction_bias."""
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return hf


def ids(batch: int = 2, t: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_converted_config_has_v3_switches():
    cfg = model_config_from_hf(tiny_config())
    assert cfg.attention.kind == "mla" and not cfg.attention.sparse.enabled and not cfg.attention.vvpa
    assert cfg.attention.kv_cache.dtype == "fp32" and not cfg.engram.enabled
    m = cfg.moe
    assert (m.enabled, m.score_func, m.n_routed_experts, m.top_k, m.n_groups, m.topk_groups) == \
        (True, "sigmoid", 8, 2, 4, 2)
    assert (m.first_dense_layers, m.route_scale, m.n_shared_experts, m.expert_dim) == (1, 2.5, 1, 32)
    assert m.bias_update_rate == 0.0 and not cfg.tie_embeddings


@pytest.mark.parametrize("overrides", [{}, {"rope_interleave": False}, {"q_lora_rank": None},
                                       {"n_group": 1, "topk_group": 1}])
def test_logits_match_reference(overrides):
    hf = reference(**overrides)
    model, _ = to_v4lab(hf)
    x = ids()
    with torch.no_grad():
        ref, ours = hf(x).logits, model(x)
    diff = max_diff(ref, ours)
    print(f"logits max abs diff {diff:.2e} (|logits| max {float(ref.abs().max()):.2f}) {overrides}")
    assert ref.abs().max() > 1.0  # logits are not trivially small
    assert diff < TOL


def test_wrong_rope_layout_is_detected():
    """Without the interleave permutation (reading an interleaved model as half-split)
    the logits differ: the comparison above can fail."""
    hf = reference()
    cfg = model_config_from_hf(hf.config)
    model, _ = to_v4lab(hf)
    model.load_state_dict(hf_state_to_v4lab(hf.state_dict(), cfg, rope_interleave=False), strict=False)
    x = ids()
    with torch.no_grad():
        assert max_diff(hf(x).logits, model(x)) > 100 * TOL


def test_group_limited_routing_is_exercised():
    """Keeping every group eligible changes the output: V3's group limit matters here."""
    hf = reference()
    model, _ = to_v4lab(hf)
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        for blk in model.blocks[1:]:
            blk.ffn.gate.topk_groups = blk.ffn.gate.n_groups
        assert max_diff(ref, model(x)) > 100 * TOL


def test_gradients_match_reference():
    hf = reference()
    model, cfg = to_v4lab(hf)
    hf.train()
    model.train()
    x = ids(t=40)
    y = ids(t=40, seed=2)
    F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).backward()
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    ref = hf_state_to_v4lab({n: p.grad for n, p in hf.named_parameters()}, cfg)
    ours = dict(model.named_parameters())
    assert set(ref) == set(ours)
    worst = 0.0
    for name, g in ref.items():
        scale = float(g.abs().max())
        assert scale > 0, name  # every weight gets a gradient (all experts are hit)
        rel = max_diff(g, ours[name].grad) / scale
        worst = max(worst, rel)
        assert rel < TOL, (name, rel)
    print(f"gradients: worst max abs diff / max |grad| over {len(ref)} tensors = {worst:.2e}")


def test_cached_decode_matches_reference():
    """v4lab's absorbed cache path against transformers' DynamicCache, token by token."""
    hf = reference()
    model, _ = to_v4lab(hf)
    prompt, steps = ids(t=20), ids(t=6, seed=3)
    caches = model.new_caches(2, 26)
    with torch.no_grad():
        out = hf(prompt, use_cache=True)
        past = out.past_key_values
        diffs = [max_diff(out.logits, model.forward_cached(prompt, caches, 0))]
        for i in range(steps.shape[1]):
            tok = steps[:, i: i + 1]
            out = hf(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            diffs.append(max_diff(out.logits, model.forward_cached(tok, caches, 20 + i)))
    print(f"cached decode max abs diff {max(diffs):.2e}")
    assert max(diffs) < TOL


def test_round_trip_through_transformers():
    """v4lab -> transformers state dict -> DeepseekV3ForCausalLM: same logits; and back
    to v4lab gives bit-identical weights."""
    hf = reference()
    model, cfg = to_v4lab(hf)
    with torch.no_grad():  # make the v4lab weights differ from the reference's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model.blocks[1].ffn.gate.bias.normal_(0, 0.05)
    state = from_v4lab(model)
    hf2 = transformers.DeepseekV3ForCausalLM(to_hf_config(cfg)).eval()
    hf2.load_state_dict(state, strict=True)
    x = ids()
    with torch.no_grad():
        assert max_diff(hf2(x).logits, model(x)) < TOL
    back, _ = to_v4lab(hf2)
    for name, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name


def test_per_expert_checkpoint_layout():
    """Checkpoints with one key per expert (V3's released layout) convert the same way."""
    hf = reference()
    state = {}
    for k, v in hf.state_dict().items():
        if k.endswith("experts.gate_up_proj"):
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                state[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e]
                state[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e]
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                state[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            state[k] = v
    a, _ = to_v4lab(hf)
    b, _ = to_v4lab(state, hf.config.to_dict())
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


@pytest.mark.parametrize("overrides,key", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                          "original_max_position_embeddings": 32}}, "rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_inexpressible_configs_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        model_config_from_hf(tiny_config(**overrides))


def test_non_v3_switches_are_refused():
    _, cfg = to_v4lab(reference())
    cfg.attention.vvpa = True
    with pytest.raises(ConfigError, match="vvpa"):
        to_hf_config(cfg)
