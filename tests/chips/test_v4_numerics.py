"""Issue 14: the chip's KV-cache policy applies to V4 attention's own cache dtype
(``model.attention.v4.kv_dtype``)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from v4lab import accounting, chips
from v4lab.errors import ConfigError
from v4lab.io import CONF_DIR
from v4lab.model import ModelConfig
from v4lab.modules.args import AttentionConfig


def _raw(name: str) -> dict:
    d = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "chip" / f"{name}.yaml"))
    assert isinstance(d, dict)
    return d


def _v4_cfg(kv_dtype: str) -> ModelConfig:
    from v4lab.modules.v4_config import V4AttentionConfig

    v4 = V4AttentionConfig(n_heads=4, head_dim=16, rope_dim=8, q_lora_rank=24, window=6, csa_ratio=4,
                           hca_ratio=8, index_n_heads=2, index_head_dim=8, csa_topk=3, o_groups=2,
                           o_lora_rank=12, kv_dtype=kv_dtype, kv_block=8)
    att = AttentionConfig(kind="v4", v4=v4, compress_ratios=[0, 4, 8, 4])
    return ModelConfig(vocab_size=64, dim=32, n_layers=4, ffn_dim=48, max_seq_len=64,
                       attention=att).validate()


def test_v4_cache_dtype_gets_the_chip_policy():
    """Issue 14: the chip's KV policy reads and sets model.attention.v4.kv_dtype (the V4
    cache's own format), not the unused kv_cache.dtype."""
    cfg = _v4_cfg("fp8")
    assert cfg.attention.kv_cache.dtype != "fp8"  # the policy must look at v4.kv_dtype
    with pytest.raises(ConfigError, match=r"model\.attention\.v4\.kv_dtype='fp8' is not allowed"):
        chips.resolve_numerics(chips.load_chip("ascend_910b"), cfg)
    # a chip without FP8 whose documented fallback is bf16: the V4 cache falls back
    d = _raw("ascend_910b")
    d["kv_fallback_dtype"], d["on_unsupported"] = "bf16", "fallback"
    chip = chips.ChipConfig.from_dict(d)
    run, matmul, notes = chips.apply_numerics(chip, cfg)
    assert run.attention.v4.kv_dtype == "bf16" and cfg.attention.v4.kv_dtype == "fp8"
    assert "fallback" in notes[0]
    m = chips.chip_metrics(chip, cfg)
    assert (m["chip/kv_dtype_requested"], m["chip/kv_dtype_effective"]) == ("fp8", "bf16")
    # the projection prices the bf16 cache: entry 16 x 2 = 32 B, not fp8's 8 + 4 + 8 x 2 = 28 B
    assert m["chip/kv_bytes_per_token"] == pytest.approx(accounting.kv_bytes_per_token(run))
    # per token: CSA (entry + 16 B key) / 4 on 2 layers, HCA entry / 8
    assert accounting.kv_bytes_per_token(run) == 2 * (32 + 16) / 4 + 32 / 8
    assert accounting.kv_bytes_per_token(cfg) == 2 * (28 + 16) / 4 + 28 / 8
    # supported on an FP8 chip: unchanged
    assert chips.apply_numerics(chips.load_chip("nvidia_h800"), cfg)[0].attention.v4.kv_dtype == "fp8"


def test_v4_cache_refuses_a_fallback_it_cannot_store():
    """Ascend's documented fallback is int8, which the V4 cache has no format for."""
    chip = chips.load_chip("ascend_910c", on_unsupported="fallback")
    with pytest.raises(ConfigError, match=r"V4 attention caches do not support .*"
                                          r"model\.attention\.v4\.kv_dtype"):
        chips.resolve_numerics(chip, _v4_cfg("fp8"))
