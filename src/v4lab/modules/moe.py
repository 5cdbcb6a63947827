"""DeepSeekMoE: shared experts plus fine-grained routed experts with top-k routing.

Routing follows DeepSeek-V3's conventions:

    u = x W_g^T                                   router logits        [N, E]
    s = score_func(u)                             affinities           [N, E]
        sigmoid(u) | softmax(u) | sqrt(softplus(u))
    c = s + b                                     biased scores, for SELECTION only
    (group-limited: group score = sum of the top-2 c in each of n_groups groups;
     only the topk_groups best groups stay eligible)
    I = top_k(c)                                  selected experts     [N, k]
    g = route_scale * s_I / sum(s_I)              gates (unbiased, normalised)
    y = sum_k g_k FFN_{I_k}(x) + FFN_shared(x)

The balancing bias ``b`` is a buffer with no gradient. Auxiliary-loss-free balancing
moves it by ``bias_update_rate`` toward under-loaded experts after every optimizer step
(``on_train_step_end``), from the load counted in the training forwards since the last
step. An optional sequence-wise balance loss (``aux_loss_alpha`` > 0) is reported to the
forward context.

Dispatch: the N*k (token, expert) pairs are sorted by expert, so every expert sees one
contiguous segment of rows; each expert runs one matrix product per weight on its
segment (or all segments run as one grouped GEMM: ``RoutedExperts.use_grouped_mm``,
off by default). The gate scales each row's hidden activations, and index_add sums the k
outputs back into their token (deterministic on CPU; atomic adds on CUDA). No Python loop
over tokens and no dense mask over all experts.

Group-limited routing masks the experts of dropped groups with -inf, as DeepSeek-V3's
reference inference code and transformers' DeepseekV3 (5.23) do; tests/test_peer.py
checks the whole model against the latter.

DeepSeek-V4 additions (both off by default):

- Hash routing (``hash_layers``): the first MoE layers select experts by a frozen
  token-id -> experts table ``tid2eid`` [vocab, k] instead of top_k(c); the gates are still
  g = route_scale * s_I / sum(s_I) from the learned, unbiased affinities (as V4's
  reference: no balancing bias, no group limit, no balance loss on these layers). The
  table is a persistent buffer (saved in checkpoints), drawn from a seeded generator of
  its own: k distinct experts per token, uniformly at random (V4 ships its table in the
  checkpoint; how it was built is not published). The layer then needs the token ids.
- SwiGLU clamp (``swiglu_limit``): every expert, routed and shared, computes
  SiLU(min(W1 x, limit)) * clamp(W3 x, -limit, limit) (ffn.swiglu).

Note vs. DeepSeek-V3: V3 renormalises the selected gates only for sigmoid scores; here
they are renormalised for every score function (DESIGN.md section 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.modules.args import MoEConfig
from v4lab.modules.ffn import SwiGLU, swiglu


def affinity(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Token-to-expert affinities s from router logits u [N, E] (float32 in, float32 out)."""
    if score_func == "sigmoid":
        return logits.sigmoid()
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    if score_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    raise ValueError(f"unknown score_func {score_func!r}")


