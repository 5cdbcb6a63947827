"""Configuration dataclasses of the architectural pieces, with validation.

Every field has a default that builds a small working model. ``validate(path)`` checks
values and raises :class:`ConfigError` naming the full key (``path.field``), the bad
value and what is allowed, so a wrong config fails before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from v4lab.errors import ConfigError, require, require_choice, require_positive
from v4lab.modules.v4_config import V4AttentionConfig

KV_DTYPES = ("fp32", "bf16", "fp8", "int8")
KV_SCALE_FORMATS = ("fp32", "ue8m0")
ATTENTION_KINDS = ("mha", "mla", "v4")
MOE_SCORE_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")
ENGRAM_GATES = ("signed_sqrt", "plain")


@dataclass
class KVCacheConfig:
    """How the attention cache is stored (and simulated in training).

    dtype: fp32 | bf16 | fp8 (e4m3, one scale per ``block_size`` values) | int8 (same blocks).
    scale_format: fp32 scales or power-of-two ``ue8m0`` scales (fp8/int8 only).
    """

    dtype: str = "bf16"
    scale_format: str = "fp32"
    block_size: int = 128

    def validate(self, path: str) -> None:
        require_choice(f"{path}.dtype", self.dtype, KV_DTYPES)
        require_choice(f"{path}.scale_format", self.scale_format, KV_SCALE_FORMATS)
        require_positive(f"{path}.block_size", self.block_size)


@dataclass
class SparseConfig:
    """Token-level sparse attention: lightning indexer + causal top-k selection.

    topk: tokens each query attends to (k = min(topk, t + 1)).
    index_n_heads / index_head_dim: indexer query heads and their width (one shared key head).
    index_rope_dim: leading dims of the indexer query/key that carry RoPE (partial RoPE).
    warmup_steps: dense warm-up steps in which only the indexer learns (KL to the main
      attention); after them training is sparse.
    kl_weight: weight of the indexer KL loss added to the LM loss.
    """

    enabled: bool = False
    topk: int = 64
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_rope_dim: int = 16
    warmup_steps: int = 100
    kl_weight: float = 1.0

    def validate(self, path: str) -> None:
        require(isinstance(self.topk, int) and self.topk >= 1, f"{path}.topk", self.topk,
                "an integer >= 1")
        require_positive(f"{path}.index_n_heads", self.index_n_heads)
        require_positive(f"{path}.index_head_dim", self.index_head_dim)
        require(
            self.index_rope_dim >= 0 and self.index_rope_dim % 2 == 0
            and self.index_rope_dim <= self.index_head_dim,
            f"{path}.index_rope_dim", self.index_rope_dim,
            f"an even integer in [0, index_head_dim={self.index_head_dim}]",
        )
        require(self.warmup_steps >= 0, f"{path}.warmup_steps", self.warmup_steps, ">= 0")
        require(self.kl_weight >= 0, f"{path}.kl_weight", self.kl_weight, ">= 0")


@dataclass
class AttentionConfig:
    """Attention kind and sizes.

    kind=mha: plain multi-head attention with ``n_heads`` heads of ``head_dim`` (RoPE on all dims).
    kind=mla: multi-head latent attention (DeepSeek-V2/V3). Queries through a rank
      ``q_lora_rank`` latent (0 = full-rank query projection); keys and values from one
      ``kv_lora_rank`` latent plus a shared decoupled RoPE key of ``qk_rope_head_dim``.
    vvpa: value-vector position awareness (MLA only, see DESIGN.md).
    kind=v4: the released DeepSeek-V4 attention (modules/v4_attention.py), sized by ``v4``
      (its own heads, widths, window, blocks, top-k and cache format; the MLA/MHA fields,
      ``kv_cache`` and ``vvpa`` are not used: V4 always rotates the output back by R(-t)).
      ``compress_ratios`` gives each layer its kind: 0 = sliding window only,
      ``v4.csa_ratio`` = CSA, ``v4.hca_ratio`` = HCA; one entry per layer. V4-Flash: two
      sliding-only layers, then CSA and HCA alternating (CSA first here: an assumption;
      ``v4_cycle: [hca, csa]`` swaps them). Empty = the V4-Flash pattern at the model's depth
      (:func:`v4_layer_ratios`): ``v4_sliding_layers`` sliding-only layers, then the kinds
      of ``v4_cycle`` in turn (['csa', 'hca'] alternating; ['hca'] = no CSA), so one
      experiment fits the tiny and the small model.
    """

    kind: str = "mla"
    n_heads: int = 4
    head_dim: int = 64
    q_lora_rank: int = 96
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    vvpa: bool = False
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    v4: V4AttentionConfig = field(default_factory=V4AttentionConfig)
    compress_ratios: list[int] = field(default_factory=list)
    v4_sliding_layers: int = 2
    v4_cycle: list[str] = field(default_factory=lambda: ["csa", "hca"])

    def layer_ratios(self, n_layers: int) -> list[int]:
        """Compress ratio of every layer (kind v4): ``compress_ratios`` or, when empty, the
        V4-Flash pattern scaled to this config's blocks."""
        if self.compress_ratios:
            return list(self.compress_ratios)
        return v4_layer_ratios(n_layers, self.v4, self.v4_sliding_layers, self.v4_cycle)

    def layer_kinds(self, path: str, n_layers: int) -> list[str]:
        """'sliding' | 'csa' | 'hca' per layer (kind v4), checked: ConfigError naming
        ``path.compress_ratios`` on a wrong length or an unknown ratio."""
        return self.v4.validate_layers(f"{path}.compress_ratios", self.layer_ratios(n_layers), n_layers)

    def validate_sequence(self, path: str, seq_len: int, n_layers: int, what: str = "") -> None:
        """Kind v4: window, blocks and CSA top-k fit sequences of ``seq_len`` tokens
        (``what`` names where the length comes from in the message)."""
        if self.kind != "v4":
            return
        kinds = self.layer_kinds(path, n_layers)
        try:
            self.v4.validate_sequence(f"{path}.v4", seq_len, kinds)
        except ConfigError as e:
            raise ConfigError(f"{e} {what}".rstrip()) from None

    def validate(self, path: str, dim: int, n_layers: int | None = None,
                 max_seq_len: int | None = None) -> None:
        require_choice(f"{path}.kind", self.kind, ATTENTION_KINDS)
        require_positive(f"{path}.n_heads", self.n_heads)
        self.kv_cache.validate(f"{path}.kv_cache")
        self.sparse.validate(f"{path}.sparse")
        if self.kind == "v4":
            self.v4.validate(f"{path}.v4")
            require(isinstance(self.v4_sliding_layers, int) and self.v4_sliding_layers >= 0,
                    f"{path}.v4_sliding_layers", self.v4_sliding_layers, "an integer >= 0")
            require(len(self.v4_cycle) > 0 and all(k in ("csa", "hca") for k in self.v4_cycle),
                    f"{path}.v4_cycle", self.v4_cycle, "a non-empty list of 'csa' and 'hca'")
            if n_layers is None:
                return
            kinds = self.layer_kinds(path, n_layers)
            require(not (self.sparse.enabled and "csa" in kinds), f"{path}.sparse.enabled",
                    self.sparse.enabled, "false when attention.kind='v4' has CSA layers (CSA "
                    "already selects top-k entries with its own indexer; token-level sparse MLA "
                    "is an MLA switch)")
            if max_seq_len is not None:  # the decode cache holds at most max_seq_len tokens
                self.validate_sequence(path, max_seq_len, n_layers,
                                       f"(model.max_seq_len={max_seq_len}, the cache's length)")
            return
        require(not self.compress_ratios, f"{path}.compress_ratios", self.compress_ratios,
                f"empty unless {path}.kind='v4' (kind is {self.kind!r})")
        if self.kind == "mha":
            require(dim % self.n_heads == 0, f"{path}.n_heads", self.n_heads,
                    f"a divisor of model.dim={dim}")
            require(self.head_dim > 0 and self.head_dim % 2 == 0, f"{path}.head_dim",
                    self.head_dim, "a positive even integer (RoPE rotates pairs)")
            require(not self.sparse.enabled, f"{path}.sparse.enabled", self.sparse.enabled,
                    "false when attention.kind='mha' (sparse attention needs MLA)")
            require(not self.vvpa, f"{path}.vvpa", self.vvpa,
                    "false when attention.kind='mha' (VVPA is defined on MLA)")
            require(self.kv_cache.dtype in ("fp32", "bf16"), f"{path}.kv_cache.dtype",
                    self.kv_cache.dtype, "'fp32' or 'bf16' when attention.kind='mha'")
            return
        require(self.q_lora_rank >= 0, f"{path}.q_lora_rank", self.q_lora_rank,
                ">= 0 (0 = no query compression)")
        require_positive(f"{path}.kv_lora_rank", self.kv_lora_rank)
        require_positive(f"{path}.qk_nope_head_dim", self.qk_nope_head_dim)
        require_positive(f"{path}.v_head_dim", self.v_head_dim)
        require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                f"{path}.qk_rope_head_dim", self.qk_rope_head_dim,
                "a positive even integer (RoPE rotates pairs)")
        if self.kv_cache.dtype in ("fp8", "int8"):
            bs = self.kv_cache.block_size
            require(self.kv_lora_rank % bs == 0, f"{path}.kv_lora_rank", self.kv_lora_rank,
                    f"a multiple of kv_cache.block_size={bs} when kv_cache.dtype="
                    f"{self.kv_cache.dtype!r}")


