"""The lean JVP rules equal PyTorch's own forward-mode AD (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scm_lightning.jvp.fast import fast_jvp


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False),
        nn.GroupNorm(2, 8, affine=False),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.GELU(),
        nn.Linear(16, 6, bias=False),
    ).double()


def test_fast_rules_equal_torch_forward_ad():
    torch.manual_seed(0)
    net = _net()
    x, v = (
        torch.randn(3, 4, 8, 8, dtype=torch.float64),
        torch.randn(3, 4, 8, 8, dtype=torch.float64),
    )
    with torch.no_grad():
        ref = torch.func.jvp(net, (x,), (v,))
        with fast_jvp():
            got = torch.func.jvp(net, (x,), (v,))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_fast_rules_honour_weight_tangents():
    """With tangents on weights too (not sCM's case) the rules stay exact."""
    torch.manual_seed(1)
    conv, gn = nn.Conv2d(2, 4, 3).double(), nn.GroupNorm(2, 4).double()
    params = {
        **{f"c.{k}": p for k, p in conv.named_parameters()},
        **{f"g.{k}": p for k, p in gn.named_parameters()},
    }
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)

    def f(p, xx):
        h = torch.func.functional_call(conv, {k[2:]: v for k, v in p.items() if k[0] == "c"}, xx)
        return torch.func.functional_call(gn, {k[2:]: v for k, v in p.items() if k[0] == "g"}, h)

    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    tx = torch.randn_like(x)
    with torch.no_grad():
        ref = torch.func.jvp(f, (params, x), (tangents, tx))
        with fast_jvp():
            got = torch.func.jvp(f, (params, x), (tangents, tx))
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_grad_enabled_jvp_gives_the_same_primal_gradients():
    """A JVP pass with grad on (the primal reused for the loss): same outputs and gradients."""
    torch.manual_seed(2)
    net = _net()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(x)

    def grads(fast: bool):
        net.zero_grad()
        x.grad = None
        with fast_jvp() if fast else torch.enable_grad():
            y, ty = torch.func.jvp(net, (x,), (v,))
        assert not fast or not ty.requires_grad  # the tangent is a stop-gradient
        (y * torch.linspace(-1, 1, y.shape[1], dtype=y.dtype)).sum().backward()
        return (
            y.detach(),
            ty.detach(),
            [x.grad.clone()] + [p.grad.clone() for p in net.parameters()],
        )

    y0, t0, g0 = grads(False)
    y1, t1, g1 = grads(True)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t1, t0, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_fast_rules_through_trigflow_unet(dtype):
    from scm_lightning.nets.trigflow_unet import TrigFlowUNet

    torch.manual_seed(0)
    net = TrigFlowUNet(sample_size=8, block_channels=(16, 32), attention_head_dim=16).to(dtype)
    for p in net.parameters():  # the zero-initialised output conv would hide errors
        p.data.normal_(std=0.2)
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    t = torch.tensor([0.3, 1.2], dtype=dtype)
    v, vt = torch.randn_like(x), torch.ones_like(t)

    def f(xx, tt):
        return net(xx, tt).sample

    with torch.no_grad():
        ref = torch.func.jvp(f, (x, t), (v, vt))
        with fast_jvp():
            got = torch.func.jvp(f, (x, t), (v, vt))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)
