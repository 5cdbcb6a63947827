"""Probe generators: every answer is checked by an independent solver that scans the raw
token sequence (not the generator's meta), the answer space matches the stated chance,
sampling is deterministic per seed, and bad sizes fail with a ConfigError naming the key."""

from __future__ import annotations

import numpy as np
import pytest

from v4lab.data.probes import IGNORE, PROBES, AssocRecall, NGramFactsProbe, PositionalRecall
from v4lab.errors import ConfigError


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def solve_assoc(ctx: np.ndarray, key: int) -> int:
    """The token right after the first occurrence of ``key`` in ``ctx``."""
    hits = np.flatnonzero(ctx[:-1] == key)
    assert hits.size == 1, f"key {key} occurs {hits.size} times before its query"
    return int(ctx[hits[0] + 1])


@pytest.mark.parametrize("cfg", [AssocRecall(), AssocRecall(seq_len=128, n_pairs=16),
                                 AssocRecall(seq_len=40, n_pairs=5, n_keys=5, n_values=7,
                                             n_queries=3)])
def test_assoc_recall_answers_by_scanning(cfg):
    batch = cfg.sample(_rng(1), 32)
    ids, tg, mask = batch.ids, batch.targets, batch.answer_mask
    assert ids.shape == tg.shape == (32, cfg.seq_len) and ids.dtype == tg.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < cfg.vocab_size
    assert (tg[~mask] == IGNORE).all() and (mask.sum(1) == cfg.queries).all()
    is_value = ids > cfg.n_keys  # value tokens occupy the top of the vocabulary
    half = cfg.seq_len // 2
    for b in range(32):
        # answers are never written into the input: no value in the second half, so
        # values already answered cannot be struck out
        assert not is_value[b, half:].any()
        for t in np.flatnonzero(mask[b]):
            assert t >= half  # queries live in the second half
            key, ans = ids[b, t], tg[b, t]
            assert 1 <= key <= cfg.n_keys and ans > cfg.n_keys
            assert solve_assoc(ids[b, :t], key) == ans
            # the answer occurs exactly once in the context; every other value is a distractor
            assert (ids[b, :t + 1] == ans).sum() == 1
            assert ans not in ids[b, :t + 1][is_value[b, :t + 1] & (ids[b, :t + 1] != ans)]
        asked = ids[b, mask[b]]  # each key asked at most once
        assert len(set(asked.tolist())) == asked.size


def test_assoc_recall_chance_is_the_answer_space():
    cfg = AssocRecall(seq_len=64, n_pairs=8, n_keys=32, n_values=16)
    assert cfg.chance == pytest.approx(1 / 16) and cfg.vocab_size == 1 + 32 + 16
    assert cfg.baseline == pytest.approx(1 / 8)
    b = cfg.sample(_rng(2), 400)
    answers = b.targets[b.answer_mask]
    # the answers are exactly the n_values value tokens: a uniform guess there is right 1/16
    assert set(answers.tolist()) == set(range(33, 49))
    counts = np.bincount(answers - 33, minlength=16)
    assert counts.min() > 0.7 * counts.mean()  # roughly uniform: no cheaper constant guess
    assert max(counts) / counts.sum() < 1.5 * cfg.chance
    # the baseline: a uniform pick among the context's values is right 1/n_pairs
    rng = _rng(3)
    picks = [rng.choice(b.ids[i, 1:16:2]) == a for i in range(400) for a in b.targets[i, b.answer_mask[i]]]
    assert abs(np.mean(picks) - cfg.baseline) < 4 * np.sqrt(cfg.baseline * (1 - cfg.baseline) / len(picks))


def test_positional_recall_answers_by_scanning():
    cfg = PositionalRecall(seq_len=48, run_len=6, n_symbols=10, n_filler=8, n_queries=3)
    batch = cfg.sample(_rng(3), 64)
    ids, tg, mask = batch.ids, batch.targets, batch.answer_mask
    assert ids.max() < cfg.vocab_size and (mask.sum(1) == 3).all()
    seen_d = set()
    for b in range(64):
        for t in np.flatnonzero(mask[b]):
            d = int(ids[b, t]) - cfg.marker  # a distance token asks "d before the marker"
            assert 1 <= d <= cfg.run_len
            seen_d.add(d)
            m = np.flatnonzero(ids[b, :t] == cfg.marker)
            assert m.size == 1
            ans = tg[b, t]
            assert ids[b, m[0] - d] == ans
            assert cfg.symbol0 <= ans < cfg.marker
            assert (ids[b, :t + 1] == ans).sum() == 1  # the answer occurs once
            run = ids[b, m[0] - cfg.run_len:m[0]]
            assert len(set(run.tolist())) == cfg.run_len  # distractors differ from the answer
        # symbols occur only in the run: filler and queries use other ranges
        is_sym = (ids[b] >= cfg.symbol0) & (ids[b] < cfg.marker)
        assert is_sym.sum() == cfg.run_len
    assert seen_d == set(range(1, 7))
    assert cfg.chance == pytest.approx(1 / 10) and cfg.baseline == pytest.approx(1 / 6)
    b2 = cfg.sample(_rng(4), 500)
    assert set(b2.targets[b2.answer_mask].tolist()) == set(range(cfg.symbol0, cfg.symbol0 + 10))


