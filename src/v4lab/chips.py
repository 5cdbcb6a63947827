"""Target chip profiles: dtype support policy and an analytic roofline cost projection.

A profile (``conf/chip/<name>.yaml``) states a chip's dense peak TFLOP/s per dtype, its
memory capacity and bandwidth, its chip-to-chip bandwidth and the dtypes its software
stack supports for matrix products and KV-cache storage. Every figure is a
``{value, source, confidence}`` entry; figures whose confidence is low, unverified or a
vendor roadmap are marked wherever they are shown. ``cpu_host`` says ``measured: true``
instead: its peaks are timed once on this machine and cached under ``~/.cache/v4lab/``.

A profile does two things:

1. Numerics (:func:`resolve_numerics`): the run's matmul dtype is the chip's, and the KV
   cache dtype requested by the model must be one the chip stores; otherwise the run
   fails (``on_unsupported=error``) or uses the chip's documented fallback.
2. Cost (:func:`project`): FLOPs and bytes per token for training, prefill and decode of
   any :class:`~v4lab.model.ModelConfig`, priced on the chip with a roofline: time is the
   largest of compute, memory traffic and interconnect traffic at assumed efficiencies
   (``chip.projection``), and the largest term is the bound reported.

Run ``python -m v4lab.chips [hydra overrides]`` for the projection table.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from v4lab.errors import ConfigError, require, require_choice
from v4lab.io import CONF_DIR, atomic_write_json, compose
from v4lab.modules.args import KV_DTYPES

CONFIDENCES = ("high", "medium", "low", "roadmap", "unverified")
MARKED_CONFIDENCES = ("low", "roadmap", "unverified")
PEAK_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8")
REQUIRED_PEAKS = ("bf16", "fp16", "fp8", "int8")  # must be present (value may be null)
MATMUL_DTYPES = PEAK_DTYPES
ON_UNSUPPORTED = ("error", "fallback")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
SCALE_BYTES = {"fp32": 4, "ue8m0": 1}



# ---------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------
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
        key), fill measured figures, validate."""
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
        return chip.ready(path)

    def ready(self, path: str = "chip") -> ChipConfig:
        """Fill measured figures (``measured: true``) and validate; for a ChipConfig that
        came out of a structured merge (e.g. a ``chip`` field of the run config)."""
        if self.measured:
            self.fill_measured()
        return self.validate(path)

    def fill_measured(self, peaks: dict[str, float] | None = None) -> None:
        """Fill peak / memory figures of a ``measured: true`` profile from this host."""
        m = peaks if peaks is not None else measure_host()
        src = (f"measured on this host ({m['cpu']}, {m['threads']} threads, torch "
               f"{m['torch']}) {m['when']}; cached in {host_cache_path()}")
        note = "not measured (the CPU stack has no native kernel for it)"
        self.peak_tflops = {
            "fp32": Figure(m["fp32_tflops"], src, "medium"),
            "bf16": Figure(m["bf16_tflops"], src, "medium"),
            "fp16": Figure(None, note, "high"),
            "fp8": Figure(None, note, "high"),
            "int8": Figure(None, note, "high"),
        }
        self.memory_gb = Figure(m["memory_gb"], "os.sysconf physical pages of this host",
                                "high")
        self.hbm_tbps = Figure(m["mem_tbps"], src + " (tensor copy, read + write)", "medium")
        if self.interconnect_gbps is None:
            self.interconnect_gbps = Figure(None, "single host: no device interconnect",
                                            "high")

    def validate(self, path: str = "chip") -> ChipConfig:
        require(bool(self.name), f"{path}.name", self.name, "a non-empty profile name")
        require(bool(self.vendor), f"{path}.vendor", self.vendor, "a non-empty vendor name")
        for key in self.peak_tflops:
            require(key in PEAK_DTYPES, f"{path}.peak_tflops", key,
                    f"dtype names from {', '.join(PEAK_DTYPES)}")
        for key in REQUIRED_PEAKS:
            if key not in self.peak_tflops:
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
                raise ConfigError(
                    f"{path}.{key} is missing in profile {self.name!r}: a {{value, source, "
                    "confidence}} entry is required")
            fig.validate(f"{path}.{key}", nullable=nullable)
        if self.dtype_support is None:
            raise ConfigError(f"{path}.dtype_support is missing in profile {self.name!r}: "
                              "a {source, confidence} entry for the dtype lists is required")
        self.dtype_support.validate(f"{path}.dtype_support")
        require(len(self.matmul_dtypes) > 0, f"{path}.matmul_dtypes", self.matmul_dtypes,
                "a non-empty list")
        for dt in self.matmul_dtypes:
            require(dt in MATMUL_DTYPES, f"{path}.matmul_dtypes", dt,
                    f"dtype names from {', '.join(MATMUL_DTYPES)}")
            fig = self.peak_tflops.get(dt)
            require(fig is not None and fig.value is not None, f"{path}.matmul_dtypes", dt,
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
        require_choice(f"{path}.on_unsupported", self.on_unsupported, ON_UNSUPPORTED)
        self.projection.validate(f"{path}.projection")
        return self

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
    """Load and validate ``conf/chip/<name>.yaml``; an unknown name lists the profiles."""
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


# ---------------------------------------------------------------------------------------
# Host measurement (cpu_host)
# ---------------------------------------------------------------------------------------
def host_cache_path() -> Path:
    root = os.environ.get("V4LAB_CACHE_DIR") or Path.home() / ".cache" / "v4lab"
    return Path(root) / "host_peaks.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def host_key() -> str:
    return f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _time_matmul(dtype: Any, n: int, budget_s: float) -> float:
    """Achieved FLOP/s of an n x n matmul in ``dtype``, best of repeated timings."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up
    best, t_end = float("inf"), time.perf_counter() + budget_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _time_copy(nbytes: int, budget_s: float) -> float:
    """Achieved memory bandwidth (bytes/s) of a tensor copy: read + write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best, t_end = float("inf"), time.perf_counter() + budget_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _measure() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fp32_tflops": _time_matmul(torch.float32, 1024, 1.0) / 1e12,
        "bf16_tflops": _time_matmul(torch.bfloat16, 1024, 1.0) / 1e12,
        "mem_tbps": _time_copy(256 << 20, 1.0) / 1e12,
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
    }


