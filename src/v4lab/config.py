"""Run-level configuration schema: data, trainer, logger, paths and the run itself.

Hydra composes YAML from ``conf/``; :func:`load_run_config` merges it onto these
dataclasses (unknown keys and wrong types fail with OmegaConf's message naming the full
key) and then checks values (:class:`~v4lab.errors.ConfigError` names the key, the
value and what is allowed). Nothing trains before this has passed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from v4lab.chips import ChipConfig
from v4lab.data.config import DataConfig, EvalConfig, ProbeConfig
from v4lab.errors import ConfigError, require, require_choice, require_positive
from v4lab.io import CONF_DIR
from v4lab.model import ModelConfig

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
STRATEGIES = ("auto", "ddp", "fsdp")
OPTIMIZERS = ("adamw", "muon")
QUANTIZE = ("none", "fp4_qat", "fp4_posthoc")


@dataclass
class TrainerConfig:
    """Optimisation and the Lightning Trainer. Steps count optimizer steps.

    ``batch_size`` is the global batch (sequences per optimizer step, summed over every
    process), so an experiment means the same thing on 1 device or 16: each of the
    ``devices * num_nodes`` processes takes ``batch_size / (devices * num_nodes)``.
    strategy: ``auto`` (one process), ``ddp`` (one process per device, gradients
    all-reduced; with ``accelerator=cpu`` the processes talk over gloo) or ``fsdp``
    (parameters, gradients and optimizer state sharded over the processes).
    optimizer: ``adamw`` (every parameter) or ``muon`` (V4's Muon for the matrices inside
    the blocks, AdamW for the rest, same lr and weight decay: :mod:`v4lab.optim`).
    quantize: routed-expert weights and the lightning indexers' q/k (blocks of
    ``min(32, index_head_dim)``) in MXFP4 (:mod:`v4lab.modules.fp4`): ``none``;
    ``fp4_qat`` (fake-quantised forward, straight-through gradient, from step
    ``floor(qat_start * max_steps)`` on, and for the final evaluation); ``fp4_posthoc``
    (trained in full precision, quantised once after training, before the final evaluation).
    """

    max_steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    val_every_n_steps: int = 100
    val_batches: int = 8
    test_batches: int = 8
    checkpoint_every_n_steps: int = 50
    log_every_n_steps: int = 10
    num_threads: Any = "auto"  # 'auto' (v4lab.threads), 0 = torch's default, or a count
    optimizer: str = "adamw"
    quantize: str = "none"
    qat_start: float = 0.9

    def validate(self, path: str = "trainer") -> None:
        for key in ("max_steps", "batch_size", "seq_len", "val_every_n_steps", "val_batches",
                    "test_batches", "checkpoint_every_n_steps", "log_every_n_steps", "devices", "num_nodes"):
            require_positive(f"{path}.{key}", getattr(self, key))
        require(self.lr > 0, f"{path}.lr", self.lr, "> 0")
        require(0 <= self.min_lr_ratio <= 1, f"{path}.min_lr_ratio", self.min_lr_ratio,
                "in [0, 1]")
        require(0 <= self.warmup_steps < self.max_steps, f"{path}.warmup_steps",
                self.warmup_steps, f"in [0, max_steps={self.max_steps})")
        require(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, ">= 0")
        for key in ("beta1", "beta2"):
            require(0 <= getattr(self, key) < 1, f"{path}.{key}", getattr(self, key), "in [0, 1)")
        require(self.grad_clip >= 0, f"{path}.grad_clip", self.grad_clip, ">= 0 (0 = off)")
        require_choice(f"{path}.precision", self.precision, PRECISIONS)
        require_choice(f"{path}.accelerator", self.accelerator, ("auto", "cpu", "gpu", "cuda"))
        require(self.num_threads == "auto" or (isinstance(self.num_threads, int)
                                                 and self.num_threads >= 0),
                f"{path}.num_threads", self.num_threads,
                "'auto' (from the free CPUs at start), 0 (torch's default) or a thread count")
        require_choice(f"{path}.strategy", self.strategy, STRATEGIES)
        require_choice(f"{path}.optimizer", self.optimizer, OPTIMIZERS)
        require_choice(f"{path}.quantize", self.quantize, QUANTIZE)
        require(0 <= self.qat_start <= 1, f"{path}.qat_start", self.qat_start, "in [0, 1]")
        require(self.optimizer != "muon" or self.strategy != "fsdp", f"{path}.optimizer",
                self.optimizer, "'adamw' with strategy='fsdp' (Muon orthogonalises whole "
                "matrices; FSDP shards them over processes)")
        world = self.world_size
        require(self.strategy != "auto" or world == 1, f"{path}.strategy", self.strategy,
                f"'ddp' or 'fsdp' for devices * num_nodes = {world} processes "
                "(trainer=ddp, trainer=fsdp or trainer=ddp_cpu)")
        require(self.batch_size % world == 0, f"{path}.batch_size", self.batch_size,
                f"a multiple of devices * num_nodes = {world} (it is the global batch, "
                "split evenly over the processes)")
        require(self.strategy != "fsdp" or self.accelerator in ("gpu", "cuda"),
                f"{path}.strategy", self.strategy,
                f"'ddp' with {path}.accelerator={self.accelerator!r} (fsdp shards over GPUs; "
                "use trainer=ddp_cpu for several CPU processes)")

    @property
    def world_size(self) -> int:
        """Processes taking part in one optimizer step."""
        return self.devices * self.num_nodes

    def check_hardware(self, path: str = "trainer") -> None:
        """Fail early (before any data or model is built) when the machine cannot run this."""
        import torch

        wants_gpu = self.accelerator in ("gpu", "cuda")
        if wants_gpu and not torch.cuda.is_available():
            if self.strategy in ("ddp", "fsdp"):
                raise ConfigError(
                    f"{path}.strategy={self.strategy!r} with {path}.accelerator="
                    f"{self.accelerator!r} needs CUDA GPUs and this machine has none: use "
                    "trainer=ddp_cpu for several processes on the CPU (gloo), or run on a GPU "
                    "node (hydra/launcher=slurm)")
            raise ConfigError(
                f"{path}.accelerator={self.accelerator!r} is not allowed on this machine: it "
                "has no CUDA GPU; use trainer=cpu (or trainer.accelerator=cpu)")
        if wants_gpu and self.devices > torch.cuda.device_count():
            raise ConfigError(
                f"{path}.devices={self.devices} is not allowed: this node has "
                f"{torch.cuda.device_count()} CUDA GPUs")


@dataclass
class LoggerConfig:
    """W&B. mode: offline (default; no network), online (uploads), disabled (no W&B run)."""

    project: str = "v4lab"
    mode: str = "offline"
    dir: str = "logs"

    def validate(self, path: str = "logger") -> None:
        require_choice(f"{path}.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class RunConfig:
    """One run: which experiment, which seed, and everything it is made of.

    combine_as: the name of a run that applies several experiment overlays
      (``+experiment=[a,b] combine_as=a+b``); it replaces ``experiment`` (folder, W&B name,
      metrics), so a combination never passes for one of its parts. Without it ``run.py``
      refuses more than one overlay.
    reevaluate: a request, not part of the run (left out of config.yaml and the hash): a
      finished run is evaluated again from its final checkpoint and metrics.json rewritten.
    """

    experiment: str = "default"
    study: str = "adhoc"
    variant: str = ""  # a study's sweep values, part of the run's name (v4lab.studies.manifests)
    seed: int = 0
    combine_as: str | None = None
    reevaluate: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    chip: ChipConfig = field(default_factory=ChipConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> RunConfig:
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed,
                "a non-negative integer")
        require(self.combine_as is None or NAME.fullmatch(self.combine_as) is not None, "combine_as",
                self.combine_as, "a folder-safe name (letters, digits, _ . + -)")
        require(all(c.isalnum() or c in "_.-" for c in self.variant), "variant", self.variant,
                "letters, digits, '_', '.' and '-' (part of the run folder's name)")
        require_finite(asdict(self))
        self.model.validate("model")
        self.data.validate("data")
        self.trainer.validate("trainer")
        self.logger.validate("logger")
        self.chip.validate("chip", allow_unmeasured=True)  # measures nothing (chips.build_numerics)
        self.probe.validate("probe")
        if self.probe.enabled:  # the probe sets the vocabulary and lengths (v4lab.probe_run)
            return self
        require(self.trainer.seq_len <= self.model.max_seq_len, "trainer.seq_len",
                self.trainer.seq_len, f"<= model.max_seq_len={self.model.max_seq_len}")
        self.eval.validate("eval", self.model.max_seq_len, self.trainer.seq_len)
        self.model.attention.validate_sequence(  # V4 window, blocks and top-k fit the windows
            "model.attention", self.trainer.seq_len, self.model.n_layers,
            f"(trainer.seq_len={self.trainer.seq_len}, the training sequence)")
        require(self.trainer.quantize == "none" or self.model.moe.enabled, "trainer.quantize",
                self.trainer.quantize, "'none' without routed experts (FP4 quantises the "
                "routed-expert weights: enable model.moe)")
        require(self.model.vocab_size == self.data.vocab_size, "model.vocab_size",
                self.model.vocab_size, f"equal to data.vocab_size={self.data.vocab_size}")
        return self


NAME = re.compile(r"[A-Za-z0-9_.+-]+")


def require_finite(tree: Any, path: str = "") -> None:
    """Every float anywhere in the config is finite: ``trainer.lr=inf`` passes ``lr > 0`` and
    NaN fails every comparison silently, so both are refused by name here."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            require_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            require_finite(value, f"{path}[{i}]")
    elif isinstance(tree, float):
        require(math.isfinite(tree), path, tree, "a finite number")


