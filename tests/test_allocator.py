"""v4lab.allocator: freed memory stays in the process (fewer page faults), values unchanged.

Each check runs twice in fresh interpreters: once as v4lab leaves it (the policy applied at
import) and once with glibc's own defaults (``V4LAB_SYSTEM_MALLOC`` set)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from v4lab.allocator import USER_POLICY, glibc, retain_freed_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_DEFAULTS = {"V4LAB_SYSTEM_MALLOC": "1"}

needs_glibc = pytest.mark.skipif(glibc() is None, reason="mallopt policy is glibc-only")


def _run(script: str, extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in USER_POLICY}
    env.update(extra_env, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# A step-like pattern, written and freed eight times: six 8 MiB tensors (glibc's defaults map
# them afresh or trim them back, depending on its heap's layout) and two of 40 MiB (above
# its dynamic mmap threshold's 32 MiB ceiling: always a fresh mmap under its defaults).
FAULTS = """
import json, resource, torch
import v4lab  # applies the policy unless V4LAB_SYSTEM_MALLOC is set
def step():
    ts = [torch.empty(n).fill_(1.0) for n in [2 << 20] * 6 + [10 << 20] * 2]
    return sum(float(t[0]) for t in ts)
step(); step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 8
print(json.dumps({"faults": faults}))
"""


@needs_glibc
@pytest.mark.process
def test_freed_tensors_are_reused_without_page_faults():
    retained = _run(FAULTS, {})["faults"]
    default = _run(FAULTS, GLIBC_DEFAULTS)["faults"]
    pages, mapped = (6 * 8 + 2 * 40) * 256, 2 * 40 * 256  # 4 KiB pages written per step
    assert default > 0.9 * mapped, default  # the 40 MiB ones at least are faulted in again
    assert retained < pages / 10, retained  # the retained heap is reused (measured: 1,280)


# Three AdamW steps of the full model (sparse MLA, FP8 KV, MoE, Engram) at a size whose
# [B, H, T, T] tensors (1 MiB) are mmapped under glibc's defaults: the weights' hash.
TRAIN = """
import hashlib, json, torch
torch.set_num_threads(1)
from v4lab.config import load_run_config
from v4lab.io import compose
from v4lab.lit import LitLM
from v4lab.modules.context import ForwardContext
cfg = load_run_config(compose(["+experiment=full", "trainer.batch_size=4", "trainer.seq_len=128"]))
torch.manual_seed(0)
lit = LitLM(cfg.model, cfg.trainer, torch.ones(cfg.model.vocab_size, dtype=torch.long))
opt = lit.configure_optimizers()["optimizer"]
batch = torch.randint(0, cfg.model.vocab_size, (4, 129), generator=torch.Generator().manual_seed(1))
x, y = batch[:, :-1], batch[:, 1:]
for step in (0, 1000, 1001):  # one dense warm-up step, two sparse ones
    ctx = ForwardContext(positions=torch.arange(128), input_ids=x, step=step, phase="train")
    logits = lit.model(x, ctx)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    (loss + sum(ctx.aux_losses.values())).backward()
    opt.step()
    opt.zero_grad()
h = hashlib.sha256()
for p in lit.model.parameters():
    h.update(p.detach().numpy().tobytes())
print(json.dumps({"sha": h.hexdigest()}))
"""


@needs_glibc
@pytest.mark.process
def test_training_is_bit_identical_under_either_policy():
    assert _run(TRAIN, {}) == _run(TRAIN, GLIBC_DEFAULTS)


def test_the_users_allocator_policy_is_left_alone():
    for key in USER_POLICY:
        assert retain_freed_memory({key: "1"}) is False
