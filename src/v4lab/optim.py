"""DeepSeek-V4's Muon (hybrid Newton-Schulz, RMS-matched updates) with AdamW for the rest.

V4's update for one weight matrix W [n, m] with gradient G (V4 report, section 2.4):

    M   = mu M + G                                  momentum, mu = 0.95
    O'  = NS_hybrid(mu M + G)                       Nesterov, then Newton-Schulz
    O   = O' * gamma * sqrt(max(n, m))              gamma = 0.18: update RMS 0.18
    W   = W (1 - lr wd) - lr O                      decoupled weight decay

NS_hybrid divides by the Frobenius norm (so every singular value is <= 1) and applies
X <- a X + (b A + c A^2) X with A = X X^T: 8 steps with (3.4445, -4.775, 2.0315), which
push small singular values up fast but leave them scattered in roughly [0.7, 1.2], then 2
steps with (2, -1.5, 0.5), the quintic with p(1) = 1 and p'(1) = 0, which pulls them onto 1.
An orthogonal O' [n, m] has min(n, m) unit singular values, so its RMS is
1 / sqrt(max(n, m)); the factor gamma * sqrt(max(n, m)) makes every update's RMS gamma,
about AdamW's, so Muon reuses AdamW's learning rate and weight decay.

Why not ``torch.optim.Muon`` itself (torch 2.13): it runs one coefficient triple for
``ns_steps`` steps and renormalises on entry, so two calls cannot make the hybrid schedule;
its ``adjust_lr_fn="match_rms_adamw"`` hard-codes 0.2 (V4 uses 0.18); it rejects 3-D
parameters, and V4 orthogonalises each routed expert separately (here stacked [E, n, m]);
and Lightning's automatic optimisation wants one optimizer, so the AdamW half (embeddings,
LM head, norms, biases, scalars) lives in the same object. Where the settings coincide
(one triple, gamma 0.2, bf16 iteration, 2-D) the Muon half gives the same numbers as
``torch.optim.Muon`` (tests/test_muon.py), and the AdamW half the same as
``torch.optim.AdamW``.

Momentum is kept as torch does, an exponential average (M <- mu M + (1 - mu) G, Nesterov
input (1 - mu) G + mu M): that is (1 - mu) times V4's sum form, and the Frobenius
normalisation removes the constant factor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from v4lab.errors import ConfigError

V4_NS_SCHEDULE: tuple[tuple[float, float, float], ...] = (
    ((3.4445, -4.775, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2)
V4_UPDATE_RMS = 0.18
# Parameter leaf names that stay on AdamW even when they are matrices: biases, mHC's static
# bases and scales, attention sinks (V4 gives AdamW "embeddings, the prediction head, static
# biases and gating factors of mHC, RMSNorm weights").
ADAMW_NAME_HINTS = ("bias", "base", "scale", "sink")


def newton_schulz(g: torch.Tensor, schedule: Sequence[tuple[float, float, float]] = V4_NS_SCHEDULE,
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate orthogonal polar factor U V^T of g = U S V^T.

    g: [..., n, m] (leading dims are independent matrices, e.g. experts) -> same shape,
    in ``dtype``. Each matrix is divided by its own Frobenius norm, then runs the steps of
    ``schedule`` on the wide orientation (rows <= columns, so X X^T is the small Gram matrix).
    """
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    flat = x.reshape(-1, *x.shape[-2:])
    for a, b, c in schedule:
        if flat.shape[0] == 1:  # addmm, as torch.optim.Muon computes it (same rounding)
            x2 = flat[0]
            gram = x2 @ x2.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            flat = torch.addmm(x2, poly, x2, beta=a).unsqueeze(0)
        else:
            gram = flat @ flat.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            flat = torch.baddbmm(flat, poly, flat, beta=a)
    x = flat.reshape(x.shape)
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the param groups with ``use_muon=True``, AdamW for the others.

    Muon group keys: lr, weight_decay, momentum, nesterov, ns_schedule (tuple of (a, b, c)
    triples), ns_dtype, update_rms (gamma), eps. A 2-D parameter is one matrix; a 3-D
    parameter [E, n, m] is E matrices, each orthogonalised and scaled on its own.
    AdamW group keys: lr, weight_decay, betas, eps (torch.optim.AdamW's arithmetic).
    Any other keys (``name``) ride along.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_schedule: Sequence[tuple[float, float, float]] = V4_NS_SCHEDULE,
                 ns_dtype: torch.dtype = torch.float32, update_rms: float = V4_UPDATE_RMS,
                 betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                 ns_eps: float = 1e-7) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_schedule=tuple(tuple(t) for t in ns_schedule), ns_dtype=ns_dtype,
                        update_rms=update_rms, betas=betas, eps=adam_eps, ns_eps=ns_eps,
                        use_muon=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.dim() not in (2, 3):
                        raise ValueError(f"Muon takes matrices [n, m] or stacks [E, n, m]; got a "
                                         f"parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - mu)
            update = g.lerp(buf, mu) if group["nesterov"] else buf
            ortho = newton_schulz(update, group["ns_schedule"], group["ns_eps"], group["ns_dtype"])
            scale = group["update_rms"] * math.sqrt(max(p.shape[-2], p.shape[-1]))
            p.mul_(1 - lr * wd)
            p.add_(ortho.to(p.dtype), alpha=-lr * scale)

    def _adamw_group(self, group: dict) -> None:
        """torch.optim.AdamW's single-tensor update (amsgrad off), step for step."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"].item()
            p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = lr / (1 - beta1 ** step)
            denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)


def _is_expert_stack(module: nn.Module) -> bool:
    """Modules whose 3-D parameters are stacks of independent matrices [E, n, m]
    (isinstance: parametrize, e.g. FP4 QAT, subclasses the module's type)."""
    from v4lab.modules.moe import RoutedExperts

    return isinstance(module, RoutedExperts)


def _own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(leaf name, parameter) a module holds itself; a parametrized weight (e.g. FP4 QAT's
    ``parametrizations.w1.original``) counts as the module's own ``w1``."""
    if isinstance(module, parametrize.ParametrizationList):
        return []  # reported by the module it parametrizes
    own = list(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        own += [(name, plist.original) for name, plist in module.parametrizations.items()
                if hasattr(plist, "original")]
    return own


def split_params(model: nn.Module, blocks_attr: str | tuple[str, ...] = ("blocks", "mtp")
                 ) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon, AdamW) lists of (name, parameter), each trainable parameter in exactly one.

    Muon: the matrices inside the containers ``model.<blocks_attr>`` (the blocks and the
    MTP module): 2-D weights (nn.Linear and raw matrices such as mHC's dynamic mixing
    maps) and 3-D routed-expert stacks.
    AdamW: everything outside them (token embedding, final norm, LM head; also when a
    container shares them, as MTP shares the embedding and the head), and inside them
    embedding tables (Engram's), convolution kernels, vectors and scalars (norms, sinks),
    leaf names containing one of ``ADAMW_NAME_HINTS``, parameters carrying an
    ``lr_multiplier`` and any parameter with attribute ``muon = False``.
    """
    attrs = (blocks_attr,) if isinstance(blocks_attr, str) else tuple(blocks_attr)
    muon_ids: set[int] = set()
    outside: set[int] = set()  # owned by a module outside the containers (shared ones too)
    for path, module in model.named_modules(remove_duplicate=False):
        if not any(path == a or path.startswith(a + ".") for a in attrs):
            outside |= {id(p) for _, p in _own_params(module)}
    for attr in attrs:
        container = getattr(model, attr, None)
        if container is None:
            continue
        for module in container.modules():
            for leaf, p in _own_params(module):
                matrix = (p.dim() == 2 or (p.dim() == 3 and _is_expert_stack(module)))
                if (matrix and not isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd))
                        and not any(h in leaf for h in ADAMW_NAME_HINTS)
                        and not hasattr(p, "lr_multiplier") and getattr(p, "muon", True)):
                    muon_ids.add(id(p))
    muon_ids -= outside
    muon, adamw, seen = [], [], set()
    for name, p in model.named_parameters():  # named_parameters yields a tied weight once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if id(p) in muon_ids else adamw).append((name, p))
    return muon, adamw


def build_muon_adamw(model: nn.Module, lr: float, weight_decay: float,
                     betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                     path: str = "trainer.optimizer", **muon_kwargs) -> MuonAdamW:
    """One :class:`MuonAdamW` over ``model``: a Muon group for :func:`split_params`' matrices
    and AdamW groups for the rest, split as ``model.optimizer_groups`` splits them when the
    model has it (decay / no decay, Engram's lr multiplier), else decay for >= 2-D.

    A group's lr is ``lr`` times its ``lr_multiplier`` (Muon's is 1). Raises ConfigError
    naming ``path`` when the model has no matrix for Muon.
    """
    muon, adamw = split_params(model)
    if not muon:
        raise ConfigError(f"{path}='muon' is not allowed: the model has no matrix parameter "
                          "inside its blocks for Muon to update (use 'adamw')")
    muon_ids = {id(p) for _, p in muon}
    groups = [{"params": [p for _, p in muon], "use_muon": True, "weight_decay": weight_decay,
               "lr_multiplier": 1.0, "name": "muon"}]
    if hasattr(model, "optimizer_groups"):
        for g in model.optimizer_groups(weight_decay):
            ps = [p for p in g["params"] if id(p) not in muon_ids]
            if ps:
                groups.append(g | {"params": ps, "use_muon": False, "name": f"adamw_{g['name']}"})
    else:
        for decay in (True, False):
            ps = [p for _, p in adamw if (p.dim() >= 2) == decay]
            if ps:
                groups.append({"params": ps, "use_muon": False, "lr_multiplier": 1.0,
                               "weight_decay": weight_decay if decay else 0.0,
                               "name": f"adamw_{'decay' if decay else 'no_decay'}"})
    for g in groups:
        g["lr"] = lr * g.pop("lr_multiplier")
    return MuonAdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, adam_eps=adam_eps,
                     **muon_kwargs)
