"""The one place for writing files, naming the code revision, hashing a config and
composing the project's Hydra config.

Bottom layer: imports nothing from v4lab above ``errors``. Every published or run file
goes through :func:`atomic_write_text` (or :func:`atomic_replace`), so nothing is ever
half-written, temp names are unique per process, and files honour the umask like any
other file (``mkstemp`` alone makes them 0600, unreadable for a group on a shared disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository (src layout)
CONF_DIR = ROOT / "conf"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_replace(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh temporary file next to ``path``, then rename it onto
    ``path``. On any failure (disk full, interrupt) the temporary file is removed and
    ``path`` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_replace(path, write)


def atomic_write_json(path: Path, obj: Any, **dump_kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(obj, **({"indent": 2} | dump_kwargs)) + "\n")


def git_rev(root: Path = ROOT, short: bool = False) -> str:
    """HEAD's commit (``+dirty`` when tracked files changed), or "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        rev = git("rev-parse", *(["--short"] if short else []), "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_hash(config_dict: dict) -> str:
    """16 hex digits identifying a resolved config (key order does not matter)."""
    blob = json.dumps(config_dict, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def compose(overrides: list[str] | None = None, conf_dir: Path | str | None = None,
            return_hydra_config: bool = False) -> Any:
    """The project's config as ``run.py`` composes it (without Hydra's runtime)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from v4lab.resolvers import register

    register()  # conf/ interpolates v4lab's own resolvers (the run folder's name)
    with initialize_config_dir(config_dir=str(Path(conf_dir or CONF_DIR)), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []),
                             return_hydra_config=return_hydra_config)
