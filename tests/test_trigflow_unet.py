"""TrigFlowUNet: config round trip, conditioning, ADN formula, JVP against finite differences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scm_lightning.nets import TrigFlowUNet
from scm_lightning.nets.trigflow_unet import (
    AttentionBlock,
    ResBlock,
    adaptive_double_norm,
    pnorm,
)

TINY = dict(
    sample_size=8,
    block_channels=(8, 16),
    attention_head_dim=8,
    norm_num_groups=4,
    embedding_channels=32,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 shared cores: intra-op threads oversubscribe and make tiny ops 50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model: torch.nn.Module, skip: str = "", seed: int = 0) -> None:
    """Give every parameter (except names containing ``skip``) a random non-zero value.

    The default init zeroes the output layers, so F = 0 and many checks would be vacuous.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip and skip in name:
                continue
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(fan_in))


def inputs(b: int = 3, dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 1.4 + 0.1
    return x, t


def test_default_init_outputs_zero_and_default_config_size() -> None:
    model = TrigFlowUNet()
    n = sum(p.numel() for p in model.parameters())
    assert 1e5 < n < 2e6  # compact enough for CPU training on 8x8 digits
    x, t = inputs()
    assert torch.equal(model(x, t).sample, torch.zeros_like(x))  # zero-init final conv
    # attention modules are diffusers Attention with the forward-AD-capable math processor
    from diffusers.models.attention_processor import Attention, AttnProcessor

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attns) == 4  # lowest level: 1 down + 2 up, plus the middle block
    assert all(isinstance(a.processor, AttnProcessor) for a in attns)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_save_load_bit_exact(tmp_path) -> None:
    model = TrigFlowUNet(**TINY, num_classes=3, guidance_embedding=True)
    randomize(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = TrigFlowUNet.from_pretrained(tmp_path)
    assert loaded.config.num_classes == 3 and loaded.supports_guidance_input
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    x, t = inputs()
    labels = torch.tensor([0, 2, 3])
    s = torch.tensor([1.0, 1.5, 2.0])
    # weights bit exact; outputs of two instances equal up to float32 rounding
    torch.testing.assert_close(
        model(x, t, labels, s).sample, loaded(x, t, labels, s).sample, rtol=1e-5, atol=1e-6
    )


def test_guidance_embedding_zero_init_and_learnable() -> None:
    model = TrigFlowUNet(**TINY, guidance_embedding=True)
    randomize(model, skip="guidance_proj")
    x, t = inputs()
    out1 = model(x, t, guidance=torch.ones(3)).sample
    out2 = model(x, t, guidance=torch.full((3,), 2.0)).sample
    assert out1.abs().max() > 1e-3  # non-trivial output
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out1, model(x, t).sample, rtol=1e-5, atol=1e-6)  # None: s = 1
    randomize(model)  # once trained, the guidance input matters
    assert not torch.allclose(
        model(x, t, guidance=1.0).sample, model(x, t, guidance=2.0).sample, atol=1e-4
    )
    plain = TrigFlowUNet(**TINY)
    assert not plain.supports_guidance_input
    with pytest.raises(ValueError, match="guidance"):
        plain(x, t, guidance=torch.ones(3))


def test_class_conditioning_changes_output() -> None:
    model = TrigFlowUNet(**TINY, num_classes=10)
    randomize(model)
    x, t = inputs()
    a = model(x, t, torch.tensor([1, 1, 1])).sample
    b = model(x, t, torch.tensor([7, 7, 7])).sample
    assert (a - b).abs().max() > 1e-3
    null = model(x, t, torch.full((3,), model.null_class_label)).sample
    # no labels = the null (CFG) label
    torch.testing.assert_close(null, model(x, t).sample, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        TrigFlowUNet(**TINY)(x, t, torch.tensor([0, 1, 2]))


def test_bad_inputs_raise() -> None:
    model = TrigFlowUNet(**TINY)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 1, 7, 7), 0.5)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model(torch.randn(2, 1, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="attention_levels"):
        TrigFlowUNet(block_channels=(8, 16), attention_levels=(2,))


def test_pnorm_and_adn_against_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=g, dtype=torch.float64)
    ref = a / torch.sqrt((a**2).sum(1, keepdim=True) / 6 + 1e-4)
    torch.testing.assert_close(pnorm(a), ref, rtol=1e-12, atol=0)
    assert torch.allclose((pnorm(a) ** 2).mean(1), torch.ones(4, dtype=torch.float64), atol=1e-3)

    block = ResBlock(4, 6, emb_channels=5, num_groups=2).double()
    randomize(block)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    emb = torch.randn(2, 5, generator=g, dtype=torch.float64)
    # Independent composition with functional primitives.
    h = F.conv2d(
        F.silu(F.group_norm(x, 2, block.norm1.weight, block.norm1.bias, 1e-5)),
        block.conv1.weight,
        block.conv1.bias,
        padding=1,
    )
    ss = F.silu(emb) @ block.emb_proj.weight.T + block.emb_proj.bias
    s, b = ss[:, :6], ss[:, 6:]
    s = s / torch.sqrt(s.pow(2).mean(1, keepdim=True) + 1e-4)
    b = b / torch.sqrt(b.pow(2).mean(1, keepdim=True) + 1e-4)
    h = F.group_norm(h, 2, eps=1e-5) * s[:, :, None, None] + b[:, :, None, None]
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    expected = (F.conv2d(x, block.skip.weight, block.skip.bias) + h) / math.sqrt(2)
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-10, atol=1e-12)
    # the helper alone: scale applied as pnorm(s), not 1 + pnorm(s)
    hn = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        adaptive_double_norm(hn, ss[:, :6], ss[:, 6:]),
        hn * s[:, :, None, None] + b[:, :, None, None],
    )


