"""Evaluation: the oracle scores 100% and a random guesser scores chance through the same
decode + scoring code; the cached greedy decode equals Transformer.generate; KV bytes and
metric names; bad input; the end-of-run hook and the checkpoint CLI agree."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from v4lab.config import load_run_config
from v4lab.data.config import EvalConfig
from v4lab.data.tasks import TASKS, Haystack, TaskParams, TaskVocab, random_guess
from v4lab.errors import ConfigError
from v4lab.evaluate import evaluate, task_examples
from v4lab.io import compose
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, EngramConfig, KVCacheConfig, SparseConfig

VOCAB = 512


def char_encode(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def vocab() -> TaskVocab:
    return TaskVocab(char_encode)


@pytest.fixture(scope="module")
def hay() -> np.ndarray:
    return np.array(char_encode("for i in range(10):\n    print(i)  # loop\n" * 40), dtype=np.int64)


class _Cache:
    length = 0

    def bytes_per_token(self) -> int:
        return 0


class Scripted(nn.Module):
    """A stand-in model with the decode interface that, after a known prompt, emits a
    scripted continuation (the oracle's answer or a random guess) one token per step."""

    def __init__(self, scripts: dict[tuple, list[int]]) -> None:
        super().__init__()
        self.scripts = scripts

    # the real decode loop, over this stand-in's forward_cached
    prefill, generate = Transformer.prefill, Transformer.generate

    def new_caches(self, batch: int, max_len: int) -> list[dict]:
        return [{"attn": _Cache()}]

    def forward_cached(self, ids, caches, start, history=None) -> torch.Tensor:
        logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB)
        for b, row in enumerate(history.tolist()):
            for k in range(0, 16):
                script = self.scripts.get(tuple(row[:len(row) - k]))
                if script is not None and k < len(script):
                    logits[b, -1, script[k]] = 1.0
                    break
        return logits


def _scripts(cfg: EvalConfig, vocab, hay, params, pick) -> dict[tuple, list[int]]:
    out = {}
    for task in cfg.tasks:
        for c in cfg.contexts:
            for ex in task_examples(task, c, cfg, vocab, Haystack(hay), params):
                out[tuple(ex.prompt)] = pick(ex)
    return out


def test_oracle_scores_100_percent(vocab, hay):
    cfg = EvalConfig(tasks=list(TASKS), contexts=[200, 300], n_examples=5, batch_size=3)
    model = Scripted(_scripts(cfg, vocab, hay, TaskParams(), lambda ex: ex.answer))
    m = evaluate(model, vocab, cfg, hay)
    accs = {k: v for k, v in m.items() if k.endswith("/acc")}
    assert len(accs) == len(TASKS) * 2 + 2 and all(v == 1.0 for v in accs.values())
    # and a model that is wrong in one token of the answer scores 0
    off_by_one = Scripted(_scripts(cfg, vocab, hay, TaskParams(),
                                   lambda ex: ex.answer[:-1] + [ex.answer[-1] + 1]))
    m = evaluate(off_by_one, vocab, cfg, hay)
    assert all(v == 0.0 for k, v in m.items() if k.endswith("/acc"))


def test_random_guessing_scores_chance(vocab, hay):
    params = TaskParams(value_digits=1, n_needles=3, n_pairs=4, n_chains=2, run_len=8)
    cfg = EvalConfig(tasks=["niah_single", "niah_multikey", "variable_tracking", "positional_recall",
                            "niah_multiquery"],
                     contexts=[120], n_examples=400, batch_size=200)
    rng = np.random.default_rng(0)
    model = Scripted(_scripts(cfg, vocab, hay, params, lambda ex: random_guess(ex, vocab, rng, params)))
    m = evaluate(model, vocab, cfg, hay, params=params)
    for task in cfg.tasks:
        acc, chance = m[f"task/{task}@120/acc"], m[f"task/{task}@120/chance"]
        expected = {"positional_recall": 1 / 8, "niah_multiquery": 1 / 90}.get(task, 1 / 10)
        assert chance == pytest.approx(expected)
        sd = math.sqrt(chance * (1 - chance) / cfg.n_examples)
        assert abs(acc - chance) < 4 * sd, (task, acc, chance)