def measure_host(refresh: bool = False) -> dict[str, Any]:
    """This host's peaks (fp32/bf16 matmul TFLOP/s, copy bandwidth TB/s, memory GB),
    timed once (~3 s) and cached in ``host_cache_path()`` keyed by CPU model, torch
    version and thread count."""
    path, key = host_cache_path(), host_key()
    cache: dict[str, Any] = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    if not refresh and key in cache:
        return cache[key]
    cache[key] = _measure()
    atomic_write_json(path, cache, indent=1, sort_keys=True)
    return cache[key]


# ---------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------
def resolve_numerics(chip: ChipConfig, model_cfg: Any) -> tuple[str, str, list[str]]:
    """(matmul_dtype, kv_dtype_effective, notes) for a run of ``model_cfg`` on ``chip``.

    Raises :class:`ConfigError` when the model's KV dtype is not stored by the chip and
    ``chip.on_unsupported='error'``; with ``'fallback'`` uses ``chip.kv_fallback_dtype``.
    """
    requested = model_cfg.attention.kv_cache.dtype
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
            f"model.attention.kv_cache.dtype={requested!r} is not allowed on chip "
            f"{chip.name!r}: it stores KV caches in {', '.join(chip.kv_dtypes)} only. Either "
            f"choose a KV dtype the chip supports (e.g. model.attention.kv_cache.dtype="
            f"{example}) or set chip.on_unsupported=fallback to use its documented fallback"
            f" ({chip.kv_fallback_dtype!r}){why}")
    if model_cfg.attention.kind == "mha" and kv not in ("fp32", "bf16"):
        raise ConfigError(
            f"chip {chip.name!r} falls back to KV dtype {kv!r}, which MHA caches do not "
            "support (fp32 | bf16): use model.attention.kind=mla or a bf16 KV cache")
    if chip.matmul_dtype in ("fp8", "int8"):
        notes.append(f"matmul dtype {chip.matmul_dtype!r} is priced in the projection; "
                     "training emulates matmuls in bf16")
    return chip.matmul_dtype, kv, notes


def apply_numerics(chip: ChipConfig, model_cfg: Any) -> tuple[Any, str, list[str]]:
    """A copy of ``model_cfg`` with the effective KV dtype set, plus the matmul dtype and notes."""
    matmul, kv, notes = resolve_numerics(chip, model_cfg)
    cfg = copy.deepcopy(model_cfg)
    cfg.attention.kv_cache.dtype = kv
    return cfg, matmul, notes


