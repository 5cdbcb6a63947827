"""Probe runs (``probe=<task>``, v4lab.probe_run): the files and metrics a study reads,
the KV-cache comparison on the same weights, and the probe keys' validation."""

from __future__ import annotations

import json

import pytest
import torch

from v4lab.config import load_run_config
from v4lab.data.config import ProbeConfig
from v4lab.errors import ConfigError
from v4lab.folders import RunError
from v4lab.io import compose
from v4lab.probe_run import probe_model_config, with_cache
from v4lab.probe_train import probe_hits
from v4lab.stats import mcnemar_exact
from v4lab.train import train

SMALL = ["model=probe", "probe=assoc_recall", "probe.steps=6", "probe.warmup=2", "probe.eval_every=3",
         "probe.eval_sequences=4", "probe.lengths=[1,2]", "probe.caches=[bf16,int8]",
         "trainer.num_threads=1", "logger.mode=disabled"]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("probe") / "run"
    cfg = compose(["+experiment=no_sparse_mla", *SMALL])
    return run_dir, cfg, train(cfg, run_dir)


def test_probe_run_writes_what_a_study_reads(probe_run):
    run_dir, _, metrics = probe_run
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics)
    for name in ("config.yaml", "curves.csv", "checkpoints/final.pt"):
        assert (run_dir / name).is_file(), name
    assert metrics["train/steps"] == 6 and metrics["probe/name"] == "assoc_recall"
    for length in (32, 64):  # the trained length and 2x, 4 sequences x 4 queries each
        assert metrics[f"probe/answers@{length}"] == 16
        assert 0 <= metrics[f"probe/acc@{length}"] <= 1
        assert metrics[f"cost/kv_bytes@{length}"] > 0
    # the cache holds twice the tokens at twice the length (the same per-token layout)
    assert metrics["cost/kv_bytes@64"] == pytest.approx(2 * metrics["cost/kv_bytes@32"], rel=0.05)
    assert metrics["probe/chance"] == pytest.approx(1 / 16) and metrics["probe/baseline"] == 1 / 4
    assert metrics["probe/reached_90"] in (0.0, 1.0)
    assert [line.split(",")[0] for line in (run_dir / "curves.csv").read_text().split()] == ["step", "3", "6"]


