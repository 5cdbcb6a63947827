"""The ngram_facts probe studies (experiments/facts.yaml, experiments/capacity.yaml): the
rows' parameter counts from the built probe models (what metrics.json records as
cost/params_*), checked against a count by hand; the manifests' overrides survive the
shell quoting of the DVC stage command and give >= 1,000 held-out answers per run."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from conftest import primes_from
from v4lab.config import load_run_config
from v4lab.io import compose
from v4lab.probe_run import new_model, probe_model_config

ROOT = Path(__file__).resolve().parents[1]
FACTS = (0, 50, 100)
EXPERTS = (4, 16, 64)
SPREAD = 464  # total-parameter spread printed by scripts/engram_allocation.py --size probe


def _manifest(name: str) -> dict:
    return yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())


def _run_cfg(study: str, experiment: str):
    """The run's config from the overrides as the DVC stage passes them: shlex.join'ed into
    the command (v4lab.studies.dvcyaml), then split again by the shell."""
    command = shlex.join([f"+experiment={experiment}", *_manifest(study)["overrides"]])
    return load_run_config(compose(shlex.split(command)))


def _built(study: str, experiment: str):
    cfg = _run_cfg(study, experiment)
    return cfg, new_model(probe_model_config(cfg, cfg.model))


def _inactive_by_hand(m) -> int:
    """Parameters a token does not pass through: embedding rows but one, routed experts
    beyond top_k, Engram table rows beyond one per (order, head)."""
    out = (m.vocab_size - 1) * m.dim
    if m.moe.enabled:
        per_expert = 3 * m.dim * m.moe.expert_dim * (m.n_layers - m.moe.first_dense_layers)
        out += (m.moe.n_routed_experts - m.moe.top_k) * per_expert
    if m.engram.enabled:
        e = m.engram
        n_tables = len(e.ngram_orders) * e.heads_per_order
        out += (sum(primes_from(e.table_size, n_tables)) - n_tables) * e.head_dim * len(e.layers)
    return out


@pytest.fixture(scope="module")
def facts():
    return {pct: _built("facts", f"facts_alloc_{pct}")[1] for pct in FACTS}


def test_facts_rows_have_equal_active_and_total_within_one_percent(facts):
    totals = {p: sum(t.numel() for t in m.parameters()) for p, m in facts.items()}
    active = {p: m.num_active_params() for p, m in facts.items()}
    assert len(set(active.values())) == 1, active
    assert max(totals.values()) - min(totals.values()) == SPREAD
    assert (max(totals.values()) - min(totals.values())) / min(totals.values()) < 0.01
    for p, m in facts.items():  # the active count agrees with a count by hand
        assert m.num_params() == totals[p]
        assert totals[p] - active[p] == _inactive_by_hand(m.cfg), p


def test_facts_rows_move_the_budget_from_experts_to_the_table(facts):
    cfg = {p: m.cfg for p, m in facts.items()}
    assert all(c.engram.enabled for c in cfg.values())  # same Engram projections everywhere
    assert cfg[0].engram.table_size == cfg[0].engram.heads_per_order  # its smallest table
    assert cfg[0].moe.n_routed_experts > cfg[50].moe.n_routed_experts and not cfg[100].moe.enabled
    width = (cfg[0].moe.n_shared_experts + cfg[0].moe.top_k) * cfg[0].moe.expert_dim
    assert cfg[100].ffn_dim == width == 128  # the top_k experts' width moved into the FFN


def test_capacity_rows_differ_in_active_params_by_the_router_only():
    built = {n: _built("capacity", f"capacity_experts_{n}")[1] for n in EXPERTS}
    dense = _built("capacity", "capacity_dense")[1]
    assert not dense.cfg.moe.enabled and not dense.cfg.engram.enabled
    per_expert = 3 * dense.cfg.dim * 32  # one routed expert of width 32 in the one MoE layer
    for n, m in built.items():
        assert not m.cfg.engram.enabled
        assert m.num_active_params() - dense.num_active_params() == dense.cfg.dim * n
        extra = m.num_params() - dense.num_params()  # routed beyond the 2 active + router
        assert extra == (n - 2) * per_expert + dense.cfg.dim * n, n
        assert m.num_params() - m.num_active_params() == _inactive_by_hand(m.cfg)


@pytest.mark.parametrize("study", ["facts", "capacity"])
def test_probe_settings_compose_and_give_enough_answers(study):
    manifest = _manifest(study)
    cfgs = {e: _run_cfg(study, e) for e in manifest["experiments"]}
    ref = cfgs[manifest["baseline"]]
    assert all(c.probe == ref.probe for c in cfgs.values())  # rows differ in the model only
    probe = ref.probe.make()
    assert probe.NAME == "ngram_facts" and probe.n_facts > 1000
    assert ref.probe.eval_sequences * probe.facts_per_seq >= 1000  # answers per run
    assert manifest["metrics"][0] == f"probe/acc@{probe.seq_len}"
    assert ref.trainer.num_threads == 1