def training_precision(matmul_dtype: str) -> str:
    """Lightning precision string that runs the chip's matmul dtype on this machine
    (fp8 / int8 matmuls are not emulated: products run in bf16, as DESIGN.md says)."""
    return {"fp32": "32-true", "fp16": "16-mixed"}.get(matmul_dtype, "bf16-mixed")


# ---------------------------------------------------------------------------------------
# Model arithmetic: parameters, KV bytes, FLOPs
# ---------------------------------------------------------------------------------------
def model_config_from_dict(d: Any) -> Any:
    """A validated ModelConfig from a (composed) mapping."""
    from omegaconf import OmegaConf

    from v4lab.model import ModelConfig

    if not isinstance(d, dict):
        d = OmegaConf.to_container(d, resolve=True)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), d))
    return cfg.validate()


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    r = int(math.isqrt(n))
    return all(n % f for f in range(3, r + 1, 2))


def engram_table_rows(e: Any) -> int:
    """Rows of one layer's packed Engram table: the smallest distinct primes >= table_size,
    one per (order, head)."""
    need, n, rows = len(e.ngram_orders) * e.heads_per_order, max(2, e.table_size), 0
    while need:
        if _is_prime(n):
            rows += n
            need -= 1
        n += 1
    return rows


def _mla_v_dim(a: Any) -> int:
    """Per-head width entering the output projection (VVPA adds the rotary part)."""
    return a.v_head_dim + (a.qk_rope_head_dim if a.vvpa else 0)


def attention_params(cfg: Any) -> dict[str, int]:
    """Parameters of one attention module (without the pre-norm), by part."""
    a, d = cfg.attention, cfg.dim
    if a.kind == "mha":
        inner = a.n_heads * a.head_dim
        return {"proj": 4 * d * inner}
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    h = a.n_heads
    if a.q_lora_rank > 0:
        q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * qk  # wq_a, q_norm, wq_b
    else:
        q = d * h * qk
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank  # wkv_a, kv_norm
    kv += a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)  # wkv_b
    out = h * _mla_v_dim(a) * d
    parts = {"proj": q + kv + out}
    if a.sparse.enabled:
        s = a.sparse
        q_in = a.q_lora_rank if a.q_lora_rank > 0 else d
        # query heads from the query latent, one shared key head (+ LayerNorm), head weights
        parts["indexer"] = (q_in * s.index_n_heads * s.index_head_dim
                            + d * s.index_head_dim + 2 * s.index_head_dim
                            + d * s.index_n_heads)
    return parts


def param_counts(cfg: Any) -> dict[str, int]:
    """Analytic parameter counts of the model ``cfg`` describes (no model is built).

    Keys: total, active (per token: top_k of the routed experts, the looked-up Engram
    rows, one embedding row), engram_table (all layers), device (total minus an Engram
    table kept in host memory), routed_experts (all routed expert weights).
    """
    d, n_layers = cfg.dim, cfg.n_layers
    emb = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = emb + head + d  # + final norm
    # one embedding row (none extra when tied: the head is the same matrix), head, final norm
    active = (0 if cfg.tie_embeddings else d) + cfg.vocab_size * d + d
    routed_total = engram_table = 0
    m, e = cfg.moe, cfg.engram
    for i in range(n_layers):
        att = sum(attention_params(cfg).values()) + 2 * d  # + attn_norm, ffn_norm
        total += att
        active += att
        if m.enabled and i >= m.first_dense_layers:
            expert = 3 * d * m.expert_dim
            shared = 3 * d * m.expert_dim * m.n_shared_experts
            gate = d * m.n_routed_experts
            total += m.n_routed_experts * expert + shared + gate
            active += m.top_k * expert + shared + gate
            routed_total += m.n_routed_experts * expert
        else:
            total += 3 * d * cfg.ffn_dim
            active += 3 * d * cfg.ffn_dim
        if e.enabled and i in e.layers:
            n_tables = len(e.ngram_orders) * e.heads_per_order
            e_dim = n_tables * e.head_dim
            dense = 2 * e_dim * d + 3 * d + d * e.kernel_size  # w_k, w_v, 3 norms, conv
            table = engram_table_rows(e) * e.head_dim
            total += dense + table
            active += dense + n_tables * e.head_dim
            engram_table += table
    device = total - (engram_table if e.enabled and e.host_memory else 0)
    return {"total": total, "active": active, "engram_table": engram_table,
            "device": device, "routed_experts": routed_total}


