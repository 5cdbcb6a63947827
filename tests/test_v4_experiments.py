"""The V4 experiments (conf/experiment/): each composes, changes only what it ablates
relative to its parent row, builds its model; `v4` and `v4_attention` train at smoke size;
a killed and resumed `v4` run (Muon, mHC, MTP, V4 attention) equals the uninterrupted one."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from conftest import CONF, deterministic
from v4lab.config import load_run_config
from v4lab.io import compose
from v4lab.model import Transformer

# experiment -> (parent row, the keys it may change beyond `experiment`)
ATTENTION_ROWS = {
    "no_csa": {"model.attention.v4_cycle"},
    "no_hca": {"model.attention.v4_cycle"},
    "no_window": {"model.attention.v4.use_window"},
    "no_sink": {"model.attention.v4.sink"},
    "no_overlap": {"model.attention.v4.overlap"},
    "csa_topk_4": {"model.attention.v4.csa_topk"},
    "csa_topk_8": {"model.attention.v4.csa_topk"},
}
V4_ROWS = {
    "no_mhc": {"model.hc.enabled"},
    "hc_unconstrained": {"model.hc.constrained"},
    "no_hash_routing": {"model.moe.hash_layers"},
    "no_mtp": {"model.mtp.depth"},
    "adamw": {"trainer.optimizer"},
    "fp4_qat": {"trainer.quantize"},  # qat_start 0.9 is the default, stated in the file
    "fp4_posthoc": {"trainer.quantize"},
    "v4_engram": {"model.engram.enabled"},
}
PARENTS = {**{k: ("v4_attention", v) for k, v in ATTENTION_ROWS.items()},
           **{k: ("v4", v) for k, v in V4_ROWS.items()},
           "v4_attention": ("full", {"model.attention.kind", "model.attention.sparse.enabled"}),
           "v4": ("v4_attention", {"model.hc.enabled", "model.moe.score_func", "model.moe.route_scale",
                                   "model.moe.first_dense_layers", "model.moe.hash_layers",
                                   "model.moe.swiglu_limit", "model.engram.enabled", "model.mtp.depth",
                                   "trainer.optimizer"})}
NEW = sorted(PARENTS)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def run_config(name: str, *extra: str):
    return load_run_config(compose([f"+experiment={name}", *extra]))


@pytest.mark.parametrize("name", NEW)
def test_experiment_changes_only_what_it_ablates(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert OmegaConf.load(CONF / "experiment" / f"{name}.yaml").experiment == name
    parent, allowed = PARENTS[name]
    for extra in ([], ["profile=smoke"]):  # the small model and the tiny one
        child, base = flat(asdict(run_config(name, *extra))), flat(asdict(run_config(parent, *extra)))
        changed = {k for k in child if child[k] != base[k]}
        if extra:  # tiny: a value may already be the ablated one (csa_topk_4: tiny's top-k is 4)
            assert changed <= allowed | {"experiment"}, (name, extra, changed)
        else:
            assert changed == allowed | {"experiment"}, (name, extra, changed)


@pytest.mark.parametrize("name", NEW)
def test_experiment_builds_its_model(name):
    for extra in ([], ["profile=smoke"]):
        cfg = run_config(name, *extra)
        model = Transformer(cfg.model)
        kinds = [b.attn.kind for b in model.blocks]
        assert cfg.model.attention.kind == "v4"
        assert ("csa" in kinds) == (name != "no_csa") and ("hca" in kinds) == (name != "no_hca")
        # small: 2 sliding-only layers first; tiny (2 layers) keeps room for one round of
        # the cycle ([csa, hca], or [sliding, x] with a one-kind cycle)
        one_kind = name in ("no_csa", "no_hca")
        assert ("sliding" in kinds) == (name != "no_window" and (not extra or one_kind)), kinds
        assert (model.mtp is not None) == (name in V4_ROWS and name != "no_mtp" or name == "v4")


def test_v4_small_is_the_released_recipe_at_lab_size():
    cfg = run_config("v4").model
    assert cfg.attention.layer_ratios(cfg.n_layers) == [0, 0, 4, 16]
    assert cfg.attention.v4.window == 64 and cfg.attention.v4.csa_topk == 16
    assert cfg.hc.enabled and cfg.hc.constrained and cfg.hc.n_streams == 4
    assert (cfg.moe.score_func, cfg.moe.hash_layers, cfg.moe.first_dense_layers) == ("sqrtsoftplus", 1, 0)
    assert cfg.moe.swiglu_limit == 10.0 and cfg.mtp.depth == 1
    assert run_config("v4").trainer.optimizer == "muon"


def test_default_model_keeps_every_new_switch_off():
    """The keys added to conf/model/*.yaml leave today's experiments as they were."""
    for extra in ([], ["profile=smoke"]):
        cfg = load_run_config(compose(extra)).model
        assert cfg.attention.kind == "mla" and cfg.attention.sparse.enabled
        assert not cfg.hc.enabled and cfg.mtp.depth == 0
        assert cfg.moe.hash_layers == 0 and cfg.moe.swiglu_limit == 0.0
        assert cfg.engram.gate == "signed_sqrt"


@pytest.mark.parametrize(("override", "key", "allowed"), [
    ("model.attention.v4.window=100", "model.attention.v4.window=100",
     "<= the sequence length 64 (trainer.seq_len=64"),
    ("model.attention.v4.csa_topk=20", "model.attention.v4.csa_topk=20", "64 // 4 = 16"),
    ("model.attention.v4.hca_ratio=128", "model.attention.v4.hca_ratio=128", "sequence length 64"),
    ("model.attention.compress_ratios=[0,4,16]", "model.attention.compress_ratios=[0, 4, 16]",
     "a list of 2 ratios"),
    ("model.attention.compress_ratios=[4,5]", "model.attention.compress_ratios[1]=5",
     "csa_ratio (4) or hca_ratio (8)"),
    ("model.attention.sparse.enabled=true", "model.attention.sparse.enabled=True",
     "false when attention.kind='v4' has CSA layers"),
    ("model.mtp.depth=2", "model.mtp.depth=2", "only depth 1 is built"),
])
def test_bad_v4_values_fail_before_training(override, key, allowed):
    from v4lab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        run_config("v4", "profile=smoke", override)
    assert key in str(e.value) and allowed in str(e.value), str(e.value)


# ---------------------------------------------------------------- smoke training

class LoggedKeys(Callback):
    """Records every metric name logged during training."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys |= set(trainer.callback_metrics)
        self.mtp = trainer.callback_metrics.get("train/mtp_loss")


@pytest.fixture(scope="module")
def v4_run(tmp_path_factory, smoke_overrides):
    from v4lab.train import train

    run_dir = tmp_path_factory.mktemp("v4_run")
    logged = LoggedKeys()
    metrics = train(compose(["+experiment=v4", *smoke_overrides]), run_dir, extra_callbacks=[logged])
    return run_dir, metrics, logged


def test_smoke_training_of_v4(v4_run):
    import math

    run_dir, metrics, logged = v4_run
    assert metrics["train/steps"] == 12
    assert metrics["val/loss"] < math.log(512)
    assert {"train/mtp_loss", "train/loss"} <= logged.keys
    assert 0 < float(logged.mtp) < 2 * math.log(512)
    assert metrics["cost/kv_bytes_per_token"] > 0  # measured after a complete block of every layer
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(k.startswith("model.mtp.block.") for k in ckpt["state_dict"])
    assert any(k.endswith("gate.tid2eid") for k in ckpt["state_dict"])  # the frozen hash table is stored
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["use_muon"] for g in groups].count(True) == 1


def test_smoke_training_of_v4_attention(tmp_path, smoke_overrides):
    import math

    from v4lab.train import train

    logged = LoggedKeys()
    metrics = train(compose(["+experiment=v4_attention", *smoke_overrides]), tmp_path,
                    extra_callbacks=[logged])
    assert metrics["train/steps"] == 12 and metrics["val/loss"] < math.log(512)
    assert "train/mtp_loss" not in logged.keys
    # the CSA indexer learns by its KL (tiny: dense warm-up of 5 steps, then top-k)
    assert {"train/v4/indexer_kl", "v4/indexer_kl", "v4/recall"} <= logged.keys


def test_v4_kill_and_resume_equals_uninterrupted(v4_run, tmp_path, smoke_overrides):
    """Muon's momentum, mHC's parameters, the MoE balancing bias, the MTP block and the
    data position all come back from the checkpoint: every logged value is bit-identical."""
    from conftest import Crash
    from v4lab.train import train

    _, metrics, _ = v4_run
    cfg = compose(["+experiment=v4", *smoke_overrides])
    run_dir = tmp_path / "resumed"
    with pytest.raises((KeyboardInterrupt, SystemExit, Exception)):
        train(cfg, run_dir, extra_callbacks=[Crash(at=7)])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    resumed = train(cfg, run_dir)
    assert resumed["train/steps"] == 12
    assert deterministic(resumed) == deterministic(metrics)
