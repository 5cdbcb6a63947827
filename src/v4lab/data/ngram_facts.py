"""Synthetic "fixed N-gram facts": a task Engram's hashed N-gram memory should help on.

A seeded set of ``n_facts`` facts maps a key (``key_len`` token ids, all keys distinct) to
a value (``value_len`` token ids). A training sequence is random filler tokens with facts
written into it as key followed by value. Predicting a value token needs nothing but the
N-gram ending at the previous token (a static lookup), which is what Engram stores; a
plain transformer must memorise the facts in its weights. ``value_mask`` marks the
positions whose *next* token is a value token, so accuracy on them measures fact recall.

Token-level (ids in [0, vocab_size)), independent of any tokenizer; deterministic given
the seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NGramFacts:
    """The fact set. keys: [n_facts, key_len], values: [n_facts, value_len] (LongTensors)."""

    vocab_size: int = 4096
    n_facts: int = 512
    key_len: int = 3
    value_len: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.key_len < 1 or self.value_len < 1 or self.n_facts < 1:
            raise ValueError("n_facts, key_len and value_len must be >= 1")
        if self.vocab_size**self.key_len < 4 * self.n_facts:
            raise ValueError(f"vocab_size**key_len={self.vocab_size**self.key_len} is too small "
                             f"for {self.n_facts} distinct keys")
        g = torch.Generator().manual_seed(self.seed)
        keys: dict[tuple[int, ...], None] = {}
        while len(keys) < self.n_facts:
            keys.setdefault(tuple(torch.randint(0, self.vocab_size, (self.key_len,),
                                                generator=g).tolist()))
        self.keys = torch.tensor(list(keys))
        self.values = torch.randint(0, self.vocab_size, (self.n_facts, self.value_len),
                                    generator=g)

    def sample(self, batch: int, seq_len: int, facts_per_seq: int, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequences with ``facts_per_seq`` facts each, at non-overlapping random places.

        Returns ids [B, T], value_mask [B, T] (True where the next token is a value token)
        and fact [B, facts_per_seq] (which facts were written).
        """
        span = self.key_len + self.value_len
        if facts_per_seq * span > seq_len:
            raise ValueError(f"{facts_per_seq} facts of {span} tokens do not fit in {seq_len}")
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab_size, (batch, seq_len), generator=g)
        mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        fact = torch.randint(0, self.n_facts, (batch, facts_per_seq), generator=g)
        slack = seq_len - facts_per_seq * span
        for b in range(batch):
            # distinct starts: sorted gaps that sum to at most the slack
            gaps = torch.sort(torch.randint(0, slack + 1, (facts_per_seq,), generator=g)).values
            for i in range(facts_per_seq):
                start = int(gaps[i]) + i * span
                f = int(fact[b, i])
                ids[b, start: start + self.key_len] = self.keys[f]
                ids[b, start + self.key_len: start + span] = self.values[f]
                mask[b, start + self.key_len - 1: start + span - 1] = True
        return ids, mask, fact

    @staticmethod
    def accuracy(logits: torch.Tensor, ids: torch.Tensor, value_mask: torch.Tensor) -> float:
        """Next-token accuracy on the value positions: logits [B, T, V] for ids [B, T]."""
        pred = logits[:, :-1].argmax(-1)
        m = value_mask[:, :-1]
        return (pred[m] == ids[:, 1:][m]).float().mean().item()