def mla_kv_bytes(kv_lora_rank: int, rope_dim: int, dtype: str, scale_format: str = "fp32",
                 block_size: int = 128) -> int:
    """Bytes per token and layer of an MLA cache ``[c_kv ; k_rope]`` (DESIGN.md §2).

    fp32/bf16: both parts in that dtype. fp8/int8: the latent in 1-byte values plus one
    scale (fp32: 4 bytes, ue8m0: 1 byte) per ``block_size`` values; k_rope stays bf16.
    """
    if dtype in ("fp32", "bf16"):
        return (kv_lora_rank + rope_dim) * DTYPE_BYTES[dtype]
    n_scales = kv_lora_rank // block_size
    return kv_lora_rank * 1 + n_scales * SCALE_BYTES[scale_format] + rope_dim * 2


def kv_bytes_per_token_layer(cfg: Any) -> int:
    """Main KV-cache bytes per token and layer for ``cfg`` (what decode reads per entry)."""
    a = cfg.attention
    if a.kind == "mha":
        return 2 * a.n_heads * a.head_dim * DTYPE_BYTES[a.kv_cache.dtype]
    return mla_kv_bytes(a.kv_lora_rank, a.qk_rope_head_dim, a.kv_cache.dtype,
                        a.kv_cache.scale_format, a.kv_cache.block_size)


def indexer_bytes_per_token_layer(cfg: Any) -> int:
    """Lightning-indexer key-cache bytes per token and layer (0 without sparse attention).
    Stored like the rotary key (modules/mla.py): fp32 in an fp32 cache, else bf16.
    (DeepSeek-V3.2 keeps its indexer keys in FP8; v4lab does not quantise them yet.)"""
    a = cfg.attention
    if a.kind != "mla" or not a.sparse.enabled:
        return 0
    return a.sparse.index_head_dim * (4 if a.kv_cache.dtype == "fp32" else 2)


def kv_bytes_per_token(cfg: Any, include_indexer: bool = True) -> int:
    """KV-cache bytes per token summed over layers (main cache + indexer keys)."""
    idx = indexer_bytes_per_token_layer(cfg) if include_indexer else 0
    return cfg.n_layers * (kv_bytes_per_token_layer(cfg) + idx)


def mean_causal_keys(seq_len: int, topk: int | None = None) -> float:
    """Mean number of keys a query attends to in a causal sequence of ``seq_len``
    (query t sees t + 1 keys, or min(topk, t + 1) with top-k sparse attention)."""
    if topk is None or topk >= seq_len:
        return (seq_len + 1) / 2
    # t + 1 <= topk for t < topk, then topk
    return (topk * (topk + 1) / 2 + (seq_len - topk) * topk) / seq_len


def forward_flops_per_token(cfg: Any, keys: float, index_keys: float,
                            absorbed: bool = False) -> dict[str, float]:
    """Forward matmul FLOPs per token, by part, when each query attends to ``keys``
    cache entries and the indexer scores ``index_keys`` entries.

    Counts every matrix product (2 FLOPs per multiply-add); norms, softmax, activations
    and the embedding lookup are not counted (as torch's FlopCounterMode does).
    ``absorbed``: MLA decode path (attention over the 576-wide latent entries).
    """
    a, d, L = cfg.attention, cfg.dim, cfg.n_layers
    p = param_counts(cfg)
    out: dict[str, float] = {}
    att = attention_params(cfg)
    out["attn_proj"] = 2.0 * att["proj"] * L
    h = a.n_heads
    if a.kind == "mha":
        core = 4.0 * h * a.head_dim * keys
    elif absorbed:
        core = 2.0 * h * (a.kv_lora_rank + a.qk_rope_head_dim) * keys
        core += 2.0 * h * (a.kv_lora_rank + (a.qk_rope_head_dim if a.vvpa else 0)) * keys
    else:
        core = 2.0 * h * (a.qk_nope_head_dim + a.qk_rope_head_dim) * keys
        core += 2.0 * h * _mla_v_dim(a) * keys
    out["attn_core"] = core * L
    if "indexer" in att:
        s = a.sparse
        out["indexer"] = (2.0 * att["indexer"] + 2.0 * s.index_n_heads * s.index_head_dim
                          * index_keys) * L
    m, e = cfg.moe, cfg.engram
    n_moe = max(0, L - m.first_dense_layers) if m.enabled else 0
    out["ffn"] = 2.0 * 3 * d * cfg.ffn_dim * (L - n_moe)
    if n_moe:
        out["moe"] = 2.0 * n_moe * (3 * d * m.expert_dim * (m.top_k + m.n_shared_experts)
                                    + d * m.n_routed_experts)
    if e.enabled:
        e_dim = len(e.ngram_orders) * e.heads_per_order * e.head_dim
        out["engram"] = 2.0 * len(e.layers) * (2 * e_dim * d + d * e.kernel_size)
    out["lm_head"] = 2.0 * d * cfg.vocab_size
    assert p["total"] > 0
    return out