def _tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, ffn_dim=64, max_seq_len=256,
                      attention=AttentionConfig(kind="mla", n_heads=2, q_lora_rank=16, kv_lora_rank=128,
                                                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                                vvpa=True, **kw.pop("attn", {})),
                      **kw)
    model = Transformer(cfg).eval()
    model.set_canonical_ids(torch.arange(VOCAB))
    return model


@pytest.mark.parametrize("kind", ["dense_bf16", "sparse_fp8_engram"])
def test_chunked_prefill_decode_equals_unchunked(kind, vocab, hay):
    if kind == "dense_bf16":
        model = _tiny(attn={"kv_cache": KVCacheConfig(dtype="bf16")})
    else:
        model = _tiny(attn={"kv_cache": KVCacheConfig(dtype="fp8"),
                            "sparse": SparseConfig(enabled=True, topk=8)},
                      engram=EngramConfig(enabled=True, layers=[1], table_size=64, head_dim=8,
                                          heads_per_order=1))
    prompts = torch.tensor(np.stack([hay[i:i + 70] for i in (0, 13, 40)]), dtype=torch.long)
    ref = model.generate(prompts, 5)[:, 70:]
    assert torch.equal(model.generate(prompts, 5, prefill_chunk=16)[:, 70:], ref)


def test_real_model_metrics_kv_bytes_and_determinism(vocab, hay):
    model = _tiny(attn={"sparse": SparseConfig(enabled=True, topk=8)})
    cfg = EvalConfig(tasks=["niah_single", "positional_recall"], contexts=[64, 160], n_examples=3,
                     batch_size=2, prefill_chunk=50, timing_tokens=3, allow_extrapolation=True)
    m = evaluate(model, vocab, cfg, hay, train_len=100)
    for c in (64, 160):
        for t in cfg.tasks:
            assert 0.0 <= m[f"task/{t}@{c}/acc"] <= 1.0
        assert m[f"speed/decode_ms_per_token@{c}"] > 0
        caches = model.new_caches(1, 4)  # independent: per-token bytes of a fresh cache x length
        model.forward_cached(torch.zeros(1, 1, dtype=torch.long), caches, 0)
        assert m[f"cost/kv_bytes@{c}"] == model.kv_bytes_per_token(caches) * c
    assert m["task/niah_single/acc_trained_lengths"] == m["task/niah_single@64/acc"]
    assert m["task/niah_single/acc_extrapolated"] == m["task/niah_single@160/acc"]
    # each cell: the examples behind it, and whether it lies beyond the trained 100 tokens
    assert [m[f"task/{t}@{c}/answers"] for t in ("niah_single", "all") for c in (64, 160)] == [3, 3, 6, 6]
    assert [m[f"task/{t}@{c}/extrapolated"] for t in ("positional_recall", "all") for c in (64, 160)] \
        == [0, 1, 0, 1]
    correct = sum(round(m[f"task/{t}@160/acc"] * 3) for t in cfg.tasks)  # all: pooled = the mean
    assert m["task/all@160/acc"] == pytest.approx(correct / m["task/all@160/answers"])
    again = evaluate(model, vocab, cfg, hay, train_len=100)
    assert {k: v for k, v in again.items() if "speed/" not in k} == \
        {k: v for k, v in m.items() if "speed/" not in k}


