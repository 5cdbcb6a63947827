"""The allocation-sweep experiment files give the stated share of a fixed sparse budget
to Engram, counted independently of the MoE module."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from v4lab.modules.args import EngramConfig, MoEConfig
from v4lab.modules.engram import engram_table_params

CONF = Path(__file__).resolve().parents[1] / "conf"
PCTS = (0, 20, 40, 60, 80)


def load(name: str):
    model = OmegaConf.load(CONF / "model" / "small.yaml")
    exp = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    return OmegaConf.merge(model, exp.model)


def budget(cfg) -> tuple[int, int]:
    """(Engram table params, routed-expert params) of a merged model config."""
    moe = {**vars(MoEConfig()), **OmegaConf.to_container(cfg.moe)}
    fields = EngramConfig.__dataclass_fields__
    eng = EngramConfig(**{k: v for k, v in OmegaConf.to_container(cfg.engram).items()
                          if k in fields})
    moe_layers = cfg.n_layers - moe["first_dense_layers"]
    routed = moe["n_routed_experts"] * 3 * cfg.dim * moe["expert_dim"] * moe_layers
    return engram_table_params(eng), routed if moe["enabled"] else 0


def test_allocation_shares_of_a_fixed_budget():
    totals = []
    for pct in PCTS:
        cfg = load(f"alloc_{pct}")
        eng, routed = budget(cfg)
        totals.append(eng + routed)
        assert eng / (eng + routed) == pytest.approx(pct / 100, abs=0.02), pct
        assert cfg.engram.enabled == (pct > 0)
        # active parameters fixed: same top_k and expert width everywhere
        assert (cfg.moe.top_k, cfg.moe.expert_dim) == (2, 128)
    assert max(totals) / min(totals) < 1.02


def test_no_engram_switches_engram_off():
    cfg = load("no_engram")
    assert cfg.engram.enabled is False
    assert budget(cfg)[0] == 0
    assert OmegaConf.load(CONF / "model" / "small.yaml").engram.enabled is True
