"""Publishing a study's outputs as one change: the table (``S.md``), ``S.csv``, ``S.json``,
the figure folder ``figures/S/`` and the index, so that a killed build leaves reports/
either as it was or as the new build made it (after the next report command).

POSIX cannot rename several files at once, so a build *stages* everything in
``reports/.tmp-S-<pid>-<random>/`` and then commits it:

1. the old figures the new table no longer draws are linked into the new folder (so the
   old table, still published for a moment, never links a missing figure), and a
   journal, ``COMMIT``, is written (atomically): from here on the build rolls forward;
2. the figure folder is exchanged with the staged one in one ``renameat2(RENAME_EXCHANGE)``
   (Linux; elsewhere two renames, a moment without the folder);
3. ``S.csv``, ``S.json`` and then ``S.md`` replace the old ones (each an atomic rename);
4. the index is rewritten; 5. the old-only figures are removed; 6. the stage is removed.

Each step can be redone, so :func:`recover`, run by the next build (and by
``python -m v4lab.report index``), finishes a stage that holds a journal and removes one
that does not (a build killed while drawing). Stages of a live process are left alone.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from v4lab.io import atomic_write_json

STAGE_PREFIX = ".tmp-"
JOURNAL = "COMMIT"
TABLE_SUFFIXES = (".csv", ".json", ".md")  # the table last: it links the figures


def new_stage(reports: Path, study: str) -> Path:
    """An empty stage folder, ``reports/.tmp-<study>-<pid>-<random>/``, with ``figures/``."""
    reports.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{study}-{os.getpid()}-", dir=reports))
    (stage / "figures").mkdir()
    return stage


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where the
    system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_figures(new: Path, final: Path) -> None:
    """Put the folder ``new`` at ``final``; the old folder (if any) ends up at ``new``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        os.rename(new, final)
    elif not _exchange(new, final):
        old = new.with_name("old-figures")
        os.rename(final, old)
        os.rename(new, final)
        os.rename(old, new)


def commit(stage: Path, reports: Path, study: str, reindex: Callable[[], None]) -> None:
    """Publish the staged ``S.md``, ``S.csv``, ``S.json`` and ``figures/`` (steps above)."""
    staged, final = stage / "figures", reports / "figures" / study
    extra = []
    if final.is_dir():
        for old in sorted(final.iterdir()):
            if not (staged / old.name).exists():
                _link_or_copy(old, staged / old.name)
                extra.append(old.name)
    atomic_write_json(stage / JOURNAL, {"study": study, "figures_inode": staged.stat().st_ino,
                                        "old_only_figures": extra})
    apply(stage, reports, reindex)


def apply(stage: Path, reports: Path, reindex: Callable[[], None]) -> None:
    """Steps 2-6 for a stage with a journal; each step is skipped when it was done."""
    journal = json.loads((stage / JOURNAL).read_text())
    study = journal["study"]
    final = reports / "figures" / study
    if not (final.is_dir() and final.stat().st_ino == journal["figures_inode"]):
        swap_figures(stage / "figures", final)
    for suffix in TABLE_SUFFIXES:
        src = stage / f"{study}{suffix}"
        if src.exists():
            os.replace(src, reports / src.name)
    reindex()
    for name in journal["old_only_figures"]:
        (final / name).unlink(missing_ok=True)
    shutil.rmtree(stage)


def _owner_alive(stage: Path) -> bool:
    """The stage belongs to another process that is still running."""
    try:
        pid = int(stage.name.rsplit("-", 2)[1])
    except (IndexError, ValueError):
        return False  # not named by this module: left by an older build
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(reports: Path, reindex: Callable[[], None]) -> list[Path]:
    """Finish (journal) or remove (no journal) what killed builds left in ``reports``;
    returns the stages handled."""
    handled = []
    for stage in sorted(reports.glob(f"{STAGE_PREFIX}*")):
        if not stage.is_dir() or _owner_alive(stage):
            continue
        if (stage / JOURNAL).is_file():
            apply(stage, reports, reindex)
        else:
            shutil.rmtree(stage, ignore_errors=True)
        handled.append(stage)
    return handled


def cleanup(stage: Path, reports: Path, reindex: Callable[[], None]) -> None:
    """After a build stopped (an error, Ctrl-C): no journal -> remove the stage (nothing was
    published); a journal -> finish publishing, or leave it to the next build's recover."""
    if not stage.exists():
        return
    if not (stage / JOURNAL).is_file():
        shutil.rmtree(stage, ignore_errors=True)
        return
    try:
        apply(stage, reports, reindex)
    except Exception:
        pass  # the journal stays: the next build finishes the commit