# A run folder belongs to one configuration (v4lab.folders checks it on every rerun). These
# keys may differ between the runs of one folder, because they change neither the weights
# nor what training saw: where W&B logs and the prepared data live, CPU threads, and the
# end-of-run evaluation (test batches and the task grid; eval.tasks only where it is not
# also what training mixes in: train_share = 0 or train_tasks given).
RESUME_FREE_KEYS = ("logger.*", "data.root", "trainer.num_threads", "trainer.test_batches",
                    "eval.enabled", "eval.contexts", "eval.n_examples", "eval.batch_size",
                    "eval.seed", "eval.allow_extrapolation", "eval.prefill_chunk", "eval.timing_tokens")
# A measured chip's figures (cpu_host) are this machine's timings: re-measured when stale
# or taken under load (chips.host), so they may change between a run and its resume.
MEASURED_CHIP_KEYS = ("chip.peak_tflops.*", "chip.hbm_tbps.*", "chip.memory_gb.*")


def flatten(tree: Any, path: str = "") -> dict[str, Any]:
    """``{"trainer": {"lr": 3e-3}}`` -> ``{"trainer.lr": 3e-3}`` (lists stay values)."""
    if not isinstance(tree, dict) or not tree:
        return {path: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flatten(value, f"{path}.{key}" if path else str(key))
    return out


def run_identity(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The flattened config without :data:`RESUME_FREE_KEYS`: what a run folder is bound to."""
    flat = flatten(config_dict)
    ev = config_dict.get("eval", {})
    free = RESUME_FREE_KEYS + (("eval.tasks",) if not ev.get("train_share") or ev.get("train_tasks") else ())
    if config_dict.get("chip", {}).get("measured"):  # cpu_host: peaks re-timed when stale or loaded
        free += MEASURED_CHIP_KEYS
    return {k: v for k, v in flat.items()
            if not any(k == f or (f.endswith(".*") and k.startswith(f[:-1])) for f in free)}


def differences(a: dict[str, Any], b: dict[str, Any], ignore=lambda key: False) -> list[str]:
    """"key: a-value vs b-value" for every key of two flat dicts whose values differ
    (a key missing on one side counts as None), except the keys ``ignore`` accepts."""
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if not ignore(k) and a.get(k) != b.get(k)]


def check_one_experiment(overrides: list[str], combine_as: str | None) -> None:
    """One experiment overlay per run (``+experiment=[a,b]`` would silently apply both and
    write into the folder of the last one), unless the combination is named."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    names: list[str] = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.key_or_group == "experiment":
            value = o.value()
            names += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if len(names) > 1 and combine_as is None:
        raise ConfigError(
            f"+experiment=[{','.join(names)}] applies {len(names)} experiment overlays, and a run "
            f"is one experiment: choose one, or name the combination, e.g. "
            f"combine_as={'+'.join(names)} (its own folder and W&B run)")
    if combine_as is not None and (CONF_DIR / "experiment" / f"{combine_as}.yaml").is_file():
        raise ConfigError(f"combine_as={combine_as} is not allowed: conf/experiment/{combine_as}.yaml is "
                          "an experiment of that name; choose a name of its own")




def load_run_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Merge a composed config onto the schema and validate it.

    Raises :class:`ConfigError` (bad values) or OmegaConf's ValidationError / ConfigKeyError
    (unknown keys, wrong types), both naming the offending key.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = {k: v for k, v in dict(cfg).items() if k != "hydra"}
    if isinstance(cfg.get("eval"), str):  # eval=<name> was the task group's name before
        raise ConfigError(f"eval={cfg['eval']} is not allowed: eval.* is filled by the tasks group "
                          "(what runs mix into training and evaluate): tasks=" + str(cfg["eval"]))
    if cfg.get("combine_as"):
        cfg["experiment"] = cfg["combine_as"]
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    run_cfg = OmegaConf.to_object(merged)
    assert isinstance(run_cfg, RunConfig)
    return run_cfg.validate()


__all__ = ["RESUME_FREE_KEYS", "LoggerConfig", "RunConfig", "TrainerConfig", "check_one_experiment",
           "load_run_config", "run_identity"]
