"""Weights converter between transformers' DeepseekV3ForCausalLM and a v4lab Transformer.

    model, cfg = to_v4lab(hf_model)                 # or to_v4lab(state_dict, hf_config)
    hf_state = from_v4lab(model)                    # a DeepseekV3ForCausalLM state dict
    hf_config = to_hf_config(model.cfg)             # the matching DeepseekV3Config

The v4lab model gets the switches that reproduce DeepSeek-V3: MLA (no sparse attention,
no VVPA), an fp32 KV cache (so training and decode match V3 exactly in fp32), DeepSeekMoE
with sigmoid affinities, V3's group-limited selection (n_group / topk_group), the shared
expert(s), ``first_k_dense_replace`` dense layers, ``routed_scaling_factor`` as
``route_scale``; Engram off. ``bias_update_rate`` defaults to 0 (transformers keeps
``e_score_correction_bias`` fixed while training); pass another value to balance.

Layout differences the mapping handles (all exact, no arithmetic on the values):

- RoPE. v4lab rotates half-split pairs (x[i], x[i + d/2]). With ``rope_interleave``
  (V3's default) transformers rotates interleaved pairs (x[2i], x[2i+1]) and writes the
  result half-split. Permuting the rope rows of q_b_proj (per head) and of
  kv_a_proj_with_mqa by [0, 2, 4, ..., 1, 3, 5, ...] makes v4lab's rotated q_rope and
  k_rope identical to transformers'. Without rope_interleave the permutation is the identity.
- MoE experts. transformers stacks gate_up_proj [E, 2I, dim] and down_proj [E, dim, I]
  (nn.Linear orientation); v4lab stacks w1, w3 [E, dim, I] and w2 [E, I, dim]:
  w1[e] = gate[e].T, w3[e] = up[e].T, w2[e] = down[e].T. Checkpoints with one key per
  expert (``mlp.experts.{e}.gate_proj.weight`` ...) are read too.
- Names: q_a_proj -> wq_a, q_a_layernorm -> q_norm, kv_a_proj_with_mqa -> wkv_a, ...

Configurations that V3 semantics and v4lab cannot both express raise ConfigError
naming the key: rope scaling (yarn mscale), attention biases, grouped KV heads
(num_key_value_heads < heads), an activation other than SiLU, ``norm_topk_prob=False``,
``rms_norm_eps`` other than 1e-6 (transformers builds the q_a / kv_a norms with eps
1e-6 whatever the config says; v4lab uses one eps for all norms). Not converted: the
MTP layers (not in DeepseekV3ForCausalLM). Embedding ``padding_idx`` (``pad_token_id``)
only zeroes that row's gradient in transformers; v4lab has no such row.

transformers is imported only inside the functions that need it (it is a dev extra).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from v4lab.errors import ConfigError, require
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, EngramConfig, KVCacheConfig, MoEConfig, SparseConfig

_ATTN = {  # transformers name -> v4lab name (within a layer's attention)
    "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b", "q_proj": "wq",
    "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b",
    "o_proj": "wo",
}
_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def rope_permutation(dim: int, interleave: bool) -> torch.Tensor:
    """Row order that turns transformers' rope rows into v4lab's: [dim] indices.

    interleave: [0, 2, ..., dim-2, 1, 3, ..., dim-1]; otherwise the identity.
    """
    idx = torch.arange(dim)
    return torch.cat([idx[0::2], idx[1::2]]) if interleave else idx


def _reorder_rope_rows(name: str, t: torch.Tensor, order: torch.Tensor, h: int, dn: int, dr: int,
                       r: int) -> torch.Tensor:
    """Reorder the rotary rows of an MLA projection (``order`` or its inverse): per head in
    q_b_proj / q_proj, after the latent in kv_a_proj_with_mqa; other weights unchanged."""
    if name in ("q_b_proj", "q_proj"):
        t = t.view(h, dn + dr, -1)
        return torch.cat([t[:, :dn], t[:, dn:][:, order]], 1).reshape(h * (dn + dr), -1)
    if name == "kv_a_proj_with_mqa":
        return torch.cat([t[:r], t[r:][order]], 0)
    return t


def model_config_from_hf(hf_config: Any, bias_update_rate: float = 0.0,
                         kv_cache: str = "fp32") -> ModelConfig:
    """The v4lab ModelConfig equivalent to a DeepseekV3Config (object or dict).

    kv_cache: the v4lab cache storage dtype; fp32 (default) reproduces transformers
    exactly, bf16 halves the cache and is the faster choice under bf16 autocast."""
    c = lambda k, d=None: _get(hf_config, k, d)  # noqa: E731
    rope = c("rope_parameters") or c("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    require(rope_type == "default", "hf_config.rope_parameters.rope_type", rope_type,
            "'default' (v4lab has no YaRN scaling; its attention scale has no mscale)")
    theta = rope.get("rope_theta") if rope else None
    theta = float(theta if theta is not None else c("rope_theta", 10000.0))
    require(not c("attention_bias", False), "hf_config.attention_bias", c("attention_bias"),
            "False (v4lab's MLA projections have no bias)")
    n_heads = c("num_attention_heads")
    kv_heads = c("num_key_value_heads") or n_heads
    # MLA up-projects per-head keys and values from one latent; fewer KV heads would make
    # transformers repeat them (GQA), which v4lab has no form of. More (the config default
    # of 128 with few heads) is ignored by transformers' sdpa path.
    require(kv_heads >= n_heads, "hf_config.num_key_value_heads", kv_heads,
            f">= num_attention_heads={n_heads} (MLA has per-head keys from one latent)")
    require(c("hidden_act", "silu") == "silu", "hf_config.hidden_act", c("hidden_act"), "'silu'")
    require(c("norm_topk_prob", True) is not False, "hf_config.norm_topk_prob",
            c("norm_topk_prob"), "True (v4lab normalises the selected gates, as V3 does)")
    eps = float(c("rms_norm_eps", 1e-6))
    require(eps == 1e-6, "hf_config.rms_norm_eps", eps,
            "1e-6 (transformers' q_a/kv_a norms always use 1e-6; v4lab uses one eps for all norms)")
    n_layers = c("num_hidden_layers")
    n_routed = c("n_routed_experts")
    moe = MoEConfig(
        enabled=True, n_routed_experts=n_routed, n_shared_experts=c("n_shared_experts", 1),
        top_k=c("num_experts_per_tok"), expert_dim=c("moe_intermediate_size"),
        first_dense_layers=min(c("first_k_dense_replace", 0) or 0, n_layers),
        route_scale=float(c("routed_scaling_factor", 1.0)), score_func="sigmoid",
        bias_update_rate=bias_update_rate, aux_loss_alpha=0.0,
        n_groups=c("n_group") or 1, topk_groups=c("topk_group") or 1)
    attention = AttentionConfig(
        kind="mla", n_heads=n_heads, q_lora_rank=c("q_lora_rank") or 0,
        kv_lora_rank=c("kv_lora_rank"), qk_nope_head_dim=c("qk_nope_head_dim"),
        qk_rope_head_dim=c("qk_rope_head_dim"), v_head_dim=c("v_head_dim"), vvpa=False,
        kv_cache=KVCacheConfig(dtype=kv_cache), sparse=SparseConfig(enabled=False))
    return ModelConfig(
        vocab_size=c("vocab_size"), dim=c("hidden_size"), n_layers=n_layers,
        ffn_dim=c("intermediate_size"), max_seq_len=c("max_position_embeddings"),
        rope_theta=theta, norm_eps=eps, tie_embeddings=bool(c("tie_word_embeddings", False)),
        init_std=float(c("initializer_range", 0.02)), attention=attention, moe=moe,
        engram=EngramConfig(enabled=False)).validate()


def _require_v3_expressible(cfg: ModelConfig) -> None:
    a, m = cfg.attention, cfg.moe
    require(a.kind == "mla", "model.attention.kind", a.kind, "'mla' (DeepSeek-V3 uses MLA)")
    require(not a.sparse.enabled, "model.attention.sparse.enabled", a.sparse.enabled,
            "False (DeepSeek-V3 attention is dense)")
    require(not a.vvpa, "model.attention.vvpa", a.vvpa, "False (not part of DeepSeek-V3)")
    require(not cfg.engram.enabled, "model.engram.enabled", cfg.engram.enabled,
            "False (not part of DeepSeek-V3)")
    if m.enabled:
        require(m.score_func == "sigmoid", "model.moe.score_func", m.score_func,
                "'sigmoid' (DeepSeek-V3's router)")


def hf_state_to_v4lab(state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                      rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """Map a DeepseekV3ForCausalLM state dict (or a dict of its gradients) to v4lab names
    and layouts. Pure re-indexing: the same function maps parameters and their gradients."""
    a = cfg.attention
    h, dn, dr, r = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank
    perm = rope_permutation(dr, rope_interleave)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in state.items():
        key = key.removeprefix("module.")
        if key == "lm_head.weight":
            out["lm_head.weight"] = t
            continue
        key = key.removeprefix("model.")
        if key == "embed_tokens.weight":
            out["tok_emb.weight"] = t
            continue
        if key == "norm.weight":
            out["norm.weight"] = t
            continue
        mt = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if mt is None:
            raise KeyError(f"unexpected key {key!r} in the DeepseekV3 state dict")
        i, rest = int(mt.group(1)), mt.group(2)
        if i >= cfg.n_layers:  # MTP layers (model.layers.61.* in V3 checkpoints)
            continue
        p = f"blocks.{i}."
        if rest == "input_layernorm.weight":
            out[p + "attn_norm.weight"] = t
        elif rest == "post_attention_layernorm.weight":
            out[p + "ffn_norm.weight"] = t
        elif rest.startswith("self_attn."):
            name = rest.split(".")[1]
            require(name in _ATTN and rest.endswith(".weight"), "state_dict", key,
                    f"an MLA weight among {sorted(_ATTN)}")
            out[p + f"attn.{_ATTN[name]}.weight"] = _reorder_rope_rows(name, t, perm, h, dn, dr, r)
        elif rest == "mlp.gate.weight":
            out[p + "ffn.gate.proj.weight"] = t
        elif rest == "mlp.gate.e_score_correction_bias":
            out[p + "ffn.gate.bias"] = t
        elif rest == "mlp.experts.gate_up_proj":  # [E, 2I, dim]
            gate, up = t.chunk(2, dim=1)
            out[p + "ffn.experts.w1"] = gate.transpose(1, 2)
            out[p + "ffn.experts.w3"] = up.transpose(1, 2)
        elif rest == "mlp.experts.down_proj":  # [E, dim, I]
            out[p + "ffn.experts.w2"] = t.transpose(1, 2)
        elif (me := re.fullmatch(r"mlp\.experts\.(\d+)\.(\w+)\.weight", rest)) is not None:
            experts.setdefault((i, _MLP[me.group(2)]), {})[int(me.group(1))] = t.t()
        elif (ms := re.fullmatch(r"mlp\.shared_experts\.(\w+)\.weight", rest)) is not None:
            out[p + f"ffn.shared.{_MLP[ms.group(1)]}.weight"] = t
        elif (md := re.fullmatch(r"mlp\.(\w+)\.weight", rest)) is not None and md.group(1) in _MLP:
            out[p + f"ffn.{_MLP[md.group(1)]}.weight"] = t
        else:
            raise KeyError(f"unexpected key {key!r} in the DeepseekV3 state dict")
    for (i, w), per_expert in experts.items():
        out[f"blocks.{i}.ffn.experts.{w}"] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def to_v4lab(hf: Any, hf_config: Any = None, bias_update_rate: float = 0.0,
             kv_cache: str = "fp32") -> tuple[Transformer, ModelConfig]:
    """A v4lab Transformer holding the weights of a DeepseekV3ForCausalLM.

    hf: the transformers model (its ``config`` is used) or its state dict (then pass
    ``hf_config``, a DeepseekV3Config or a dict of its fields). ``kv_cache``: see
    :func:`model_config_from_hf`. Returns (model, config);
    the model is in eval mode, in fp32, on the CPU unless the weights are elsewhere.
    """
    if hf_config is None:
        hf_config = getattr(hf, "config", None)
        if hf_config is None:
            raise ConfigError("to_v4lab: pass hf_config when converting a bare state dict")
    state = hf.state_dict() if hasattr(hf, "state_dict") else hf
    cfg = model_config_from_hf(hf_config, bias_update_rate, kv_cache)
    mapped = hf_state_to_v4lab(state, cfg, bool(_get(hf_config, "rope_interleave", True)))
    with torch.device("meta"):
        model = Transformer(cfg)
    device = next(iter(mapped.values())).device
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(
        {k: v.detach().float().contiguous() for k, v in mapped.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("ffn.load")]
    if missing or unexpected:
        raise KeyError(f"to_v4lab: missing {missing}, unexpected {unexpected}")
    for m in model.modules():  # non-persistent buffers are not in the state dict
        if hasattr(m, "load") and isinstance(m.load, torch.Tensor):
            m.load.zero_()
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval(), cfg


def to_hf_config(cfg: ModelConfig, **overrides: Any):
    """The DeepseekV3Config equivalent to a v4lab ModelConfig (imports transformers)."""
    from transformers import DeepseekV3Config

    _require_v3_expressible(cfg)
    a, m = cfg.attention, cfg.moe
    moe_on = m.enabled
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_heads, q_lora_rank=a.q_lora_rank or None,
        kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
        moe_intermediate_size=m.expert_dim, n_routed_experts=m.n_routed_experts,
        n_shared_experts=m.n_shared_experts, num_experts_per_tok=m.top_k,
        first_k_dense_replace=m.first_dense_layers if moe_on else cfg.n_layers,
        n_group=m.n_groups, topk_group=m.topk_groups, norm_topk_prob=True,
        routed_scaling_factor=m.route_scale, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_interleave=True, attention_bias=False, hidden_act="silu", pad_token_id=None)
    fields.update(overrides)
    return DeepseekV3Config(**fields)


def from_v4lab(model: Transformer, rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """A DeepseekV3ForCausalLM state dict (transformers' stacked-expert layout) holding the
    weights of a v4lab Transformer; load it into ``DeepseekV3ForCausalLM(to_hf_config(cfg))``."""
    cfg = model.cfg
    _require_v3_expressible(cfg)
    a = cfg.attention
    h, dn, dr, r = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank
    inv = torch.argsort(rope_permutation(dr, rope_interleave))
    inv_attn = {v: k for k, v in _ATTN.items()}
    inv_mlp = {v: k for k, v in _MLP.items()}
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        t = t.detach().clone()
        if key.endswith("ffn.load"):
            continue
        if key == "tok_emb.weight":
            out["model.embed_tokens.weight"] = t
            continue
        if key == "norm.weight":
            out["model.norm.weight"] = t
            continue
        if key == "lm_head.weight":
            out["lm_head.weight"] = t
            continue
        mt = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if mt is None:
            raise KeyError(f"from_v4lab: unexpected v4lab key {key!r}")
        p, rest = f"model.layers.{mt.group(1)}.", mt.group(2)
        if rest == "attn_norm.weight":
            out[p + "input_layernorm.weight"] = t
        elif rest == "ffn_norm.weight":
            out[p + "post_attention_layernorm.weight"] = t
        elif rest.startswith("attn."):
            name = inv_attn[rest.split(".")[1]]
            out[p + f"self_attn.{name}.weight"] = _reorder_rope_rows(name, t, inv, h, dn, dr, r)
        elif rest == "ffn.gate.proj.weight":
            out[p + "mlp.gate.weight"] = t
        elif rest == "ffn.gate.bias":
            out[p + "mlp.gate.e_score_correction_bias"] = t
        elif rest in ("ffn.experts.w1", "ffn.experts.w3"):
            continue  # written together below
        elif rest == "ffn.experts.w2":
            out[p + "mlp.experts.down_proj"] = t.transpose(1, 2).contiguous()
            w1, w3 = sd[f"blocks.{mt.group(1)}.ffn.experts.w1"], sd[f"blocks.{mt.group(1)}.ffn.experts.w3"]
            out[p + "mlp.experts.gate_up_proj"] = torch.cat(
                [w1.transpose(1, 2), w3.transpose(1, 2)], 1).detach().clone()
        elif (ms := re.fullmatch(r"ffn\.shared\.(w\d)\.weight", rest)) is not None:
            out[p + f"mlp.shared_experts.{inv_mlp[ms.group(1)]}.weight"] = t
        elif (md := re.fullmatch(r"ffn\.(w\d)\.weight", rest)) is not None:
            out[p + f"mlp.{inv_mlp[md.group(1)]}.weight"] = t
        else:
            raise KeyError(f"from_v4lab: unexpected v4lab key {key!r}")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
