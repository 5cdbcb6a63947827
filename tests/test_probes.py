"""Probe generators: every answer is checked by an independent solver that scans the raw
token sequence (not the generator's meta), the answer space matches the stated chance,
sampling is deterministic per seed, and bad sizes fail with a ConfigError naming the key."""

from __future__ import annotations

import numpy as np
import pytest

from v4lab.data.probes import PROBES, AssocRecall, NGramFactsProbe, PositionalRecall
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
    ids, mask = batch.ids, batch.answer_mask
    assert ids.shape == mask.shape == (32, cfg.seq_len) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < cfg.vocab_size
    assert (mask.sum(1) == cfg.queries).all()
    values = (ids > cfg.n_keys)  # value tokens occupy the top of the vocabulary
    for b in range(32):
        for p in np.flatnonzero(mask[b]):
            assert p >= cfg.seq_len // 2 + 1  # queries live in the second half
            key, ans, ctx = ids[b, p - 1], ids[b, p], ids[b, :p - 1]
            assert 1 <= key <= cfg.n_keys and values[b, p]
            assert solve_assoc(ctx, key) == ans
            # the answer occurs exactly once before it; every other value there is a distractor
            assert (ids[b, :p] == ans).sum() == 1
            others = ids[b, :p][values[b, :p] & (ids[b, :p] != ans)]
            assert ans not in others
        # each key asked at most once, and only value tokens are supervised
        asked = ids[b, np.flatnonzero(mask[b]) - 1]
        assert len(set(asked.tolist())) == asked.size
    assert values[mask].all() and not (mask & ~values).any()


def test_assoc_recall_chance_is_the_answer_space():
    cfg = AssocRecall(seq_len=64, n_pairs=8, n_keys=32, n_values=16)
    assert cfg.chance == pytest.approx(1 / 16) and cfg.vocab_size == 1 + 32 + 16
    answers = cfg.sample(_rng(2), 400).ids[cfg.sample(_rng(2), 400).answer_mask]
    # the answers are exactly the n_values value tokens: a uniform guess there is right 1/16
    assert set(answers.tolist()) == set(range(33, 49))
    counts = np.bincount(answers - 33, minlength=16)
    assert counts.min() > 0.7 * counts.mean()  # roughly uniform: no cheaper constant guess
    assert max(counts) / counts.sum() < 1.5 * cfg.chance


def test_positional_recall_answers_by_scanning():
    cfg = PositionalRecall(seq_len=48, run_len=6, n_symbols=10, n_filler=8, n_queries=3)
    batch = cfg.sample(_rng(3), 64)
    ids, mask = batch.ids, batch.answer_mask
    assert ids.max() < cfg.vocab_size and (mask.sum(1) == 3).all()
    seen_d = set()
    for b in range(64):
        for p in np.flatnonzero(mask[b]):
            d = int(ids[b, p - 1]) - cfg.marker  # a distance token asks "d before the marker"
            assert 1 <= d <= cfg.run_len
            seen_d.add(d)
            m = np.flatnonzero(ids[b, :p] == cfg.marker)
            assert m.size == 1
            ans = ids[b, p]
            assert ids[b, m[0] - d] == ans
            assert cfg.symbol0 <= ans < cfg.marker
            assert (ids[b, :p] == ans).sum() == 1  # the answer occurs once before it
            run = ids[b, m[0] - cfg.run_len:m[0]]
            assert len(set(run.tolist())) == cfg.run_len  # distractors differ from the answer
    assert seen_d == set(range(1, 7))
    assert cfg.chance == pytest.approx(1 / 10)
    answers = cfg.sample(_rng(4), 500).ids[cfg.sample(_rng(4), 500).answer_mask]
    assert set(answers.tolist()) == set(range(cfg.symbol0, cfg.symbol0 + 10))


def test_ngram_facts_answers_from_the_table_only():
    cfg = NGramFactsProbe(seq_len=64, n_facts=100, key_len=3, n_key_tokens=6, n_values=20,
                          n_filler=8, facts_per_seq=10)
    table = {tuple(k): int(v) for k, v in zip(cfg.keys.tolist(), cfg.values.tolist())}
    assert len(table) == 100  # distinct keys
    batch = cfg.sample(_rng(5), 32)
    ids, mask = batch.ids, batch.answer_mask
    assert ids.max() < cfg.vocab_size and (mask.sum(1) == 10).all()
    is_key = (ids >= cfg.n_filler) & (ids < cfg.n_filler + cfg.n_key_tokens)
    for b in range(32):
        # scan every window of key_len key tokens: exactly the written facts, each once
        grams = [tuple(ids[b, t:t + 3].tolist()) for t in range(cfg.seq_len - 2) if is_key[b, t:t + 3].all()]
        assert len(grams) == 10 and len(set(grams)) == 10 and all(g in table for g in grams)
        for p in np.flatnonzero(mask[b]):
            key = tuple(ids[b, p - 3:p].tolist())
            assert table[key] == ids[b, p]
            # the answer is not in the context before it unless another fact has the same value
            same = [g for g in grams if table[g] == ids[b, p]]
            assert (ids[b, :p] == ids[b, p]).sum() <= len(same) - 1
    assert cfg.chance == pytest.approx(1 / 20)
    assert cfg.majority == pytest.approx(np.bincount(cfg.values).max() / 100)
    assert set(cfg.values.tolist()) <= set(range(14, 34))


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
    np.testing.assert_array_equal(a.answer_mask, b.answer_mask)
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
    (lambda: PositionalRecall(seq_len=16), "positional_recall.seq_len", "16"),
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