def train_flops_per_token(cfg: Any, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward) at sequence length ``seq_len``.

    Matmuls cost 3x forward (forward, input gradient, weight gradient); the attention core
    3.5x (FlashAttention-style backward recomputes the scores). ``causal=False`` prices
    every query against all ``seq_len`` keys (how torch counts an ``is_causal`` SDPA).
    """
    a = cfg.attention
    topk = a.sparse.topk if (a.kind == "mla" and a.sparse.enabled) else None
    if causal:
        keys, index_keys = mean_causal_keys(seq_len, topk), mean_causal_keys(seq_len)
    else:
        keys = float(min(topk, seq_len) if topk else seq_len)
        index_keys = float(seq_len)
    f = forward_flops_per_token(cfg, keys, index_keys)
    core = f.pop("attn_core")
    return 3.0 * sum(f.values()) + 3.5 * core


def decode_flops_per_token(cfg: Any, context: int) -> float:
    """Forward FLOPs of one decoded token at ``context`` cached tokens (MLA absorbed)."""
    a = cfg.attention
    keys = float(min(a.sparse.topk, context) if a.kind == "mla" and a.sparse.enabled
                 else context)
    return sum(forward_flops_per_token(cfg, keys, float(context), absorbed=True).values())


def prefill_flops_per_token(cfg: Any, context: int) -> float:
    """Forward FLOPs per token when prefilling a ``context``-token prompt."""
    a = cfg.attention
    topk = a.sparse.topk if (a.kind == "mla" and a.sparse.enabled) else None
    return sum(forward_flops_per_token(cfg, mean_causal_keys(context, topk),
                                       mean_causal_keys(context)).values())


# ---------------------------------------------------------------------------------------
# Roofline projection
# ---------------------------------------------------------------------------------------
def _bound(terms: dict[str, float]) -> tuple[float, str]:
    name = max(terms, key=lambda k: terms[k])
    return terms[name], name


def project(chip: ChipConfig, cfg: Any) -> dict[str, Any]:
    """Roofline projection of ``cfg`` on ``chip`` (per device).

    Training: per token time = max(compute, weight traffic, MoE all-to-all); weights are
    read 3x per pass of ``train_microbatch_tokens``; activations and optimizer traffic
    are not counted. Decode: one deployment of ``devices_needed`` devices, the fewest that
    hold weights + KV of ``decode_batch`` sequences per device at every context (fewer
    sequences where their KV does not fit, see ProjectionConfig); a step reads the resident
    weights touched by the batch's experts plus each sequence's KV (top-k entries + indexer
    keys when sparse) and sends MoE dispatch/combine to other devices. An Engram table in
    host memory is read over ``host_link_gbps`` (lookups can be prefetched: its own bound).
    """
    pj = chip.projection
    peak = chip.peak_flops()
    hbm = chip.hbm_tbps.value * 1e12 * pj.bw_util  # type: ignore[union-attr]
    ic_fig = chip.interconnect_gbps
    ic = (ic_fig.value * 1e9 * pj.comm_efficiency
          if ic_fig is not None and ic_fig.value is not None else None)
    mem = chip.memory_gb.value * 1e9 * pj.memory_usable  # type: ignore[union-attr]
    wbytes = DTYPE_BYTES[pj.weight_dtype or chip.matmul_dtype]
    abytes = DTYPE_BYTES[pj.act_dtype]
    p = param_counts(cfg)
    m, e = cfg.moe, cfg.engram
    n_moe = max(0, cfg.n_layers - m.first_dense_layers) if m.enabled else 0
    weights = p["device"] * wbytes
    routed = p["routed_experts"] * wbytes
    a2a_per_token = 2 * m.top_k * cfg.dim * abytes * n_moe  # dispatch + combine, forward
    host_bytes_per_token = (len(e.layers) * len(e.ngram_orders) * e.heads_per_order
                            * e.head_dim * wbytes if e.enabled and e.host_memory else 0)
    kv_tok = kv_bytes_per_token(cfg)
    out: dict[str, Any] = {"params_total": p["total"], "params_active": p["active"],
                           "kv_bytes_per_token": kv_tok, "weights_gb": weights / 1e9}

    # -- training ---------------------------------------------------------------------
    f_train = train_flops_per_token(cfg, pj.train_seq_len)
    t = {"compute": f_train / (peak * pj.train_mfu),
         "memory": 3 * weights / pj.train_microbatch_tokens / hbm}
    if ic is not None and a2a_per_token:
        t["interconnect"] = 2 * a2a_per_token / ic  # forward + backward
    if host_bytes_per_token:
        t["host_link"] = 3 * host_bytes_per_token / (pj.host_link_gbps * 1e9)
    sec, bound = _bound(t)
    out.update(train_flops_per_token=f_train, train_tokens_per_s=1 / sec, bound_train=bound,
               devices_needed_train=math.ceil(p["total"] * pj.train_bytes_per_param / mem))

    # -- prefill per context -------------------------------------------------------------
    out["devices_needed_weights"] = math.ceil(weights / mem)
    for L in pj.contexts:
        f_pre = prefill_flops_per_token(cfg, L)
        tp = {"compute": f_pre / (peak * pj.train_mfu),
              "memory": (weights / L + kv_tok) / hbm}
        sec, bound = _bound(tp)
        out[f"prefill_tokens_per_s@{L}"] = 1 / sec
        out[f"bound_prefill@{L}"] = bound

    # -- decode: fewest devices that fit at each context; one deployment for all -------
    # b sequences per device; if their KV would take more than kv_memory_share of the
    # device, fewer (possibly a fraction: one sequence's KV spread over devices)
    for L in pj.contexts:
        b = min(float(pj.decode_batch), pj.kv_memory_share * mem / (L * kv_tok))
        out[f"devices_needed@{L}"] = max(1, math.ceil(weights / (mem - b * L * kv_tok)))
    n = max(out[f"devices_needed@{L}"] for L in pj.contexts)
    out["devices_needed"] = n
    out["decode_devices"] = n
    a = cfg.attention
    for L in pj.contexts:
        kv_seq = L * kv_tok
        b = min(float(pj.decode_batch), (mem - weights / n) / kv_seq)
        out[f"decode_batch@{L}"] = b
        out[f"mem_per_device_gb@{L}"] = (weights / n + b * kv_seq) / 1e9
        # weights read per step: everything resident, except routed experts nobody chose
        tokens_step = b * n
        touched = 1.0 - (1.0 - m.top_k / m.n_routed_experts) ** tokens_step if n_moe else 1.0
        w_read = (weights - routed * (1.0 - touched)) / n
        keys = min(a.sparse.topk, L) if a.kind == "mla" and a.sparse.enabled else L
        kv_read = cfg.n_layers * (keys * kv_bytes_per_token_layer(cfg)
                                  + L * indexer_bytes_per_token_layer(cfg))
        td = {"compute": b * decode_flops_per_token(cfg, L) / (peak * pj.decode_mfu),
              "memory": (w_read + b * kv_read) / hbm}
        if ic is not None and a2a_per_token and n > 1:
            td["interconnect"] = b * a2a_per_token * (1 - 1 / n) / ic
        if host_bytes_per_token:
            td["host_link"] = b * host_bytes_per_token / (pj.host_link_gbps * 1e9)
        sec, bound = _bound(td)
        out[f"decode_tokens_per_s@{L}"] = b / sec
        out[f"bound_decode@{L}"] = bound
    return out


# ---------------------------------------------------------------------------------------
# Scale presets and metrics
# ---------------------------------------------------------------------------------------
SCALE_PRESETS = ("v3_671b", "v4_flash_est")


def load_model_preset(name: str, conf_dir: Path | str | None = None) -> Any:
    """ModelConfig of ``conf/model/<name>.yaml`` (a scale preset; self-contained YAML)."""
    from omegaconf import OmegaConf

    path = Path(conf_dir or CONF_DIR) / "model" / f"{name}.yaml"
    if not path.is_file():
        avail = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"scale={name!r} is not allowed: one of {', '.join(avail)}")
    d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(d, dict)
    d.pop("defaults", None)
    return model_config_from_dict(d)


def with_switches(preset: Any, run_cfg: Any) -> Any:
    """The preset's sizes with the run's architectural switches (attention kind, VVPA,
    KV-cache format, sparse attention, MoE, Engram on/off and host memory), so one
    experiment's switches are priced at full size."""
    cfg = copy.deepcopy(preset)
    ra, a = run_cfg.attention, cfg.attention
    a.kind, a.vvpa = ra.kind, ra.vvpa
    a.kv_cache = copy.deepcopy(ra.kv_cache)
    a.sparse.enabled = ra.sparse.enabled
    cfg.moe.enabled = run_cfg.moe.enabled
    cfg.engram.enabled = run_cfg.engram.enabled
    cfg.engram.host_memory = run_cfg.engram.host_memory
    return cfg.validate()


def chip_metrics(chip: ChipConfig, model_cfg: Any, presets: dict[str, Any] | None = None,
                 ) -> dict[str, float | str]:
    """Flat ``chip/*`` metrics for a run: numerics, marks, and projections of the run's
    own model plus each scale preset with the run's switches (``chip/<preset>/...``)."""
    matmul, kv, notes = resolve_numerics(chip, model_cfg)
    out: dict[str, float | str] = {
        "chip/name": chip.name, "chip/vendor": chip.vendor, "chip/matmul_dtype": matmul,
        "chip/kv_dtype_requested": model_cfg.attention.kv_cache.dtype,
        "chip/kv_dtype_effective": kv, "chip/on_unsupported": chip.on_unsupported,
        "chip/peak_tflops": chip.peak_flops() / 1e12,
        "chip/hbm_tbps": float(chip.hbm_tbps.value),  # type: ignore[union-attr,arg-type]
        "chip/memory_gb": float(chip.memory_gb.value),  # type: ignore[union-attr,arg-type]
        "chip/marked_figures": ", ".join(chip.marked_figures()),
        "chip/assumed_train_mfu": chip.projection.train_mfu,
        "chip/notes": " | ".join(notes),
    }
    run = copy.deepcopy(model_cfg)
    run.attention.kv_cache.dtype = kv
    targets = {"": run}
    for name, preset in (presets or {}).items():
        targets[f"{name}/"] = with_switches(preset, run)
    for prefix, cfg in targets.items():
        for k, v in project(chip, cfg).items():
            out[f"chip/{prefix}proj_{k}" if "per_s" in k else f"chip/{prefix}{k}"] = (
                v if isinstance(v, str) else float(v))
    return out


