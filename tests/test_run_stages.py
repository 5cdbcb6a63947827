"""scripts/run_stages.py: which commands it reads from dvc.yaml, and that a forked child
runs a command as ``__main__`` with its own arguments, exit code and log (no run is made)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "run_stages", Path(__file__).resolve().parents[1] / "scripts" / "run_stages.py")
rs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rs)


def test_commands_are_dvc_yaml_stage_commands_with_items_filled_in():
    train = rs.commands(["smoke"], "train")
    assert [n for n, _, _ in train] == [f"train@smoke-{r}-s0" for r in ("baseline", "mha", "full")]
    name, cmd, folder = train[0]
    assert cmd.startswith("python run.py +experiment=baseline seed=0 study=smoke profile=smoke")
    assert "${" not in cmd and folder == rs.ROOT / "outputs" / "smoke" / "baseline-s0"
    evaluate = rs.commands(["kv_cache"], "evaluate")
    assert len(evaluate) == 5 and all(c.startswith("python -m v4lab.probe_run --source outputs/recall/")
                                      for _, c, _ in evaluate)
    assert rs.commands(["no_such_study"], "train") == []


def test_report_stages_are_every_study_s_build_command_never_skipped():
    assert rs.commands(["smoke"], "report") == [("smoke", "python -m v4lab.report build smoke", None)]
    studies = sorted(p.stem for p in (rs.ROOT / "experiments").glob("*.yaml"))
    assert sorted(n for n, _, _ in rs.commands([], "report")) == studies


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_children_run_modules_as_main_and_report_exit_codes(tmp_path):
    todo = [("ok", "python -m json.tool --help"),          # argparse help: exit 0, text to stdout
            ("bad", "python -m json.tool /no/such/file"),  # argparse error: exit 2, text to stderr
            ("missing", "python -m v4lab.no_such_module")]  # import error: exit 1, traceback
    done = {name: rc for name, rc, _ in rs.run_forked(todo, 2, tmp_path)}
    assert done == {"ok": 0, "bad": 2, "missing": 1}
    assert "usage: python -m json.tool" in (tmp_path / "ok.log").read_text()
    assert "No such file" in (tmp_path / "bad.log").read_text()
    assert "v4lab.no_such_module" in (tmp_path / "missing.log").read_text()


def test_a_command_that_is_not_python_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a python command"):
        rs._fork("dvc repro", tmp_path / "x.log")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_s_exit_leaves_the_parent_s_temporary_folders(tmp_path):
    # W&B makes its media folder at import and removes it at exit; a report child that
    # removed it broke every later child's W&B table (seen in the first forked reports)
    from wandb.sdk.data_types._private import MEDIA_TMP

    mine = tempfile.TemporaryDirectory()  # removed by a weakref.finalize at exit
    todo = [("a", "python -m json.tool --help"), ("b", "python -m json.tool --help")]
    assert [rc for _, rc, _ in rs.run_forked(todo, 1, tmp_path)] == [0, 0]
    assert Path(MEDIA_TMP.name).is_dir() and Path(mine.name).is_dir()
    mine.cleanup()
