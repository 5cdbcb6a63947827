"""A run folder's rules: one folder holds one run of one configuration.

A rerun with another configuration is refused with the differing keys named
(:data:`v4lab.config.RESUME_FREE_KEYS` may change); a finished run (``metrics.json``) is
read back, not rewritten; a second process running into the same folder at the same time
stops at once (``run.lock``); a truncated checkpoint or unreadable file is named with what
to do. :func:`v4lab.train.train` applies these rules before it builds anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from v4lab.config import RunConfig, flatten, run_identity


class RunError(RuntimeError):
    """The run folder cannot take this run: another configuration's run, another process
    running in it, an unreadable or unwritable file. The message names the file or key
    and what to do."""


def first_line(e: BaseException) -> str:
    """An exception's first line (at most 160 characters), for one-line messages."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run_dir>/run.lock`` (an fcntl lock, released when the process ends, however
    it ends) for the whole run: a second run into the same folder stops at once instead of
    sharing its checkpoints, metrics.json and W&B run."""
    path = run_dir / "run.lock"
    try:
        f = open(path, "a")
    except OSError as e:
        raise RunError(f"{path} cannot be opened ({e.strerror}): the run folder must be writable; "
                       "choose another with hydra.run.dir=DIR") from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{run_dir} is in use by another run (it holds {path}): wait for it to "
                           "finish, or run this one elsewhere with hydra.run.dir=DIR") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fmt(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)


_ABSENT = object()


def config_diff(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key=new (this folder's run: old)`` for every key of the run's identity that differs.
    A key the saved config lacks is no difference when the new value is the schema's
    default (a key added to the code since: the saved run ran as if it had it)."""
    a, b = run_identity(saved), run_identity(new)
    defaults = flatten(asdict(RunConfig()))

    def differs(k: str) -> bool:
        old, value = a.get(k, _ABSENT), b.get(k, _ABSENT)
        return old != value and not (old is _ABSENT and k in defaults and value == defaults[k])

    return [f"{k}={_fmt(b.get(k, _ABSENT))} (this folder's run: {_fmt(a.get(k, _ABSENT))})"
            for k in sorted(set(a) | set(b)) if differs(k)]


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at; a truncated or corrupt file is named
    (memory-mapped: the tensors are not read)."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception as e:
        raise RunError(f"{path} is truncated or corrupt ({first_line(e)}): delete it to train this "
                       "run again from the start, or put back a good copy") from e


def check_run_folder(run_dir: Path, config_dict: dict[str, Any]) -> tuple[bool, int | None]:
    """Whether ``run_dir`` can take this run: (finished: metrics.json exists, the step of
    ``checkpoints/last.ckpt`` or None). Raises :class:`RunError` when the folder holds a
    run of another configuration (keys named) or files that cannot be read."""
    saved_path, metrics = run_dir / "config.yaml", run_dir / "metrics.json"
    last = run_dir / "checkpoints" / "last.ckpt"
    if saved_path.is_file():
        try:
            saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
            assert isinstance(saved, dict)
        except Exception as e:
            raise RunError(f"{saved_path} is unreadable ({first_line(e)}): put back a good copy, or "
                           f"delete {run_dir} to start the run over") from e
        new = OmegaConf.to_container(OmegaConf.create(config_dict))
        assert isinstance(new, dict)
        diff = config_diff(saved, new)
        if diff:
            more = f"; and {len(diff) - 5} more" if len(diff) > 5 else ""
            raise RunError(
                f"{run_dir} holds a run of another configuration: {'; '.join(diff[:5])}{more}. "
                f"Run this one in a folder of its own (hydra.run.dir=DIR), or delete {run_dir} to "
                "start over (keys that may change on a rerun: v4lab.config.RESUME_FREE_KEYS)")
    elif metrics.exists() or last.exists():
        raise RunError(f"{run_dir} holds a run but no config.yaml, so which configuration it belongs "
                       f"to is unknown: put config.yaml back, or delete {run_dir} to start over")
    return metrics.is_file(), checkpoint_step(last) if last.is_file() else None


def finished_metrics(path: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json``; an unreadable one is named with what to do."""
    try:
        metrics = json.loads(path.read_text())
        assert isinstance(metrics, dict)
        return metrics
    except (OSError, ValueError, AssertionError) as e:
        raise RunError(f"{path} is unreadable ({first_line(e)}): rerun with reevaluate=true to "
                       "write it again from the final checkpoint") from e
