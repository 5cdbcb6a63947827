"""Tokenizer compression: canonical ids from a small byte-level BPE trained here."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from v4lab.data.canonical import build_canonical_ids, canonical_text

TEXT = ["Apple apple APPLE Café cafe café naïve naive  déjà vu\n\ndef f(x):\n    return x\n"] * 30


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(TEXT, trainer)
    return tok


@pytest.mark.parametrize("raw, canon", [
    ("Apple", "apple"), (" apple", "apple"), ("APPLE\n", "apple"), ("Café", "cafe"),
    ("naïve", "naive"), ("\ufb01le", "file"),  # NFKC: ligature fi
    ("a \t\n b", "a b"), ("\n\n", " "), ("    ", " "), ("x²", "x2"),
])
def test_canonical_text(raw, canon):
    assert canonical_text(raw) == canon


def test_build_canonical_ids(tokenizer):
    ids, ratio = build_canonical_ids(tokenizer)
    vocab = tokenizer.get_vocab_size()
    assert ids.shape == (vocab,) and ids.dtype == torch.long
    n_canon = len(set(ids.tolist()))
    assert ratio == pytest.approx(n_canon / vocab) and ratio < 1
    assert ids.max().item() == n_canon - 1  # dense numbering 0..
    # independent check: tokens share an id exactly when their canonical texts agree
    for i in range(vocab):
        for j in range(i + 1, vocab):
            ti, tj = tokenizer.decode([i]), tokenizer.decode([j])
            if "\ufffd" in ti or "\ufffd" in tj:
                continue
            assert (ids[i] == ids[j]) == (canonical_text(ti) == canonical_text(tj)), (ti, tj)
    # whole words that became single tokens: case / leading-space variants merge
    single = {w: tokenizer.encode(w).ids for w in ["Apple", " apple", "apple", "APPLE"]}
    singles = [v[0] for v in single.values() if len(v) == 1]
    assert len(singles) >= 2 and len({int(ids[i]) for i in singles}) == 1


def test_byte_pieces_stay_distinct(tokenizer):
    ids, _ = build_canonical_ids(tokenizer)
    pieces = [i for i in range(tokenizer.get_vocab_size()) if "\ufffd" in tokenizer.decode([i])]
    assert len(pieces) > 10  # partial UTF-8 bytes of the byte-level alphabet
    assert len({int(ids[i]) for i in pieces}) == len(pieces)
