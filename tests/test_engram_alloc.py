"""The allocation sweep (conf/experiment/alloc_*.yaml): the composed models have exactly
equal active parameters, total parameters within the stated spread, and the stated share
of the sparse budget in Engram's table, counted independently of the accounting module."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import primes_from

PCTS = (0, 25, 50, 75, 100)
MANIFEST = Path(__file__).resolve().parents[1] / "experiments" / "allocation.yaml"
SPREAD = 1536  # total-parameter spread printed by scripts/engram_allocation.py


def _model(name: str):
    from v4lab.config import load_run_config
    from v4lab.io import compose

    overrides = list(OmegaConf.load(MANIFEST).overrides)
    return load_run_config(compose([f"+experiment={name}", *overrides])).model


def _sparse_split(m) -> tuple[int, int]:
    """(inactive Engram table params, inactive routed-expert params) counted by hand."""
    e = m.engram
    n_tables = len(e.ngram_orders) * e.heads_per_order
    table = sum(primes_from(e.table_size, n_tables)) * e.head_dim * len(e.layers)
    eng = table - n_tables * e.head_dim * len(e.layers)
    if not m.moe.enabled:
        return eng, 0
    layers = m.n_layers - m.moe.first_dense_layers
    per_expert = 3 * m.dim * m.moe.expert_dim * layers
    return eng, (m.moe.n_routed_experts - m.moe.top_k) * per_expert


@pytest.fixture(scope="module")
def models():
    return {pct: _model(f"alloc_{pct}") for pct in PCTS}


def test_manifest_lists_the_sweep():
    assert list(OmegaConf.load(MANIFEST).experiments) == [f"alloc_{p}" for p in PCTS]


def test_equal_active_and_total_parameters(models):
    from v4lab.accounting.params import param_counts

    counts = {pct: param_counts(m) for pct, m in models.items()}
    active = {c["active"] for c in counts.values()}
    assert len(active) == 1, {p: c["active"] for p, c in counts.items()}
    totals = [c["total"] for c in counts.values()]
    assert max(totals) - min(totals) == SPREAD
    # total - active is exactly the hand-counted sparse part plus the embedding rows a
    # token does not use (nothing else moved)
    for pct, m in models.items():
        assert not m.tie_embeddings  # untied: the head is active, the embedding one row
        unused_rows = (m.vocab_size - 1) * m.dim
        assert counts[pct]["total"] - counts[pct]["active"] == sum(_sparse_split(m)) + unused_rows


def test_shares_and_ends(models):
    for pct, m in models.items():
        eng, routed = _sparse_split(m)
        assert eng / (eng + routed) == pytest.approx(pct / 100, abs=0.005), pct
        assert m.engram.enabled  # same Engram projections at every point
    assert models[0].engram.table_size == models[0].engram.heads_per_order  # smallest allowed
    assert not models[100].moe.enabled  # no routed experts ...
    shared = (models[0].moe.n_shared_experts + models[0].moe.top_k) * models[0].moe.expert_dim
    assert models[100].ffn_dim == shared  # ... their active width moved into the shared FFN


def test_no_engram_switches_engram_off():
    from v4lab.config import load_run_config
    from v4lab.io import compose

    assert load_run_config(compose(["+experiment=no_engram"])).model.engram.enabled is False
    assert load_run_config(compose([])).model.engram.enabled is True