def _fd_check(model, x, t, vx, vt, h):
    def f(x_, t_):
        return model(x_, t_).sample

    _, jvp = torch.func.jvp(f, (x, t), (vx, vt))
    fd = (f(x + h * vx, t + h * vt) - f(x - h * vx, t - h * vt)) / (2 * h)
    return jvp, fd


@pytest.mark.parametrize("direction", ["x", "t", "both"])
def test_jvp_matches_central_differences_float64(direction: str) -> None:
    model = TrigFlowUNet(**TINY, num_classes=None).double()
    randomize(model)
    x, t = inputs(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    vx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    vt = torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5
    if direction == "x":
        vt = torch.zeros_like(vt)
    elif direction == "t":
        vx = torch.zeros_like(vx)
    with torch.no_grad():
        jvp, fd = _fd_check(model, x, t, vx, vt, h=1e-5)
    rel = (jvp - fd).norm() / fd.norm()
    assert fd.norm() > 1e-2  # derivative is not trivially zero
    assert rel < 1e-7, rel  # measured ~1e-8..1e-10 (time embedding in float64)


def test_jvp_float32_and_forward_ad_agree_with_float64() -> None:
    model = TrigFlowUNet(**TINY)
    randomize(model)
    x, t = inputs()
    vx, vt = torch.randn_like(x), torch.ones_like(t)
    with torch.no_grad():
        _, j32 = torch.func.jvp(lambda a, b: model(a, b).sample, (x, t), (vx, vt))
        with torch.autograd.forward_ad.dual_level():
            out = model(
                torch.autograd.forward_ad.make_dual(x, vx),
                torch.autograd.forward_ad.make_dual(t, vt),
            ).sample
            j_fwd = torch.autograd.forward_ad.unpack_dual(out).tangent
        m64 = model.double()
        _, j64 = torch.func.jvp(
            lambda a, b: m64(a, b).sample, (x.double(), t.double()), (vx.double(), vt.double())
        )
    assert j32.dtype == torch.float32
    assert (j32.double() - j64).norm() / j64.norm() < 1e-4
    assert (j_fwd.double() - j64).norm() / j64.norm() < 1e-4


def test_autocast_bf16_forward_and_jvp_on_cpu() -> None:
    model = TrigFlowUNet(**TINY)
    randomize(model)
    x, t = inputs()
    with torch.no_grad():
        ref = model(x, t).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t).sample
            _, tangent = torch.func.jvp(
                lambda a, b: model(a, b).sample, (x, t), (torch.randn_like(x), torch.ones_like(t))
            )
    assert torch.isfinite(out).all() and torch.isfinite(tangent).all()
    assert (out.float() - ref).norm() / ref.norm() < 5e-2  # bf16 accuracy
    assert tangent.shape == x.shape


def test_gradient_checkpointing_same_grads_and_skipped_in_jvp() -> None:
    model = TrigFlowUNet(**TINY)
    randomize(model)
    x, t = inputs()

    def grads():
        model.zero_grad()
        model(x, t).sample.square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    g0 = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt_calls = []
    inner = model._gradient_checkpointing_func

    def counting(block, *args):
        ckpt_calls.append(type(block).__name__)
        return inner(block, *args)

    model._gradient_checkpointing_func = counting
    g1 = grads()
    assert "ResBlock" in ckpt_calls and "AttentionBlock" in ckpt_calls
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # JVP with grad enabled: checkpointing is bypassed for tangent-carrying inputs
    ckpt_calls.clear()
    for tangents in [(torch.zeros_like(x), torch.ones_like(t)), (torch.ones_like(x), None)]:
        if tangents[1] is None:  # x only: t is a plain tensor, x carries the tangent
            _, tangent = torch.func.jvp(lambda a: model(a, t).sample, (x,), tangents[:1])
        else:
            _, tangent = torch.func.jvp(lambda a, b: model(a, b).sample, (x, t), tangents)
        assert torch.isfinite(tangent).all() and tangent.abs().max() > 0
    with torch.autograd.forward_ad.dual_level():
        model(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)), t)
    assert ckpt_calls == []


def test_attention_uses_diffusers_attention_processor_hook() -> None:
    """A processor set on the Attention module is what the block calls."""
    model = TrigFlowUNet(**TINY)
    randomize(model)
    x, t = inputs()
    calls = []

    class Recording:
        def __call__(
            self,
            attn,
            hidden_states,
            encoder_hidden_states=None,
            attention_mask=None,
            temb=None,
            **kwargs,
        ):
            calls.append(tuple(hidden_states.shape))
            return torch.zeros_like(hidden_states)

    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    ref = model(x, t).sample
    for blk in blocks:
        blk.attn.set_processor(Recording())
    out = model(x, t).sample
    assert len(calls) == len(blocks)
    assert not torch.allclose(out, ref)


def test_ten_k_param_config_trains() -> None:
    """The smallest config is a complete network (no wall-clock bound: tests never depend on
    the machine's speed or load)."""
    model = TrigFlowUNet(
        block_channels=(8,), attention_head_dim=8, norm_num_groups=4, embedding_channels=16
    )
    n = sum(p.numel() for p in model.parameters())
    assert 5_000 < n < 15_000, n
    x, t = inputs(b=16)
    out = model(x, t).sample
    out.sum().backward()
    assert out.shape == x.shape
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
