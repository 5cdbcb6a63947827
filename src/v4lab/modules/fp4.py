"""MXFP4 fake quantisation (OCP Microscaling e2m1) for weights, with a straight-through gradient.

A weight is cut into blocks of 32 consecutive entries along its input dimension (the one
a matmul sums over). Each block shares one power-of-two scale 2^X (an unsigned e8m0
exponent, X in [-127, 127]); each entry is stored as an e2m1 number (1 sign, 2 exponent,
1 mantissa bit), whose 16 codes are

    +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}      (bits s e e m: 0.5 is the one subnormal)

Quantising block b:  w_q = 2^X * e2m1(w / 2^X), e2m1(.) = nearest grid value, ties to the
even code (mantissa bit 0), magnitudes above 6 saturate to 6.

Scale rule:
  ``ocp``  X = floor(log2 amax) - 2 (OCP MX spec v1.0, section 6.3: emax of e2m1 is 2).
           amax / 2^X lies in [4, 8), so the block's largest entries may saturate at 6.
  ``ceil`` X = ceil(log2(amax / 6)): the smallest scale with no saturation (the "RCEIL"
           rule of torch's own MX reference, and DeepGEMM's ue8m0 scales).

Forward: the fake-quantised weight (same dtype and shape); backward: the gradient passes
unchanged to the full-precision weight (straight-through estimator), so quantisation-aware
training (QAT) keeps full-precision master weights and trains them through the FP4 forward.

``apply_fp4_qat`` attaches this to a model from outside (torch.nn.utils.parametrize), so
modules need no FP4 code; ``quantize_fp4_`` is the post-hoc variant (weights replaced once).

Target ``indexer_qk``: the lightning indexers' queries and keys (activations, V4's FP4
indexer QK path). Each indexer (sparse.LightningIndexer, compressor.LightningIndexerV4) has
a ``qk_quant`` slot, None by default, applied to q and k right before its score matmul
q . k -- after RoPE, so what is quantised is exactly what the matmul multiplies (DeepSeek
V3.2's reference quantises the same RoPE'd q and k, there after a Hadamard rotation that
the lab omits). Keys are quantised when scored, not when cached: the blocks are per token,
so that gives the values a quantised cache would hold. Blocks run along the head dim (the
contraction dim). Block size: ``min(block, head_dim)`` (see :func:`indexer_block`), since
the lab's small profiles have index_head_dim 16 < 32: there one block is the whole vector.
Post-hoc mode cannot round activations once, so it installs the quantiser switched on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from v4lab.errors import require, require_choice

E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest normal e2m1 value (6 = 1.5 * 2^2)
SCALE_RULES = ("ocp", "ceil")
FP4_TARGETS = ("routed_experts", "indexer_qk")
# Weight names of routed experts (modules/moe.py RoutedExperts: w1, w3 [E, dim, hidden],
# w2 [E, hidden, dim]); every one is used as x @ w[e], so the input dim is dim 1.
EXPERT_WEIGHTS = ("w1", "w2", "w3")


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """Round float32 values y to the e2m1 grid: nearest, ties to even code, |y| > 6 -> 6.

    The grid spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; in every binade the grid
    points are k * spacing with k starting even, so rounding k half-to-even (torch.round)
    is rounding to the even mantissa bit.
    """
    mag = y.abs()
    _, exp = torch.frexp(mag)                     # mag = m * 2^exp, m in [0.5, 1)
    spacing = torch.exp2((exp - 1).clamp(min=0, max=E2M1_EMAX).float() - 1)
    q = (torch.round(mag / spacing) * spacing).clamp(max=E2M1_MAX)
    return torch.copysign(q, y)


def mx_block_exponent(amax: torch.Tensor, rule: str = "ocp") -> torch.Tensor:
    """Shared exponent X (float32, integral, in [-127, 127]) of blocks with max |w| ``amax``.
    All-zero blocks get X = 0 (any scale represents them)."""
    if rule == "ocp":
        _, exp = torch.frexp(amax)                # floor(log2 amax) = exp - 1, exactly
        x = (exp - 1 - E2M1_EMAX).float()
    elif rule == "ceil":
        x = torch.ceil(torch.log2(amax / E2M1_MAX))
    else:
        raise ValueError(f"unknown MX scale rule {rule!r}; one of {SCALE_RULES}")
    return torch.where(amax > 0, x, torch.zeros_like(x)).clamp(-127, 127)


def mxfp4_quantize(w: torch.Tensor, dim: int = -1, block: int = 32, rule: str = "ocp"
                   ) -> torch.Tensor:
    """MXFP4 round trip of ``w`` (any shape), blocks of ``block`` along ``dim``: same shape
    and dtype, every value of the form 2^X * e2m1 code. No gradient (see :func:`fake_fp4`)."""
    n = w.shape[dim]
    require(n % block == 0, "fp4.block_size", block,
            f"a divisor of the quantised dimension (dim {dim} of a weight of shape "
            f"{tuple(w.shape)} has {n} entries)")
    x = w.detach().float().movedim(dim, -1)
    blocks = x.reshape(*x.shape[:-1], n // block, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.exp2(mx_block_exponent(amax, rule))
    q = e2m1_round(blocks / scale) * scale
    return q.reshape(x.shape).movedim(-1, dim).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, dim, block, rule):
        return mxfp4_quantize(w, dim, block, rule)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_fp4(w: torch.Tensor, dim: int = -1, block: int = 32, rule: str = "ocp") -> torch.Tensor:
    """MXFP4 fake quantisation with the identity as its gradient (straight-through)."""
    return _StraightThrough.apply(w, dim, block, rule)


class FakeFP4(nn.Module):
    """Parametrization: the module's weight is read through :func:`fake_fp4`.
    ``enabled`` False passes the weight through (QAT switched on late in training)."""

    def __init__(self, dim: int, block: int = 32, rule: str = "ocp") -> None:
        super().__init__()
        require_choice("fp4.scale_rule", rule, SCALE_RULES)
        self.dim, self.block, self.rule = dim, block, rule
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_fp4(w, self.dim, self.block, self.rule) if self.enabled else w

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block={self.block}, rule={self.rule}, enabled={self.enabled}"


def fp4_weights(model: nn.Module, targets: tuple[str, ...] = FP4_TARGETS
                ) -> list[tuple[str, nn.Module, str, int]]:
    """(module name, module, weight name, input dim) of every weight the targets name.
    ``routed_experts``: w1, w2, w3 of every RoutedExperts (stacked [E, n, m], input dim 1)."""
    from v4lab.modules.moe import RoutedExperts

    for t in targets:
        require_choice("fp4.targets", t, FP4_TARGETS)
    found = []
    for name, module in model.named_modules():
        if "routed_experts" in targets and isinstance(module, RoutedExperts):
            found += [(name, module, w, 1) for w in EXPERT_WEIGHTS]
    return found


def fp4_indexers(model: nn.Module, targets: tuple[str, ...] = FP4_TARGETS
                 ) -> list[tuple[str, nn.Module]]:
    """(name, module) of every lightning indexer whose q/k the targets quantise
    (``indexer_qk``: modules with a ``qk_quant`` slot and a ``head_dim``)."""
    if "indexer_qk" not in targets:
        return []
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "qk_quant") and hasattr(m, "head_dim")]


def indexer_block(head_dim: int, block: int = 32) -> int:
    """MX block of an indexer's q/k: ``min(block, head_dim)``. The block spans the
    contraction dim of q . k; below 32 (the lab's index_head_dim 16) one block is the whole
    vector, one shared scale per head and token. Above it, ``block`` must divide head_dim."""
    b = min(block, head_dim)
    require(head_dim % b == 0, "fp4.block_size", block,
            f"a divisor of index_head_dim ({head_dim}), or at least index_head_dim")
    return b


def check_fp4(model: nn.Module, targets: tuple[str, ...] = FP4_TARGETS, block: int = 32
              ) -> list[tuple[str, nn.Module, str, int]]:
    """The target weights (see :func:`fp4_weights`), after checking that the targets name
    something the model has (weights or indexers) and that ``block`` fits every one:
    ConfigError otherwise."""
    found = fp4_weights(model, targets)
    indexers = fp4_indexers(model, targets)
    require(bool(found or indexers), "fp4.targets", list(targets), "names weights the model "
            "has (no routed experts or lightning indexers here: enable model.moe or sparse "
            "attention)")
    _check_blocks(found, block)
    for _, m in indexers:
        indexer_block(m.head_dim, block)
    return found


def _check_blocks(found, block: int) -> None:
    for name, module, w, dim in found:
        n = getattr(module, w).shape[dim]
        require(n % block == 0, "fp4.block_size", block,
                f"a divisor of the input dim of {name}.{w} ({n}; shape "
                f"{tuple(getattr(module, w).shape)})")


def _install_indexer_quant(model: nn.Module, targets, block: int, rule: str) -> list[FakeFP4]:
    fakes = []
    for _, m in fp4_indexers(model, targets):
        m.qk_quant = FakeFP4(-1, indexer_block(m.head_dim, block), rule)  # no state: checkpoints unchanged
        fakes.append(m.qk_quant)
    return fakes


def apply_fp4_qat(model: nn.Module, targets: tuple[str, ...] = FP4_TARGETS, block: int = 32,
                  rule: str = "ocp") -> list[FakeFP4]:
    """Quantisation-aware training: every target weight is read through MXFP4 fake
    quantisation (parametrize; the full-precision tensor stays the trained parameter, now
    ``<module>.parametrizations.<w>.original``), and every target indexer fake-quantises its
    q and k. Returns the quantisers (set ``enabled`` to switch QAT on and off). Checks every
    block size before changing anything; raises ConfigError when no target exists."""
    found = check_fp4(model, targets, block)
    fakes = []
    for _, module, w, dim in found:
        fake = FakeFP4(dim, block, rule)
        parametrize.register_parametrization(module, w, fake)
        fakes.append(fake)
    return fakes + _install_indexer_quant(model, targets, block, rule)


@torch.no_grad()
def quantize_fp4_(model: nn.Module, targets: tuple[str, ...] = FP4_TARGETS, block: int = 32,
                  rule: str = "ocp") -> int:
    """Post-hoc FP4: replace every target weight by its MXFP4 round trip, in place, and
    switch on every target indexer's q/k quantiser. Returns the number of weight tensors
    and indexers quantised."""
    found = check_fp4(model, targets, block)
    for _, module, w, dim in found:
        p = getattr(module, w)
        p.copy_(mxfp4_quantize(p, dim, block, rule))
    return len(found) + len(_install_indexer_quant(model, targets, block, rule))
