"""Runs that never clobber and failures that say what happened (issue 18), one test per case.

Each refusal is checked for its one-line message and for leaving every file that was in
the run folder before byte-identical (sha256 of every file, before and after).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import ROOT, TINY_DATA, Crash, deterministic
from v4lab.errors import ConfigError
from v4lab.folders import RunError
from v4lab.io import compose
from v4lab.train import train


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message


@pytest.fixture(scope="module")
def overrides(smoke_overrides) -> list[str]:
    # checkpoint every 5 of 12 steps: the final step is not a multiple, so the run's own
    # final checkpoint (v4lab.train) is what a resume at max_steps reads.
    return ["+experiment=baseline", *smoke_overrides, "trainer.checkpoint_every_n_steps=5"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, overrides):
    """A finished smoke run: (its folder, its metrics, sha256 of every file in it)."""
    run_dir = tmp_path_factory.mktemp("finished")
    metrics = train(compose(overrides), run_dir)
    return run_dir, metrics, hashes(run_dir)


# --- 1. a run folder belongs to one configuration ------------------------------------------


def test_rerun_with_another_configuration_is_refused_naming_the_keys(finished, overrides):
    run_dir, _, before = finished
    with pytest.raises(RunError) as e:
        train(compose([*overrides, "trainer.lr=1e-4", "model.dim=48"]), run_dir)
    message = one_line(str(e.value))
    assert f"{run_dir} holds a run of another configuration" in message
    assert "trainer.lr=0.0001 (this folder's run: 0.003)" in message
    assert "model.dim=48 (this folder's run: 64)" in message
    assert "hydra.run.dir=DIR" in message
    assert hashes(run_dir) == before


def test_keys_that_may_change_on_resume_are_not_a_different_configuration(finished, overrides):
    """logger.*, threads, data.root and the evaluation grid may change (RESUME_FREE_KEYS)."""
    from v4lab.config import load_run_config, run_identity

    run_dir, metrics, before = finished
    again = train(compose([*overrides, "trainer.num_threads=2", "logger.project=other",
                           "eval.n_examples=2", "eval.contexts=[64]"]), run_dir)
    assert again == metrics and hashes(run_dir) == before
    # eval.tasks is free only while training does not mix those tasks in
    cfg = load_run_config(compose(overrides))
    config = asdict(cfg)
    assert cfg.eval.train_share > 0 and not cfg.eval.train_tasks
    assert "eval.tasks" in run_identity(config) and "eval.n_examples" not in run_identity(config)
    config["eval"]["train_share"] = 0.0
    assert "eval.tasks" not in run_identity(config)
    # a measured chip's timings (cpu_host: re-timed when stale or loaded) may change too
    config["chip"]["peak_tflops"] = {"fp32": {"value": 0.14, "source": "measured", "confidence": "medium"}}
    config["chip"]["measured"] = True
    assert not any(k.startswith("chip.peak_tflops.") for k in run_identity(config))
    config["chip"]["measured"] = False
    assert "chip.peak_tflops.fp32.value" in run_identity(config)


def test_config_keys_added_to_the_code_since_a_run_are_not_a_different_configuration():
    """A folder saved before a key existed resumes when the key has its default value."""
    from omegaconf import OmegaConf

    from v4lab.config import load_run_config
    from v4lab.folders import config_diff

    config = asdict(load_run_config(compose(["+experiment=baseline", "profile=smoke"])))
    config.pop("reevaluate")
    new = OmegaConf.to_container(OmegaConf.create(config))
    saved = {k: v for k, v in new.items() if k != "combine_as"}  # saved before combine_as existed
    assert config_diff(saved, new) == []
    renamed = {**new, "combine_as": "x"}
    assert config_diff(saved, renamed) == ['combine_as="x" (this folder\'s run: (absent))']


@pytest.mark.process
def test_rerun_with_another_configuration_is_refused_by_run_py_and_keeps_hydra_record(tmp_path, data_root):
    """From the command line: exit 1, one line on stderr, nothing in the folder rewritten
    (Hydra's own .hydra/ record included: run.py writes it only for an accepted run)."""
    run_dir = tmp_path / "run"
    args = ["+experiment=baseline", "profile=smoke", f"hydra.run.dir={run_dir}", f"data.root={data_root}",
            *TINY_DATA, "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.seq_len=48"]
    first = _run_py(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    before = hashes(run_dir)
    r = _run_py([*args, "trainer.lr=1e-4"])
    assert r.returncode == 1
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert "holds a run of another configuration: trainer.lr=0.0001 (this folder's run: 0.003)" in line
    assert "Traceback" not in r.stderr
    assert hashes(run_dir) == before


def _run_py(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WANDB_MODE": "disabled", **env})


# --- 2. a finished run is not retrained or rewritten ---------------------------------------


def test_finished_run_is_not_retrained_or_rewritten(finished, overrides, capsys):
    run_dir, metrics, before = finished
    capsys.readouterr()
    again = train(compose(overrides), run_dir)
    out = capsys.readouterr().out
    assert one_line(out).strip() == (f"{run_dir}: already finished (metrics.json, step 12); nothing to "
                                     "do (reevaluate=true evaluates it again from its final checkpoint)")
    assert again == metrics
    assert hashes(run_dir) == before


def test_reevaluate_evaluates_a_finished_run_again_without_training(tmp_path, finished, overrides):
    src, metrics, _ = finished
    run_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(src, run_dir)
    before = hashes(run_dir)
    again = train(compose([*overrides, "reevaluate=true"]), run_dir)
    assert deterministic(again) == deterministic(metrics)  # same weights, same evaluation
    # training figures come from the checkpoint, not from an empty resume
    for key in ("train/loss", "speed/train_tokens_per_s", "time/train_s"):
        assert again[key] == metrics[key], key
    after = hashes(run_dir)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed <= {"metrics.json"}  # only what was asked for is rewritten
    assert "reevaluate" not in (run_dir / "config.yaml").read_text()


def test_run_killed_during_final_evaluation_evaluates_without_retraining(
        tmp_path, finished, overrides, capsys):
    _, metrics, _ = finished

    class KilledInTest(Callback):
        def on_test_start(self, trainer, pl_module) -> None:
            raise RuntimeError("killed during the final evaluation")

    run_dir = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed during the final evaluation"):
        train(compose(overrides), run_dir, extra_callbacks=[KilledInTest()])
    assert not (run_dir / "metrics.json").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 12  # saved at max_steps although 12 is not a multiple of 5
    before = hashes(run_dir)
    capsys.readouterr()
    resumed = train(compose(overrides), run_dir)
    assert f"{run_dir}: trained to step 12; evaluating from checkpoints/last.ckpt without training" \
        in capsys.readouterr().out
    assert deterministic(resumed) == deterministic(metrics)
    for key in ("train/loss", "speed/train_tokens_per_s", "time/train_s"):
        assert resumed[key] == resumed[key] and resumed[key] > 0, key  # finite, not NaN
    assert resumed["train/loss"] == metrics["train/loss"]
    after = hashes(run_dir)
    assert {k: v for k, v in after.items() if k != "metrics.json"} == before  # nothing retrained


# --- 3. default folder names -----------------------------------------------------------


def _run_dir(overrides: list[str]) -> str:
    return str(compose(overrides, return_hydra_config=True).hydra.run.dir)


def test_default_folder_names_distinguish_profiles():
    readme = (ROOT / "README.md").read_text()
    readme = readme[readme.index("## One run"):readme.index("### The pieces")]  # its commands
    lines = re.findall(r"^python run\.py (\+experiment=[^#\n]*?)\s*(?:#.*)?$", readme, re.M)
    commands = [line.split() for line in lines if "--cfg" not in line]
    assert ["+experiment=no_vvpa"] in commands and ["+experiment=no_vvpa", "profile=smoke"] in commands
    folders = {_run_dir(c): c for c in commands}
    assert len(folders) == len(commands), folders  # no two README lines share a folder
    assert _run_dir(["+experiment=no_vvpa"]) == "outputs/adhoc/no_vvpa-s0"
    assert _run_dir(["+experiment=no_vvpa", "profile=smoke"]) == "outputs/adhoc/no_vvpa-smoke-s0"
    # a trainer profile alone (the small model, smoke's steps) is another folder again
    assert _run_dir(["+experiment=no_vvpa", "trainer=smoke"]) == "outputs/adhoc/no_vvpa-trainer_smoke-s0"
    # a study's runs keep <experiment>-s<seed>, where dvc.yaml and v4lab.studies look for them
    from v4lab.studies import Run

    dvc = (ROOT / "dvc.yaml").read_text()
    assert "outputs/${item.study}/${item.run}/config.yaml" in dvc
    for study, profile in (("smoke", "profile=smoke"), ("components", "profile=study")):
        assert _run_dir(["+experiment=full", "seed=2", f"study={study}", profile]) == \
            f"outputs/{study}/{Run('full', 2).name}"


# --- 4. one experiment per run ------------------------------------------------------------


@pytest.mark.process
def test_two_experiment_overlays_are_refused_unless_named(tmp_path, data_root):
    from v4lab.config import check_one_experiment, load_run_config

    genuine = tmp_path / "mha-s0"  # a genuine mha run's folder
    genuine.mkdir()
    (genuine / "metrics.json").write_text('{"experiment": "mha"}\n')
    before = hashes(genuine)
    r = _run_py(["+experiment=[no_vvpa,mha]", f"hydra.run.dir={genuine}", f"data.root={data_root}"])
    assert r.returncode == 1
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert line == ("error: +experiment=[no_vvpa,mha] applies 2 experiment overlays, and a run is one "
                    "experiment: choose one, or name the combination, e.g. combine_as=no_vvpa+mha "
                    "(its own folder and W&B run)")
    assert hashes(genuine) == before
    # named, the combination is a run of its own: its own name, folder and W&B run
    overrides = ["+experiment=[no_vvpa,mha]", "combine_as=no_vvpa+mha"]
    check_one_experiment(overrides, "no_vvpa+mha")
    cfg = load_run_config(compose(overrides))
    assert cfg.experiment == "no_vvpa+mha" and cfg.model.attention.kind == "mha"
    assert _run_dir(overrides) == "outputs/adhoc/no_vvpa+mha-s0"
    with pytest.raises(ConfigError, match=r"^combine_as=mha is not allowed: conf/experiment/mha.yaml"):
        check_one_experiment(["+experiment=[no_vvpa,mha]", "combine_as=mha"], "mha")
    check_one_experiment(["+experiment=no_vvpa", "seed=1"], None)  # one overlay: fine


# --- 5. a lock per run folder ---------------------------------------------------------------


@pytest.mark.process
def test_second_concurrent_run_into_one_folder_is_refused_at_once(tmp_path, overrides):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen(  # another process running in the folder (holds its lock)
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(run_dir / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = hashes(run_dir)
        cfg = compose(overrides)
        t0 = time.perf_counter()
        with pytest.raises(RunError) as e:
            train(cfg, run_dir)
        assert time.perf_counter() - t0 < 5  # at once: no data, model or training first
    finally:
        holder.kill()
        holder.wait()
    assert one_line(str(e.value)) == (
        f"{run_dir} is in use by another run (it holds {run_dir / 'run.lock'}): "
        "wait for it to finish, or run this one elsewhere with hydra.run.dir=DIR")
    assert hashes(run_dir) == before


def test_checkpoint_temp_names_are_unique_per_process(tmp_path, monkeypatch):
    """AtomicCheckpointIO writes through io.atomic_replace: a mkstemp name next to the file."""
    from v4lab import io as v4io
    from v4lab.callbacks import AtomicCheckpointIO

    seen = []
    real = v4io.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        seen.append(Path(name))
        return fd, name

    monkeypatch.setattr(v4io.tempfile, "mkstemp", spy)
    io = AtomicCheckpointIO()
    for _ in range(2):
        io.save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    ours = [p for p in seen if p.parent == tmp_path]  # (fsspec makes temp files of its own in /tmp)
    assert len(ours) == 2 and ours[0] != ours[1]
    assert all(p.name.startswith(".last.ckpt.") and p.name.endswith(".tmp") for p in ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# --- 6. failures that say what happened ------------------------------------------------------


def test_truncated_last_ckpt_names_the_file(tmp_path, overrides):
    run_dir = tmp_path / "truncated"
    with pytest.raises((KeyboardInterrupt, SystemExit, Exception)):
        train(compose(overrides), run_dir, extra_callbacks=[Crash(at=7)])
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = hashes(run_dir)
    with pytest.raises(RunError) as e:
        train(compose(overrides), run_dir)
    message = one_line(str(e.value))
    assert message.startswith(f"{last} is truncated or corrupt (")
    assert message.endswith("delete it to train this run again from the start, or put back a good copy")
    assert hashes(run_dir) == before


def _prepared(tmp_path, data_root):
    """A copy of the session's prepared tiny corpus under a root of its own."""
    import shutil

    from v4lab.config import load_run_config
    from v4lab.data.prepare import prepare

    cfg = load_run_config(compose(["+experiment=baseline", "profile=smoke", f"data.root={data_root}",
                                   *TINY_DATA])).data
    folder = prepare(cfg)
    root = tmp_path / "ro"
    shutil.copytree(folder, root / folder.name)
    cfg.root = str(root)
    return cfg, root / folder.name


def _read_only(root: Path, monkeypatch) -> None:
    """Make ``root`` read only; as root (whom permissions do not stop) also make opening a
    lock file under it fail as it does for everyone else (EACCES)."""
    import builtins

    from v4lab.data import prepare as prep

    for p in [root, *root.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)

    def guarded_open(file, mode="r", *args, **kwargs):
        if Path(file).is_relative_to(root) and any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(prep, "open", guarded_open, raising=False)


def test_read_only_prepared_corpus_is_used(tmp_path, data_root, monkeypatch):
    from v4lab.data.prepare import DataError, prepare

    cfg, folder = _prepared(tmp_path, data_root)
    root = folder.parent
    _read_only(root, monkeypatch)
    before = hashes(root)
    try:
        assert prepare(cfg) == folder  # complete: only read, no lock file opened
        assert hashes(root) == before
        (folder / "manifest.json").chmod(0o644)
        os.chmod(folder, 0o755)
        (folder / "manifest.json").unlink()  # incomplete and read only: one line, what to do
        os.chmod(folder, 0o555)
        before = hashes(root)
        with pytest.raises(DataError) as e:
            prepare(cfg)
        assert one_line(str(e.value)) == (
            f"{root} is not writable (Permission denied) and the corpus there is not prepared: prepare "
            "it where you can write (data.root=DIR), or ask its owner to run `python -m "
            "v4lab.data.prepare` with these data settings")
        assert hashes(root) == before
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_corpus_of_non_utf8_files_is_not_reported_as_no_match(tmp_path):
    from v4lab.data.config import DataConfig
    from v4lab.data.prepare import DataError, collect_files

    src = tmp_path / "latin1"
    src.mkdir()
    for name in ("a.py", "b.py"):
        (src / name).write_bytes("s = 'café'\n".encode("latin-1"))
    before = hashes(src)
    with pytest.raises(DataError) as e:
        collect_files(DataConfig(source=str(src), root=str(tmp_path / "data")))
    assert one_line(str(e.value)) == (
        f"2 files in {src} match data.include=['**/*.py'] but none is UTF-8 text (e.g. {src / 'a.py'}): "
        "convert them to UTF-8 or point data.source at UTF-8 source files")
    assert hashes(src) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"^no files in .* match data.include"):
        collect_files(DataConfig(source=str(empty), root=str(tmp_path / "data")))


class Poison(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.model.tok_emb.weight.fill_(float("nan"))


def test_last_good_checkpoint_is_kept_said_only_when_one_exists(tmp_path, overrides):
    from v4lab.lit import NonFiniteLossError

    with pytest.raises(NonFiniteLossError) as e:  # NaN before the first checkpoint (step 5)
        train(compose(overrides), tmp_path / "none", extra_callbacks=[Poison(at=2)])
    assert "is kept (" not in one_line(str(e.value))
    assert "step 2" in str(e.value) and "No checkpoint was written before it (none is kept)" in str(e.value)
    assert not (tmp_path / "none" / "checkpoints" / "last.ckpt").exists()
    run_dir = tmp_path / "one"
    with pytest.raises(NonFiniteLossError) as e:  # NaN after the checkpoint at step 5
        train(compose(overrides), run_dir, extra_callbacks=[Poison(at=6)])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"The last good checkpoint is kept ({last})" in one_line(str(e.value))
    assert torch.load(last, weights_only=False)["global_step"] == 5


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_float_fails_validation(value):
    from v4lab.config import load_run_config

    with pytest.raises(ConfigError) as e:
        load_run_config(compose(["+experiment=baseline", f"trainer.lr={value}"]))
    assert one_line(str(e.value)) == f"trainer.lr={float(value)!r} is not allowed: a finite number"
    with pytest.raises(ConfigError, match=r"^model.rope_theta=inf is not allowed: a finite"):
        load_run_config(compose(["+experiment=full", "model.rope_theta=inf"]))


def _wandb_exit_code(logs: Path) -> int:
    [run] = list((logs / "wandb").glob("offline-run-*"))
    found = re.findall(r"got exitcode: (-?\d+)", (run / "logs" / "debug.log").read_text())
    return int(found[-1])


def test_wandb_run_ends_with_the_real_exit_code(tmp_path, overrides, monkeypatch):
    from v4lab.lit import NonFiniteLossError

    monkeypatch.setenv("WANDB_MODE", "offline")
    logs = tmp_path / "logs"
    with pytest.raises(NonFiniteLossError):
        train(compose([*overrides, f"logger.dir={logs}", "logger.mode=offline"]), tmp_path / "failed",
              extra_callbacks=[Poison(at=2)])
    assert _wandb_exit_code(logs) == 1  # recorded as failed
    ok_logs = tmp_path / "ok_logs"
    train(compose([*overrides, f"logger.dir={ok_logs}", "trainer.max_steps=4", "trainer.warmup_steps=1"]),
          tmp_path / "ok")
    assert _wandb_exit_code(ok_logs) == 0


@pytest.mark.parametrize("case", ["no key", "no network"])
def test_wandb_online_without_network_or_key_falls_back_to_offline(tmp_path, overrides, monkeypatch,
                                                                    caplog, case):
    """Never the network: "no key" is an empty WANDB_API_KEY and a HOME without a netrc;
    "no network" a key but a server on a closed local port (127.0.0.1:9)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("V4LAB_WANDB_PROBE_S", "1")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "" if case == "no key" else "0" * 40)
    logs = tmp_path / "logs"
    caplog.set_level(logging.WARNING, logger="v4lab")
    t0 = time.perf_counter()
    metrics = train(compose([*overrides, f"logger.dir={logs}", "trainer.max_steps=4",
                             "trainer.warmup_steps=1"]), tmp_path / "run")
    assert time.perf_counter() - t0 < 60  # seconds of training, not a 100 s wait
    assert metrics["train/steps"] == 4
    warnings = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    why = "no API key (WANDB_API_KEY or `wandb login`)" if case == "no key" else "127.0.0.1:9 unreachable"
    assert len(warnings) == 1 and why in one_line(warnings[0]), warnings
    assert "logging offline under" in warnings[0]
    assert os.environ["WANDB_MODE"] == "offline"
    assert _wandb_exit_code(logs) == 0  # an offline W&B run was written instead


def test_disk_full_leaves_no_partial_checkpoint(tmp_path, overrides, monkeypatch):
    from lightning.fabric.plugins.io import torch_io

    run_dir = tmp_path / "full"
    with pytest.raises((KeyboardInterrupt, SystemExit, Exception)):
        train(compose(overrides), run_dir, extra_callbacks=[Crash(at=7)])
    last = run_dir / "checkpoints" / "last.ckpt"
    before = hashes(run_dir)

    def disk_full(checkpoint, filepath):  # half the bytes reach the disk, then ENOSPC
        with open(filepath, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", disk_full)
    with pytest.raises(RunError) as e:
        train(compose(overrides), run_dir)
    assert one_line(str(e.value)) == (
        f"{last} could not be written (No space left on device): the previous checkpoint is kept; "
        "free space (or fix the folder's permissions) and rerun the same command to resume from it")
    assert not [p.name for p in last.parent.iterdir() if p.name != "last.ckpt"]  # no temp left
    assert hashes(run_dir) == before
