"""W&B: one run per experiment run, offline unless asked otherwise.

Offline runs live under ``<logger.dir>/wandb/`` (look at them with ``wandb leet
logs/wandb``; upload with ``wandb sync logs/wandb/offline-run-*``). ``WANDB_MODE`` in the
environment wins over ``logger.mode``. W&B is never allowed to wait on the network
unless the mode is ``online``, and ``online`` without an API key or without a reachable
server falls back to offline with one warning, decided in seconds before ``wandb.init``
(which would otherwise prompt, fail, or retry for about 100 s): the key is looked up
where wandb looks (WANDB_API_KEY, an identity token file, the netrc entry of
WANDB_BASE_URL's host) and the server, or the HTTPS proxy, must accept a TCP connection
within ``V4LAB_WANDB_PROBE_S`` seconds (default 3). A run's W&B record ends
with the run's real exit code: a failed run is recorded as failed.

The history is keyed by the trainer's global step (:func:`key_by_global_step`): every
row's ``trainer/global_step``, the x-axis Lightning's WandbLogger gives every metric, is
``trainer.global_step`` when the row is logged, the optimizer updates so far, as in
``curves.csv`` and the progress lines (Lightning's own counter lags one step behind it
in the training rows and the validations during fit, not in a later validate). The run's
tags name the effective numerics (chip, matmul dtype, the KV-cache dtype the model
really stores after the chip's policy); its config records the host's thread count and
load at the start (``host/*``, also in metrics.json and the summary), so a run that
fails still has them.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from v4lab.chips import kv_dtype
from v4lab.config import RunConfig

log = logging.getLogger("v4lab")
DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 3.0  # one TCP connect to the W&B server (or the proxy) before going online


def wandb_mode(cfg: RunConfig) -> str:
    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    return mode if mode in ("online", "offline", "disabled") else "offline"


def _has_api_key(base_url: str) -> bool:
    """An API key wandb would find without asking: WANDB_API_KEY (non-empty), an identity
    token file, or a netrc entry for the server (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        creds = netrc.netrc(path).authenticators(urlsplit(base_url).netloc)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(creds and creds[2])


def _unreachable(base_url: str, timeout: float) -> str | None:
    """Why the W&B server (or the HTTPS proxy in front of it) cannot be reached, or None."""
    parts = urlsplit(base_url)
    proxy = os.environ.get("HTTPS_PROXY" if parts.scheme == "https" else "HTTP_PROXY") or os.environ.get(
        "https_proxy" if parts.scheme == "https" else "http_proxy")
    target = urlsplit(proxy) if proxy else parts
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host}:{port} unreachable ({e.strerror or type(e).__name__})"


def resolve_mode(cfg: RunConfig) -> str:
    """The mode this run logs in (set as WANDB_MODE for wandb unless disabled): ``online``
    only when an API key exists and the server answers a TCP connect within seconds."""
    mode = wandb_mode(cfg)
    if mode == "online":
        base_url = os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
        timeout = float(os.environ.get("V4LAB_WANDB_PROBE_S", PROBE_TIMEOUT_S))
        why = (None if _has_api_key(base_url) else "no API key (WANDB_API_KEY or `wandb login`)") \
            or _unreachable(base_url, timeout)
        if why:
            log.warning(f"W&B: online mode asked for, but {why}: logging offline under "
                        f"{Path(cfg.logger.dir) / 'wandb'}; upload later with `wandb sync`")
            mode = "offline"
        os.environ["WANDB_MODE"] = mode  # a fallback also holds for the later runs of a sweep
    elif mode == "offline":
        os.environ["WANDB_MODE"] = mode
    return mode


def run_tags(cfg: RunConfig, matmul_dtype: str | None = None) -> list[str]:
    """The switches that are on and the effective numerics, as W&B tags: ``cfg.model`` is
    the model the run builds (after the chip's KV policy, :func:`v4lab.build.numerics`),
    ``matmul_dtype`` the chip's matmul dtype."""
    a, m = cfg.model.attention, cfg.model
    tags = [f"attn:{a.kind}", f"kv:{kv_dtype(m)}", f"chip:{cfg.chip.name}"]
    if matmul_dtype is not None:
        tags.append(f"matmul:{matmul_dtype}")
    if a.kind == "mla" and a.sparse.enabled:
        tags.append("sparse")
    if a.kind == "mla" and a.vvpa:
        tags.append("vvpa")
    if m.moe.enabled:
        tags.append(f"moe:{m.moe.n_routed_experts}x{m.moe.top_k}")
    if m.engram.enabled:
        tags.append("engram")
    return tags


def make_logger(cfg: RunConfig, run_dir: Path, config_dict: dict[str, Any],
                matmul_dtype: str | None = None, host: dict[str, float] | None = None):
    """A Lightning WandbLogger for this run, or None when W&B is disabled. ``matmul_dtype``:
    the chip's (a tag); ``host``: the thread count and load (``ThreadChoice.metrics``)."""
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    log_dir = Path(cfg.logger.dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    # A stable id per run directory: a resumed run continues the same W&B run.
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return WandbLogger(
        project=cfg.logger.project, name=f"{cfg.experiment}{cfg.variant}-s{cfg.seed}", group=cfg.study,
        tags=run_tags(cfg, matmul_dtype), job_type="train", save_dir=str(log_dir), id=run_id,
        resume="allow", config={**config_dict, **(host or {})}, log_model=False,
    )


def key_by_global_step(logger, trainer) -> None:
    """Make ``logger`` key every row by ``trainer.global_step`` at the time it is logged
    (Lightning passes its batches-stepped counter, which the training rows and in-fit
    validations read before it moves: the validation after 6 updates came out as step 5,
    the one after fit as step 6)."""
    log_metrics = logger.log_metrics

    def keyed(metrics, step=None):
        return log_metrics(metrics, step=int(trainer.global_step))

    logger.log_metrics = keyed


def finish(exit_code: int = 0) -> None:
    """Close the current W&B run, if any, recording how the run ended (0: finished,
    otherwise failed). Always call in a ``finally``."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except Exception:  # pragma: no cover - closing must never mask the real error
        pass