def test_other_caches_are_compared_on_the_same_weights_and_answers(probe_run):
    run_dir, cfg, metrics = probe_run
    run_cfg = load_run_config(cfg)
    saved = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    from v4lab.probe_run import new_model

    model = new_model(saved["model"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    probe = run_cfg.probe.make()
    own = probe_hits(model, probe, run_cfg.seed, 4, decode=True)
    assert float(own.float().mean()) == metrics["probe/acc@32"]  # the saved weights are the run's
    int8 = probe_hits(with_cache(model, "int8"), probe, run_cfg.seed, 4, decode=True)
    test = mcnemar_exact(int8.numpy(), own.numpy())
    assert metrics["probe/kv_int8/acc"] == float(int8.float().mean())
    assert metrics["probe/kv_int8/discordant"] == test.n10 + test.n01
    assert metrics["probe/kv_int8/mcnemar_p"] == test.p
    assert with_cache(model, "int8").cfg.attention.kv_cache.dtype == "int8"
    torch.testing.assert_close(with_cache(model, "bf16").state_dict(), model.state_dict())


EVALUATED = ("probe/acc@", "probe/answers@", "cost/kv_bytes@", "probe/kv_")


def test_evaluating_a_trained_run_again_gives_its_own_evaluation(probe_run, tmp_path):
    """Same weights, same answers: the in-run figures come back exactly, for the run's own
    cache and for each other cache; a new cache (fp32) is compared on the same answers."""
    from v4lab.probe_run import evaluate_run

    run_dir, cfg, metrics = probe_run
    again = evaluate_run(load_run_config(compose(["+experiment=no_sparse_mla", *SMALL, "study=again"])),
                         run_dir, tmp_path / "again")
    evaluated = {k: v for k, v in metrics.items() if k.startswith(EVALUATED)}
    assert len(evaluated) == 12 and {k: again[k] for k in evaluated} == evaluated  # 2 lengths, 2 caches
    assert again["train/steps"] == 6 and again["study"] == "again" and again["source_run"] == str(run_dir)
    assert json.loads((tmp_path / "again" / "metrics.json").read_text()) == pytest.approx(again)
    assert (tmp_path / "again" / "curves.csv").read_text() == (run_dir / "curves.csv").read_text()

    fp32 = evaluate_run(load_run_config(compose(["+experiment=no_sparse_mla", *SMALL, "probe.lengths=[1]",
                                                 "probe.caches=[fp32]"])), run_dir, tmp_path / "fp32")
    assert fp32["probe/acc@32"] == metrics["probe/acc@32"] and "probe/acc@64" not in fp32
    saved = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    from v4lab.probe_run import new_model

    model = new_model(saved["model"])
    model.load_state_dict(saved["state_dict"])
    run_cfg = load_run_config(cfg)
    own = probe_hits(model.eval(), run_cfg.probe.make(), run_cfg.seed, 4, decode=True)
    hits = probe_hits(with_cache(model, "fp32"), run_cfg.probe.make(), run_cfg.seed, 4, decode=True)
    assert fp32["probe/kv_fp32/acc"] == float(hits.float().mean())
    assert fp32["probe/kv_fp32/mcnemar_p"] == mcnemar_exact(hits.numpy(), own.numpy()).p


@pytest.mark.parametrize("change", ["probe.steps=7", "seed=1", "probe.eval_sequences=8"])
def test_an_evaluation_that_trained_otherwise_is_refused(probe_run, tmp_path, change):
    from v4lab.probe_run import evaluate_run

    run_dir, _, _ = probe_run
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=f"trained otherwise than this evaluation asks .*{key}"):
        evaluate_run(load_run_config(compose(["+experiment=no_sparse_mla", *SMALL, change])),
                     run_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_finished_probe_run_is_not_run_again(probe_run):
    run_dir, cfg, metrics = probe_run
    assert train(cfg, run_dir) == metrics
    with pytest.raises(RunError, match="probe run is not evaluated again"):
        train(compose(["+experiment=no_sparse_mla", *SMALL, "reevaluate=true"]), run_dir)


def test_probe_model_takes_the_probes_vocabulary_and_longest_length():
    run_cfg = load_run_config(compose(["+experiment=mha", *SMALL]))
    cfg = probe_model_config(run_cfg, run_cfg.model)
    assert cfg.vocab_size == 1 + 32 + 16 and cfg.max_seq_len == 64


@pytest.mark.parametrize("change, match", [
    ({"name": "recall"}, "probe.name='recall'"),
    ({"lengths": [2, 4]}, "starting with 1"),
    ({"task": {"n_pairs": 40}}, "assoc_recall.n_pairs=40"),
    ({"task": {"pairs": 4}}, "fields of assoc_recall"),
    ({"steps": 0}, "probe.steps=0"),
])
def test_bad_probe_keys_are_named(change, match):
    with pytest.raises(ConfigError, match=match):
        ProbeConfig(**{"name": "assoc_recall", **change}).validate()


def _study_configs(name: str) -> dict:
    import yaml

    from conftest import ROOT

    study = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())
    return study, {e: load_run_config(compose([f"+experiment={e}", *study["overrides"]]))
                   for e in study["experiments"]}


def test_recall_study_rows_differ_from_dense_mla_in_attention_only():
    study, cfgs = _study_configs("recall")
    ref = cfgs[study["baseline"]]
    assert ref.model.attention.kind == "mla" and not ref.model.attention.sparse.enabled
    for name, cfg in cfgs.items():
        assert cfg.probe == ref.probe and cfg.model.moe == ref.model.moe, name
        assert cfg.model.engram == ref.model.engram and cfg.model.init_std == 0.1, name
    assert cfgs["mha"].model.attention.kind == "mha" and cfgs["v4_attention"].model.attention.kind == "v4"
    pairs = ref.probe.task["n_pairs"]  # top-k below and above the pairs a sequence holds
    assert cfgs["topk_2"].model.attention.sparse.topk < pairs < cfgs["topk_8"].model.attention.sparse.topk
    for col in study["metrics"]:  # every length column is one the runs evaluate
        if col.startswith("probe/acc@"):
            assert int(col.split("@")[1]) // ref.probe.task["seq_len"] in ref.probe.lengths, col


def test_vvpa_study_changes_only_vvpa():
    study, cfgs = _study_configs("vvpa")
    a, b = cfgs["no_sparse_mla"], cfgs["no_vvpa"]
    assert a.model.attention.vvpa and not b.model.attention.vvpa
    assert a.model.attention.sparse == b.model.attention.sparse and a.probe == b.probe
