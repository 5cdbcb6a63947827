"""A study that ``evaluates`` another study's trained runs (``kv_cache`` decodes ``recall``'s
dense-MLA weights with other caches): evaluate@ stages on the trained runs' outputs instead
of training, refused when the configs would train otherwise (composed from the real conf/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from v4lab.errors import ConfigError
from v4lab.studies import dvcyaml, load_study, multirun_command


@pytest.fixture(scope="module")
def stages() -> dict:
    return dvcyaml.dvc_stages(ROOT)["stages"]


def test_kv_cache_evaluates_the_recall_runs_without_training(stages):
    study = load_study("kv_cache", ROOT)
    assert study.evaluates == "recall"
    assert not [k for k in stages["train"]["foreach"] if k.startswith("kv_cache-")]
    evaluate = stages["evaluate"]
    assert list(evaluate["foreach"]) == [f"kv_cache-no_sparse_mla-s{s}" for s in range(5)]
    item = evaluate["foreach"]["kv_cache-no_sparse_mla-s3"]
    assert (item["source"], item["run"], item["seed"]) == ("recall", "no_sparse_mla-s3", 3)
    assert "'probe.caches=[fp32,bf16,int8]'" in item["overrides"]
    do = evaluate["do"]
    assert do["cmd"].startswith("python -m v4lab.probe_run --source outputs/${item.source}/${item.run} "
                                "--out outputs/${item.study}/${item.run} +experiment=${item.experiment}")
    # the trained run's outputs: DVC runs train@recall-... first and re-evaluates when they change
    assert "outputs/${item.source}/${item.run}/checkpoints" in do["deps"]
    assert "recall-no_sparse_mla-s3" in stages["train"]["foreach"]
    assert do["metrics"] == ["outputs/${item.study}/${item.run}/metrics.json"]
    assert "outputs/kv_cache/no_sparse_mla-s3/metrics.json" in stages["kv_cache"]["deps"]
    with pytest.raises(ConfigError, match="trains nothing: it evaluates study 'recall'"):
        multirun_command(study)


def _checkout(tmp_path: Path, **changes) -> Path:
    (tmp_path / "run.py").write_text("")
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "src" / "v4lab").mkdir(parents=True)
    (tmp_path / "experiments").mkdir()
    for name in ("recall", "kv_cache"):
        data = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())
        if name == "kv_cache":
            data |= changes
        (tmp_path / "experiments" / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


@pytest.mark.parametrize(("changes", "message"), [
    ({"overrides": ["profile=study", "model=probe", "probe=assoc_recall", "probe.steps=300",
                    "probe.caches=[fp32]"]},
     "no_sparse_mla would train otherwise there (probe.steps: 1000 vs 300)"),
    ({"seeds": [0, 5]}, "missing: ['seed 5']"),
    ({"experiments": ["no_vvpa"], "baseline": "no_vvpa"}, "missing: ['no_vvpa']"),
])
def test_an_evaluation_of_runs_trained_otherwise_is_refused(tmp_path, changes, message):
    root = _checkout(tmp_path, **changes)
    with pytest.raises(ConfigError, match="kv_cache.yaml: evaluates=recall is not allowed") as e:
        dvcyaml.dvc_stages(root)
    assert message in str(e.value)


@pytest.mark.parametrize("value", ["kv_cache", "nope", 3])
def test_evaluates_names_another_study(tmp_path, value):
    root = _checkout(tmp_path, evaluates=value)
    with pytest.raises(ConfigError, match=f"evaluates={value!r} is not allowed: the name of another study"):
        load_study("kv_cache", root)
