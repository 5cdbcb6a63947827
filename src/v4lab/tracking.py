"""W&B: one run per experiment run, offline unless asked otherwise.

Offline runs live under ``<logger.dir>/wandb/`` (look at them with ``wandb leet
logs/wandb``; upload with ``wandb sync logs/wandb/offline-run-*``). ``WANDB_MODE`` in the
environment wins over ``logger.mode``. W&B is never allowed to wait on the network
unless the mode is ``online``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from v4lab.config import RunConfig


def wandb_mode(cfg: RunConfig) -> str:
    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    return mode if mode in ("online", "offline", "disabled") else "offline"


def run_tags(cfg: RunConfig) -> list[str]:
    """The switches that are on, as W&B tags."""
    a, m = cfg.model.attention, cfg.model
    tags = [f"attn:{a.kind}", f"kv:{a.kv_cache.dtype}"]
    if a.kind == "mla" and a.sparse.enabled:
        tags.append("sparse")
    if a.kind == "mla" and a.vvpa:
        tags.append("vvpa")
    if m.moe.enabled:
        tags.append(f"moe:{m.moe.n_routed_experts}x{m.moe.top_k}")
    if m.engram.enabled:
        tags.append("engram")
    return tags


def make_logger(cfg: RunConfig, run_dir: Path, config_dict: dict[str, Any]):
    """A Lightning WandbLogger for this run, or None when W&B is disabled."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    log_dir = Path(cfg.logger.dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    # A stable id per run directory: a resumed run continues the same W&B run.
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return WandbLogger(
        project=cfg.logger.project, name=f"{cfg.experiment}{cfg.variant}-s{cfg.seed}", group=cfg.study,
        tags=run_tags(cfg), job_type="train", save_dir=str(log_dir), id=run_id,
        resume="allow", config=config_dict, log_model=False,
    )


def finish() -> None:
    """Close the current W&B run, if any (always call in a ``finally``)."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception:  # pragma: no cover - closing must never mask the real error
        pass