def test_ngram_facts_answers_from_the_table_only():
    cfg = NGramFactsProbe(seq_len=64, n_facts=100, key_len=3, n_key_tokens=6, n_values=20,
                          n_filler=8, facts_per_seq=10)
    table = {tuple(k): int(v) for k, v in zip(cfg.keys.tolist(), cfg.values.tolist())}
    assert len(table) == 100  # distinct keys
    batch = cfg.sample(_rng(5), 32)
    ids, tg, mask = batch.ids, batch.targets, batch.answer_mask
    assert ids.max() < cfg.vocab_size and (mask.sum(1) == 10).all()
    is_key = (ids >= cfg.key0) & (ids < cfg.value0)
    for b in range(32):
        # scan every window of key_len key tokens: exactly the written facts, each once
        grams = [tuple(ids[b, t:t + 3].tolist()) for t in range(cfg.seq_len - 2) if is_key[b, t:t + 3].all()]
        assert len(grams) == 10 and len(set(grams)) == 10 and all(g in table for g in grams)
        for t in np.flatnonzero(mask[b]):
            key = tuple(ids[b, t - 2:t + 1].tolist())  # the N-gram ending at the asked token
            assert table[key] == tg[b, t] == ids[b, t + 1]  # written as text right after
            # the value is in the context before only if an earlier fact shares it
            same = [g for g in grams if table[g] == tg[b, t]]
            assert (ids[b, :t + 1] == tg[b, t]).sum() <= len(same) - 1
    assert cfg.chance == pytest.approx(1 / 20)
    assert cfg.baseline == pytest.approx(np.bincount(cfg.values).max() / 100)
    assert set(cfg.values.tolist()) <= set(range(cfg.value0, cfg.value0 + 20))


def test_ngram_facts_table_is_fixed_by_its_seed():
    a, b = NGramFactsProbe(table_seed=1), NGramFactsProbe(table_seed=1)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.values, b.values)
    c = NGramFactsProbe(table_seed=2)
    assert not np.array_equal(a.keys, c.keys)
    # the table does not depend on the sampling rng; sequences do
    x, y = a.sample(_rng(0), 4), a.sample(_rng(1), 4)
    assert not np.array_equal(x.ids, y.ids)
    # a capacity sweep draws a table per size; each holds distinct keys
    big = NGramFactsProbe(n_facts=1024, n_key_tokens=32, key_len=2)
    assert len({tuple(k) for k in big.keys.tolist()}) == 1024


@pytest.mark.parametrize("cls", [AssocRecall, PositionalRecall, NGramFactsProbe])
def test_deterministic_per_seed(cls):
    p = cls()
    a, b, c = p.sample(_rng(11), 8), p.sample(_rng(11), 8), p.sample(_rng(12), 8)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.ids, c.ids)
    assert PROBES[cls.NAME] is cls


@pytest.mark.parametrize("make, key, value", [
    (lambda: AssocRecall(seq_len=64, n_pairs=17), "assoc_recall.n_pairs", "17"),
    (lambda: AssocRecall(n_pairs=8, n_values=4), "assoc_recall.n_pairs", "8"),
    (lambda: AssocRecall(n_pairs=8, n_keys=4), "assoc_recall.n_pairs", "8"),
    (lambda: AssocRecall(n_queries=9), "assoc_recall.n_queries", "9"),
    (lambda: AssocRecall(seq_len=0), "assoc_recall.seq_len", "0"),
    (lambda: PositionalRecall(run_len=20, n_symbols=16), "positional_recall.run_len", "20"),
    (lambda: PositionalRecall(n_queries=9, run_len=8), "positional_recall.n_queries", "9"),
    (lambda: PositionalRecall(seq_len=12), "positional_recall.seq_len", "12"),
    (lambda: NGramFactsProbe(n_facts=65, n_key_tokens=8, key_len=2), "ngram_facts.n_facts", "65"),
    (lambda: NGramFactsProbe(facts_per_seq=22, seq_len=64), "ngram_facts.facts_per_seq", "22"),
    (lambda: NGramFactsProbe(n_facts=4, facts_per_seq=5), "ngram_facts.facts_per_seq", "5"),
])
def test_bad_sizes_raise_config_error(make, key, value):
    with pytest.raises(ConfigError) as err:
        make()
    msg = str(err.value)
    assert msg.startswith(f"{key}={value}") and "allowed" in msg


def test_bad_batch_raises():
    with pytest.raises(ConfigError, match="batch=0"):
        AssocRecall().sample(_rng(), 0)
