"""Decode cache of the DeepSeek-V4 attention, stored in the precision the config names.

Entries (window kv, compressed entries) are [nope | rope] vectors of width d:

    fp32: as computed;  bf16: rounded to bf16;
    fp8:  nope part float8 e4m3 with one fp32 scale per ``block`` values, rope part bf16
          (the released model's layout: rotary channels stay in 16 bits)

Indexer keys are kept in bf16 unless the cache is fp32. Training applies the same
rounding (:func:`round_entries`, straight-through gradient) to the values it attends to,
and ``dequantize(quantize(x))`` equals that rounding bit for bit, so decoding from the
stored tensors gives the full forward's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from v4lab.modules.attention import round_through
from v4lab.modules.compressor import CompressorState
from v4lab.modules.kv_quant import dequantize, fake_quant, quantize


def round_entries(x: torch.Tensor, fmt: str, rope_dim: int, block: int) -> torch.Tensor:
    """x [..., d] with the rounding the cache applies in format ``fmt`` (STE gradient)."""
    if fmt == "fp32":
        return x
    if fmt == "bf16":
        return round_through(x, torch.bfloat16)
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    return torch.cat([fake_quant(nope, "fp8", block), round_through(rope, torch.bfloat16)], dim=-1)


class EntryStore:
    """Append-only entries [B, L, d] held in format ``fmt`` (see the module docstring).

    ``append(x [B, n, d])`` stores x (unrounded; the format rounds it); ``read()`` ->
    [B, L, d] fp32 equal to ``round_entries`` of everything appended; ``keep_last(n)``
    drops older entries (the sliding window). ``keep=False``: a throwaway store for a
    forward without a cache, which stores nothing.

    Storage: each part is a buffer with spare room; the entries held are its slice
    [start, end). Appending one token writes into the spare room (amortised O(1), where
    concatenating would copy every entry at every decode step); ``keep_last`` moves
    ``start``; a full buffer is compacted to the front, or doubled when the entries held
    fill more than half of it. Reads are views of the held slice.
    """

    def __init__(self, fmt: str, rope_dim: int, block: int, keep: bool = True) -> None:
        self.fmt, self.rope_dim, self.block, self.keep = fmt, rope_dim, block, keep
        self.buffers: dict[str, torch.Tensor] = {}
        self.start = self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the entries held, by part ([B, L, ...] views)."""
        return {k: v[:, self.start:self.end] for k, v in self.buffers.items()}

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fmt == "fp32":
            return {"kv": x.float()}
        if self.fmt == "bf16":
            return {"kv": x.to(torch.bfloat16)}
        q, scale = quantize(x[..., :-self.rope_dim], "fp8", self.block)
        return {"nope": q, "scale": scale, "rope": x[..., -self.rope_dim:].to(torch.bfloat16)}

    def _make_room(self, n: int, like: dict[str, torch.Tensor]) -> None:
        """Ensure n free slots after ``end``: compact to the front, or grow to twice what is held."""
        held = len(self)
        room = next(iter(self.buffers.values())).shape[1] if self.buffers else 0
        if self.end + n <= room:
            return
        if held + n > room // 2:  # compacting would leave too little room: grow
            room = max(2 * (held + n), 16)
            fresh = {k: v.new_empty(v.shape[0], room, *v.shape[2:]) for k, v in like.items()}
        else:
            fresh = self.buffers
        live = {k: v.clone() for k, v in self.parts.items()}  # clone: source and target overlap
        for k, v in live.items():
            fresh[k][:, :held] = v
        self.buffers, self.start, self.end = fresh, 0, held

    def append(self, x: torch.Tensor) -> None:
        if not self.keep or x.shape[1] == 0:
            return
        new = self._encode(x.detach())
        self._make_room(x.shape[1], new)
        for k, v in new.items():
            self.buffers[k][:, self.end:self.end + v.shape[1]] = v
        self.end += x.shape[1]

    def extend(self, new: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """Append new [B, n, d]; return every entry held before it, then the new ones, as the
        attention sees them: [B, L + n, d] (the new part keeps its gradient, rounded like the
        store). ``keep``: afterwards hold only the last ``keep`` entries."""
        if self.keep and not new.requires_grad:  # decoding: the store's read-back is the rounding
            self.append(new)
            out = self.read().to(new.dtype) if len(self) else new[:, :0]
        else:
            prev = self.read().to(new.dtype) if len(self) else new[:, :0]
            self.append(new)
            out = torch.cat([prev, round_entries(new, self.fmt, self.rope_dim, self.block)], dim=1)
        if keep is not None:
            self.keep_last(keep)
        return out

    def keep_last(self, n: int) -> None:
        self.start = max(self.end - n, self.start)

    def _decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fmt != "fp8":
            return parts["kv"].float()
        return torch.cat([dequantize(parts["nope"], parts["scale"]), parts["rope"].float()], dim=-1)

    def read(self) -> torch.Tensor:
        return self._decode(self.parts)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Only the entries idx [B, k] -> [B, k, d] fp32 (decoding reads just its top-k)."""
        b = torch.arange(idx.shape[0], device=idx.device)[:, None]

        def take(v: torch.Tensor) -> torch.Tensor:  # 1-byte dtypes are indexed as raw bytes
            return v.view(torch.uint8)[b, idx].view(v.dtype) if v.element_size() == 1 else v[b, idx]

        return self._decode({k: take(v) for k, v in self.parts.items()})

    def bytes_per_entry(self) -> int:
        """Bytes one entry occupies, read off the stored tensors (0 while empty)."""
        return sum(v[0, 0].numel() * v.element_size() for v in self.parts.values()) if len(self) else 0

    def nbytes(self) -> int:
        """Bytes of the entries held (the buffers' spare room is not counted)."""
        return sum(v.numel() * v.element_size() for v in self.parts.values())


@dataclass
class V4LayerCache:
    """Decode state of one V4 attention layer.

    window: the last W - 1 window entries; entries / index_keys: compressed entries and
    the CSA indexer's keys; comp / index: the two compressors' states (incomplete block,
    overlap half, entry count); ratio: the layer's block length (0: sliding only);
    pos: position of the next token; decode_weights: the layer's projections as one-token
    decoding uses them, taken at the first such step (a cache belongs to one set of
    weights: its keys were computed with them).
    Build it with :meth:`V4Attention.new_cache` so the stores use the layer's format.
    """

    window: EntryStore
    entries: EntryStore
    index_keys: EntryStore
    comp: CompressorState = field(default_factory=CompressorState)
    index: CompressorState = field(default_factory=CompressorState)
    ratio: int = 0
    pos: int = 0
    decode_weights: dict | None = None  # the layer's matrices for one-token steps (taken at the first)

    @classmethod
    def empty(cls, fmt: str, rope_dim: int, block: int, ratio: int, keep: bool = True) -> V4LayerCache:
        """A fresh cache; ``keep=False`` for a forward without one (nothing is stored)."""
        index_fmt = "fp32" if fmt == "fp32" else "bf16"
        return cls(EntryStore(fmt, rope_dim, block, keep), EntryStore(fmt, rope_dim, block, keep),
                   EntryStore(index_fmt, rope_dim, block, keep), ratio=ratio)

    def bytes_per_token(self) -> float:
        """How fast the cache grows: bytes per token of context, read off the stored
        compressed entries and indexer keys (one of each per ``ratio`` tokens). The window
        is a constant ``window_bytes()`` on top. 0 for a sliding-only layer, and until the
        first block completes."""
        if self.ratio == 0:
            return 0.0
        return (self.entries.bytes_per_entry() + self.index_keys.bytes_per_entry()) / self.ratio

    def window_bytes(self) -> int:
        """Bytes of the full window (W - 1 stored entries), once it has filled."""
        return self.window.nbytes()

    def nbytes(self) -> int:
        """Bytes held by the stored entries (window, compressed, indexer keys); the
        compressors' buffers of at most one incomplete block are not counted."""
        return self.window.nbytes() + self.entries.nbytes() + self.index_keys.nbytes()
