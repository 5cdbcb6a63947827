"""trainer.num_threads=auto: threads from the usable and busy CPUs (issue 17)."""

from __future__ import annotations

import pytest

import conftest
from v4lab.config import TrainerConfig
from v4lab.errors import ConfigError
from v4lab.threads import busy_cpus, cgroup_quota, choose_threads


@pytest.mark.parametrize("cpus,busy,processes,expected", [
    (2, 0, 1, 2),     # idle: every core
    (2, 2, 1, 1),     # two busy processes on two cores: one thread, never 0
    (2, 1, 1, 1),
    (8, 2.4, 1, 6),   # fractional load rounds to the nearest CPU
    (8, 0, 2, 4),     # two DDP processes split the free cores
    (1.5, 0, 1, 2),   # a 1.5-CPU quota rounds to 2 threads
])
def test_auto_threads_from_usable_and_busy_cpus(cpus, busy, processes, expected):
    assert choose_threads("auto", processes, cpus=cpus, busy=busy).threads == expected


def test_a_configured_count_is_kept_and_recorded():
    choice = choose_threads(3, cpus=2, busy=2)
    assert choice.threads == 3 and choice.reason == "as configured"
    assert choice.metrics() == {"host/threads": 3.0, "host/usable_cpus": 2.0,
                                "host/busy_cpus_at_start": 2.0}


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) == 2.0


def test_busy_cpus_is_a_non_negative_count():
    assert busy_cpus(samples=2, interval=0.0) >= 0


@pytest.mark.parametrize("bad", [-1, "many", 1.5])
def test_num_threads_is_validated(bad):
    with pytest.raises(ConfigError, match=r"trainer.num_threads=.*'auto'"):
        TrainerConfig(num_threads=bad).validate()


@pytest.mark.parametrize("cpus,memory_gib,expected", [
    (64.0, 9, 4),       # many cores, little memory: memory decides (2 GiB a worker)
    (2.0, 24, 2),       # this project's 2-core machine: one worker per CPU
    (2.5, None, 2),     # a fractional cgroup quota rounds down; no MemAvailable: CPUs decide
    (8.0, 1, 1),        # never fewer than one worker
])
def test_auto_test_workers_fit_the_cpus_and_the_memory(monkeypatch, cpus, memory_gib, expected):
    """The suite's own ``-n auto`` (tests/conftest.py) counts workers like the thread policy."""
    monkeypatch.setattr(conftest, "usable_cpus", lambda: cpus)
    memory = None if memory_gib is None else memory_gib * 2**30
    monkeypatch.setattr(conftest, "available_memory", lambda: memory)
    assert conftest.pytest_xdist_auto_num_workers(None) == expected