def cross_check_model(model: Any, include_indexer: bool = True) -> dict[str, tuple[int, int]]:
    """Analytic vs measured counts of a built Transformer: {name: (analytic, measured)}
    for total params, active params and KV bytes per token (from real caches, which
    after a short decode hold real fp8/int8 tensors). The lead points a test at this once
    MLA / MoE / Engram are merged (MHA is tested here); ``include_indexer``: whether the
    MLA cache's bytes_per_token counts the sparse indexer's key cache."""
    cfg = model.cfg
    p = param_counts(cfg)
    caches = model.new_caches(1, 8)
    with torch.no_grad():
        model.forward_cached(torch.zeros(1, 2, dtype=torch.long), caches, 0)
    measured_kv = model.kv_bytes_per_token(caches)
    return {"params_total": (p["total"], model.num_params()),
            "params_active": (p["active"], model.num_active_params()),
            "kv_bytes_per_token": (kv_bytes_per_token(cfg, include_indexer), measured_kv)}



# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v == math.inf:
        return "n/a"
    if v >= 1e9:
        return f"{v / 1e9:.1f}G"
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def chip_from_cfg(chip_node: Any) -> ChipConfig:
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(chip_node, resolve=True) if not isinstance(chip_node, dict) \
        else dict(chip_node)
    assert isinstance(d, dict)
    return ChipConfig.from_dict(d)


