"""The v4lab language model: a pre-norm decoder assembled from a :class:`ModelConfig`.

With every switch off it is a plain decoder (RMSNorm, RoPE, SwiGLU, multi-head causal
attention). Each architectural piece is one module under ``v4lab.modules`` and one
switch here:

    attention.kind      mha | mla | v4       (modules/attention.py, mla.py, v4_attention.py)
    attention.sparse    lightning indexer    (modules/sparse.py)
    attention.vvpa      position in values   (modules/mla.py)
    attention.kv_cache  fp32 | bf16 | fp8 | int8 storage
    moe.enabled         DeepSeekMoE          (modules/moe.py)
    engram.enabled      Engram memory        (modules/engram.py)
    hc.enabled          hyper-connections    (modules/mhc.py): n residual streams
    mtp.depth           multi-token predict. (modules/mtp.py): 0 = off, 1 = one MTP block

Decoding: ``Transformer.prefill`` / ``generate`` (the one decode loop); with
``speculative=True`` the MTP block drafts (v4lab/decode.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.decode import generate_speculative
from v4lab.errors import require, require_positive
from v4lab.modules.args import AttentionConfig, EngramConfig, HyperConnectionConfig, MoEConfig
from v4lab.modules.attention import MultiHeadAttention
from v4lab.modules.context import ForwardContext
from v4lab.modules.ffn import SwiGLU
from v4lab.modules.mtp import MTPConfig
from v4lab.modules.norm import RMSNorm


@dataclass
class ModelConfig:
    """Everything that defines the network. Sizes default to a tiny working model."""

    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    ffn_dim: int = 683
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    hc: HyperConnectionConfig = field(default_factory=HyperConnectionConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)

    def validate(self, path: str = "model") -> ModelConfig:
        for key in ("vocab_size", "dim", "n_layers", "ffn_dim", "max_seq_len"):
            require_positive(f"{path}.{key}", getattr(self, key))
        require(self.rope_theta > 0, f"{path}.rope_theta", self.rope_theta, "> 0")
        require(self.norm_eps > 0, f"{path}.norm_eps", self.norm_eps, "> 0")
        require(self.init_std > 0, f"{path}.init_std", self.init_std, "> 0")
        self.attention.validate(f"{path}.attention", self.dim, self.n_layers, self.max_seq_len)
        self.moe.validate(f"{path}.moe", self.n_layers)
        self.engram.validate(f"{path}.engram", self.n_layers)
        self.hc.validate(f"{path}.hc")
        self.mtp.validate(f"{path}.mtp")
        return self

    def mtp_block_config(self) -> ModelConfig:
        """The config the MTP block is built from: the model's own, without the pieces that
        belong to the main stack (hyper-connection streams: the MTP block reads and writes
        one stream, h after the head's collapse; Engram)."""
        return dataclasses.replace(
            self, hc=dataclasses.replace(self.hc, enabled=False),
            engram=dataclasses.replace(self.engram, enabled=False))


def v4_layer_kind(cfg: ModelConfig, layer_idx: int) -> str:
    """Kind ('sliding' | 'csa' | 'hca') of V4 attention layer ``layer_idx``. The MTP block
    (index n_layers) gets a sliding-window layer, or the last layer's kind without the
    window (an assumption: the lab does not know the released MTP layer's attention)."""
    a = cfg.attention
    kinds = a.layer_kinds("model.attention", cfg.n_layers)
    if layer_idx < cfg.n_layers:
        return kinds[layer_idx]
    return "sliding" if a.v4.use_window else kinds[-1]


def build_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if cfg.attention.kind == "mha":
        return MultiHeadAttention(cfg.dim, cfg.attention, cfg.rope_theta)
    if cfg.attention.kind == "v4":
        from v4lab.modules.v4_attention import V4Attention

        return V4Attention(cfg.dim, cfg.attention.v4, v4_layer_kind(cfg, layer_idx))
    from v4lab.modules.mla import MultiHeadLatentAttention

    return MultiHeadLatentAttention(cfg.dim, cfg.attention, cfg.rope_theta, cfg.norm_eps)


def build_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if cfg.moe.enabled and layer_idx >= cfg.moe.first_dense_layers:
        from v4lab.modules.moe import MoE

        return MoE(cfg.dim, cfg.moe, layer_idx, cfg.vocab_size)
    return SwiGLU(cfg.dim, cfg.ffn_dim)


class Block(nn.Module):
    """One pre-norm decoder block: [Engram] -> attention -> FFN/MoE, each residual.

    x: [B, T, dim] -> [B, T, dim]; with hyper-connections (cfg.hc.enabled) the residual is
    the streams x [B, T, n, dim], and attention and FFN each sit behind a site of their own
    (read the sublayer input from the streams, write its output back, mix the streams).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.engram = None
        if cfg.engram.enabled and layer_idx in cfg.engram.layers:
            from v4lab.modules.engram import Engram

            streams = cfg.hc.n_streams if cfg.hc.enabled else 1  # a gate per stream
            self.engram = Engram(cfg.dim, cfg.engram, layer_idx, cfg.vocab_size, cfg.norm_eps,
                                 streams)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = build_ffn(cfg, layer_idx)
        self.attn_hc = self.ffn_hc = None
        if cfg.hc.enabled:
            from v4lab.modules.mhc import HyperConnection

            self.attn_hc = HyperConnection(cfg.dim, cfg.hc, cfg.norm_eps)
            self.ffn_hc = HyperConnection(cfg.dim, cfg.hc, cfg.norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        cache = ctx.caches[self.layer_idx] if ctx.caches is not None else {}
        if self.attn_hc is not None:
            return self._forward_streams(x, ctx, cache)
        if self.engram is not None:
            x = x + self.engram(x, ctx, cache.get("engram"))
        x = x + self.attn(self.attn_norm(x), ctx, cache.get("attn"))
        return x + self.ffn(self.ffn_norm(x), ctx)

    def _forward_streams(self, x: torch.Tensor, ctx: ForwardContext, cache: dict) -> torch.Tensor:
        """Hyper-connected block: x [B, T, n, dim] -> [B, T, n, dim]. Engram adds its delta
        to every stream directly (as the Engram paper's demo), attention and FFN go through
        their sites."""
        if self.engram is not None:
            x = x + self.engram(x, ctx, cache.get("engram"))
        h, mix = self.attn_hc.read(x)
        x = self.attn_hc.write(x, self.attn(self.attn_norm(h), ctx, cache.get("attn")), mix)
        ctx.track_hc(mix[1])
        h, mix = self.ffn_hc.read(x)
        x = self.ffn_hc.write(x, self.ffn(self.ffn_norm(h), ctx), mix)
        ctx.track_hc(mix[1])
        return x


class Transformer(nn.Module):
    """Decoder-only language model.

    forward(input_ids [B, T]) -> logits [B, T, vocab_size].
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hc_head = None
        if cfg.hc.enabled:
            from v4lab.modules.mhc import HyperHead

            self.hc_head = HyperHead(cfg.dim, cfg.hc, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        self._scale_residual_outputs(self)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.mtp = None
        if cfg.mtp.enabled:  # one more Block, sharing the embedding and the LM head
            from v4lab.modules.mtp import MTP

            self.mtp = MTP(cfg.dim, Block(cfg.mtp_block_config(), cfg.n_layers), self.tok_emb,
                           self.lm_head, cfg.norm_eps, cfg.mtp.loss_weight)
            for own in (self.mtp.proj, self.mtp.block):  # not the shared embedding and head
                own.apply(self._init_weights)
            self._scale_residual_outputs(self.mtp.block)

    def _scale_residual_outputs(self, module: nn.Module) -> None:
        """GPT-2 style: the residual output projections get std init_std / sqrt(2 n_layers)
        (V4 attention's is wo_b, after the grouped wo_a)."""
        std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in module.named_parameters():
            if (name.endswith(("attn.wo.weight", "attn.wo_b.weight", "ffn.w2.weight", "experts.w2"))
                    or ".w2." in name):
                nn.init.normal_(p, std=std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "init_weights"):  # own parameter layout (MoE's stacked experts)
            module.init_weights(self.cfg.init_std)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        b, t = input_ids.shape
        if ctx is None:
            ctx = ForwardContext(positions=torch.arange(t, device=input_ids.device))
        if ctx.input_ids is None:
            ctx.input_ids = input_ids
        end = int(ctx.positions[-1]) + 1
        if end > self.cfg.max_seq_len:
            raise ValueError(f"position {end - 1} is beyond model.max_seq_len={self.cfg.max_seq_len}")
        for block in self.blocks:  # Engram's indices depend only on the ids: compute them first
            if block.engram is not None:
                block.engram.prefetch(ctx)
        x = self.tok_emb(input_ids)
        if self.hc_head is not None:  # the embedding copied into every residual stream
            from v4lab.modules.mhc import expand_streams

            x = expand_streams(x, self.cfg.hc.n_streams)
            ctx.hc_product = None
            ctx.hc_track = (ctx.records or self.training) and ctx.diagnose  # statistics only
        for block in self.blocks:
            x = block(x, ctx)
        if self.hc_head is not None:
            x = self.hc_head(x)
            ctx.report_hc()
        if self.mtp is not None:
            ctx.hidden = x  # the MTP block's input h (lit.py adds its loss); decoding ignores it
        return self.lm_head(self.norm(x))

    def mtp_loss(self, ctx: ForwardContext, tokens: torch.Tensor) -> torch.Tensor:
        """Unweighted MTP cross-entropy of a training window tokens [B, T+1] whose inputs
        tokens[:, :T] just ran through ``forward(…, ctx)``. The MTP block's auxiliary losses
        and statistics (an MoE block's) join ``ctx``'s."""
        h = ctx.hidden
        sub = ForwardContext(positions=ctx.positions[: h.shape[1] - 1], input_ids=tokens[:, 1:-1],
                             step=ctx.step, phase=ctx.phase, diagnose=ctx.diagnose)
        ce = self.mtp.ce(h, tokens, sub)
        for name, value in sub.aux_losses.items():
            ctx.add_loss(name, value)
        for name, (total, count) in sub.stats.items():
            old_total, old_count = ctx.stats.get(name, (0.0, 0))
            ctx.stats[name] = (old_total + total, old_count + count)
        return ce

    def set_canonical_ids(self, ids: torch.Tensor) -> None:
        """Install the token -> canonical id map [vocab_size] in every Engram module."""
        for blk in self.blocks:
            if blk.engram is not None:
                blk.engram.set_canonical_ids(ids)

    # ---- decoding -------------------------------------------------------------------
    def new_caches(self, batch: int, max_len: int | None = None) -> list[dict]:
        """Empty decode state per layer, for ``batch`` sequences of up to ``max_len`` tokens:
        ``{"attn": KV cache}`` plus ``"engram"`` (its convolution state) where present."""
        max_len = max_len or self.cfg.max_seq_len
        device = self.tok_emb.weight.device
        caches = []
        for blk in self.blocks:
            cache = {"attn": blk.attn.new_cache(batch, max_len, device)}
            if blk.engram is not None:
                cache["engram"] = blk.engram.new_cache(batch, device)
            caches.append(cache)
        return caches

    def kv_bytes_per_token(self, caches: list[dict]) -> float:
        """KV bytes per token summed over layers, measured from the stored cache tensors.

        V4 attention: how fast its caches grow (compressed entries and indexer keys, one per
        block, so a fraction of a byte is possible; the constant window is not included and
        a layer counts 0 until its first block completes: run :meth:`kv_probe_tokens`
        tokens first)."""
        return float(sum(c["attn"].bytes_per_token() for c in caches))

    def kv_probe_tokens(self) -> int:
        """Tokens to run through fresh caches before :meth:`kv_bytes_per_token` sees every
        kind of stored entry (V4: one complete block of every compressed layer)."""
        ratios = [blk.attn.ratio for blk in self.blocks if hasattr(blk.attn, "ratio")]
        return max([2, *ratios])

    def forward_cached(self, input_ids: torch.Tensor, caches: list, start_pos: int,
                       history: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens [B, T] at positions start_pos.. through the caches; logits [B, T, V].

        ``history`` [B, start_pos + T] holds every token so far (Engram hashes suffixes
        that reach back before this chunk); defaults to ``input_ids`` alone.
        """
        t = input_ids.shape[1]
        positions = torch.arange(start_pos, start_pos + t, device=input_ids.device)
        ctx = ForwardContext(positions=positions, input_ids=input_ids, caches=caches,
                             history_ids=history if history is not None else input_ids)
        return self.forward(input_ids, ctx)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, caches: list, chunk: int | None = None) -> torch.Tensor:
        """Run a prompt [B, P] through empty ``caches`` in chunks of ``chunk`` tokens (all at
        once when None; chunks bound the attention scores' memory for long prompts).
        Returns the logits of the last position [B, V]."""
        chunk = chunk or tokens.shape[1]
        logits = None
        for s in range(0, tokens.shape[1], chunk):
            e = min(s + chunk, tokens.shape[1])
            logits = self.forward_cached(tokens[:, s:e], caches, s, history=tokens[:, :e])[:, -1]
        return logits

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None,
                 prefill_chunk: int | None = None, speculative: bool = False) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation with the KV cache: the one decode
        loop (evaluation uses it too).

        prompt: [B, T0] -> [B, T0 + max_new_tokens]. ``speculative``: greedy only, with the
        MTP block drafting one token per step (:func:`v4lab.decode.generate_speculative`).
        """
        if speculative:
            if temperature > 0 or self.mtp is None:
                raise ValueError("speculative decoding needs temperature=0 and an MTP block "
                                 f"(temperature={temperature}, model.mtp.depth={self.cfg.mtp.depth})")
            return generate_speculative(self, prompt, max_new_tokens, prefill_chunk)
        b, t0 = prompt.shape
        caches = self.new_caches(b, t0 + max_new_tokens)
        tokens = prompt
        logits = self.prefill(prompt, caches, prefill_chunk)
        for i in range(max_new_tokens):
            if temperature > 0:
                probs = F.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            if i + 1 < max_new_tokens:
                logits = self.forward_cached(nxt, caches, t0 + i, history=tokens)[:, -1]
        return tokens

    # ---- training hooks ---------------------------------------------------------------
    def on_train_step_end(self) -> None:
        """Called by the trainer after every optimizer step: pieces that keep running state
        (MoE's balancing bias) update it by defining ``on_train_step_end`` themselves."""
        for module in self.modules():
            if module is not self and hasattr(module, "on_train_step_end"):
                module.on_train_step_end()

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: matrices decay; norms, biases and 1-d parameters do not.

        A parameter may carry ``lr_multiplier`` (float) and ``no_weight_decay`` (bool)
        attributes (Engram's table does); each distinct (lr multiplier, decay) pair is a
        group with keys ``params``, ``weight_decay``, ``lr_multiplier`` and ``name``.
        """
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            decay = p.dim() >= 2 and not getattr(p, "no_weight_decay", False)
            groups.setdefault((float(getattr(p, "lr_multiplier", 1.0)), decay), []).append(p)
        return [
            {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_multiplier": mult,
             "name": f"{'decay' if decay else 'no_decay'}_lr{mult:g}"}
            for (mult, decay), ps in sorted(groups.items())
        ]

    # ---- accounting -------------------------------------------------------------------
    def num_params(self) -> int:
        """All parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters used per token: routed experts count top_k of n (in the MTP block
        too), Engram rows only those looked up; the embedding table counts one row."""
        total = self.num_params()
        total -= self.tok_emb.weight.numel() - self.cfg.dim
        if self.cfg.tie_embeddings:
            total += self.tok_emb.weight.numel() - self.cfg.dim  # lm_head is the same matrix
        blocks = [*self.blocks, *([self.mtp.block] if self.mtp is not None else [])]
        for blk in blocks:  # the MTP block's MoE routes top_k experts per token too
            inactive = getattr(blk.ffn, "inactive_params_per_token", None)
            if inactive is not None:
                total -= inactive()
            if blk.engram is not None:
                total -= blk.engram.inactive_params_per_token()
        return total