class Gate(nn.Module):
    """Router: picks top_k experts per token and their gate weights.

    forward(x [N, dim]) -> (gates [N, k] float32, indices [N, k] int64, scores [N, E] float32)
    where ``scores`` are the unbiased affinities s (the balance loss uses them).
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.top_k
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.n_groups = cfg.n_groups
        self.topk_groups = cfg.topk_groups
        self.proj = nn.Linear(dim, cfg.n_routed_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)
        # Balancing bias b_i: used for selection only, updated outside autograd; saved
        # with the model (persistent buffer).
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):  # route in fp32
            logits = F.linear(x.float(), self.proj.weight.float())
        scores = affinity(logits, self.score_func)
        choice = scores + self.bias
        if self.n_groups > 1:
            n = x.shape[0]
            grouped = choice.view(n, self.n_groups, -1)
            per_group = min(2, grouped.shape[-1])
            group_scores = grouped.topk(per_group, dim=-1).values.sum(dim=-1)  # [N, G]
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(n, -1)
        indices = choice.topk(self.top_k, dim=-1).indices
        return selected_gates(scores, indices, self.route_scale), indices, scores


def selected_gates(scores: torch.Tensor, indices: torch.Tensor, route_scale: float) -> torch.Tensor:
    """g = route_scale * s_I / sum(s_I): the unbiased affinities of the selected experts
    [N, k], renormalised (float32)."""
    gates = scores.gather(1, indices)
    return gates / (gates.sum(dim=-1, keepdim=True) + 1e-20) * route_scale


def hash_table(vocab_size: int, n_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """A token-id -> experts table: int64 [vocab_size, top_k], k distinct experts per token
    drawn uniformly from a generator seeded with ``seed`` (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(vocab_size, n_experts, generator=g).argsort(dim=-1)[:, :top_k].contiguous()


class HashGate(nn.Module):
    """Hash router (DeepSeek-V4): experts from the frozen table, gates from learned scores.

    forward(x [N, dim], ids [N]) -> (gates [N, k] float32, indices [N, k] int64,
    scores [N, E] float32), like :class:`Gate` but with no balancing bias.
    """

    def __init__(self, dim: int, cfg: MoEConfig, vocab_size: int, seed: int) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.top_k
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.proj = nn.Linear(dim, cfg.n_routed_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)
        self.register_buffer("tid2eid", hash_table(vocab_size, cfg.n_routed_experts, cfg.top_k,
                                                   seed), persistent=True)

    def forward(self, x: torch.Tensor, ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):  # route in fp32
            logits = F.linear(x.float(), self.proj.weight.float())
        scores = affinity(logits, self.score_func)
        indices = self.tid2eid[ids]
        return selected_gates(scores, indices, self.route_scale), indices, scores


class RoutedExperts(nn.Module):
    """``n`` SwiGLU experts as stacked weights: w1, w3 [n, dim, hidden], w2 [n, hidden, dim].

    forward(x [M, dim] rows sorted by expert, counts: rows per expert, summing to M,
    scale [M] optional per-row factor) -> [M, dim]: expert e applied to its segment of rows,
    each row's output times its scale (applied to the hidden activations, which are
    narrower than dim, so cheaper than scaling the output).
    """

    def __init__(self, n: int, dim: int, hidden: int, limit: float = 0.0) -> None:
        super().__init__()
        self.limit = limit  # SwiGLU clamp (ffn.swiglu); 0 = off
        self.w1 = nn.Parameter(torch.empty(n, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, dim))
        # True: one grouped GEMM (F.grouped_mm) over all segments instead of one product
        # per segment. torch 2.13's CPU grouped_mm gives the same results but was not
        # reliably faster here (within noise on 1 thread, a third faster to a third slower
        # on 2 across runs on a shared 2-core machine, benchmarks/results/moe_dispatch.md),
        # so it is off by default.
        self.use_grouped_mm = False
        self.init_weights(0.02)

    def init_weights(self, std: float) -> None:
        """Normal(0, std) like nn.Linear weights in the model (Transformer calls this)."""
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=std)

    def forward(self, x: torch.Tensor, counts: list[int],
                scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None:
            scale = x.new_ones(x.shape[0])
        scale = scale.to(x.dtype).unsqueeze(-1)
        if self.use_grouped_mm and hasattr(F, "grouped_mm"):
            offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
            h = swiglu(F.grouped_mm(x, self.w1, offs=offs), F.grouped_mm(x, self.w3, offs=offs),
                       self.limit)
            return F.grouped_mm(h * scale, self.w2, offs=offs)
        # split / unbind (not x[a:b], w[e]): their backward is one cat / stack instead of
        # a zero-filled full-size gradient per expert.
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        outs = [(swiglu(xe @ w1[e], xe @ w3[e], self.limit) * se) @ w2[e]
                for e, (xe, se) in enumerate(zip(x.split(counts), scale.split(counts)))
                if counts[e] > 0]
        return torch.cat(outs) if outs else x.new_zeros(0, self.w2.shape[-1])


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int,
                          alpha: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over the sequences of a batch.

    scores: [B*T, E] affinities s; indices: [B*T, k] selected experts.
    Per sequence: f_i = E / (k T) * #tokens routed to i, P_i = mean_t s_i,t / sum_j s_j,t,
    loss = alpha * sum_i f_i P_i (equals alpha when routing is perfectly balanced).
    """
    n, e = scores.shape
    k = indices.shape[1]
    t = n // batch
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, t, e).mean(dim=1)
    ones = torch.ones(batch, t * k, device=scores.device, dtype=scores.dtype)
    counts = torch.zeros(batch, e, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, indices.reshape(batch, t * k), ones)
    f = counts * (e / (k * t))
    return alpha * (f * probs).sum(dim=-1).mean()


class MoE(nn.Module):
    """DeepSeekMoE feed-forward layer.

    forward(x [B, T, dim], ctx, input_ids) -> [B, T, dim]. ``ctx`` (a ForwardContext, or
    None when used standalone) receives, in training mode, the statistics ``moe/load_cv``,
    ``moe/max_over_mean``, ``moe/dead_experts``, ``moe/bias_min``, ``moe/bias_max`` and,
    when ``aux_loss_alpha`` > 0, the loss ``moe/aux_loss`` (the last three not on
    hash-routed layers, which have no bias and no choice to balance).
    Shared experts are one SwiGLU of width n_shared_experts * expert_dim.

    Block ``layer_idx`` routes by hash when ``cfg.is_hash_layer(layer_idx)``; it then
    reads the token ids [B, T] from ``input_ids`` or else ``ctx.input_ids``, and its table
    covers ``vocab_size`` ids.
    """

    def __init__(self, dim: int, cfg: MoEConfig, layer_idx: int | None = None,
                 vocab_size: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.top_k
        self.expert_dim = cfg.expert_dim
        self.bias_update_rate = cfg.bias_update_rate
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.hashed = layer_idx is not None and cfg.is_hash_layer(layer_idx)
        if self.hashed:
            if vocab_size is None:
                raise ValueError(f"MoE layer {layer_idx} is hash-routed: it needs vocab_size")
            # a distinct table per layer, the same in every process for a given hash_seed
            self.gate = HashGate(dim, cfg, vocab_size, cfg.hash_seed * 1_000_003 + layer_idx)
        else:
            self.gate = Gate(dim, cfg)
        limit = cfg.swiglu_limit
        self.experts = RoutedExperts(cfg.n_routed_experts, dim, cfg.expert_dim, limit)
        self.shared = (SwiGLU(dim, cfg.n_shared_experts * cfg.expert_dim, limit)
                       if cfg.n_shared_experts > 0 else None)
        # (token, expert) assignments counted in training forwards since the last step.
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def params_per_expert(self) -> int:
        return 3 * self.dim * self.expert_dim

    def inactive_params_per_token(self) -> int:
        """Routed-expert parameters a token does not use: (n_routed - top_k) experts."""
        return (self.n_experts - self.top_k) * self.params_per_expert()

    def forward(self, x: torch.Tensor, ctx=None, input_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        if self.hashed:
            gates, indices, scores = self.gate(flat, self._token_ids(b, t, ctx, input_ids))
        else:
            gates, indices, scores = self.gate(flat)
        k = self.top_k
        # Sort the N*k (token, expert) pairs by expert: contiguous segment per expert.
        pair_expert = indices.reshape(-1)
        order = pair_expert.argsort(stable=True)
        counts = torch.bincount(pair_expert, minlength=self.n_experts)
        token = order // k  # source token of each sorted pair
        # index_select, not flat[token]: the same rows, about 2.5x faster on CPU forward, and
        # its backward is an index_add (not an accumulating index_put)
        y = self.experts(flat.index_select(0, token), counts.tolist(),
                         gates.reshape(-1).index_select(0, order))
        # sum the k gated outputs per token (y is bf16 under autocast: accumulate in y's dtype)
        out = flat.new_zeros(flat.shape, dtype=y.dtype).index_add_(0, token, y)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training:
            self._record(counts, scores, indices, b, ctx)
        return out.view(b, t, d)

    @staticmethod
    def _token_ids(b: int, t: int, ctx, input_ids: torch.Tensor | None) -> torch.Tensor:
        """The ids [B*T] a hash-routed layer routes by: ``input_ids`` or ``ctx.input_ids``."""
        ids = input_ids if input_ids is not None else getattr(ctx, "input_ids", None)
        if ids is None:
            raise ValueError("a hash-routed MoE layer needs the token ids: pass input_ids= "
                             "or a ForwardContext with input_ids")
        if ids.shape != (b, t):
            raise ValueError(f"token ids of shape {tuple(ids.shape)} do not match the input "
                             f"[{b}, {t}, dim]")
        return ids.reshape(-1)

    def _record(self, counts: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor,
                batch: int, ctx) -> None:
        """Count load for the bias update; report statistics and the balance loss."""
        with torch.no_grad():
            load = counts.to(self.load.dtype)
            self.load += load
        if ctx is None:
            return
        mean = load.mean()
        ctx.add_stat("moe/load_cv", load.std(unbiased=False) / mean)
        ctx.add_stat("moe/max_over_mean", load.max() / mean)
        ctx.add_stat("moe/dead_experts", (load == 0).sum())
        if self.hashed:
            return
        ctx.add_stat("moe/bias_min", self.gate.bias.min())
        ctx.add_stat("moe/bias_max", self.gate.bias.max())
        if self.aux_loss_alpha > 0:
            ctx.add_loss("moe/aux_loss",
                         sequence_balance_loss(scores, indices, batch, self.aux_loss_alpha))

    @torch.no_grad()
    def on_train_step_end(self) -> None:
        """After an optimizer step: b_i += rate * sign(mean load - load_i); reset the count.

        With several processes (DDP/FSDP) the load is summed over ranks first: the bias
        follows the global batch's load, and every rank applies the same update."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.load)
        if self.bias_update_rate > 0 and self.load.sum() > 0 and not self.hashed:
            self.gate.bias += self.bias_update_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()