def projection_table(chip: ChipConfig, model_cfg: Any, scales: list[str]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    pj = chip.projection
    marks = chip.marked_figures()
    title = (f"Projection on {chip.name} ({chip.vendor}, matmul {chip.matmul_dtype}); per "
             "device")
    caption = (f"assumed: train MFU {pj.train_mfu}, decode MFU {pj.decode_mfu}, HBM util "
               f"{pj.bw_util}, link efficiency {pj.comm_efficiency}, decode batch "
               f"{pj.decode_batch}/device (b = what fits), train seq {pj.train_seq_len}.\n"
               + (f"Rests on marked figures: {', '.join(marks)}" if marks
                  else "No marked figures."))
    table = Table(title=escape(title), caption=escape(caption))
    cols = ["scale", "params tot/act", "KV B/tok", "train tok/s/dev (bound)", "devices"]
    for L in pj.contexts:
        cols += [f"decode tok/s/dev @{L} (bound, seqs/dev)", f"mem/dev GB @{L}"]
    for c in cols:
        table.add_column(c, justify="right" if c != "scale" else "left")
    targets = [("run", model_cfg)]
    for s in scales:
        preset = load_model_preset(s)
        scaled = with_switches(preset, model_cfg)
        targets.append((f"{s} (run's switches)", scaled))
        if scaled != preset:
            targets.append((f"{s} (its own switches)", preset))
    for name, cfg in targets:
        r = project(chip, cfg)
        row = [name, f"{_fmt(r['params_total'])}/{_fmt(r['params_active'])}",
               _fmt(r["kv_bytes_per_token"]),
               f"{_fmt(r['train_tokens_per_s'])} ({r['bound_train']})",
               _fmt(r["devices_needed"])]
        for L in pj.contexts:
            row += [f"{_fmt(r[f'decode_tokens_per_s@{L}'])} ({r[f'bound_decode@{L}']}, "
                    f"{r[f'decode_batch@{L}']:.3g})", _fmt(r[f"mem_per_device_gb@{L}"])]
        table.add_row(*row)
    return table


def figures_table(chip: ChipConfig) -> Any:
    """Every figure of a profile with its confidence mark and source."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{chip.name}: {chip.device}"))
    for c in ("figure", "value", "confidence", "source"):
        table.add_column(c, overflow="fold")
    for key, fig in chip.figures().items():
        value = "null" if fig.value is None else f"{fig.value:.4g}"
        table.add_row(key, value, escape(fig.mark or fig.confidence), escape(fig.source))
    if chip.dtype_support is not None:
        ds = chip.dtype_support
        table.add_row("dtypes", escape(f"matmul {chip.matmul_dtypes}, kv {chip.kv_dtypes}, "
                                       f"fallback {chip.kv_fallback_dtype}"),
                      escape(ds.mark or ds.confidence), escape(ds.source))
    return table


def main(argv: list[str] | None = None) -> int:
    """``python -m v4lab.chips [--scales v3_671b,v4_flash_est] [hydra overrides...]``"""
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    scales = list(SCALE_PRESETS)
    if argv and argv[0].startswith("--scales"):
        arg = argv.pop(0)
        val = arg.split("=", 1)[1] if "=" in arg else argv.pop(0)
        scales = [s for s in val.split(",") if s]
    console = Console(width=200)
    try:
        chip_arg = [o for o in argv if o.startswith("chip=")]
        if chip_arg:  # unknown names list the profiles (before Hydra's own message)
            name = chip_arg[-1].split("=", 1)[1]
            if name not in available_chips():
                raise ConfigError(f"chip={name!r} is not allowed: one of "
                                  f"{', '.join(available_chips())}")
        try:
            cfg = compose(argv)
        except Exception as e:  # Hydra: unknown experiment / override, with its own message
            raise ConfigError(f"could not compose the config: {e}") from e
        chip = chip_from_cfg(cfg.chip)
        model_cfg = model_config_from_dict(cfg.model)
        run_cfg, matmul, notes = apply_numerics(chip, model_cfg)
        for s in scales:
            load_model_preset(s)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        return 2
    console.print(figures_table(chip))
    console.print(projection_table(chip, run_cfg, scales))
    console.print(f"numerics: matmul {matmul}, KV cache {run_cfg.attention.kv_cache.dtype}"
                  + "".join(f"\n  note: {n}" for n in notes), highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
