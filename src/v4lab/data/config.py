"""Configuration of the data a run reads: the corpus (:class:`DataConfig`) and the
long-context task suite mixed into training and evaluated at the end (:class:`EvalConfig`),
and a probe run's synthetic task (:class:`ProbeConfig`).

Below the run layer: ``data.prepare`` and ``evaluate`` import these, ``config.RunConfig``
composes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from v4lab.data.probes import PROBES
from v4lab.data.tasks import TASKS, check_task
from v4lab.errors import require, require_positive


@dataclass
class DataConfig:
    """Corpus and tokenizer.

    source: ``stdlib`` (this Python's standard library source) or a directory of code.
    include / exclude: glob patterns (relative to the source root) selecting files.
    max_files: keep only the first N files in path order (0 = all); for smoke corpora.
    root: where prepared corpora live (one folder per source + settings).
    """

    source: str = "stdlib"
    include: list[str] = field(default_factory=lambda: ["**/*.py"])
    exclude: list[str] = field(default_factory=list)
    max_files: int = 0
    vocab_size: int = 4096
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    root: str = "data"

    def validate(self, path: str = "data") -> None:
        require(bool(self.source), f"{path}.source", self.source,
                "'stdlib' or a directory of source files")
        require(self.vocab_size >= 257, f"{path}.vocab_size", self.vocab_size,
                ">= 257 (256 byte symbols + the end-of-text token)")
        require(self.vocab_size <= 65535, f"{path}.vocab_size", self.vocab_size,
                "<= 65535 (tokens are stored as uint16)")
        require(self.max_files >= 0, f"{path}.max_files", self.max_files, ">= 0 (0 = all files)")
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            require(0 < v < 0.5, f"{path}.{key}", v, "a fraction in (0, 0.5)")


@dataclass
class EvalConfig:
    """The long-context task suite: what a run mixes into training and evaluates at the end.

    tasks / contexts: the evaluation grid (context = prompt + answer tokens).
    n_examples: examples per (task, context); batch_size: examples decoded together.
    seed: seed of the held-out examples (training mixes use the run's seed).
    allow_extrapolation: evaluate contexts beyond the trained length (trainer.seq_len) and
      beyond model.max_seq_len (RoPE has no hard limit; the check guards against asking for
      it by mistake). Such cells are extrapolation, marked in metrics.json
      (``task/<task>@<context>/extrapolated``) and in the report.
    prefill_chunk: prompt tokens per cached forward (bounds the attention scores' memory).
    timing_tokens: decode steps timed per context for speed/decode_ms_per_token.
    train_share: share of training windows replaced by task sequences (0 = none).
    train_tasks: tasks mixed into training (empty = ``tasks``).
    answer_loss_weight: w in the training objective LM mean + w * (mean loss over the
      answer tokens of the mixed task sequences); 0 = the plain LM loss.
    enabled: evaluate at the end of every run.
    """

    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    contexts: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    n_examples: int = 8
    batch_size: int = 8
    seed: int = 1234
    allow_extrapolation: bool = False
    prefill_chunk: int = 512
    timing_tokens: int = 8
    train_share: float = 0.0
    train_tasks: list[str] = field(default_factory=list)
    answer_loss_weight: float = 0.0

    def validate(self, path: str = "eval", max_seq_len: int | None = None,
                 trained_len: int | None = None) -> EvalConfig:
        require(len(self.tasks) > 0, f"{path}.tasks", self.tasks, f"a non-empty list of: {', '.join(TASKS)}")
        for t in self.tasks:
            check_task(t, f"{path}.tasks")
        for t in self.train_tasks:
            check_task(t, f"{path}.train_tasks")
        require(len(self.contexts) > 0, f"{path}.contexts", self.contexts, "a non-empty list of lengths")
        for c in self.contexts:
            require(isinstance(c, int) and c > 0, f"{path}.contexts", self.contexts,
                    "positive integer lengths")
        require(len(set(self.contexts)) == len(self.contexts), f"{path}.contexts", self.contexts,
                "distinct lengths")
        for key in ("n_examples", "batch_size", "prefill_chunk", "timing_tokens"):
            require_positive(f"{path}.{key}", getattr(self, key))
        require(isinstance(self.seed, int) and self.seed >= 0, f"{path}.seed", self.seed,
                "a non-negative integer")
        require(0.0 <= self.train_share <= 1.0, f"{path}.train_share", self.train_share, "in [0, 1]")
        require(self.answer_loss_weight >= 0, f"{path}.answer_loss_weight", self.answer_loss_weight,
                ">= 0")
        # a grid that is never evaluated (tasks=off) need not fit the model's rotary range
        limits = [(max_seq_len, "model.max_seq_len", "the model's rotary range", "anyway"),
                  (trained_len, "trainer.seq_len", "the trained length",
                   "as extrapolation (marked so in metrics.json and the report)")]
        for limit, key, what, how in limits:
            if limit is None or not self.enabled or self.allow_extrapolation:
                continue
            beyond = [c for c in self.contexts if c > limit]
            require(not beyond, f"{path}.contexts", self.contexts,
                    f"lengths <= {key}={limit} ({what}); {beyond} lie beyond it: set "
                    f"{path}.allow_extrapolation=true to evaluate them {how}, or drop them")
        return self

    @property
    def mixed_tasks(self) -> list[str]:
        return list(self.train_tasks or self.tasks)


@dataclass
class ProbeConfig:
    """A probe run (``probe=<name>``, conf/probe/): instead of the corpus, the model learns a
    synthetic task of :mod:`v4lab.data.probes` on which one piece matters a lot
    (:mod:`v4lab.probe_run`). ``none``: a corpus run.

    task: the probe's own fields (``seq_len``, ``n_pairs``, ...; the probe class's defaults
      otherwise); the model's vocabulary becomes the probe's.
    steps, batch, lr, warmup, weight_decay: the probe's AdamW loop (answer loss only).
    eval_every: held-out accuracy every so many steps (the learning curve; 0 = at the end).
    eval_sequences: held-out sequences per evaluated length (answers = sequences x queries).
    lengths: multiples of task.seq_len evaluated at the end, token by token through the
      decode caches (1 = the trained length; more = longer contexts, same number of answers).
    caches: KV-cache dtypes evaluated on the same weights at the trained length (a paired
      comparison with the run's own cache); empty = none.
    """

    name: str = "none"
    task: dict[str, Any] = field(default_factory=dict)
    steps: int = 600
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 0
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_sequences: int = 128
    lengths: list[int] = field(default_factory=lambda: [1])
    caches: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def make(self, length: int = 1):
        """The probe at ``length`` x its trained sequence length (ConfigError on bad fields)."""
        cls = PROBES[self.name]
        task = dict(self.task)
        seq_len = task.pop("seq_len", cls.seq_len)
        unknown = sorted(set(task) - set(cls.__dataclass_fields__))
        require(not unknown, "probe.task", self.task,
                f"fields of {self.name}: {', '.join(sorted(cls.__dataclass_fields__))}")
        return cls(seq_len=seq_len * length, **task)

    def validate(self, path: str = "probe") -> ProbeConfig:
        require(self.name == "none" or self.name in PROBES, f"{path}.name", self.name,
                f"none or one of: {', '.join(PROBES)}")
        for key in ("steps", "batch", "eval_sequences"):
            require_positive(f"{path}.{key}", getattr(self, key))
        require(self.lr > 0, f"{path}.lr", self.lr, "> 0")
        require(isinstance(self.warmup, int) and 0 <= self.warmup <= self.steps, f"{path}.warmup",
                self.warmup, f"0..steps={self.steps}")
        require(self.eval_every >= 0, f"{path}.eval_every", self.eval_every, ">= 0")
        require(bool(self.lengths) and all(isinstance(n, int) and n >= 1 for n in self.lengths)
                and self.lengths[0] == 1 and len(set(self.lengths)) == len(self.lengths),
                f"{path}.lengths", self.lengths,
                "distinct integers >= 1 starting with 1 (the trained length)")
        if self.enabled:
            for n in self.lengths:
                self.make(n)  # the probe validates its own fields at every length
        return self
