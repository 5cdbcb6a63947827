"""Issue 14: cost/kv_bytes@<context> of V4 attention holds the sliding-window ring besides
the compressed entries and the indexer keys, by hand and off the stored tensors."""

from __future__ import annotations

import pytest
import torch

from v4lab import accounting
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig
from v4lab.modules.v4_config import V4AttentionConfig


def _v4_model_cfg() -> ModelConfig:
    v4 = V4AttentionConfig(n_heads=4, head_dim=16, rope_dim=8, q_lora_rank=24, window=6, csa_ratio=4,
                           hca_ratio=8, index_n_heads=2, index_head_dim=8, csa_topk=3, o_groups=2,
                           o_lora_rank=12, kv_dtype="fp8", kv_block=4)
    return ModelConfig(vocab_size=97, dim=32, n_layers=4, ffn_dim=48, max_seq_len=64,
                       attention=AttentionConfig(kind="v4", v4=v4, compress_ratios=[0, 4, 8, 4]))


@pytest.mark.parametrize("context,expected", [(3, 384), (40, 1760)])
def test_v4_kv_bytes_held_include_the_window_ring_below_and_above_it(context, expected):
    """cost/kv_bytes@<context> of a small V4 stack (layers: sliding, CSA m=4, HCA m'=8, CSA;
    window W=6; fp8 entries of head_dim 16 = 8 nope bytes + 2 fp32 scales + 8 bf16 rope
    values = 32 bytes; indexer keys 8 bf16 = 16 bytes), by hand:
      context 3:  window min(W-1, 3) = 3 entries x 32 B x 4 layers = 384; no block complete.
      context 40: window 5 x 32 x 4 = 640; CSA 40/4 = 10 x (32 + 16) x 2 layers = 960;
                  HCA 40/8 = 5 x 32 = 160: 1760.
    The ring keeps W - 1 entries between steps (the current token's is made by the step),
    so the cap is min(W - 1, context). The same number read off the stored tensors after
    a real prefill (what evaluate records as cost/kv_bytes@<context>)."""
    from v4lab.evaluate import cache_bytes

    cfg = _v4_model_cfg().validate()
    assert accounting.kv_bytes_held(cfg, context) == expected
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    caches = model.new_caches(1, context)
    with torch.no_grad():
        model.prefill(torch.randint(0, cfg.vocab_size, (1, context)), caches)
    assert cache_bytes(caches) == expected
