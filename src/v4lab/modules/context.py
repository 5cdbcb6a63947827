"""The per-forward context handed from the model to every block.

It carries what some pieces need beyond the hidden state (token positions, input ids
for Engram, the decode cache, the training step for sparse attention's warm-up) and
collects what they give back (auxiliary losses, scalar statistics for logging).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from v4lab.modules.rope import rope_angles


@dataclass
class ForwardContext:
    """State shared by all blocks during one forward pass.

    positions: [T] absolute position of each token of the input (start_pos .. start_pos+T-1).
    input_ids: [B, T] token ids of the input (Engram hashes them).
    caches: per layer, a dict of decode state ({"attn": KV cache, "engram": ...}) when
      decoding incrementally, else None.
    history_ids: [B, P + T] every token so far when decoding (P cached before this chunk);
      pieces that look back beyond the chunk (Engram's N-grams) read it.
    phase: what this forward is for, set by its caller and read by the pieces (not
      inferred from module flags): ``train`` (a training step: losses, statistics,
      indexer learning), ``eval`` (validation/test of a training run: the same statistics,
      no update) or ``infer`` (decoding, evaluation: every piece in its final mode, nothing
      recorded). Left unset, it is ``infer`` without a ``step`` and ``train`` with one.
    step: global training step in the ``train``/``eval`` phases (selects the sparse
      warm-up); None in ``infer``.
    diagnose: whether pieces compute the statistics that cost time and feed no loss (the
      indexers' recall, which ranks the main attention's own top-k; Engram's bucket
      collision rate; mHC's product of mixing matrices across depth). The trainer turns it
      off on training steps whose statistics nobody reads (``LitLM.reads_stats``); the
      losses, and so the training, are the same either way.
    aux_losses: name -> scalar tensor; the trainer adds their sum to the LM loss.
    stats: name -> (sum, count) of a statistic over the layers that report it, the sum a
      detached 0-d tensor: nothing here waits for the device (no per-layer ``.item()``);
      the trainer reduces them once, when it logs (e.g. ``sparse/recall``).
    prefetched: work a piece did ahead of the blocks for this forward, keyed by module
      (Engram's table indices / host-memory rows, computed before any layer runs).
    hc_track / hc_product: with hyper-connections, whether to track (training and
      validation) and the running product H_1 H_2 ... of the residual-mixing matrices of
      the sites run so far, [B, T, n, n] (no gradient).
    hidden: [B, T, dim] the last block's output before the final norm (set only when the
      model has an MTP block, whose input it is).
    """

    positions: torch.Tensor
    input_ids: torch.Tensor | None = None
    caches: list[dict[str, Any]] | None = None
    history_ids: torch.Tensor | None = None
    step: int | None = None
    phase: str | None = None
    diagnose: bool = True
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    prefetched: dict[str, Any] = field(default_factory=dict)
    hc_track: bool = False
    hc_product: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    _rope: dict = field(default_factory=dict, repr=False)

    PHASES = ("train", "eval", "infer")

    def __post_init__(self) -> None:
        if self.phase is None:
            self.phase = "infer" if self.step is None else "train"
        if self.phase not in self.PHASES:
            raise ValueError(f"phase={self.phase!r} is not one of {self.PHASES}")

    @property
    def records(self) -> bool:
        """Whether pieces record statistics and training signals (train and eval phases)."""
        return self.phase != "infer"

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        """Accumulate an auxiliary loss (summed over layers)."""
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value

    def add_stat(self, name: str, value: torch.Tensor | float) -> None:
        """Accumulate a statistic as a mean over the layers that report it (a tensor stays
        on its device: no host sync)."""
        v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        total, count = self.stats.get(name, (0.0, 0))
        self.stats[name] = (total + v, count + 1)

    @torch.no_grad()
    def track_hc(self, res: torch.Tensor) -> None:
        """Multiply one site's residual-mixing matrices [B, T, n, n] into ``hc_product``."""
        if self.hc_track:
            res = res.detach().float()
            self.hc_product = res if self.hc_product is None else self.hc_product @ res

    def report_hc(self) -> None:
        """Log the gain of the composite residual map across depth: the streams leave the
        last site as (H_1 ... H_L)^T X_0 plus the sublayer outputs. ``hc/fwd_gain`` is the
        largest absolute row sum of that map (how much a forward signal can grow),
        ``hc/bwd_gain`` the largest absolute column sum (the same for gradients), both the
        maximum over tokens; 1 for doubly stochastic H (mHC), free without the constraint."""
        if self.hc_product is None:
            return
        p = self.hc_product.abs()
        self.add_stat("hc/fwd_gain", p.sum(dim=-2).amax())  # rows of P^T
        self.add_stat("hc/bwd_gain", p.sum(dim=-1).amax())
        self.hc_product = None

    def rope(self, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, dim/2] for ``positions``, computed once per (dim, theta) and shared."""
        key = (dim, theta)
        if key not in self._rope:
            self._rope[key] = rope_angles(self.positions, dim, theta)
        return self._rope[key]

    def stat_tensors(self) -> dict[str, torch.Tensor]:
        """The statistics averaged over reporting layers, as 0-d tensors (no host sync):
        what the trainer logs, so it reduces them only at its logging steps."""
        return {name: total / count for name, (total, count) in self.stats.items()}

    def mean_stats(self) -> dict[str, float]:
        """The same as floats, read from the device in one transfer: name -> mean."""
        means = self.stat_tensors()
        if not means:
            return {}
        return dict(zip(means, torch.stack(list(means.values())).tolist()))