def v4_layer_ratios(n_layers: int, v4: V4AttentionConfig, sliding_layers: int,
                    cycle: list[str]) -> list[int]:
    """The V4-Flash layer pattern at any depth: ``sliding_layers`` sliding-only layers (as
    many as leave room for one round of ``cycle``; none without the window), then the
    compressed kinds of ``cycle`` in turn (V4-Flash: 2, then csa, hca, csa, hca, ...)."""
    ratio = {"csa": v4.csa_ratio, "hca": v4.hca_ratio}
    head = min(sliding_layers, max(n_layers - len(cycle), 0)) if v4.use_window else 0
    return [0] * head + [ratio[cycle[i % len(cycle)]] for i in range(n_layers - head)]


@dataclass
class MoEConfig:
    """DeepSeekMoE: shared experts + fine-grained routed experts with top-k routing.

    score_func: sigmoid | softmax | sqrtsoftplus (affinity s_i of token to expert i).
    bias_update_rate: auxiliary-loss-free balancing step (0 disables the bias update).
    aux_loss_alpha: weight of the optional sequence-wise balance loss (0 = off).
    n_groups / topk_groups: group-limited routing as in DeepSeek-V3 (1/1 = off): a group's
      score is the sum of its top-2 biased scores; only the topk_groups best groups stay
      eligible for the top-k selection.
    Shared experts form one SwiGLU of width n_shared_experts * expert_dim (V3 convention).
    hash_layers: the first ``hash_layers`` MoE layers route by a frozen token-id -> experts
      table (DeepSeek-V4's hash routing), generated from ``hash_seed`` and the layer index;
      their gate weights still come from the learned scores (no bias).
    swiglu_limit: > 0 clamps every expert's SwiGLU (routed and shared) as DeepSeek-V4 does
      (10 there): up projection to [-limit, limit], gate projection to <= limit. 0 = off.
    """

    enabled: bool = False
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    expert_dim: int = 128
    first_dense_layers: int = 1
    route_scale: float = 1.0
    score_func: str = "sigmoid"
    bias_update_rate: float = 1e-3
    aux_loss_alpha: float = 0.0
    n_groups: int = 1
    topk_groups: int = 1
    hash_layers: int = 0
    hash_seed: int = 0
    swiglu_limit: float = 0.0

    def is_hash_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` is one of the first ``hash_layers`` MoE layers."""
        first = self.first_dense_layers
        return self.enabled and first <= layer_idx < first + self.hash_layers

    def validate(self, path: str, n_layers: int) -> None:
        require_choice(f"{path}.score_func", self.score_func, MOE_SCORE_FUNCS)
        if not self.enabled:
            return
        require_positive(f"{path}.n_routed_experts", self.n_routed_experts)
        require(self.n_shared_experts >= 0, f"{path}.n_shared_experts", self.n_shared_experts,
                ">= 0")
        require(isinstance(self.top_k, int) and 1 <= self.top_k <= self.n_routed_experts,
                f"{path}.top_k", self.top_k,
                f"an integer in [1, n_routed_experts={self.n_routed_experts}]")
        require_positive(f"{path}.expert_dim", self.expert_dim)
        require(0 <= self.first_dense_layers <= n_layers, f"{path}.first_dense_layers",
                self.first_dense_layers, f"an integer in [0, model.n_layers={n_layers}]")
        require(self.route_scale > 0, f"{path}.route_scale", self.route_scale, "> 0")
        require(self.bias_update_rate >= 0, f"{path}.bias_update_rate",
                self.bias_update_rate, ">= 0")
        require(self.aux_loss_alpha >= 0, f"{path}.aux_loss_alpha", self.aux_loss_alpha, ">= 0")
        require(self.n_groups >= 1 and self.n_routed_experts % self.n_groups == 0,
                f"{path}.n_groups", self.n_groups,
                f"a divisor of n_routed_experts={self.n_routed_experts}")
        require(1 <= self.topk_groups <= self.n_groups, f"{path}.topk_groups",
                self.topk_groups, f"an integer in [1, n_groups={self.n_groups}]")
        n_moe = n_layers - self.first_dense_layers
        require(isinstance(self.hash_layers, int) and 0 <= self.hash_layers <= n_moe,
                f"{path}.hash_layers", self.hash_layers,
                f"an integer in [0, {n_moe}] (the MoE layers: model.n_layers={n_layers} - "
                f"first_dense_layers={self.first_dense_layers})")
        require(isinstance(self.hash_seed, int), f"{path}.hash_seed", self.hash_seed, "an integer")
        require(self.swiglu_limit >= 0, f"{path}.swiglu_limit", self.swiglu_limit,
                ">= 0 (0 = no clamp)")
        eligible = self.topk_groups * (self.n_routed_experts // self.n_groups)
        require(self.top_k <= eligible, f"{path}.top_k", self.top_k,
                f"<= topk_groups * n_routed_experts / n_groups = {eligible} (experts in the "
                "groups kept by group-limited routing)")


@dataclass
class EngramConfig:
    """Engram conditional memory: hashed suffix N-gram lookup into one packed table.

    layers: indices of the blocks that get an Engram module (before attention).
    ngram_orders: N-gram orders (each >= 2); heads_per_order hash heads each.
    table_size: target rows per (order, head) table; each uses a distinct prime near it.
    head_dim: width of one head's embedding row; e_t concatenates all heads.
    kernel_size: depthwise causal convolution kernel (dilation = max order).
    lr_multiplier: learning-rate multiplier of the table's optimizer group (no weight decay).
    host_memory: keep the table in host memory, indices computed before the layer runs.
    gate: signed_sqrt = sigmoid(sign(g) sqrt|g|) of the scaled dot product g, as the Engram
      paper's demo; plain = sigmoid(g), the lab's earlier gate, kept for comparison.
    """

    enabled: bool = False
    layers: list[int] = field(default_factory=lambda: [1])
    ngram_orders: list[int] = field(default_factory=lambda: [2, 3])
    heads_per_order: int = 4
    table_size: int = 4099
    head_dim: int = 32
    kernel_size: int = 4
    lr_multiplier: float = 5.0
    host_memory: bool = False
    gate: str = "signed_sqrt"

    def validate(self, path: str, n_layers: int) -> None:
        require_choice(f"{path}.gate", self.gate, ENGRAM_GATES)
        if not self.enabled:
            return
        require(len(self.layers) > 0, f"{path}.layers", self.layers, "a non-empty list")
        for i in self.layers:
            require(isinstance(i, int) and 0 <= i < n_layers, f"{path}.layers", self.layers,
                    f"layer indices in [0, model.n_layers-1={n_layers - 1}]")
        require(len(self.ngram_orders) > 0, f"{path}.ngram_orders", self.ngram_orders,
                "a non-empty list")
        for n in self.ngram_orders:
            require(isinstance(n, int) and n >= 2, f"{path}.ngram_orders", self.ngram_orders,
                    "N-gram orders >= 2")
        require_positive(f"{path}.heads_per_order", self.heads_per_order)
        require(self.table_size >= self.heads_per_order, f"{path}.table_size",
                self.table_size, f">= heads_per_order={self.heads_per_order}")
        require_positive(f"{path}.head_dim", self.head_dim)
        require_positive(f"{path}.kernel_size", self.kernel_size)
        require(self.lr_multiplier > 0, f"{path}.lr_multiplier", self.lr_multiplier, "> 0")


@dataclass
class HyperConnectionConfig:
    """Hyper-connections: the residual is ``n_streams`` parallel streams (modules/mhc.py).

    enabled: false = the plain residual (one stream, x + f(x)).
    n_streams: residual streams (4 in DeepSeek-V4); the embedding is copied into all.
    sinkhorn_iters: Sinkhorn normalisation rounds making the residual-mixing matrix doubly
      stochastic (20 in V4).
    eps: added to the pre weights and to every Sinkhorn denominator (V4's hc_eps).
    constrained: true = manifold-constrained (mHC, Sinkhorn); false = unconstrained
      hyper-connections: the mixing matrix is identity + the learned map, no Sinkhorn.
    """

    enabled: bool = False
    n_streams: int = 4
    sinkhorn_iters: int = 20
    eps: float = 1e-6
    constrained: bool = True

    def validate(self, path: str) -> None:
        require(isinstance(self.n_streams, int) and self.n_streams >= 1, f"{path}.n_streams",
                self.n_streams, "an integer >= 1")
        require(isinstance(self.sinkhorn_iters, int) and self.sinkhorn_iters >= 1,
                f"{path}.sinkhorn_iters", self.sinkhorn_iters, "an integer >= 1")
        require(self.eps >= 0, f"{path}.eps", self.eps, ">= 0")
