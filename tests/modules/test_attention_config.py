"""Bad attention configs fail in validate(), naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from v4lab.errors import ConfigError
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, KVCacheConfig, SparseConfig


def model_cfg(**attn) -> ModelConfig:
    sparse = attn.pop("sparse", {})
    kv = attn.pop("kv_cache", {})
    att = AttentionConfig(**attn, kv_cache=KVCacheConfig(**kv), sparse=SparseConfig(**sparse))
    return ModelConfig(vocab_size=64, dim=64, n_layers=1, ffn_dim=64, max_seq_len=32,
                       attention=att)


@pytest.mark.parametrize("attn,key,allowed", [
    (dict(sparse=dict(enabled=True, topk=0)), "model.attention.sparse.topk=0",
     "an integer >= 1"),
    (dict(sparse=dict(enabled=True, topk=-3)), "model.attention.sparse.topk=-3",
     "an integer >= 1"),
    (dict(kv_lora_rank=96, kv_cache=dict(dtype="fp8")), "model.attention.kv_lora_rank=96",
     "a multiple of kv_cache.block_size=128 when kv_cache.dtype='fp8'"),
    (dict(kv_lora_rank=200, kv_cache=dict(dtype="int8")), "model.attention.kv_lora_rank=200",
     "a multiple of kv_cache.block_size=128 when kv_cache.dtype='int8'"),
    (dict(qk_rope_head_dim=7), "model.attention.qk_rope_head_dim=7",
     "a positive even integer (RoPE rotates pairs)"),
    (dict(sparse=dict(index_rope_dim=5)), "model.attention.sparse.index_rope_dim=5",
     "an even integer in [0, index_head_dim=32]"),
    (dict(kind="mha", n_heads=4, head_dim=15), "model.attention.head_dim=15",
     "a positive even integer (RoPE rotates pairs)"),
    (dict(kind="mha", n_heads=5, head_dim=16), "model.attention.n_heads=5",
     "a divisor of model.dim=64"),
    (dict(kind="mha", n_heads=4, head_dim=16, sparse=dict(enabled=True)),
     "model.attention.sparse.enabled=True", "false when attention.kind='mha'"),
    (dict(kind="mha", n_heads=4, head_dim=16, vvpa=True), "model.attention.vvpa=True",
     "false when attention.kind='mha'"),
    (dict(kind="mha", n_heads=4, head_dim=16, kv_cache=dict(dtype="fp8")),
     "model.attention.kv_cache.dtype='fp8'", "'fp32' or 'bf16' when attention.kind='mha'"),
    (dict(kind="gqa"), "model.attention.kind='gqa'", "one of 'mha', 'mla'"),
    (dict(kv_cache=dict(dtype="fp4")), "model.attention.kv_cache.dtype='fp4'",
     "one of 'fp32', 'bf16', 'fp8', 'int8'"),
    (dict(kv_cache=dict(scale_format="e5m2")), "model.attention.kv_cache.scale_format='e5m2'",
     "one of 'fp32', 'ue8m0'"),
    (dict(sparse=dict(warmup_steps=-1)), "model.attention.sparse.warmup_steps=-1", ">= 0"),
])
def test_bad_attention_config_names_key_and_allowed(attn, key, allowed):
    cfg = model_cfg(**attn)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    msg = str(err.value)
    assert msg.startswith(key + " is not allowed: "), msg
    assert allowed in msg, msg
    with pytest.raises(ConfigError):  # the model refuses to build, before any training
        Transformer(cfg)


def test_good_full_config_builds():
    cfg = model_cfg(vvpa=True, kv_cache=dict(dtype="fp8", scale_format="ue8m0"),
                    sparse=dict(enabled=True, topk=8))
    Transformer(cfg)
