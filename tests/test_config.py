"""Config composition and validation: wrong values fail before training, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF, ROOT
from v4lab.config import load_run_config
from v4lab.errors import ConfigError
from v4lab.io import compose

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_default_config_validates():
    cfg = load_run_config(compose())
    assert cfg.experiment == "default"
    assert cfg.model.vocab_size == cfg.data.vocab_size


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_names_itself(name):
    cfg = load_run_config(compose([f"+experiment={name}"]))
    assert cfg.experiment == name, f"conf/experiment/{name}.yaml must set experiment: {name}"
    # the model it describes can be built
    from v4lab.model import Transformer

    small = load_run_config(compose([f"+experiment={name}", "profile=smoke"]))
    Transformer(small.model)


def test_profile_smoke_selects_tiny_model_but_command_line_wins():
    smoke = load_run_config(compose(["profile=smoke"]))
    assert (smoke.model.dim, smoke.trainer.max_steps, smoke.eval.contexts) == (64, 20, [64, 128])
    assert load_run_config(compose(["profile=smoke", "model=small"])).model.dim == 192
    trainer = load_run_config(compose(["profile=smoke", "trainer=ddp_cpu"])).trainer
    assert trainer.strategy == "ddp" and trainer.max_steps == 20


@pytest.mark.parametrize("profile", ["cpu", "gpu", "smoke", "study"])
def test_a_trainer_sets_only_trainer_keys_and_a_profile_picks_the_rest(profile):
    """Issue 13: trainer=<name> changes nothing outside trainer.*; profile=<name> is the one
    place that picks trainer + model + tasks together."""
    plain = load_run_config(compose([]))
    trainer_only = load_run_config(compose([f"trainer={profile}"]))
    # the task grid's default context is the trained length (${trainer.seq_len}): it follows
    # the trainer's sequence length by design, and nothing else of eval does
    assert trainer_only.eval.contexts == [trainer_only.trainer.seq_len]
    trainer_only.eval.contexts = plain.eval.contexts
    assert (trainer_only.model, trainer_only.eval) == (plain.model, plain.eval)
    load_run_config(compose([f"profile={profile}"]))  # a valid run
    picked = compose([f"profile={profile}"])
    text = (ROOT / "conf" / "profile" / f"{profile}.yaml").read_text()
    for group, node in (("trainer", "trainer"), ("model", "model"), ("tasks", "eval")):
        assert f"  - override /{group}: " in text, group
        choice = text.split(f"override /{group}: ")[1].split()[0]
        assert OmegaConf.to_container(picked[node]) == \
            OmegaConf.to_container(compose([f"{group}={choice}"])[node]), group  # as written
    for f in (ROOT / "conf" / "trainer").glob("*.yaml"):
        assert "override /" not in f.read_text(), f"{f} overrides another group: use conf/profile/"


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("model.dim=-8", "model.dim", "positive integer"),
        ("model.attention.kv_cache.dtype=fp16", "model.attention.kv_cache.dtype", "'bf16'"),
        ("model.attention.n_heads=5", "model.attention.n_heads", "divisor of model.dim"),
        ("trainer.precision=fp64", "trainer.precision", "'bf16-mixed'"),
        ("trainer.seq_len=4096", "trainer.seq_len", "model.max_seq_len"),
        ("trainer.warmup_steps=999", "trainer.warmup_steps", "max_steps"),
        ("data.vocab_size=100", "data.vocab_size", ">= 257"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(override, key, allowed):
    overrides = ["+experiment=baseline", override]
    with pytest.raises(ConfigError) as e:
        load_run_config(compose(overrides))
    msg = str(e.value)
    assert key in msg and override.split("=", 1)[1] in msg and allowed in msg, msg


def test_unknown_key_and_wrong_type_are_rejected():
    with pytest.raises(ConfigKeyError, match="model.no_such_key|no_such_key"):
        load_run_config(compose(["+model.no_such_key=1"]))
    with pytest.raises(ValidationError, match="model.dim"):
        load_run_config(compose(["model.dim=wide"]))


@pytest.mark.process
def test_unknown_experiment_lists_the_available_ones():
    r = subprocess.run([sys.executable, "run.py", "+experiment=does_not_exist"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "does_not_exist" in out
    for name in EXPERIMENTS:
        assert name in out


@pytest.mark.process
def test_bad_value_fails_before_training_with_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "run.py", "+experiment=baseline", "model.dim=-1",
                        f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120,
                       env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 1
    assert "model.dim=-1 is not allowed" in r.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_the_old_eval_group_name_points_to_the_tasks_group():
    with pytest.raises(ConfigError, match=r"eval=off is not allowed: eval.\* is filled by the tasks "
                                          r"group .*: tasks=off"):
        load_run_config(compose(["eval=off"]))
