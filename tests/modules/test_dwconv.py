"""The shifted-products depthwise conv and its hand-written backward against F.conv1d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from v4lab.modules.dwconv import shifted_conv


@pytest.mark.parametrize("kernel, dilation", [(4, 3), (1, 2), (3, 1)])
def test_shifted_conv_values_and_gradients_match_conv1d(kernel, dilation):
    g = torch.Generator().manual_seed(0)
    b, t, c = 2, 9, 5
    pad = (kernel - 1) * dilation
    x = torch.randn(b, t + pad, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, kernel, generator=g, dtype=torch.float64, requires_grad=True)
    got = shifted_conv(x, w, dilation, t)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.conv1d(x2.transpose(1, 2), w2[:, None, :], groups=c, dilation=dilation).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    up = torch.randn(b, t, c, generator=g, dtype=torch.float64)
    (got * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-12, rtol=1e-12)
