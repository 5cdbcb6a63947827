"""Tokenizer compression for Engram: map token ids to canonical ids.

Engram hashes N-grams of *canonical* ids so that surface variants of one token
(``Apple`` / `` apple`` / ``APPLE``) address the same memory rows. A token's canonical
text is its decoded text after NFKC, lowercasing, stripping accents (NFD, drop combining
marks) and collapsing whitespace (runs of whitespace -> one space, then stripped; a
whitespace-only token becomes " "). Tokens sharing the canonical text share one id.
Tokens whose single-token decoding is not valid text (byte-level pieces of a multi-byte
character decode to U+FFFD) keep their own id, keyed by their raw token string, so
different byte pieces are never merged.
"""

from __future__ import annotations

import re
import unicodedata

import torch

_WS = re.compile(r"\s+")


def canonical_text(text: str) -> str:
    """NFKC -> lowercase -> strip accents -> collapse whitespace (see module docstring)."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = "".join(ch for ch in unicodedata.normalize("NFD", t) if not unicodedata.combining(ch))
    t = unicodedata.normalize("NFC", t)
    if t and not t.strip():
        return " "
    return _WS.sub(" ", t).strip()


def build_canonical_ids(tokenizer) -> tuple[torch.Tensor, float]:
    """Canonical id of every token of a ``tokenizers.Tokenizer``.

    Returns (ids LongTensor [vocab_size], compression ratio = distinct canonical ids /
    vocab_size). Canonical ids are numbered 0.. in order of first appearance by token id,
    so the map is deterministic. The Engram paper reports the reduction 1 - ratio (23% for
    its 128K tokenizer).
    """
    vocab = tokenizer.get_vocab_size()
    keys: dict[tuple[str, str], int] = {}
    out = torch.empty(vocab, dtype=torch.long)
    for i in range(vocab):
        text = tokenizer.decode([i], skip_special_tokens=False)
        raw = tokenizer.id_to_token(i)
        if raw is None or "\ufffd" in text:
            key = ("raw", raw if raw is not None else f"<id {i}>")
        else:
            key = ("text", canonical_text(text) if text else raw)
        out[i] = keys.setdefault(key, len(keys))
    return out, len(keys) / vocab
