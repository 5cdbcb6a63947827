"""The package's layer contracts (.importlinter) hold, and a back-import breaks them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import-linter (a dev extra, like pytest itself), run by this interpreter: the
# `lint-imports` found on PATH may be a shim (pyenv) or another environment's script.
LINT = ["-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    assert importlib.util.find_spec("importlinter"), \
        "import-linter missing: pip install -c constraints.txt -e '.[dev]'"
    env = {**os.environ, "PYTHONPATH": str(root / "src")}  # this tree's v4lab, not the installed one
    return subprocess.run([sys.executable, *LINT, "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.process
def test_layer_contracts_are_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module,back_import", [
    ("modules/norm.py", "import v4lab.model"),        # a piece reaching up to the model
    ("data/tasks.py", "import v4lab.train"),          # data reaching up to the run layer
    ("build.py", "import v4lab.evaluate"),            # the build reaching up to its users
    ("modules/rope.py", "import lightning"),           # modules/ must stay pure torch
    ("accounting/flops.py", "import v4lab.chips"),     # the FLOP model reaching up to chips
    ("accounting/keys.py", "import v4lab.accounting.kv"),  # inside accounting/: key counts below bytes
    ("chips/host.py", "import v4lab.chips.profile"),   # inside chips/: timing below the schema
])
@pytest.mark.process
def test_a_back_import_breaks_the_contracts(tmp_path, module, back_import):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    target = tmp_path / "src" / "v4lab" / module
    target.write_text(target.read_text() + f"\n{back_import}  # deliberately wrong\n")
    r = _lint(tmp_path)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout[-2000:]
