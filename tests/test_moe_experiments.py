"""The MoE blocks of conf/model/*.yaml and the expert-count experiments build valid models.

No Hydra composition: the yaml files are loaded with OmegaConf and merged by hand the way
the defaults list / `# @package _global_` overlays would merge them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from v4lab.model import ModelConfig, Transformer
from v4lab.modules.moe import MoE

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERT_COUNTS = (4, 8, 16, 32)


def model_yaml(name: str):
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    if "defaults" in cfg:  # tiny inherits small
        parents = [d for d in cfg.pop("defaults") if d != "_self_"]
        cfg = OmegaConf.merge(*[model_yaml(p) for p in parents], cfg)
    return cfg


def build(name: str = "small", experiment: str | None = None) -> Transformer:
    cfg = model_yaml(name)
    cfg.vocab_size = 256  # normally ${data.vocab_size}
    if experiment is not None:
        overlay = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
        cfg = OmegaConf.merge(cfg, overlay.model)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg))
    torch.manual_seed(0)
    return Transformer(model_cfg)


def ffn_width(model: Transformer) -> tuple[int, int]:
    """(active, total) FFN hidden width of the last block."""
    ffn = model.blocks[-1].ffn
    if not isinstance(ffn, MoE):
        return ffn.w1.out_features, ffn.w1.out_features
    shared = ffn.shared.w1.out_features if ffn.shared is not None else 0
    return ffn.top_k * ffn.expert_dim + shared, ffn.n_experts * ffn.expert_dim + shared


def test_default_models_use_moe_with_dense_matched_active_width():
    for name in ("small", "tiny"):
        model = build(name)
        assert model.cfg.moe.enabled
        first = model.cfg.moe.first_dense_layers
        assert not isinstance(model.blocks[first - 1].ffn, MoE)
        assert all(isinstance(b.ffn, MoE) for b in model.blocks[first:])
        assert ffn_width(model)[0] == model.cfg.ffn_dim


def test_experiment_overlays_only_touch_moe():
    for exp in ("dense_ffn", *(f"experts_{n}" for n in EXPERT_COUNTS)):
        text = (CONF / "experiment" / f"{exp}.yaml").read_text()
        assert text.startswith("# @package _global_")
        overlay = OmegaConf.load(CONF / "experiment" / f"{exp}.yaml")
        assert overlay.experiment == exp
        assert set(overlay.keys()) == {"experiment", "model"}
        assert list(overlay.model.keys()) == ["moe"]


def test_expert_counts_hold_active_params_fixed():
    models = {n: build(experiment=f"experts_{n}") for n in EXPERT_COUNTS}
    dense = build(experiment="dense_ffn")
    assert not any(isinstance(b.ffn, MoE) for b in dense.blocks)
    widths = {n: ffn_width(m) for n, m in models.items()}
    assert {w[0] for w in widths.values()} == {dense.cfg.ffn_dim}  # active width 512
    # sparse capacity grows with the expert count: total routed width N * expert_dim
    # (routed: n experts x 128; shared: 2 x 128)
    assert [widths[n][1] for n in EXPERT_COUNTS] == [128 * n + 256 for n in EXPERT_COUNTS]
    for n, m in models.items():
        assert m.cfg.moe.n_routed_experts == n
        # equal up to the router (n x dim per MoE layer), which is active for every token
        router = m.cfg.moe.n_routed_experts * m.cfg.dim * (m.cfg.n_layers - 1)
        assert m.num_active_params() - router == pytest.approx(
            dense.num_active_params(), rel=1e-9, abs=0)
        assert m.num_active_params() == pytest.approx(dense.num_active_params(), rel=0.02)
    totals = [models[n].num_params() for n in EXPERT_COUNTS]
    assert totals == sorted(totals) and totals[0] > dense.num_params()


def test_tiny_model_forward():
    model = build("tiny", "experts_8")
    ids = torch.randint(0, 256, (2, 16))
    assert model(ids).shape == (2, 16, 256)
