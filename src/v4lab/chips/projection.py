"""Roofline projection: a model priced on a chip, and the ``chip/*`` metrics of a run.

FLOPs and bytes per token for training, prefill and decode of any
:class:`~v4lab.model.ModelConfig` (counted by :mod:`v4lab.accounting`) are priced on the
chip with a roofline: time is the largest of compute, memory traffic and interconnect
traffic at assumed efficiencies (``chip.projection``), and the largest term is the bound
reported. Figures marked low / unverified / roadmap (``chip.marked_figures()``) carry over
to every projection resting on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from v4lab.accounting import (
    DTYPE_BYTES,
    decode_flops_per_token,
    decode_kv_read_bytes,
    kv_bytes_held,
    kv_bytes_per_token,
    param_counts,
    prefill_flops_per_token,
    train_flops_per_token,
)
from v4lab.chips.numerics import kv_dtype, resolve_numerics, with_kv_dtype
from v4lab.chips.presets import load_model_preset, with_switches
from v4lab.chips.profile import ChipConfig, ProjectionConfig


def _bound(terms: dict[str, float]) -> tuple[float, str]:
    name = max(terms, key=lambda k: terms[k])
    return terms[name], name


@dataclass
class _Setup:
    """Per-device rates of the chip (at the assumed efficiencies) and the model's bytes."""

    pj: ProjectionConfig
    peak: float  # FLOP/s in the matmul dtype
    hbm: float  # bytes/s
    ic: float | None  # bytes/s between devices (None: single device)
    mem: float  # usable bytes per device
    params: dict[str, int]
    weights: float  # bytes of the device-resident weights
    routed: float  # bytes of all routed experts
    a2a_per_token: float  # MoE dispatch + combine bytes per token, forward
    host_bytes_per_token: float  # Engram rows read from host memory per token
    kv_tok: float  # KV bytes per token, all layers
    n_moe: int


def _setup(chip: ChipConfig, cfg: Any) -> _Setup:
    pj = chip.projection
    ic_fig = chip.interconnect_gbps
    wbytes = DTYPE_BYTES[pj.weight_dtype or chip.matmul_dtype]
    p = param_counts(cfg)
    m, e = cfg.moe, cfg.engram
    n_moe = max(0, cfg.n_layers - m.first_dense_layers) if m.enabled else 0
    return _Setup(
        pj=pj, peak=chip.peak_flops(),
        hbm=chip.hbm_tbps.value * 1e12 * pj.bw_util,  # type: ignore[union-attr,operator]
        ic=(ic_fig.value * 1e9 * pj.comm_efficiency
            if ic_fig is not None and ic_fig.value is not None else None),
        mem=chip.memory_gb.value * 1e9 * pj.memory_usable,  # type: ignore[union-attr,operator]
        params=p, weights=p["device"] * wbytes, routed=p["routed_experts"] * wbytes,
        a2a_per_token=2 * m.top_k * cfg.dim * DTYPE_BYTES[pj.act_dtype] * n_moe,
        host_bytes_per_token=(len(e.layers) * len(e.ngram_orders) * e.heads_per_order
                              * e.head_dim * wbytes if e.enabled and e.host_memory else 0),
        kv_tok=kv_bytes_per_token(cfg), n_moe=n_moe)


def _train(s: _Setup, cfg: Any) -> dict[str, Any]:
    """Per token: max(compute, weights read 3x per microbatch, MoE all-to-all, host link)."""
    pj = s.pj
    f_train = train_flops_per_token(cfg, pj.train_seq_len)
    t = {"compute": f_train / (s.peak * pj.train_mfu),
         "memory": 3 * s.weights / pj.train_microbatch_tokens / s.hbm}
    if s.ic is not None and s.a2a_per_token:
        t["interconnect"] = 2 * s.a2a_per_token / s.ic  # forward + backward
    if s.host_bytes_per_token:
        t["host_link"] = 3 * s.host_bytes_per_token / (pj.host_link_gbps * 1e9)
    sec, bound = _bound(t)
    return {"train_flops_per_token": f_train, "train_tokens_per_s": 1 / sec,
            "bound_train": bound,
            "devices_needed_train": math.ceil(s.params["total"] * pj.train_bytes_per_param
                                              / s.mem)}


def _prefill(s: _Setup, cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"devices_needed_weights": math.ceil(s.weights / s.mem)}
    for L in s.pj.contexts:
        f_pre = prefill_flops_per_token(cfg, L)
        tp = {"compute": f_pre / (s.peak * s.pj.train_mfu),
              "memory": (s.weights / L + s.kv_tok) / s.hbm}
        sec, bound = _bound(tp)
        out[f"prefill_tokens_per_s@{L}"] = 1 / sec
        out[f"bound_prefill@{L}"] = bound
    return out


def _decode_devices(s: _Setup, cfg: Any) -> dict[str, Any]:
    """Fewest devices that fit at each context; one deployment for all. b sequences per
    device; if their KV would take more than kv_memory_share of the device, fewer (possibly
    a fraction: one sequence's KV spread over devices)."""
    pj, out = s.pj, {}
    for L in pj.contexts:
        kv_seq = kv_bytes_held(cfg, L)
        b = min(float(pj.decode_batch), pj.kv_memory_share * s.mem / kv_seq)
        out[f"devices_needed@{L}"] = max(1, math.ceil(s.weights / (s.mem - b * kv_seq)))
    n = max(out[f"devices_needed@{L}"] for L in pj.contexts)
    return out | {"devices_needed": n, "decode_devices": n}


