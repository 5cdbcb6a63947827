"""Engram: conditional memory by hashed suffix N-gram lookup (DeepSeek, arXiv 2601.07372).

For every position t, every N-gram order n in ``cfg.ngram_orders`` and every one of
``cfg.heads_per_order`` hash heads, the suffix n-gram of canonical token ids
(c[t-n+1], ..., c[t]) is hashed to one row of that (order, head)'s sub-table; the rows of
all J = len(orders) * heads sub-tables are concatenated into e_t [J * head_dim]. Then

    k_t     = W_K e_t,  v_t = W_V e_t                                  [dim]
    g_t     = <RMSNorm(h_t), RMSNorm(k_t)> / sqrt(dim)
    alpha_t = sigmoid(sign(g_t) sqrt(max(|g_t|, 1e-6)))                 (context-aware gate)
    u_t     = alpha_t * v_t
    y_t     = u_t + SiLU(DepthwiseCausalConv(RMSNorm(u))_t)            (kernel K, dilation max n)

and y joins the residual stream before the block's attention (``Block`` adds it to h).

The gate's signed square root is the paper's official demo's: it compresses large scores
(the gate saturates less) and amplifies small ones (the floor 1e-6 inside the root
bounds its gradient; |g| below it maps to +-1e-3, g = 0 to 0). ``cfg.gate='plain'`` gives
sigmoid(g_t), the gate this lab used before, for comparison.

Several residual streams (hyper-connections, modules/mhc.py). With ``n_streams`` = n the
layer reads the streams h [B, T, n, dim] and writes a delta to every stream, as the
paper's multi-branch integration (its demo): the value projection is shared, but each
stream i has its own key projection W_K^i (W_K stacks them: [n*dim, J*head_dim]) and its
own query and key norm gains, hence its own gate alpha_t^i = gate(h_t^i, k_t^i); the
gated values u^i = alpha^i v are RMS-normalised per stream (own gains) and convolved over
all n*dim channels. With n = 1 the parameters are exactly the single-stream layer's.

Hash. Positions before the sequence start read the pad id ``vocab_size`` (no canonical id
equals it). For sub-table j of order n, with odd multipliers m[j, k] drawn from a
splitmix64 stream seeded by (layer index, j) — fixed integers, the same in every process
and on every torch version —

    mix_j(t) = XOR_{k=0..n-1} (c[t-k] * m[j, k])       (exact in int64: c < 2^31, m < 2^31)
    row_j(t) = offset_j + mix_j(t) mod p_j

where p_j are distinct primes (the smallest primes >= ``cfg.table_size``) and offset_j
places sub-table j in one packed embedding table of sum_j p_j rows.

Host memory. The indices depend only on the input ids, so the model computes them (and,
with ``cfg.host_memory``, gathers the rows on the host and copies them to the compute
device) in :meth:`Engram.prefetch` before any block runs; the layer then reuses them. With
``host_memory`` the table stays in host memory whatever ``.to()`` / ``.cuda()`` is applied
to the model (its optimizer state lives there too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.modules.args import EngramConfig
from v4lab.modules.context import ForwardContext
from v4lab.modules.dwconv import shifted_conv
from v4lab.modules.norm import RMSNorm

_MASK64 = (1 << 64) - 1
HASH_SEED = 0x5EED_E6A1


def _splitmix64(state: int) -> tuple[int, int]:
    """One step of splitmix64: (new state, 64-bit output). Pure Python, version-independent."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def hash_multipliers(layer_idx: int, n_tables: int, max_order: int) -> torch.Tensor:
    """Odd multipliers in [1, 2^31) for each sub-table and N-gram offset: int64 [J, max_order].

    Deterministic in (layer_idx, table, offset): a splitmix64 stream seeded per layer.
    """
    state = (HASH_SEED * 1_000_003 + layer_idx) & _MASK64
    out = []
    for _ in range(n_tables * max_order):
        state, z = _splitmix64(state)
        out.append((z >> 33) | 1)  # top 31 bits, odd
    return torch.tensor(out, dtype=torch.int64).view(n_tables, max_order)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def table_primes(cfg: EngramConfig) -> list[int]:
    """Sizes p_j of the J = len(ngram_orders) * heads_per_order sub-tables, in packed order
    (orders ascending, heads within an order): the smallest J distinct primes >= table_size."""
    n_tables = len(cfg.ngram_orders) * cfg.heads_per_order
    primes, n = [], max(2, cfg.table_size)
    while len(primes) < n_tables:
        if _is_prime(n):
            primes.append(n)
        n += 1
    return primes


