"""Block-scaled fp8 / int8 KV quantisation against the format's definition."""

from __future__ import annotations

import pytest
import torch

from v4lab.modules.kv_quant import dequantize, fake_quant, quantize

E4M3_MAX, INT8_MAX = 448.0, 127.0


def sample(shape=(3, 5, 256), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # blocks of very different magnitudes, including tiny values that fall into subnormals
    mags = torch.logspace(-3, 2, shape[-1] // 128).repeat_interleave(128)
    x = torch.randn(*shape, generator=g) * mags
    x[..., :5] = 1e-9
    return x


def naive_scale(block: torch.Tensor, qmax: float, ue8m0: bool) -> float:
    s = max(float(block.abs().max()), 2.0 ** -100) / qmax
    if ue8m0:
        e = 0
        while 2.0 ** e < s:
            e += 1
        while 2.0 ** (e - 1) >= s:
            e -= 1
        s = 2.0 ** e
    return s


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
def test_roundtrip_within_format_bound(fmt, scale_format):
    x = sample()
    q, s = quantize(x, fmt, 128, scale_format)
    assert q.dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
    assert s.dtype == (torch.float32 if scale_format == "fp32" else torch.float8_e8m0fnu)
    assert q.shape == x.shape and s.shape == (3, 5, 2)
    xh = dequantize(q, s)
    qmax = E4M3_MAX if fmt == "fp8" else INT8_MAX
    for idx in [(0, 0), (1, 3), (2, 4)]:
        for blk in range(2):
            xb = x[idx][blk * 128:(blk + 1) * 128]
            sc = naive_scale(xb, qmax, scale_format == "ue8m0")
            assert float(s[idx][blk].float()) == pytest.approx(sc, rel=1e-6)
            err = (xb - xh[idx][blk * 128:(blk + 1) * 128]).abs()
            if fmt == "fp8":  # 3 mantissa bits: 2^-4 relative; subnormal spacing 2^-9 * scale
                bound = torch.maximum(xb.abs() * 2.0 ** -4, torch.full_like(xb, sc * 2.0 ** -10))
            else:
                bound = torch.full_like(xb, sc / 2)
            assert torch.all(err <= bound * (1 + 1e-6)), float((err / bound).max())
            assert err.max() > 0  # it really quantised
            assert float((xb / sc).abs().max()) <= qmax * (1 + 1e-6)


def test_ue8m0_scales_are_powers_of_two_and_one_byte():
    _, s = quantize(sample(), "fp8", 128, "ue8m0")
    assert s.element_size() == 1
    e = torch.log2(s.float())
    assert torch.equal(e, e.round())


def test_fp8_values_are_e4m3_grid_and_block_max_maps_to_448():
    x = sample()
    q, s = quantize(x, "fp8", 128, "fp32")
    qf = q.float()
    assert torch.equal(qf.to(torch.float8_e4m3fn).float(), qf)
    assert torch.allclose(qf.unflatten(-1, (2, 128)).abs().amax(-1), torch.tensor(E4M3_MAX))


def test_fake_quant_equals_roundtrip_with_straight_through_gradient():
    x = sample().requires_grad_()
    y = fake_quant(x, "fp8", 128, "ue8m0")
    assert torch.equal(y.detach(), dequantize(*quantize(x.detach(), "fp8", 128, "ue8m0")))
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_zero_block_and_bad_width():
    q, s = quantize(torch.zeros(1, 128), "int8")
    assert torch.equal(dequantize(q, s), torch.zeros(1, 128))
    with pytest.raises(ValueError, match="multiple of block size 128"):
        quantize(torch.zeros(1, 100), "fp8")


def test_e4m3_table_conversion_is_bit_exact():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ones = torch.ones(2, dtype=torch.float32)
    got = dequantize(codes.view(2, 128), ones.view(2, 1))
    want = codes.float().view(2, 128)
    finite = torch.isfinite(want)
    assert torch.equal(got[finite], want[finite]) and torch.isnan(got[~finite]).all()
