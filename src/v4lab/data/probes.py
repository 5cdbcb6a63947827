"""Probe tasks: small synthetic token problems on which one architectural piece matters a lot.

Unlike the RULER-style tasks (``tasks.py``), a probe needs no corpus and no tokenizer: each
probe has its own small integer vocabulary, split into disjoint ranges (filler, keys,
values, symbols, markers), so an answer can only come from where the task put it. A probe
is a frozen config that validates itself and draws batches from a numpy Generator:

    probe = AssocRecall(seq_len=64, n_pairs=8)
    batch = probe.sample(np.random.default_rng(seed), batch=64)
    batch.ids          [B, T] int64 token ids in [0, probe.vocab_size): the model's input
    batch.targets      [B, T] int64: the answer the logits at position t must give, IGNORE
                       (-1) where nothing is asked; train and score on those positions only
    batch.answer_mask  targets != IGNORE
    batch.chance       accuracy of a uniform guess over the answer vocabulary (probe.chance)

Answers of recall probes are *not* written into the input (the query is the last token
before the answer; the slot after it is blank, as in Zoology's MQAR). Written answers
would leak: with every key asked once, the values already answered can be struck out,
and a model that never looks a key up reaches H(n)/n (0.34 for 8 pairs, measured on the
lab's MHA) by elimination alone.

    AssocRecall       multi-query associative recall (Zoology's MQAR): n_pairs single-token
                      key/value pairs at the start of the first half, keys asked (each at
                      most once, random order, random places) in the second half:
                          k1 v1 k2 v2 ... kn vn . . . | . k3 . . . k1 . . k6 .
                                                             [v3]    [v1]  [v6]
                      Attention variants differ in whether they can look a key up.
    PositionalRecall  a run of distinct symbols ending in a marker, in random filler; the
                      last tokens are distance tokens asking which symbol stood d positions
                      before the marker:   f f s1 s2 ... sL M f f f ... D3 D1
                                                                       [s_{L-2}] [sL]
                      Position must survive in the values (VVPA).
    NGramFactsProbe   a fixed table of facts (key N-gram -> value token), drawn once from
                      ``table_seed``, written as text into random filler; the value must
                      come from the table (no fact repeats within a sequence):
                          f f a b v_ab f f c d v_cd f ...
                                 [v_ab]       [v_cd]
                      Engram's hashed N-gram memory vs parameters of an MoE; varying
                      n_facts measures facts-per-parameter capacity.

(``.`` is the blank token 0, ``f`` random filler, ``[x]`` the target at the token above.)
Each probe also states ``baseline``: the best accuracy without doing the task's lookup
(a uniform pick among the candidates in the context, or the table's majority value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from v4lab.errors import require, require_positive

IGNORE = -1  # target of a position where nothing is asked
BLANK = 0    # the token in every probe's vocabulary that fills empty slots


@dataclass
class ProbeBatch:
    """A batch of probe sequences; see the module docstring. meta: per-sequence arrays a
    solver or an analysis may use (which keys were asked, distances, fact indices)."""

    ids: np.ndarray
    targets: np.ndarray
    chance: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_mask(self) -> np.ndarray:
        return self.targets != IGNORE

    @property
    def n_answers(self) -> int:
        return int(self.answer_mask.sum())


def _slots(rng: np.random.Generator, room: int, n: int, width: int) -> np.ndarray:
    """Sorted starts of n non-overlapping blocks of ``width`` tokens in ``room`` tokens,
    uniformly over the arrangements (stars and bars: sorted gaps plus the blocks before)."""
    gaps = np.sort(rng.integers(0, room - n * width + 1, size=n))
    return gaps + width * np.arange(n)


def _check_batch(batch: int) -> None:
    require_positive("batch", batch)


@dataclass(frozen=True)
class AssocRecall:
    """Multi-query associative recall with single-token keys and values.

    Vocabulary: 0 blank, 1..n_keys keys, n_keys+1..n_keys+n_values values. Keys are
    distinct within a sequence, and so are values (each value occurs once in the context).
    n_queries of the pairs (default all) are asked, each once, at random places of the
    second half; the target at a query is its value. chance = 1 / n_values;
    baseline = 1 / n_pairs (a value of the context picked without looking the key up).
    """

    seq_len: int = 64
    n_pairs: int = 8
    n_keys: int = 32
    n_values: int = 16
    n_queries: int | None = None  # None = n_pairs
    NAME = "assoc_recall"

    def __post_init__(self) -> None:
        k = self.NAME
        for name in ("seq_len", "n_pairs", "n_keys", "n_values"):
            require_positive(f"{k}.{name}", getattr(self, name))
        half = self.seq_len // 2
        require(2 * self.n_pairs <= half, f"{k}.n_pairs", self.n_pairs,
                f"<= {half // 2}: the pairs (2 tokens each) must fit in the first half of "
                f"seq_len={self.seq_len}")
        require(self.n_pairs <= self.n_keys, f"{k}.n_pairs", self.n_pairs,
                f"<= n_keys={self.n_keys} (keys are distinct within a sequence)")
        require(self.n_pairs <= self.n_values, f"{k}.n_pairs", self.n_pairs,
                f"<= n_values={self.n_values} (values are distinct within a sequence)")
        if self.n_queries is not None:
            require(isinstance(self.n_queries, int) and 1 <= self.n_queries <= self.n_pairs,
                    f"{k}.n_queries", self.n_queries, f"1..n_pairs={self.n_pairs}, or None")

    @property
    def queries(self) -> int:
        return self.n_pairs if self.n_queries is None else self.n_queries

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    @property
    def baseline(self) -> float:
        return 1.0 / self.n_pairs

    def sample(self, rng: np.random.Generator, batch: int) -> ProbeBatch:
        """Meta: keys, values [B, n_pairs] (token ids, in the order written), asked
        [B, n_queries] (pair indices in the order asked)."""
        _check_batch(batch)
        T, n, q, half = self.seq_len, self.n_pairs, self.queries, self.seq_len // 2
        ids = np.full((batch, T), BLANK, dtype=np.int64)
        targets = np.full((batch, T), IGNORE, dtype=np.int64)
        keys = np.empty((batch, n), dtype=np.int64)
        vals = np.empty((batch, n), dtype=np.int64)
        asked = np.empty((batch, q), dtype=np.int64)
        for b in range(batch):
            keys[b] = 1 + rng.choice(self.n_keys, size=n, replace=False)
            vals[b] = 1 + self.n_keys + rng.choice(self.n_values, size=n, replace=False)
            ids[b, 0:2 * n:2], ids[b, 1:2 * n:2] = keys[b], vals[b]
            asked[b] = rng.choice(n, size=q, replace=False)
            at = half + np.sort(rng.choice(T - half, size=q, replace=False))
            ids[b, at], targets[b, at] = keys[b, asked[b]], vals[b, asked[b]]
        return ProbeBatch(ids, targets, self.chance, {"keys": keys, "values": vals, "asked": asked})


@dataclass(frozen=True)
class PositionalRecall:
    """Which symbol stood exactly d positions before the marker?

    Vocabulary: 0 blank (unused), 1..n_filler filler, then n_symbols symbols, the marker,
    and run_len distance tokens D_1..D_run_len. A run of run_len distinct symbols ends
    right before the marker, at a random place in random filler; the last n_queries tokens
    ask distinct distances, each target the symbol d before the marker. Each symbol of the
    run occurs once in the sequence. chance = 1 / n_symbols; baseline = 1 / run_len (a
    symbol of the run picked without counting).
    """

    seq_len: int = 64
    run_len: int = 8
    n_symbols: int = 16
    n_filler: int = 16
    n_queries: int = 4
    NAME = "positional_recall"

    def __post_init__(self) -> None:
        k = self.NAME
        for name in ("seq_len", "run_len", "n_symbols", "n_filler", "n_queries"):
            require_positive(f"{k}.{name}", getattr(self, name))
        require(self.run_len <= self.n_symbols, f"{k}.run_len", self.run_len,
                f"<= n_symbols={self.n_symbols} (the run's symbols are distinct)")
        require(self.n_queries <= self.run_len, f"{k}.n_queries", self.n_queries,
                f"<= run_len={self.run_len} (each query asks a different distance)")
        need = self.run_len + 1 + self.n_queries
        require(need <= self.seq_len, f"{k}.seq_len", self.seq_len,
                f">= run_len + 1 + n_queries = {need}")

    @property
    def symbol0(self) -> int:
        return 1 + self.n_filler

    @property
    def marker(self) -> int:
        return self.symbol0 + self.n_symbols

    def distance_token(self, d: int) -> int:
        """Token id asking for distance d (1..run_len)."""
        return self.marker + d

    @property
    def vocab_size(self) -> int:
        return self.marker + 1 + self.run_len

    @property
    def chance(self) -> float:
        return 1.0 / self.n_symbols

    @property
    def baseline(self) -> float:
        return 1.0 / self.run_len

    def sample(self, rng: np.random.Generator, batch: int) -> ProbeBatch:
        """Meta: marker [B] (position of the marker), distances [B, n_queries]."""
        _check_batch(batch)
        T, L, q = self.seq_len, self.run_len, self.n_queries
        ids = 1 + rng.integers(0, self.n_filler, size=(batch, T)).astype(np.int64)
        targets = np.full((batch, T), IGNORE, dtype=np.int64)
        marker = np.empty(batch, dtype=np.int64)
        dist = np.empty((batch, q), dtype=np.int64)
        at = np.arange(T - q, T)  # the distance tokens
        for b in range(batch):
            m = int(rng.integers(L, T - q))  # the run fills m-L..m-1, the marker sits at m
            ids[b, m - L:m] = self.symbol0 + rng.choice(self.n_symbols, size=L, replace=False)
            ids[b, m] = self.marker
            marker[b] = m
            dist[b] = 1 + rng.choice(L, size=q, replace=False)
            ids[b, at] = self.marker + dist[b]
            targets[b, at] = ids[b, m - dist[b]]
        return ProbeBatch(ids, targets, self.chance, {"marker": marker, "distances": dist})


@dataclass(frozen=True)
class NGramFactsProbe:
    """A fixed table of n_facts facts (key N-gram -> value token) recalled from memory.

    Vocabulary: 0 blank (unused), 1..n_filler filler, then n_key_tokens key tokens, then
    n_values value tokens. The table is drawn once from ``table_seed``: n_facts distinct
    keys of key_len key tokens, each with a value drawn uniformly (values may repeat across
    facts). A sequence is random filler with facts_per_seq distinct facts written as key
    then value; the target at a key's last token is its value. The ranges are disjoint, so
    a key N-gram occurs only where a fact was written. chance = 1 / n_values; baseline =
    the table's most frequent value's share (the best constant guess).
    """

    seq_len: int = 64
    n_facts: int = 256
    key_len: int = 2
    n_key_tokens: int = 32
    n_values: int = 32
    n_filler: int = 16
    facts_per_seq: int = 8
    table_seed: int = 0
    NAME = "ngram_facts"

    def __post_init__(self) -> None:
        k = self.NAME
        for name in ("seq_len", "n_facts", "key_len", "n_key_tokens", "n_values", "n_filler",
                     "facts_per_seq"):
            require_positive(f"{k}.{name}", getattr(self, name))
        space = self.n_key_tokens ** self.key_len
        require(self.n_facts <= space, f"{k}.n_facts", self.n_facts,
                f"<= n_key_tokens**key_len = {space} distinct keys")
        require(self.facts_per_seq <= self.n_facts, f"{k}.facts_per_seq", self.facts_per_seq,
                f"<= n_facts={self.n_facts} (no fact repeats within a sequence)")
        span = self.facts_per_seq * (self.key_len + 1)
        require(span <= self.seq_len, f"{k}.facts_per_seq", self.facts_per_seq,
                f"<= seq_len // (key_len + 1) = {self.seq_len // (self.key_len + 1)}")
        rng = np.random.default_rng([self.table_seed, 0xFAC7])
        codes = rng.choice(space, size=self.n_facts, replace=False)
        digits = (codes[:, None] // self.n_key_tokens ** np.arange(self.key_len)[::-1]) % self.n_key_tokens
        object.__setattr__(self, "keys", (self.key0 + digits).astype(np.int64))
        object.__setattr__(self, "values", self.value0 + rng.integers(0, self.n_values, size=self.n_facts))

    @property
    def key0(self) -> int:
        return 1 + self.n_filler

    @property
    def value0(self) -> int:
        return self.key0 + self.n_key_tokens

    @property
    def vocab_size(self) -> int:
        return self.value0 + self.n_values

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    @property
    def baseline(self) -> float:
        """Accuracy of always answering the table's most frequent value."""
        return float(np.bincount(self.values).max()) / self.n_facts

    def sample(self, rng: np.random.Generator, batch: int) -> ProbeBatch:
        """Meta: facts [B, facts_per_seq] (table rows written, in sequence order)."""
        _check_batch(batch)
        T, n, w = self.seq_len, self.facts_per_seq, self.key_len + 1
        ids = 1 + rng.integers(0, self.n_filler, size=(batch, T)).astype(np.int64)
        targets = np.full((batch, T), IGNORE, dtype=np.int64)
        facts = np.empty((batch, n), dtype=np.int64)
        for b in range(batch):
            facts[b] = rng.choice(self.n_facts, size=n, replace=False)
            starts = _slots(rng, T, n, w)
            for j in range(self.key_len):
                ids[b, starts + j] = self.keys[facts[b], j]
            ids[b, starts + self.key_len] = self.values[facts[b]]
            targets[b, starts + self.key_len - 1] = self.values[facts[b]]
        return ProbeBatch(ids, targets, self.chance, {"facts": facts})


PROBES = {p.NAME: p for p in (AssocRecall, PositionalRecall, NGramFactsProbe)}
