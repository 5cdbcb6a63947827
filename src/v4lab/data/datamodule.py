"""LightningDataModule over prepared token shards.

Training samples are windows of ``seq_len + 1`` tokens. Sample ``i`` is fully determined
by (seed, i): windows are non-overlapping slots of the train shard visited in a seeded
permutation, a fresh permutation per pass. The sampler starts at the number of samples
already consumed, which the module saves in every checkpoint, so a resumed run sees
exactly the batches an uninterrupted run would have seen.

With a :class:`~v4lab.data.tasks.TaskMix`, a seeded share of training samples (again a
function of (seed, i)) are synthetic long-context task sequences instead of corpus windows.

Validation and test use fixed windows spread evenly over their shards.

Several processes (DDP/FSDP): ``batch_size`` is the global batch. Optimizer step ``s``
consumes samples ``[s * batch_size, (s + 1) * batch_size)`` whatever the number of
processes; rank ``r`` of ``w`` takes the ``r``-th contiguous slice of ``batch_size / w``
of them, so the union over ranks is exactly the single-process batch. Evaluation windows
are dealt round-robin (rank ``r`` takes windows ``r, r + w, ...``) and the LightningModule
sums loss and byte counts over ranks, so val/test figures cover the same windows.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from v4lab.data.prepare import verify
from v4lab.data.tasks import TaskMix


class TrainWindows(Dataset):
    """Seeded windows of the train shard.

    item i -> (LongTensor [seq_len + 1], answer_len): ``answer_len`` is the number of answer
    tokens ending a task sequence (they are the last ``answer_len`` tokens), 0 for a corpus
    window; the LightningModule uses it to log (and optionally weight) the answer loss.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, num_samples: int, seed: int,
                 task_mix: TaskMix | None = None) -> None:
        self.tokens, self.seq_len, self.num_samples, self.seed = tokens, seq_len, num_samples, seed
        self.task_mix = task_mix
        self.n_slots = (len(tokens) - 1) // seq_len
        if self.n_slots < 1:
            raise ValueError(f"train shard has {len(tokens)} tokens, fewer than one window "
                             f"of trainer.seq_len+1={seq_len + 1}")
        self._perm_pass, self._perm = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.task_mix is not None:
            ex = self.task_mix.example(i)
            if ex is not None:
                return torch.tensor(ex.tokens, dtype=torch.long), len(ex.answer)
        pass_idx, j = divmod(i, self.n_slots)
        if pass_idx != self._perm_pass:
            rng = np.random.default_rng([self.seed, pass_idx])
            self._perm, self._perm_pass = rng.permutation(self.n_slots), pass_idx
        start = int(self._perm[j]) * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64)), 0


class FixedWindows(Dataset):
    """``count`` windows of ``seq_len + 1`` tokens spread evenly over a shard."""

    def __init__(self, tokens: np.ndarray, seq_len: int, count: int) -> None:
        n_slots = (len(tokens) - 1) // seq_len
        if n_slots < 1:
            raise ValueError(f"shard has {len(tokens)} tokens, fewer than one window of "
                             f"{seq_len + 1}")
        count = min(count, n_slots)
        self.starts = (np.linspace(0, n_slots - 1, count).round().astype(np.int64) * seq_len)
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(self.starts[i])
        return torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))


class ResumableSampler(Sampler[int]):
    """This rank's share of samples ``start, start+1, ..., n-1`` (the ones a resumed run has
    not consumed yet), in global batches of ``batch_size``: from each, rank ``rank`` of
    ``world`` takes the contiguous slice ``[rank * b/world, (rank + 1) * b/world)``.
    With one process it yields start, ..., n-1.

    ``len`` stays this rank's share of all ``n``: Lightning restores its own count of
    batches already seen in the epoch and adds the ones it draws now, so the epoch must
    keep its full length or Lightning would end it early and start the loader over.
    """

    def __init__(self, n: int, start: int = 0, batch_size: int = 1, rank: int = 0,
                 world: int = 1) -> None:
        if batch_size % world or n % batch_size or start % batch_size:
            raise ValueError(f"batch_size={batch_size} must divide into world={world} ranks "
                             f"and into n={n} and start={start}")
        self.n, self.start, self.batch_size, self.rank, self.world = n, start, batch_size, rank, world

    def __iter__(self):
        per_rank = self.batch_size // self.world
        for first in range(self.start, self.n, self.batch_size):
            lo = first + self.rank * per_rank
            yield from range(lo, lo + per_rank)

    def __len__(self) -> int:
        return self.n // self.world


class CorpusDataModule(L.LightningDataModule):
    """Train/val/test loaders over a prepared corpus folder."""

    def __init__(self, folder: str | Path, seq_len: int, batch_size: int, max_steps: int,
                 seed: int, val_batches: int, test_batches: int,
                 task_mix: TaskMix | None = None) -> None:
        super().__init__()
        self.task_mix = task_mix
        self.folder = Path(folder)
        self.seq_len, self.batch_size, self.max_steps, self.seed = seq_len, batch_size, max_steps, seed
        self.val_batches, self.test_batches = val_batches, test_batches
        self.manifest = verify(self.folder)
        self.samples_consumed = 0

    def shard(self, split: str) -> np.ndarray:
        return np.memmap(self.folder / f"{split}.bin", dtype=np.uint16, mode="r")

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        ds = TrainWindows(self.shard("train"), self.seq_len, self.max_steps * self.batch_size,
                          self.seed, self.task_mix)
        rank, world = self._rank_world()
        sampler = ResumableSampler(len(ds), self.samples_consumed, self.batch_size, rank, world)
        return DataLoader(ds, batch_size=self.batch_size // world, sampler=sampler)

    def _eval_loader(self, split: str, batches: int) -> DataLoader:
        ds = FixedWindows(self.shard(split), self.seq_len, batches * self.batch_size)
        rank, world = self._rank_world()
        return DataLoader(ds, batch_size=self.batch_size // world,
                          sampler=list(range(rank, len(ds), world)))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", self.val_batches)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.test_batches)

    # Saved in every checkpoint: how many training samples the run has consumed.
    def state_dict(self) -> dict:
        return {"samples_consumed": int(self.trainer.global_step) * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.samples_consumed = int(state["samples_consumed"])