def engram_table_params(cfg: EngramConfig) -> int:
    """Embedding-table parameters of all Engram layers (0 when disabled)."""
    if not cfg.enabled:
        return 0
    return sum(table_primes(cfg)) * cfg.head_dim * len(cfg.layers)


def engram_params(model: nn.Module) -> int:
    """All parameters of the Engram modules of ``model`` (tables, projections, norms, conv):
    the figure logged as ``engram/params``."""
    return sum(p.numel() for m in model.modules() if isinstance(m, Engram) for p in m.parameters())


def _stream_rms(u: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """RMSNorm of each stream of u [B, T, n, dim] with its own slice of norm.weight [n*dim]
    (computed in fp32 like RMSNorm)."""
    uf = u.float()
    y = uf * torch.rsqrt(uf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (y * norm.weight.float().view(u.shape[-2], u.shape[-1])).to(u.dtype)


class EngramCache:
    """Decode state of one Engram layer: the convolution's previous inputs.

    state: [B, (kernel_size - 1) * dilation, dim], the normed gated values of the latest
    positions (zeros before the sequence start, like the causal padding of a full forward).
    """

    def __init__(self, batch: int, length: int, dim: int, device: torch.device | str = "cpu"):
        self.state = torch.zeros(batch, length, dim, device=device)


class Engram(nn.Module):
    """Hashed N-gram memory for one layer.

    forward(x [B, T, dim], ctx, cache) -> residual delta [B, T, dim]. Reads ``ctx.input_ids``
    [B, T] (training: positions before 0 are padding) or, when decoding
    (``ctx.caches`` is not None), ``ctx.history_ids`` [B, P + T] so suffixes can reach back
    before the chunk; ``cache`` (:class:`EngramCache`) then carries the convolution state.
    """

    def __init__(self, dim: int, cfg: EngramConfig, layer_idx: int, vocab_size: int,
                 norm_eps: float = 1e-6, n_streams: int = 1) -> None:
        super().__init__()
        if vocab_size >= 2**31:
            raise ValueError(f"vocab_size={vocab_size} too large for the int64 hash (< 2^31)")
        self.dim, self.layer_idx, self.vocab_size = dim, layer_idx, vocab_size
        self.n_streams = n_streams
        width = n_streams * dim  # one key, query/key/conv norm gain and conv channel per stream
        self.head_dim, self.host_memory = cfg.head_dim, cfg.host_memory
        self.signed_sqrt_gate = cfg.gate == "signed_sqrt"
        self.orders = sorted(cfg.ngram_orders)
        self.max_order = max(self.orders)
        self.heads = cfg.heads_per_order
        self.n_tables = len(self.orders) * self.heads
        self.kernel_size, self.dilation = cfg.kernel_size, self.max_order
        primes = table_primes(cfg)
        self.primes = primes
        self.register_buffer("canonical_ids", torch.arange(vocab_size), persistent=True)
        mult = hash_multipliers(layer_idx, self.n_tables, self.max_order)
        table_order = torch.tensor([n for n in self.orders for _ in range(self.heads)])
        mult = mult * (torch.arange(self.max_order)[None, :] < table_order[:, None])  # 0 = unused
        self.register_buffer("multipliers", mult, persistent=False)          # [J, max_order]
        self.register_buffer("table_order", table_order, persistent=False)   # [J]
        self.register_buffer("modulus", torch.tensor(primes), persistent=False)  # [J]
        offsets = torch.tensor([0] + primes[:-1]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)           # [J]

        self.table = nn.Embedding(sum(primes), cfg.head_dim)
        self.table.weight.lr_multiplier = cfg.lr_multiplier  # type: ignore[attr-defined]
        self.table.weight.no_weight_decay = True  # type: ignore[attr-defined]
        e_dim = self.n_tables * cfg.head_dim
        self.w_k = nn.Linear(e_dim, width, bias=False)
        self.w_v = nn.Linear(e_dim, dim, bias=False)
        self.norm_h = RMSNorm(width, norm_eps)
        self.norm_k = RMSNorm(width, norm_eps)
        self.norm_conv = RMSNorm(width, norm_eps)
        # Depthwise causal conv, zero-initialised so the module starts as the gated value.
        self.conv = nn.Conv1d(width, width, cfg.kernel_size, groups=width,
                              dilation=self.dilation, bias=False)
        nn.init.zeros_(self.conv.weight)

    # ---- host memory ----------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """With host_memory, device/dtype moves of the model leave the table untouched."""
        if not self.host_memory:
            return super()._apply(fn, recurse)
        table = self._modules["table"]
        self._modules["table"] = None  # skipped by nn.Module._apply, order preserved
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules["table"] = table

    # ---- canonical ids ----------------------------------------------------------------
    def set_canonical_ids(self, ids: torch.Tensor) -> None:
        """Install the token -> canonical id map: LongTensor [vocab_size], values in
        [0, vocab_size) (see ``v4lab.data.canonical.build_canonical_ids``)."""
        ids = torch.as_tensor(ids)
        if ids.shape != (self.vocab_size,):
            raise ValueError(f"canonical ids must have shape ({self.vocab_size},), got "
                             f"{tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"canonical ids must lie in [0, {self.vocab_size})")
        self.canonical_ids.copy_(ids.to(self.canonical_ids))

    # ---- hashing ------------------------------------------------------------------------
    def window(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        """Canonical ids of the last t tokens of ``ids`` [B, L] plus the max_order - 1 before
        them, left-padded with the pad id ``vocab_size``: [B, t + max_order - 1]."""
        need = t + self.max_order - 1
        c = self.canonical_ids.to(ids.device)[ids[:, -need:]]
        if c.shape[1] < need:
            c = F.pad(c, (need - c.shape[1], 0), value=self.vocab_size)
        return c

    def hash_indices(self, window: torch.Tensor) -> torch.Tensor:
        """Packed-table rows of every (position, sub-table): [B, T, J] from a window
        [B, T + max_order - 1] (see :meth:`window`)."""
        t = window.shape[1] - self.max_order + 1
        mult = self.multipliers.to(window.device)
        mix = torch.zeros(*window.shape[:1], t, self.n_tables, dtype=torch.int64,
                          device=window.device)
        for k in range(self.max_order):  # token at t - k
            tok = window[:, self.max_order - 1 - k: self.max_order - 1 - k + t]
            mix = mix ^ (tok.unsqueeze(-1) * mult[:, k])
        return mix % self.modulus.to(window.device) + self.offsets.to(window.device)

    def _ids(self, ctx: ForwardContext) -> torch.Tensor:
        if ctx.input_ids is None:
            raise ValueError("Engram needs ctx.input_ids")
        if ctx.caches is not None and ctx.history_ids is not None:
            return ctx.history_ids
        return ctx.input_ids

    def prefetch(self, ctx: ForwardContext) -> None:
        """Compute this layer's table indices (and, with host_memory, gather the rows on the
        host and start their copy to the compute device) before any block runs; stored in
        ``ctx.prefetched`` and reused by :meth:`forward`."""
        t = ctx.input_ids.shape[1]
        ids = self._ids(ctx)
        dev = self.table.weight.device
        win = self.window(ids.to(dev), t)
        idx = self.hash_indices(win)
        rows = None
        if self.host_memory:
            rows = self.table(idx).to(ids.device, non_blocking=True)
        ctx.prefetched[self._key] = (win, idx, rows)

    @property
    def _key(self) -> str:
        return f"engram.{self.layer_idx}"

    # ---- statistics -----------------------------------------------------------------------
    @torch.no_grad()
    def collision_rate(self, window: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Bucket collision rate of a batch, averaged over the J sub-tables.

        For sub-table j of order n: the distinct n-grams of canonical ids (pads included)
        occurring in the batch are U_j; a distinct n-gram *collides* when at least one
        other distinct n-gram of the batch hashes to the same row of that sub-table. The
        rate of sub-table j is (#colliding distinct n-grams) / |U_j|. Under uniform hashing
        of |U| n-grams into p rows its expectation is 1 - (1 - 1/p)^(|U| - 1).
        """
        t = idx.shape[1]
        rows_all, sizes = [], []
        for oi, n in enumerate(self.orders):
            grams = torch.stack([window[:, self.max_order - 1 - k: self.max_order - 1 - k + t]
                                 for k in range(n)], dim=-1).reshape(-1, n)
            base = self.vocab_size + 1
            if base**n < 2**63:  # exact single-integer code of the n-gram: a fast 1-d unique
                code = grams[:, 0].clone()
                for k in range(1, n):
                    code = code * base + grams[:, k]
                uniq, inverse = torch.unique(code, return_inverse=True)
            else:
                uniq, inverse = torch.unique(grams, dim=0, return_inverse=True)
            heads = idx[..., oi * self.heads: (oi + 1) * self.heads].reshape(-1, self.heads)
            rows = torch.zeros(len(uniq), self.heads, dtype=torch.int64, device=idx.device)
            rows.scatter_(0, inverse.to(idx.device)[:, None].expand(-1, self.heads), heads)
            rows_all.append(rows.flatten())
            sizes.append(len(uniq))
        # Every sub-table owns a disjoint range of packed rows, so one count over all of them
        # counts each sub-table's rows apart (one sort instead of one per sub-table).
        _, inv_b, counts = torch.unique(torch.cat(rows_all), return_inverse=True,
                                        return_counts=True)
        collides = (counts[inv_b] > 1).float().split([u * self.heads for u in sizes])
        rates = [c.view(u, self.heads).mean(0) for c, u in zip(collides, sizes)]
        return torch.cat(rates).mean()

    # ---- forward ----------------------------------------------------------------------------
    def embed(self, ctx: ForwardContext, t: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(window, indices [B, T, J], e [B, T, J * head_dim]) from ctx.prefetched when
        :meth:`prefetch` ran for this forward, else computed here."""
        pre = ctx.prefetched.get(self._key)
        if pre is None:
            self.prefetch(ctx)
            pre = ctx.prefetched[self._key]
        win, idx, rows = pre
        if rows is None:  # the table's rows; index_select's backward (an index_add into the
            # zero gradient) gives the embedding's gradient bit for bit, in half the time
            rows = self.table.weight.index_select(0, idx.flatten()).view(*idx.shape, -1)
        return win, idx, rows.to(device).flatten(-2)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: EngramCache | None = None
                ) -> torch.Tensor:
        if x.dim() == 4:
            return self._forward_streams(x, ctx, cache)
        b, t, _ = x.shape
        win, idx, e = self.embed(ctx, t, x.device)
        e = e.to(x.dtype)
        k, v = self.w_k(e), self.w_v(e)
        alpha = self.gate(x, k)                                        # [B, T, 1]
        u = (alpha * v).to(x.dtype)
        y = u + F.silu(self._conv(self.norm_conv(u), cache))
        self._stats(ctx, alpha, win, idx)
        return y

    def _forward_streams(self, x: torch.Tensor, ctx: ForwardContext,
                         cache: EngramCache | None) -> torch.Tensor:
        """Streams x [B, T, n, dim] -> delta [B, T, n, dim] (see the module docstring)."""
        b, t, n, d = x.shape
        if n != self.n_streams:
            raise ValueError(f"Engram built for {self.n_streams} streams got {n}")
        win, idx, e = self.embed(ctx, t, x.device)
        e = e.to(x.dtype)
        k = self.w_k(e).unflatten(-1, (n, d))                          # [B, T, n, dim]
        v = self.w_v(e).unsqueeze(-2)                                  # [B, T, 1, dim]
        alpha = self.gate(x, k)                                        # [B, T, n, 1]
        u = (alpha * v).to(x.dtype)                                    # [B, T, n, dim]
        z = _stream_rms(u, self.norm_conv).flatten(-2)                 # [B, T, n*dim]
        y = u + F.silu(self._conv(z, cache)).unflatten(-1, (n, d))
        self._stats(ctx, alpha, win, idx)
        return y

    def _stats(self, ctx: ForwardContext, alpha: torch.Tensor, win: torch.Tensor,
               idx: torch.Tensor) -> None:
        if ctx.records or self.training:
            ctx.add_stat("engram/gate_mean", alpha.mean())
            if ctx.diagnose:  # a unique() per sub-table: skipped on steps nobody reads
                ctx.add_stat("engram/bucket_collision_rate", self.collision_rate(win, idx))

    def gate(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """alpha = sigmoid(sign(g) sqrt(max(|g|, 1e-6))) (or sigmoid(g) with
        cfg.gate='plain') of g = :meth:`gate_score`: [B, T, 1] from h, k [B, T, dim]."""
        score = self.gate_score(h, k)
        if self.signed_sqrt_gate:
            score = score.abs().clamp_min(1e-6).sqrt() * score.sign()
        return torch.sigmoid(score)

    def gate_score(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """g = <RMSNorm_h(h), RMSNorm_k(k)> / sqrt(dim): [B, T, 1], in fp32. Computed as
        <h * k, g_h * g_k> * r_h * r_k with r = 1/rms: the same value as normalising both
        first, with fewer passes over [B, T, dim]."""
        hf, kf = h.float(), k.float()
        r_h = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.norm_h.eps)
        r_k = torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + self.norm_k.eps)
        g = (self.norm_h.weight * self.norm_k.weight).float()
        if h.dim() == 4:  # streams [B, T, n, dim]: each stream with its own gains
            dot = (hf * kf * g.view(self.n_streams, self.dim)).sum(-1, keepdim=True)
            return dot * r_h * r_k / math.sqrt(self.dim)
        return (hf * kf) @ g.unsqueeze(-1) * r_h * r_k / math.sqrt(self.dim)

    def _conv(self, z: torch.Tensor, cache: EngramCache | None) -> torch.Tensor:
        """Depthwise causal dilated conv over time: z [B, T, dim] -> [B, T, dim]; prepends
        the cached previous inputs (or zeros) and updates the cache."""
        pad = (self.kernel_size - 1) * self.dilation
        if cache is not None:
            full = torch.cat([cache.state.to(z.dtype), z], dim=1)
            cache.state = full[:, full.shape[1] - pad:].detach() if pad else full[:, :0]
        else:
            full = F.pad(z, (0, 0, pad, 0))
        # y_t = sum_i w[:, i] * z_{t - (K-1-i) * dilation}: K shifted products (modules/
        # dwconv.py; same weights as nn.Conv1d)
        return shifted_conv(full, self.conv.weight[:, 0, :], self.dilation, z.shape[1])

    # ---- decode / accounting ------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device | str = "cpu") -> EngramCache:
        return EngramCache(batch, (self.kernel_size - 1) * self.dilation,
                           self.n_streams * self.dim, device)

    def inactive_params_per_token(self) -> int:
        """Table parameters not looked up by one token (all rows but its J)."""
        return (self.table.weight.shape[0] - self.n_tables) * self.head_dim
