"""Every metric name the project writes, defined once: its unit, the tolerance that
``python -m v4lab.report check`` allows it, and which direction is better.

Bottom layer (beside :mod:`v4lab.errors` and :mod:`v4lab.io`): imports nothing from v4lab.
A name is looked up with :func:`metric`; families of names are written as patterns whose
``<placeholder>`` parts stand for any text without ``@`` (``task/<task>@<context>/acc``
covers ``task/niah_single@1024/acc``); an exact name wins over a pattern, and among
patterns the first listed wins.

Tolerances are *relative*, per metric (the values ``report check`` has always used):

- quality (losses, bits per byte, accuracies, the pieces' diagnostics): deterministic on
  CPU up to float summation order, which other kernels and thread counts change: 1e-3;
- cost (parameter counts, KV bytes, analytic FLOPs): integers or closed-form float64
  arithmetic: 1e-9;
- chip (roofline projections from the profile's figures): float64 arithmetic: 1e-6;
- speed and time: wall clock of a shared machine: 0.5 and 1.0.

How far a table cell derived from a metric may move: :func:`cell_tolerance`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

LOWER, HIGHER, NONE = "lower", "higher", "none"  # which direction is better
P_TOLERANCE = 0.02  # absolute, for the p-values of `report check`

QUALITY, COST, CHIP, SPEED, TIME = 1e-3, 1e-9, 1e-6, 0.5, 1.0  # relative tolerances (above)


@dataclass(frozen=True)
class Metric:
    """One metric name (or a family of names: see the module docstring)."""

    name: str
    unit: str
    direction: str          # LOWER, HIGHER or NONE (a label, a setting, a diagnostic)
    tolerance: float        # relative, for `report check`
    finite: bool = True     # a good run writes a finite number (NaN means a failed run)
    doc: str = ""

    def matches(self, name: str) -> bool:
        return _regex(self.name).fullmatch(name) is not None


def _regex(pattern: str) -> re.Pattern:
    parts = re.split(r"<[^>]+>", pattern)
    return re.compile("[^@]+?".join(re.escape(p) for p in parts))


def _q(name: str, unit: str, direction: str = LOWER, doc: str = "", finite: bool = True) -> Metric:
    return Metric(name, unit, direction, QUALITY, finite, doc)


# Diagnostics the pieces report (ForwardContext.add_stat): under their own name while
# training (W&B), as val/<stat>, test/<stat> in metrics.json, and as final/<stat>: the
# end of training, the mean over the last trainer.log_every_n_steps training steps
# (callbacks.PieceTail; MoE's load statistics exist only in training steps).
PIECE_STATS = (
    Metric("moe/load_cv", "ratio", LOWER, QUALITY, doc="std/mean of the tokens per routed expert"),
    Metric("moe/max_over_mean", "ratio", LOWER, QUALITY, doc="busiest expert's load over the mean"),
    Metric("moe/dead_experts", "experts", LOWER, QUALITY, doc="routed experts that got no token"),
    Metric("moe/bias_min", "logit", NONE, QUALITY, doc="smallest balancing bias"),
    Metric("moe/bias_max", "logit", NONE, QUALITY, doc="largest balancing bias"),
    Metric("sparse/indexer_kl", "nats", LOWER, QUALITY, doc="KL(dense attention || indexer scores)"),
    Metric("sparse/recall", "fraction", HIGHER, QUALITY,
           doc="dense attention mass on the keys the indexer selected"),
    Metric("v4/indexer_kl", "nats", LOWER, QUALITY,
           doc="KL(compressed-entry attention || CSA indexer scores)"),
    Metric("v4/recall", "fraction", HIGHER, QUALITY,
           doc="attention mass on the compressed entries the CSA indexer selected"),
    Metric("hc/fwd_gain", "ratio", NONE, QUALITY,
           doc="largest row sum of the product of mHC mixing matrices across depth (1 for mHC)"),
    Metric("hc/bwd_gain", "ratio", NONE, QUALITY, doc="the same for columns (gradient growth)"),
    Metric("engram/gate_mean", "fraction", NONE, QUALITY, doc="mean Engram gate"),
    Metric("engram/bucket_collision_rate", "fraction", LOWER, QUALITY,
           doc="n-gram lookups sharing a hash bucket with another n-gram"),
)
AUX_LOSSES = ("moe/aux_loss", "sparse/indexer_kl", "v4/indexer_kl")  # ForwardContext.add_loss: train/<name>

# Projection figures (chips.project): with a ``proj_`` prefix for throughputs, for the
# run's own model (chip/<figure>) and each scale preset (chip/<preset>/<figure>).
_PROJECTION = (
    Metric("params_total", "parameters", LOWER, CHIP), Metric("params_active", "parameters", LOWER, CHIP),
    Metric("kv_bytes_per_token", "bytes/token", LOWER, CHIP), Metric("weights_gb", "GB", LOWER, CHIP),
    Metric("train_flops_per_token", "FLOP/token", LOWER, CHIP),
    Metric("proj_train_tokens_per_s", "tokens/s", HIGHER, CHIP),
    Metric("proj_prefill_tokens_per_s@<context>", "tokens/s", HIGHER, CHIP),
    Metric("proj_decode_tokens_per_s@<context>", "tokens/s", HIGHER, CHIP),
    Metric("bound_train", "", NONE, CHIP, False, "the limiting term (compute, memory, ...)"),
    Metric("bound_prefill@<context>", "", NONE, CHIP, False),
    Metric("bound_decode@<context>", "", NONE, CHIP, False),
    Metric("devices_needed_train", "devices", LOWER, CHIP),
    Metric("devices_needed_weights", "devices", LOWER, CHIP),
    Metric("devices_needed@<context>", "devices", LOWER, CHIP),
    Metric("devices_needed", "devices", LOWER, CHIP), Metric("decode_devices", "devices", LOWER, CHIP),
    Metric("decode_batch@<context>", "sequences", HIGHER, CHIP),
    Metric("mem_per_device_gb@<context>", "GB", LOWER, CHIP),
)

METRICS: tuple[Metric, ...] = (
    # -- quality: training (lit.LitLM, callbacks.CurveLog) --------------------------------
    _q("train/loss", "nats/token", doc="mean next-token loss of the last logged step"),
    _q("train/answer_loss", "nats/token", doc="loss on task answer tokens"),
    _q("train/mtp_loss", "nats/token", doc="MTP head's cross-entropy on token t+2 (unweighted)"),
    Metric("train/lr", "1", NONE, QUALITY, doc="learning rate of the first parameter group"),
    *(Metric(f"train/{a}", "loss", LOWER, QUALITY, doc="auxiliary loss") for a in AUX_LOSSES),
    Metric("train/steps", "steps", NONE, QUALITY, doc="optimizer steps taken"),
    Metric("train/processes", "processes", NONE, QUALITY, doc="processes of a DDP/FSDP run"),
    Metric("train/strategy", "", NONE, QUALITY, False, "the distributed strategy (a label)"),
    # -- quality: evaluation (lit.LitLM._eval_end, train.train) -------------------------
    *(_q(f"{split}/loss", "nats/token", doc=f"mean next-token loss on the {split} split")
      for split in ("val", "test")),
    *(_q(f"{split}/bpb", "bits/byte", doc=f"bits per byte of raw text on the {split} split")
      for split in ("val", "test")),
    _q("val/unigram_bpb", "bits/byte", NONE, doc="a unigram model's bits per byte (the floor to beat)"),
    *(Metric(f"{split}/{s.name}", s.unit, s.direction, s.tolerance, doc=s.doc)
      for split in ("val", "test") for s in PIECE_STATS),
    *PIECE_STATS,
    *(Metric(f"final/{s.name}", s.unit, s.direction, s.tolerance,
             doc=f"{s.doc}: mean over the last log_every_n_steps training steps")
      for s in PIECE_STATS),
    # -- long-context tasks (evaluate.evaluate) -------------------------------------------
    _q("task/<task>@<context>/acc", "accuracy", HIGHER, "exact-match accuracy at one context length"),
    _q("task/<task>@<context>/chance", "accuracy", NONE, "a guess's expected accuracy"),
    Metric("task/<task>@<context>/answers", "answers", NONE, QUALITY,
           doc="examples behind task/<task>@<context>/acc (all: summed over the tasks)"),
    Metric("task/<task>@<context>/extrapolated", "flag", NONE, QUALITY,
           doc="1 when the context is beyond the trained length (trainer.seq_len), else 0"),
    _q("task/<task>/acc_trained_lengths", "accuracy", HIGHER, "mean over the trained lengths"),
    _q("task/<task>/acc_extrapolated", "accuracy", HIGHER, "mean beyond the trained length"),
    # -- probe runs (v4lab.probe_run) ---------------------------------------------------
    Metric("probe/name", "", NONE, QUALITY, False, "the probe task (a label)"),
    _q("probe/acc@<context>", "accuracy", HIGHER,
       "held-out answer accuracy at one length, token by token through the decode caches"),
    Metric("probe/answers@<context>", "answers", NONE, QUALITY, doc="answers behind probe/acc@<context>"),
    _q("probe/chance", "accuracy", NONE, "a uniform guess over the answer vocabulary"),
    _q("probe/baseline", "accuracy", NONE, "the best accuracy without the task's lookup"),
    Metric("probe/steps_to_90", "steps", LOWER, QUALITY,
           doc="first evaluated step with held-out accuracy >= 0.9 (probe.steps if never: censored)"),
    Metric("probe/reached_90", "fraction", HIGHER, QUALITY, doc="1 if 0.9 was reached, else 0"),
    _q("probe/kv_<dtype>/acc", "accuracy", HIGHER,
       "the run's weights decoded with another KV-cache dtype, at the trained length"),
    Metric("probe/kv_<dtype>/discordant", "answers", NONE, QUALITY,
           doc="answers where that cache and the run's own cache disagree in correctness"),
    Metric("probe/kv_<dtype>/mcnemar_p", "p", NONE, QUALITY,
           doc="exact McNemar test of that cache against the run's own, same answers"),
    # -- cost (build.measure_costs, evaluate.evaluate) ------------------------------------
    Metric("cost/params_total", "parameters", LOWER, COST),
    Metric("cost/params_active", "parameters", LOWER, COST, doc="parameters a token passes through"),
    Metric("cost/kv_bytes_per_token", "bytes/token", LOWER, COST,
           doc="KV cache bytes per token (V4 attention: growth of compressed entries + indexer keys, "
               "windows' fixed bytes not included; accounting.kv_bytes_per_token)"),
    Metric("cost/train_flops_per_token", "FLOP/token", LOWER, COST, doc="analytic (accounting)"),
    Metric("cost/train_flops_per_token_counted", "FLOP/token", LOWER, COST,
           doc="counted by torch's FlopCounterMode on the run's model"),
    Metric("cost/kv_bytes@<context>", "bytes", LOWER, COST,
           doc="KV cache held by one sequence at one context, read off the stored tensors (V4: "
               "min(W - 1, context) window-ring entries + compressed entries + indexer keys)"),
    # (engram/ keeps the quality tolerance it always had in `check`)
    Metric("engram/params", "parameters", LOWER, QUALITY, doc="Engram table parameters"),
    Metric("engram/canonical_vocab_ratio", "ratio", NONE, QUALITY, doc="canonical ids / vocabulary"),
    # -- speed and time (wall clock) --------------------------------------------------------
    Metric("speed/train_tokens_per_s", "tokens/s", HIGHER, SPEED),
    Metric("speed/decode_ms_per_token@<context>", "ms/token", LOWER, SPEED),
    Metric("time/train_s", "s", LOWER, TIME, doc="seconds in trainer.fit"),
    Metric("time/eval_s", "s", LOWER, TIME, doc="seconds of long-context evaluation"),
    # -- the machine when the run started (v4lab.threads): recorded, never compared ---------
    Metric("host/threads", "threads", NONE, TIME, doc="torch threads the run used"),
    Metric("host/usable_cpus", "CPUs", NONE, TIME, doc="CPU affinity capped by the cgroup quota"),
    Metric("host/busy_cpus_at_start", "CPUs", NONE, TIME, doc="other processes running at start"),
    # -- chip profile (chips.chip_metrics) -------------------------------------------------
    *(Metric(f"chip/{k}", "", NONE, CHIP, False, "a label") for k in (
        "name", "vendor", "matmul_dtype", "kv_dtype_requested", "kv_dtype_effective",
        "on_unsupported", "marked_figures", "notes")),
    Metric("chip/peak_tflops", "TFLOP/s", HIGHER, CHIP),
    Metric("chip/hbm_tbps", "TB/s", HIGHER, CHIP),
    Metric("chip/memory_gb", "GB", HIGHER, CHIP),
    Metric("chip/assumed_train_mfu", "fraction", NONE, CHIP),
    *(Metric(f"chip/{m.name}", m.unit, m.direction, m.tolerance, m.finite, m.doc) for m in _PROJECTION),
    *(Metric(f"chip/<preset>/{m.name}", m.unit, m.direction, m.tolerance, m.finite, m.doc)
      for m in _PROJECTION),
)

_EXACT = {m.name: m for m in METRICS if "<" not in m.name}
_PATTERNS = [m for m in METRICS if "<" in m.name]


def metric(name: str) -> Metric:
    """The registered metric ``name`` is (exact name first, then the first pattern);
    KeyError for a name nobody registered."""
    if name in _EXACT:
        return _EXACT[name]
    for m in _PATTERNS:
        if m.matches(name):
            return m
    raise KeyError(f"{name!r} is not a registered metric (src/v4lab/metrics.py)")


def key(pattern: str, **parts: object) -> str:
    """The metric name of a registered ``pattern`` with its ``<placeholders>`` filled in:
    ``key("task/<task>@<context>/acc", task="niah_single", context=1024)``. Writers use this
    (or a registered exact name) instead of a loose string, so a typo fails at once."""
    if pattern not in _EXACT and pattern not in {m.name for m in _PATTERNS}:
        raise KeyError(f"{pattern!r} is not a registered metric (src/v4lab/metrics.py)")
    name = pattern
    for part, value in parts.items():
        if f"<{part}>" not in name:
            raise KeyError(f"{pattern!r} has no <{part}>")
        name = name.replace(f"<{part}>", str(value))
    if "<" in name:
        raise KeyError(f"{pattern!r}: fill in {', '.join(re.findall(r'<[^>]+>', name))}")
    return name


def known(name: str) -> bool:
    try:
        metric(name)
    except KeyError:
        return False
    return True


def tolerance(name: str) -> float:
    """Relative tolerance of ``report check``; an unregistered name gets the quality one."""
    return metric(name).tolerance if known(name) else QUALITY


def unit(name: str) -> str:
    return metric(name).unit if known(name) else ""


def label(name: str) -> str:
    """An axis label: ``val/bpb (bits/byte)``."""
    u = unit(name)
    return f"{name} ({u})" if u else name


def must_be_finite(name: str) -> bool:
    """A non-finite value of ``name`` means the run failed (unregistered names: no claim)."""
    return known(name) and metric(name).finite


def cell_tolerance(col: str, a: float, b: float, mean: float | None) -> float:
    """How far a rebuilt table cell ``<metric> <stat>`` may move from ``b`` to ``a``
    (``mean``: the row's ``<metric> mean``).

    Means move by their metric's relative tolerance. A delta or CI half-width is a
    *difference* of such values, so a relative tolerance on itself is meaningless when it
    is tiny (two runs 1e-6 apart on one CPU and 3e-6 on another): it gets an absolute one,
    twice the relative tolerance of the row's mean (each operand of the difference may
    move by that much). p-values: absolute (:data:`P_TOLERANCE`)."""
    if col.endswith(" p"):
        return P_TOLERANCE
    name, _, stat = col.rpartition(" ")
    rel = tolerance(name)
    if stat in ("delta", "ci95") and mean is not None and math.isfinite(mean):
        return 2 * rel * abs(mean) + 1e-12
    return rel * max(abs(a), abs(b)) + 1e-12
