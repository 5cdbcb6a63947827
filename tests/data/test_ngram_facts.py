"""Synthetic N-gram facts: deterministic, facts written where the mask says, and an
N-gram lookup oracle recalls every value token."""

from __future__ import annotations

import pytest
import torch

from v4lab.data.ngram_facts import NGramFacts


def test_facts_deterministic_and_distinct():
    a, b = NGramFacts(vocab_size=50, n_facts=40, seed=3), NGramFacts(vocab_size=50, n_facts=40,
                                                                        seed=3)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert len({tuple(k) for k in a.keys.tolist()}) == 40
    assert not torch.equal(a.keys, NGramFacts(vocab_size=50, n_facts=40, seed=4).keys)
    ia, ma, _ = a.sample(3, 40, 4, seed=1)
    ib, mb, _ = a.sample(3, 40, 4, seed=1)
    assert torch.equal(ia, ib) and torch.equal(ma, mb)


def test_oracle_lookup_recalls_every_value():
    facts = NGramFacts(vocab_size=1000, n_facts=64, key_len=3, value_len=2, seed=0)
    ids, mask, fact = facts.sample(4, 64, 5, seed=7)
    assert int(mask.sum()) == 4 * 5 * 2
    table = {tuple(k): v for k, v in zip(facts.keys.tolist(), facts.values.tolist())}
    # oracle: predict from the last key_len tokens (and, inside a value, the key before it)
    logits = torch.full((*ids.shape, 1000), -1.0)
    seq = ids.tolist()
    for b in range(4):
        for t in range(64):
            for off in range(facts.value_len):  # t is the off-th position after the key end
                key = tuple(seq[b][t - off - 2: t - off + 1]) if t - off >= 2 else None
                if key in table and mask[b, t]:
                    logits[b, t, table[key][off]] = 1.0
                    break
    assert NGramFacts.accuracy(logits, ids, mask) == 1.0
    # every written fact appears as key + value
    for b in range(4):
        text = ",".join(map(str, seq[b]))
        for f in fact[b].tolist():
            assert ",".join(map(str, facts.keys[f].tolist() + facts.values[f].tolist())) in text
    # a uniform guess is at chance
    assert NGramFacts.accuracy(torch.zeros(4, 64, 1000), ids, mask) < 0.2


def test_bad_sizes():
    with pytest.raises(ValueError, match="too small"):
        NGramFacts(vocab_size=3, n_facts=100, key_len=2)
    with pytest.raises(ValueError, match="do not fit"):
        NGramFacts(vocab_size=100, n_facts=4).sample(1, 8, 2, seed=0)
