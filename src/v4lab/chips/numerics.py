"""Numerics policy: which matmul and KV-cache dtypes a run gets on a chip.

The run's matmul dtype is the chip's, and the KV-cache dtype requested by the model must
be one the chip stores; otherwise the run fails (``on_unsupported=error``) or uses the
chip's documented fallback. :func:`build_numerics` is the step a run takes when it is
built: it resolves the chip (``cpu_host`` peaks are measured there, not when the config is
validated) and returns the model config the run really uses, which is what its
``config.yaml`` records.

The cache dtype is the attention's own: ``model.attention.kv_cache.dtype`` for MHA and
MLA, ``model.attention.v4.kv_dtype`` for V4 attention (its window, compressed entries
and, through it, its indexer keys): :func:`kv_dtype_key` names which.
"""

from __future__ import annotations

import copy
from typing import Any

from v4lab.chips.profile import ChipConfig
from v4lab.errors import ConfigError

V4_KV_DTYPES = ("fp32", "bf16", "fp8")  # modules/v4_config.KV_FORMATS (no int8 V4 cache)


def kv_dtype_key(model_cfg: Any) -> str:
    """The config key of the model's KV-cache dtype (V4 attention keeps its own)."""
    v4 = model_cfg.attention.kind == "v4"
    return "model.attention.v4.kv_dtype" if v4 else "model.attention.kv_cache.dtype"


def kv_dtype(model_cfg: Any) -> str:
    """The KV-cache dtype the model requests (:func:`kv_dtype_key`)."""
    a = model_cfg.attention
    return a.v4.kv_dtype if a.kind == "v4" else a.kv_cache.dtype


def with_kv_dtype(model_cfg: Any, kv: str) -> Any:
    """A copy of ``model_cfg`` storing its KV cache in ``kv`` (the key :func:`kv_dtype_key`)."""
    cfg = copy.deepcopy(model_cfg)
    if cfg.attention.kind == "v4":
        cfg.attention.v4.kv_dtype = kv
    else:
        cfg.attention.kv_cache.dtype = kv
    return cfg


def resolve_numerics(chip: ChipConfig, model_cfg: Any) -> tuple[str, str, list[str]]:
    """(matmul_dtype, kv_dtype_effective, notes) for a run of ``model_cfg`` on ``chip``.

    Raises :class:`ConfigError` when the model's KV dtype is not stored by the chip and
    ``chip.on_unsupported='error'``; with ``'fallback'`` uses ``chip.kv_fallback_dtype``.
    """
    requested, name = kv_dtype(model_cfg), kv_dtype_key(model_cfg)
    notes: list[str] = []
    if requested in chip.kv_dtypes:
        kv = requested
    elif chip.on_unsupported == "fallback" and chip.kv_fallback_dtype is not None:
        kv = chip.kv_fallback_dtype
        notes.append(f"chip {chip.name!r} does not store {requested!r} KV caches; using its "
                     f"documented fallback {kv!r} (chip.on_unsupported=fallback)")
    else:
        why = ("" if chip.kv_fallback_dtype is not None else
               " (this chip documents no fallback, so chip.on_unsupported=fallback "
               "cannot help; choose a supported dtype)")
        example = chip.kv_fallback_dtype or chip.kv_dtypes[0]
        raise ConfigError(
            f"{name}={requested!r} is not allowed on chip "
            f"{chip.name!r}: it stores KV caches in {', '.join(chip.kv_dtypes)} only. Either "
            f"choose a KV dtype the chip supports (e.g. {name}="
            f"{example}) or set chip.on_unsupported=fallback to use its documented fallback"
            f" ({chip.kv_fallback_dtype!r}){why}")
    if model_cfg.attention.kind == "mha" and kv not in ("fp32", "bf16"):
        raise ConfigError(
            f"chip {chip.name!r} falls back to KV dtype {kv!r}, which MHA caches do not "
            "support (fp32 | bf16): use model.attention.kind=mla or a bf16 KV cache")
    if model_cfg.attention.kind == "v4" and kv not in V4_KV_DTYPES:
        raise ConfigError(
            f"chip {chip.name!r} falls back to KV dtype {kv!r}, which V4 attention caches do "
            f"not support ({' | '.join(V4_KV_DTYPES)}): set {name} to one of those the chip "
            f"stores ({', '.join(d for d in chip.kv_dtypes if d in V4_KV_DTYPES)})")
    if chip.matmul_dtype in ("fp8", "int8"):
        notes.append(f"matmul dtype {chip.matmul_dtype!r} is priced in the projection; "
                     "training emulates matmuls in bf16")
    return chip.matmul_dtype, kv, notes


def apply_numerics(chip: ChipConfig, model_cfg: Any) -> tuple[Any, str, list[str]]:
    """A copy of ``model_cfg`` with the effective KV dtype set, plus the matmul dtype and
    notes. Pure (evaluation rebuilds a run's model with it); applying it to its own result
    changes nothing."""
    matmul, kv, notes = resolve_numerics(chip, model_cfg)
    return with_kv_dtype(model_cfg, kv), matmul, notes


def build_numerics(chip: ChipConfig, model_cfg: Any, path: str = "chip",
                   ) -> tuple[Any, str, list[str]]:
    """What a run does when it is built: resolve ``chip`` in place (a measured profile gets
    this host's peaks, see :meth:`ChipConfig.resolve`) and return :func:`apply_numerics`:
    the model config the run uses (record it in ``config.yaml``), the matmul dtype, notes."""
    chip.resolve(path)
    return apply_numerics(chip, model_cfg)


def training_precision(matmul_dtype: str) -> str:
    """Lightning precision string that runs the chip's matmul dtype on this machine
    (fp8 / int8 matmuls are not emulated: products run in bf16, as DESIGN.md says)."""
    return {"fp32": "32-true", "fp16": "16-mixed"}.get(matmul_dtype, "bf16-mixed")