def _decode(s: _Setup, cfg: Any, n: int) -> dict[str, Any]:
    """A step on ``n`` devices reads the resident weights touched by the batch's experts
    plus each sequence's KV (top-k entries + indexer keys when sparse; V4: the window,
    the attended compressed entries and the CSA indexer keys) and sends MoE dispatch /
    combine to the other devices."""
    pj, m, out = s.pj, cfg.moe, {}
    for L in pj.contexts:
        kv_seq = kv_bytes_held(cfg, L)
        b = min(float(pj.decode_batch), (s.mem - s.weights / n) / kv_seq)
        out[f"decode_batch@{L}"] = b
        out[f"mem_per_device_gb@{L}"] = (s.weights / n + b * kv_seq) / 1e9
        # weights read per step: everything resident, except routed experts nobody chose
        tokens_step = b * n
        touched = (1.0 - (1.0 - m.top_k / m.n_routed_experts) ** tokens_step if s.n_moe
                   else 1.0)
        w_read = (s.weights - s.routed * (1.0 - touched)) / n
        kv_read = decode_kv_read_bytes(cfg, L)
        td = {"compute": b * decode_flops_per_token(cfg, L) / (s.peak * pj.decode_mfu),
              "memory": (w_read + b * kv_read) / s.hbm}
        if s.ic is not None and s.a2a_per_token and n > 1:
            td["interconnect"] = b * s.a2a_per_token * (1 - 1 / n) / s.ic
        if s.host_bytes_per_token:
            td["host_link"] = b * s.host_bytes_per_token / (pj.host_link_gbps * 1e9)
        sec, bound = _bound(td)
        out[f"decode_tokens_per_s@{L}"] = b / sec
        out[f"bound_decode@{L}"] = bound
    return out


def project(chip: ChipConfig, cfg: Any) -> dict[str, Any]:
    """Roofline projection of ``cfg`` on ``chip`` (per device).

    Training: per token time = max(compute, weight traffic, MoE all-to-all); weights are
    read 3x per pass of ``train_microbatch_tokens``; activations and optimizer traffic
    are not counted. Decode: one deployment of ``devices_needed`` devices, the fewest that
    hold weights + KV of ``decode_batch`` sequences per device at every context (fewer
    sequences where their KV does not fit, see ProjectionConfig; the KV a sequence holds is
    accounting.kv_bytes_held, with V4's fixed windows); a step reads the resident
    weights touched by the batch's experts plus each sequence's KV (top-k entries + indexer
    keys when sparse) and sends MoE dispatch/combine to other devices. An Engram table in
    host memory is read over ``host_link_gbps`` (lookups can be prefetched: its own bound).
    """
    s = _setup(chip, cfg)
    out: dict[str, Any] = {"params_total": s.params["total"], "params_active": s.params["active"],
                           "kv_bytes_per_token": s.kv_tok, "weights_gb": s.weights / 1e9}
    out |= _train(s, cfg)
    out |= _prefill(s, cfg)
    out |= _decode_devices(s, cfg)
    out |= _decode(s, cfg, out["devices_needed"])
    return out


def chip_metrics(chip: ChipConfig, model_cfg: Any, presets: dict[str, Any] | None = None,
                 ) -> dict[str, float | str]:
    """Flat ``chip/*`` metrics for a run of ``model_cfg`` (as requested, before the chip's
    numerics): numerics, marks, and projections of the run's own model plus each scale
    preset with the run's switches (``chip/<preset>/...``)."""
    matmul, kv, notes = resolve_numerics(chip, model_cfg)
    out: dict[str, float | str] = {
        "chip/name": chip.name, "chip/vendor": chip.vendor, "chip/matmul_dtype": matmul,
        "chip/kv_dtype_requested": kv_dtype(model_cfg),
        "chip/kv_dtype_effective": kv, "chip/on_unsupported": chip.on_unsupported,
        "chip/peak_tflops": chip.peak_flops() / 1e12,
        "chip/hbm_tbps": float(chip.hbm_tbps.value),  # type: ignore[union-attr,arg-type]
        "chip/memory_gb": float(chip.memory_gb.value),  # type: ignore[union-attr,arg-type]
        "chip/marked_figures": ", ".join(chip.marked_figures()),
        "chip/assumed_train_mfu": chip.projection.train_mfu,
        "chip/notes": " | ".join(notes),
    }
    run = with_kv_dtype(model_cfg, kv)
    targets = {"": run}
    for name, preset in (presets or {}).items():
        targets[f"{name}/"] = with_switches(preset, run)
    for prefix, cfg in targets.items():
        for k, v in project(chip, cfg).items():
            out[f"chip/{prefix}proj_{k}" if "per_s" in k else f"chip/{prefix}{k}"] = (
                v if isinstance(v, str) else float(v))
    return out


RUN_PRESETS = ("v3_671b",)  # the full-size presets every run projects (chip/<preset>/...)


def run_chip_metrics(chip: ChipConfig, model_cfg: Any) -> dict[str, float | str]:
    """The ``chip/*`` metrics a run records (:func:`chip_metrics` with :data:`RUN_PRESETS`),
    for ``model_cfg`` as requested; also what a study row without runs of its own shows."""
    return chip_metrics(chip, model_cfg, presets={p: load_model_preset(p) for p in RUN_PRESETS})