def test_bad_input_is_a_clear_error(vocab, hay):
    model = _tiny()
    with pytest.raises(ConfigError, match=r"eval.contexts=\[300\].*max_seq_len=256.*allow_extrapolation"):
        evaluate(model, vocab, EvalConfig(tasks=["niah_single"], contexts=[300]), hay)
    with pytest.raises(ConfigError, match=r"lengths >= \d+ for task 'mqar'.*\[50\]"):
        evaluate(model, vocab, EvalConfig(tasks=["mqar"], contexts=[50, 200]), hay)
    with pytest.raises(ConfigError, match="unknown task; the tasks are niah_single"):
        EvalConfig(tasks=["needle"]).validate()
    # beyond the trained length (not the rotary range): extrapolation, only when asked for
    with pytest.raises(ConfigError, match=r"eval.contexts=\[64, 160\].*trainer.seq_len=100.*\[160\] lie "
                                          r"beyond it: set eval.allow_extrapolation=true"):
        evaluate(model, vocab, EvalConfig(tasks=["niah_single"], contexts=[64, 160]), hay, train_len=100)
    # extrapolation on request, and the model's own limit is restored afterwards
    m = evaluate(model, vocab, EvalConfig(tasks=["niah_single"], contexts=[300], n_examples=1,
                                          allow_extrapolation=True), hay)
    assert "task/niah_single@300/acc" in m and model.cfg.max_seq_len == 256


def test_run_config_validates_eval_before_training():
    with pytest.raises(ConfigError, match="unknown task"):
        load_run_config(compose(["eval.tasks=[niah_single,bogus]"]))
    with pytest.raises(ConfigError, match=r"eval.contexts.*model.max_seq_len=2048"):
        load_run_config(compose(["eval.contexts=[1024,4096]"]))
    # evaluation off: the grid is never decoded, so it need not fit the rotary range (the
    # chips study once stopped on this with the tiny model) nor the trained length
    off = load_run_config(compose(["tasks=off", "model=tiny", "eval.contexts=[1024]"]))
    assert off.eval.contexts == [1024]
    with pytest.raises(ConfigError, match=r"eval.contexts=\[256, 512\].*trainer.seq_len=256"):
        load_run_config(compose(["eval.contexts=[256,512]"]))
    # the default grid: cells of >= 100 examples at the trained length of each profile
    for profile, length in (("cpu", 256), ("study", 128)):
        ev = load_run_config(compose([f"profile={profile}"])).eval
        assert ev.contexts == [length] and ev.n_examples >= 100 and not ev.allow_extrapolation
    smoke = load_run_config(compose(["profile=smoke"])).eval  # CI-sized: marked, not results
    assert smoke.n_examples < 100 and smoke.allow_extrapolation and max(smoke.contexts) > 64
    cfg = load_run_config(compose(["tasks=long_context"]))
    assert cfg.eval.allow_extrapolation and max(cfg.eval.contexts) == 2048 and cfg.eval.train_share == 0.5
    assert cfg.eval.answer_loss_weight == 1.0
    with pytest.raises(ConfigError, match="eval.train_share"):
        load_run_config(compose(["eval.train_share=1.5"]))


def test_end_of_run_eval_and_checkpoint_cli_agree(tmp_path, smoke_overrides):
    from v4lab.evaluate import main
    from v4lab.train import train

    run_dir = tmp_path / "run"
    metrics = train(compose(["+experiment=full", *smoke_overrides]), run_dir)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    for key in ("task/niah_single@64/acc", "task/positional_recall@128/acc",
                "speed/decode_ms_per_token@64", "cost/kv_bytes@128", "task/all@64/acc",
                "task/niah_single/acc_extrapolated"):
        assert key in on_disk and key in metrics
    assert main([f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"]) == 0
    alone = json.loads((run_dir / "eval.json").read_text())
    for key, value in on_disk.items():
        if key.startswith(("task/", "cost/kv_bytes@")):
            assert alone[key] == value, key
    assert main([f"ckpt={run_dir}", "tasks=[nope]"]) == 1
    # (smoke allows extrapolation: asked not to, beyond the rotary range or the trained 48 tokens)
    assert main([f"ckpt={run_dir}", "contexts=[4096]", "allow_extrapolation=false"]) == 1
    assert main([f"ckpt={run_dir}", "contexts=[64]", "allow_extrapolation=false"]) == 1
