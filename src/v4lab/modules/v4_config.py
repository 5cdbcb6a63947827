"""Configuration of the DeepSeek-V4 attention (modules/v4_attention.py), with validation.

Kept apart from the layer so a model config can embed :class:`V4AttentionConfig` without
importing torch modules (no import cycle through modules/args.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from v4lab.errors import require, require_choice, require_positive

KV_FORMATS = ("fp32", "bf16", "fp8")
LAYER_KINDS = ("sliding", "csa", "hca")


@dataclass
class V4AttentionConfig:
    """The V4 attention of one model (all layers); the layer kind comes from its compress ratio.

    window: sliding-window length W (keys s with t - W < s <= t).
    csa_ratio / hca_ratio: block lengths m (CSA) and m' (HCA); a layer's ratio 0 = sliding only.
    overlap: CSA entries pool 2m tokens (previous block's Ca half + this block's Cb half).
    index_n_heads / index_head_dim / csa_topk: the CSA lightning indexer and its top-k.
    o_groups / o_lora_rank: grouped output projection (heads split into o_groups groups).
    yarn_factor / yarn_original_len: YaRN on the compressed layers' RoPE (factor 1 = off).
    kv_dtype / kv_block: cache format fp32 | bf16 | fp8 (nope e4m3, one scale per kv_block
      values, rope bf16); training sees the same rounding.
    index_kl_weight: weight of the CSA indexer's KL loss (its only training signal: KL from
      the main attention over the compressed entries to the indexer's scores, as the lab's
      sparse MLA trains its indexer); 0 = the indexer is not trained.
    index_warmup_steps: training steps in which CSA attends to every complete entry (dense)
      while the indexer learns; sparse top-k after them.
    """

    n_heads: int = 4
    head_dim: int = 64
    rope_dim: int = 16
    q_lora_rank: int = 64
    window: int = 64
    use_window: bool = True
    sink: bool = True
    csa_ratio: int = 4
    hca_ratio: int = 16
    overlap: bool = True
    index_n_heads: int = 4
    index_head_dim: int = 32
    csa_topk: int = 16
    o_groups: int = 2
    o_lora_rank: int = 64
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 1.0
    yarn_original_len: int = 0
    norm_eps: float = 1e-6
    kv_dtype: str = "fp32"
    kv_block: int = 64
    index_kl_weight: float = 1.0
    index_warmup_steps: int = 0

    def validate(self, path: str) -> None:
        for name in ("n_heads", "head_dim", "rope_dim", "q_lora_rank", "window", "csa_ratio", "hca_ratio",
                     "index_n_heads", "index_head_dim", "csa_topk", "o_groups", "o_lora_rank"):
            require_positive(f"{path}.{name}", getattr(self, name))
        for name in ("use_window", "sink", "overlap"):
            value = getattr(self, name)
            require(isinstance(value, bool), f"{path}.{name}", value, "true or false")
        width = min(self.head_dim, self.index_head_dim)
        require(self.rope_dim % 2 == 0 and self.rope_dim <= width, f"{path}.rope_dim", self.rope_dim,
                f"an even number <= head_dim and index_head_dim ({width})")
        require(self.n_heads % self.o_groups == 0, f"{path}.o_groups", self.o_groups,
                f"a divisor of n_heads ({self.n_heads})")
        require(self.csa_ratio != self.hca_ratio, f"{path}.hca_ratio", self.hca_ratio,
                f"different from csa_ratio ({self.csa_ratio}): the ratio names the layer kind")
        require(self.yarn_factor >= 1.0, f"{path}.yarn_factor", self.yarn_factor,
                "a number >= 1 (1 = no YaRN)")
        if self.yarn_factor > 1.0:
            require_positive(f"{path}.yarn_original_len", self.yarn_original_len)
        require(self.index_kl_weight >= 0, f"{path}.index_kl_weight", self.index_kl_weight, ">= 0")
        require(isinstance(self.index_warmup_steps, int) and self.index_warmup_steps >= 0,
                f"{path}.index_warmup_steps", self.index_warmup_steps, "an integer >= 0")
        require_choice(f"{path}.kv_dtype", self.kv_dtype, KV_FORMATS)
        if self.kv_dtype == "fp8":
            nope = self.head_dim - self.rope_dim
            require(isinstance(self.kv_block, int) and self.kv_block > 0 and nope % self.kv_block == 0,
                    f"{path}.kv_block", self.kv_block, f"a positive divisor of head_dim - rope_dim ({nope})")

    def layer_kind(self, key: str, ratio: int) -> str:
        """'sliding' | 'csa' | 'hca' for a layer's compress ratio; ``key`` names it in errors."""
        kinds = {0: "sliding", self.csa_ratio: "csa", self.hca_ratio: "hca"}
        require(ratio in kinds, key, ratio,
                f"0 (sliding only), csa_ratio ({self.csa_ratio}) or hca_ratio ({self.hca_ratio})")
        kind = kinds[ratio]
        require(kind != "sliding" or self.use_window, key, ratio,
                "a compressed layer: with use_window=false a sliding-only layer would attend to nothing")
        return kind

    def validate_layers(self, path: str, ratios: list[int], n_layers: int) -> list[str]:
        """Check a per-layer ``compress_ratios`` list (``path`` is its key); returns the kinds."""
        require(len(ratios) == n_layers, path, ratios, f"a list of {n_layers} ratios, one per layer")
        return [self.layer_kind(f"{path}[{i}]", r) for i, r in enumerate(ratios)]

    def validate_sequence(self, path: str, seq_len: int, kinds: list[str]) -> None:
        """Window, blocks and top-k must fit a sequence of ``seq_len`` tokens."""
        if self.use_window:
            require(self.window <= seq_len, f"{path}.window", self.window,
                    f"<= the sequence length {seq_len}")
        if "hca" in kinds:
            require(self.hca_ratio <= seq_len, f"{path}.hca_ratio", self.hca_ratio,
                    f"<= the sequence length {seq_len} (else no block ever completes)")
        if "csa" in kinds:
            n_blocks = seq_len // self.csa_ratio
            require(1 <= self.csa_topk <= n_blocks, f"{path}.csa_topk", self.csa_topk,
                    f"between 1 and the number of CSA blocks in the sequence ({seq_len} // "
                    f"{self.csa_ratio} = {n_blocks})")
