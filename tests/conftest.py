"""Shared fixtures: Hydra composition, a tiny prepared corpus, W&B kept off the network."""

from __future__ import annotations

import os
from pathlib import Path

# v4lab before torch: importing it sets the passive OpenMP wait (v4lab.threads), which
# OpenMP reads once when torch loads it; two 2-thread test workers on two cores
# (V4LAB_TEST_THREADS=2, CI's second pass) would otherwise spin against each other.
from v4lab.threads import usable_cpus

# isort: split
import pytest
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]


# Wall-clock figures and the machine's state when a run started (host/busy_cpus_at_start moves
# with the load): never part of "same config, seed, threads and CPU give the same metrics".
NOT_DETERMINISTIC = ("speed/", "time/", "host/")


def deterministic(metrics: dict) -> dict:
    """A run's metrics without the wall-clock and machine-state ones: what must repeat exactly."""
    return {k: v for k, v in metrics.items() if not k.startswith(NOT_DETERMINISTIC)}


def primes_from(n: int, count: int) -> list[int]:
    """The ``count`` smallest primes >= n, by trial division (an independent check of
    Engram's prime table sizes, shared by the parameter-count tests)."""
    out = []
    while len(out) < count:
        if n >= 2 and all(n % p for p in range(2, int(n ** 0.5) + 1)):
            out.append(n)
        n += 1
    return out
CONF = ROOT / "conf"

# Tests never touch the network: W&B is disabled unless a test asks for offline.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Test-sized tensors run fastest on one thread (and a loaded machine oversubscribes more).
# CI runs the suite a second time at another thread count (V4LAB_TEST_THREADS=2) so that
# no tolerance depends on one thread count's summation order.
torch.set_num_threads(int(os.environ.get("V4LAB_TEST_THREADS", "1")))


# Memory one test worker may need: the largest worker's peak RSS was 1.34 GB over a whole
# fast suite, and two workers with their child processes added 2.5 GB to the machine's
# used memory (2-core AMD EPYC, 2026-12-02); 2 GiB leaves half as much again.
WORKER_MEMORY = 2 * 2**30


def available_memory() -> int | None:
    """Bytes the kernel could give new processes (MemAvailable), or None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per usable CPU, counted as
    ``trainer.num_threads=auto`` counts them (affinity, cgroup quota), and no more than
    the available memory holds at ``WORKER_MEMORY`` each (a many-core machine with little
    memory would otherwise run out). At V4LAB_TEST_THREADS=2 this oversubscribes the CPUs
    twice over, which with the passive OpenMP wait set above was still the faster way:
    CI's second pass on 2 cores, all 1,082 tests, took 505 s with two workers against 541 s
    for 1,057 of them in one process."""
    workers = int(usable_cpus())
    memory = available_memory()
    if memory is not None:
        workers = min(workers, memory // WORKER_MEMORY)
    return max(1, workers)


# A small slice of the standard library: enough files for three splits, seconds to prepare.
TINY_DATA = [
    "data.include=[json/*.py,email/*.py,http/*.py,urllib/*.py,xml/dom/*.py,logging/*.py]",
    "data.vocab_size=512",
]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A session-wide folder for prepared corpora (prepared once, reused by every test)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def smoke_overrides(data_root) -> list[str]:
    """Overrides for a seconds-long training run on the tiny corpus."""
    return ["profile=smoke", f"data.root={data_root}", *TINY_DATA, "logger.mode=disabled",
            "trainer.max_steps=12", "trainer.val_every_n_steps=6",
            "trainer.checkpoint_every_n_steps=4", "trainer.seq_len=48"]



class Crash(Callback):
    """Simulates a killed run: dies right after optimizer step ``at`` (the checkpoints
    written before it stay)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt
