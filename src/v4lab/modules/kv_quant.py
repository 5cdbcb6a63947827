"""Block-scaled quantisation of KV-cache tensors: float8 e4m3 and int8.

A tensor [..., D] is cut into blocks of ``block`` consecutive values along its last
dimension; each block gets one scale so that its largest magnitude maps onto the
format's largest value (448 for e4m3, 127 for int8). Scales are fp32, or power-of-two
``ue8m0`` scales (the exponent byte of an unsigned E8M0 number, stored as
``torch.float8_e8m0fnu``, 1 byte each), rounded up so nothing saturates.

    quantize(x)   -> (q [..., D] in float8_e4m3fn | int8, scale [..., D / block])
    dequantize(q, scale) -> x_hat [..., D]
    fake_quant(x) -> x_hat with a straight-through gradient (training)

``fake_quant`` computes exactly what ``dequantize(*quantize(x))`` returns, so a model
trained with it sees the same cached values that decoding reads back.
"""

from __future__ import annotations

import torch

QMAX = {"fp8": 448.0, "int8": 127.0}
STORE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
SCALE_DTYPES = {"fp32": torch.float32, "ue8m0": torch.float8_e8m0fnu}
_TINY = 2.0 ** -100  # floor on a block's amax: an all-zero block gets a finite scale


def _scales(x: torch.Tensor, fmt: str, block: int, scale_format: str) -> torch.Tensor:
    """fp32 scale per block: [..., D / block]."""
    blocks = x.float().unflatten(-1, (-1, block))
    amax = blocks.abs().amax(-1).clamp_min(_TINY)
    scale = amax / QMAX[fmt]
    if scale_format == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def quantize(x: torch.Tensor, fmt: str, block: int = 128,
             scale_format: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x [..., D] (D a multiple of ``block``) to ``fmt`` ('fp8' | 'int8').

    Returns (q [..., D] float8_e4m3fn or int8, scale [..., D / block] fp32 or float8_e8m0fnu).
    """
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of block size {block}")
    scale = _scales(x, fmt, block, scale_format)
    y = x.float().unflatten(-1, (-1, block)) / scale.unsqueeze(-1)
    y = y.clamp(-QMAX[fmt], QMAX[fmt]).flatten(-2)
    q = y.round().to(torch.int8) if fmt == "int8" else y.to(torch.float8_e4m3fn)
    return q, scale.to(SCALE_DTYPES[scale_format])


_E4M3_TABLES: dict[torch.device, torch.Tensor] = {}


def _e4m3_to_float(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> fp32 through a 256-entry table (bit-identical to ``q.float()``,
    several times faster on CPU, where the direct conversion is not vectorised)."""
    if q.device.type != "cpu":
        return q.float()
    table = _E4M3_TABLES.get(q.device)
    if table is None:
        table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        _E4M3_TABLES[q.device] = table
    codes = q.contiguous().view(torch.uint8).flatten().int()
    return table.index_select(0, codes).view(q.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: q [..., D], scale [..., D / block] -> [..., D] in ``dtype``."""
    qf = _e4m3_to_float(q) if q.dtype == torch.float8_e4m3fn else q.float()
    blocks = qf.unflatten(-1, (scale.shape[-1], -1))
    return (blocks * scale.float().unsqueeze(-1)).flatten(-2).to(dtype)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: str, block: int, scale_format: str) -> torch.Tensor:  # type: ignore[override]
        return dequantize(*quantize(x, fmt, block, scale_format), dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None, None


def fake_quant(x: torch.Tensor, fmt: str, block: int = 128,
               scale_format: str = "fp32") -> torch.Tensor:
    """Quantise-dequantise x [..., D] with a straight-through gradient (identity backward)."""
    return _FakeQuant.apply(x, fmt, block, scale_format)

