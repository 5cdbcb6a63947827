"""Chip profile schema: ``conf/chip/<name>.yaml`` as dataclasses, loaded and checked.

A profile states a chip's dense peak TFLOP/s per dtype, its memory capacity and
bandwidth, its chip-to-chip bandwidth and the dtypes its software stack supports for
matrix products and KV-cache storage. Every figure is a ``{value, source, confidence}``
entry; figures whose confidence is low, unverified or a vendor roadmap are marked wherever
they are shown. ``cpu_host`` says ``measured: true`` instead: its figures are filled from
this machine's timings by :meth:`ChipConfig.resolve` (see :mod:`v4lab.chips.host`).

Checking a profile (:meth:`ChipConfig.validate`) is pure: it measures nothing and touches
no file. Measuring happens in :meth:`ChipConfig.resolve`, which a run calls when it is
built (and the loaders here, which return profiles ready to use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from v4lab.accounting import DTYPE_BYTES
from v4lab.chips import host
from v4lab.errors import ConfigError, require, require_choice
from v4lab.io import CONF_DIR
from v4lab.modules.args import KV_DTYPES

CONFIDENCES = ("high", "medium", "low", "roadmap", "unverified")
MARKED_CONFIDENCES = ("low", "roadmap", "unverified")
PEAK_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8")
REQUIRED_PEAKS = ("bf16", "fp16", "fp8", "int8")  # must be present (value may be null)
MATMUL_DTYPES = PEAK_DTYPES
ON_UNSUPPORTED = ("error", "fallback")


@dataclass
class Figure:
    """One published (or measured) number with where it comes from and how sure it is.

    value: the number (null = not published / not supported); source: citation or
    derivation; confidence: high | medium | low | roadmap | unverified.
    """

    value: float | None = None
    source: str = ""
    confidence: str = ""

    def validate(self, path: str, *, positive: bool = True, nullable: bool = False) -> None:
        require(bool(self.source and self.source.strip()), f"{path}.source", self.source,
                "a non-empty citation of where the figure comes from")
        require_choice(f"{path}.confidence", self.confidence, CONFIDENCES)
        if self.value is None:
            require(nullable, f"{path}.value", None, "a number (this figure is required)")
            return
        require(isinstance(self.value, (int, float)) and not isinstance(self.value, bool)
                and math.isfinite(self.value), f"{path}.value", self.value, "a finite number")
        if positive:
            require(self.value > 0, f"{path}.value", self.value, "a number > 0")

    @property
    def mark(self) -> str:
        """'' for high/medium confidence, else the confidence in brackets (shown in reports)."""
        return f"[{self.confidence}]" if self.confidence in MARKED_CONFIDENCES else ""


@dataclass
class SupportNote:
    """Source and confidence of a non-numeric statement (which dtypes a stack supports)."""

    source: str = ""
    confidence: str = ""

    def validate(self, path: str) -> None:
        require(bool(self.source and self.source.strip()), f"{path}.source", self.source,
                "a non-empty citation")
        require_choice(f"{path}.confidence", self.confidence, CONFIDENCES)

    @property
    def mark(self) -> str:
        return f"[{self.confidence}]" if self.confidence in MARKED_CONFIDENCES else ""


@dataclass
class ProjectionConfig:
    """Assumptions of the roofline projection (not chip figures; printed with the table).

    train_mfu: achieved fraction of the matmul-dtype peak in training (and prefill).
    decode_mfu: achieved fraction of peak for the compute part of decode.
    bw_util: achieved fraction of HBM bandwidth.
    comm_efficiency: achieved fraction of the chip-to-chip bandwidth (DeepSeek-V3 reports
      ~160 of 400 GB/s NVLink on H800, i.e. 0.4).
    memory_usable: fraction of device memory available to weights + KV cache.
    decode_batch: sequences decoded concurrently per device (fewer when their KV would
      take more than ``kv_memory_share`` of usable memory; then a fraction is possible:
      one sequence's KV spread over several devices).
    train_seq_len: training sequence length (sets the causal attention cost).
    train_microbatch_tokens: tokens per pass over one copy of the weights (weights are read
      three times per pass: forward, input gradient, weight gradient).
    train_bytes_per_param: weights + gradients + optimizer state per parameter in training
      (bf16 weights and grads, fp32 master + two Adam moments = 2 + 2 + 12 = 16).
    weight_dtype: dtype weights are stored in for serving ('' = the chip's matmul dtype).
    act_dtype: dtype of activations sent between devices (MoE dispatch / combine).
    host_link_gbps: host<->device bandwidth for an Engram table in host memory (GB/s;
      64 = nominal PCIe 5.0 x16, an assumption, not a chip figure).
    contexts: decode / prefill context lengths reported.
    """

    train_mfu: float = 0.40
    decode_mfu: float = 0.40
    bw_util: float = 0.80
    comm_efficiency: float = 0.40
    memory_usable: float = 0.90
    decode_batch: int = 16
    kv_memory_share: float = 0.5
    train_seq_len: int = 4096
    train_microbatch_tokens: int = 65536
    train_bytes_per_param: float = 16.0
    weight_dtype: str = ""
    act_dtype: str = "bf16"
    host_link_gbps: float = 64.0
    contexts: list[int] = field(default_factory=lambda: [32768, 131072])

    def validate(self, path: str) -> None:
        for key in ("train_mfu", "decode_mfu", "bw_util", "comm_efficiency", "memory_usable",
                    "kv_memory_share"):
            v = getattr(self, key)
            require(0 < v <= 1, f"{path}.{key}", v, "a fraction in (0, 1]")
        for key in ("decode_batch", "train_seq_len", "train_microbatch_tokens"):
            v = getattr(self, key)
            require(isinstance(v, int) and v > 0, f"{path}.{key}", v, "a positive integer")
        require(self.train_bytes_per_param > 0, f"{path}.train_bytes_per_param",
                self.train_bytes_per_param, "> 0")
        require(self.weight_dtype == "" or self.weight_dtype in DTYPE_BYTES,
                f"{path}.weight_dtype", self.weight_dtype,
                f"'' (the chip's matmul dtype) or one of {', '.join(DTYPE_BYTES)}")
        require_choice(f"{path}.act_dtype", self.act_dtype, tuple(DTYPE_BYTES))
        require(self.host_link_gbps > 0, f"{path}.host_link_gbps", self.host_link_gbps, "> 0")
        require(len(self.contexts) > 0 and all(isinstance(c, int) and c > 0
                                               for c in self.contexts),
                f"{path}.contexts", self.contexts, "a non-empty list of positive integers")


@dataclass
class ChipConfig:
    """A target chip: figures (each with source + confidence) and dtype policy.

    peak_tflops: dense TFLOP/s per dtype; keys from fp32, bf16, fp16, fp8, int8 (bf16,
      fp16, fp8, int8 required; value null = not supported / not published).
    memory_gb, hbm_tbps: device memory capacity (GB) and bandwidth (TB/s).
    interconnect_gbps: chip-to-chip bandwidth per device (GB/s; null = single device).
    matmul_dtypes / kv_dtypes: what the chip's software stack runs / stores.
    matmul_dtype: the dtype runs use for matrix products on this chip.
    kv_fallback_dtype: documented replacement for an unsupported KV dtype (null = none).
    on_unsupported: error | fallback, when the model asks for a KV dtype the chip lacks.
    measured: figures are timed on this machine (cpu_host) instead of typed in.
    """

    name: str = ""
    vendor: str = ""
    device: str = ""
    measured: bool = False
    peak_tflops: dict[str, Figure] = field(default_factory=dict)
    memory_gb: Figure | None = None
    hbm_tbps: Figure | None = None
    interconnect_gbps: Figure | None = None
    matmul_dtypes: list[str] = field(default_factory=list)
    kv_dtypes: list[str] = field(default_factory=list)
    dtype_support: SupportNote | None = None
    matmul_dtype: str = "bf16"
    kv_fallback_dtype: str | None = None
    on_unsupported: str = "error"
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, path: str = "chip") -> ChipConfig:
        """Merge a YAML mapping onto the schema (unknown keys / wrong types fail naming the
        key), check it, then resolve it (a measured profile gets this host's figures)."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        if not isinstance(d, dict):
            d = OmegaConf.to_container(d, resolve=True)
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), d)
            chip = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {e}") from e
        assert isinstance(chip, ChipConfig)
        return chip.validate(path, allow_unmeasured=True).resolve(path)

    def resolve(self, path: str = "chip") -> ChipConfig:
        """Ready for use: a ``measured: true`` profile gets this host's figures (read from
        the cache, or timed now when there is none or it is stale, see
        :func:`v4lab.chips.host.measure_host`), then the full check. A run calls this when
        it is built; validating its config does not."""
        if self.measured:
            self.fill_measured()
        return self.validate(path)

    def fill_measured(self, peaks: dict[str, Any] | None = None) -> None:
        """Fill peak / memory figures of a ``measured: true`` profile from this host
        (``peaks``: a :func:`~v4lab.chips.host.measure_host` record; measured if None).
        Peaks timed under load are marked ``low`` confidence, and so is every projection
        that rests on them (``marked_figures``)."""
        m = peaks if peaks is not None else host.measure_host()
        confidence, caveat = host.peaks_confidence(m)
        src = (f"measured on this host ({m['cpu']}, {m['threads']} threads, torch "
               f"{m['torch']}) {m['when']}{caveat}; cached in {host.host_cache_path()}")
        note = "not measured (the CPU stack has no native kernel for it)"
        self.peak_tflops = {
            "fp32": Figure(m["fp32_tflops"], src, confidence),
            "bf16": Figure(m["bf16_tflops"], src, confidence),
            "fp16": Figure(None, note, "high"),
            "fp8": Figure(None, note, "high"),
            "int8": Figure(None, note, "high"),
        }
        self.memory_gb = Figure(m["memory_gb"], "os.sysconf physical pages of this host",
                                "high")
        self.hbm_tbps = Figure(m["mem_tbps"], src + " (tensor copy, read + write)", confidence)
        if self.interconnect_gbps is None:
            self.interconnect_gbps = Figure(None, "single host: no device interconnect",
                                            "high")

    # ---- checks (pure) --------------------------------------------------------------------
    def validate(self, path: str = "chip", *, allow_unmeasured: bool = False) -> ChipConfig:
        """Check every key (names the key, the value and what is allowed). Measures nothing.

        ``allow_unmeasured``: a ``measured: true`` profile may still lack the figures that
        :meth:`resolve` fills (what validating a run config allows); the figures it states
        are checked all the same.
        """
        pending = allow_unmeasured and self.measured
        require(bool(self.name), f"{path}.name", self.name, "a non-empty profile name")
        require(bool(self.vendor), f"{path}.vendor", self.vendor, "a non-empty vendor name")
        self._validate_figures(path, pending)
        if self.dtype_support is None:
            raise ConfigError(f"{path}.dtype_support is missing in profile {self.name!r}: "
                              "a {source, confidence} entry for the dtype lists is required")
        self.dtype_support.validate(f"{path}.dtype_support")
        self._validate_dtypes(path, pending)
        require_choice(f"{path}.on_unsupported", self.on_unsupported, ON_UNSUPPORTED)
        self.projection.validate(f"{path}.projection")
        return self

    def _validate_figures(self, path: str, pending: bool) -> None:
        for key in self.peak_tflops:
            require(key in PEAK_DTYPES, f"{path}.peak_tflops", key,
                    f"dtype names from {', '.join(PEAK_DTYPES)}")
        for key in REQUIRED_PEAKS:
            if key not in self.peak_tflops and not pending:
                raise ConfigError(
                    f"{path}.peak_tflops.{key} is missing in profile {self.name!r}: every "
                    f"profile states {', '.join(REQUIRED_PEAKS)} as {{value, source, "
                    "confidence}} (value null when the chip has no such unit)")
        for key, fig in self.peak_tflops.items():
            fig.validate(f"{path}.peak_tflops.{key}", nullable=True)
        for key, nullable in (("memory_gb", False), ("hbm_tbps", False),
                              ("interconnect_gbps", True)):
            fig = getattr(self, key)
            if fig is None:
                if pending:
                    continue
                raise ConfigError(
                    f"{path}.{key} is missing in profile {self.name!r}: a {{value, source, "
                    "confidence}} entry is required")
            fig.validate(f"{path}.{key}", nullable=nullable)

    def _validate_dtypes(self, path: str, pending: bool) -> None:
        require(len(self.matmul_dtypes) > 0, f"{path}.matmul_dtypes", self.matmul_dtypes,
                "a non-empty list")
        for dt in self.matmul_dtypes:
            require(dt in MATMUL_DTYPES, f"{path}.matmul_dtypes", dt,
                    f"dtype names from {', '.join(MATMUL_DTYPES)}")
            fig = self.peak_tflops.get(dt)
            require(pending or (fig is not None and fig.value is not None),
                    f"{path}.matmul_dtypes", dt,
                    f"dtypes with a peak_tflops.{dt} value (the chip runs matmuls in it)")
        require(len(self.kv_dtypes) > 0, f"{path}.kv_dtypes", self.kv_dtypes, "a non-empty list")
        for dt in self.kv_dtypes:
            require(dt in KV_DTYPES, f"{path}.kv_dtypes", dt,
                    f"dtype names from {', '.join(KV_DTYPES)}")
        require(self.matmul_dtype in self.matmul_dtypes, f"{path}.matmul_dtype",
                self.matmul_dtype, f"one of the chip's matmul_dtypes {self.matmul_dtypes}")
        require(self.kv_fallback_dtype is None or self.kv_fallback_dtype in self.kv_dtypes,
                f"{path}.kv_fallback_dtype", self.kv_fallback_dtype,
                f"null or one of the chip's kv_dtypes {self.kv_dtypes}")

    # ---- figures --------------------------------------------------------------------------
    def peak_flops(self, dtype: str | None = None) -> float:
        """Dense peak FLOP/s in ``dtype`` (default: the matmul dtype)."""
        fig = self.peak_tflops.get(dtype or self.matmul_dtype)
        if fig is None or fig.value is None:
            raise ConfigError(f"chip {self.name!r} has no peak_tflops figure for "
                              f"{dtype or self.matmul_dtype!r}")
        return fig.value * 1e12

    def figures(self) -> dict[str, Figure]:
        """Every figure by flat name (peak_tflops.bf16, memory_gb, ...)."""
        out = {f"peak_tflops.{k}": v for k, v in self.peak_tflops.items()}
        for key in ("memory_gb", "hbm_tbps", "interconnect_gbps"):
            fig = getattr(self, key)
            if fig is not None:
                out[key] = fig
        return out

    def marked_figures(self) -> list[str]:
        """Names of figures whose confidence is low, unverified or roadmap, with the mark."""
        out = [f"{k}{v.mark}" for k, v in self.figures().items() if v.mark]
        if self.dtype_support is not None and self.dtype_support.mark:
            out.append(f"dtype_support{self.dtype_support.mark}")
        return out


def available_chips(conf_dir: Path | str | None = None) -> list[str]:
    d = Path(conf_dir or CONF_DIR) / "chip"
    return sorted(p.stem for p in d.glob("*.yaml"))


def load_chip(name: str, conf_dir: Path | str | None = None, **overrides: Any) -> ChipConfig:
    """Load, check and resolve ``conf/chip/<name>.yaml``; an unknown name lists the profiles."""
    from omegaconf import OmegaConf

    path = Path(conf_dir or CONF_DIR) / "chip" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"chip={name!r} is not allowed: one of "
                          f"{', '.join(available_chips(conf_dir))} (profiles in "
                          f"{path.parent})")
    d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(d, dict)
    d.pop("defaults", None)
    for k, v in overrides.items():
        d[k] = v
    return ChipConfig.from_dict(d, path="chip")


def chip_from_cfg(chip_node: Any) -> ChipConfig:
    """A resolved ChipConfig from a composed ``chip`` node (or a plain mapping)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(chip_node, resolve=True) if not isinstance(chip_node, dict) \
        else dict(chip_node)
    assert isinstance(d, dict)
    return ChipConfig.from_dict(d)
