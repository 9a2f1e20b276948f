"""Tiled JVP attention (spec §6) against forward-mode AD through explicit math attention."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from scm_lightning.jvp import attention_with_tangent, install_jvp_attention, jvp_attention
from scm_lightning.jvp.install import JVPAttnProcessor

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def math_attention(q, k, v, scale=None):
    """Independent reference: explicit softmax(q kᵀ·scale) v."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def _qkv(lq, lk, d, dv=None, dtype=torch.float64, b=2, h=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k, v = mk(b, h, lq, d), mk(b, h, lk, d), mk(b, h, lk, dv or d)
    return (q, k, v), (mk(*q.shape), mk(*k.shape), mk(*v.shape))


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


# (Lq, Lk, D, Dv, block): self- and cross-attention, lengths off the block grid, one-tile case.
SHAPES = [
    (64, 64, 16, 16, 16),
    (37, 37, 8, 8, 16),
    (37, 53, 8, 12, (16, 8)),
    (5, 70, 40, 40, (3, 32)),
    (100, 7, 32, 32, 512),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("lq", "lk", "d", "dv", "block"), SHAPES)
def test_func_jvp_matches_math(dtype, lq, lk, d, dv, block):
    primals, tangents = _qkv(lq, lk, d, dv, dtype)
    y, ty = torch.func.jvp(lambda *a: jvp_attention(*a, block_size=block), primals, tangents)
    y_ref, ty_ref = torch.func.jvp(math_attention, primals, tangents)
    _close(y, y_ref, dtype)
    _close(ty, ty_ref, dtype)
    # The one-pass kernel (f accumulated too, spec §6 finish y = f/ℓ) gives the same pair.
    y2, ty2 = attention_with_tangent(*primals, *tangents, block_size=block)
    _close(y2, y_ref, dtype)
    _close(ty2, ty_ref, dtype)


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 2), (1, 2)])
def test_partial_tangents(which):
    """Inputs without a tangent arrive as None and are treated as zero."""
    (q, k, v), tangents = _qkv(19, 33, 8)
    primals = [q, k, v]

    def fn(impl):
        def f(*args):
            full = list(primals)
            for i, a in zip(which, args, strict=True):
                full[i] = a
            return impl(*full)

        return f

    p = tuple(primals[i] for i in which)
    t = tuple(tangents[i] for i in which)
    _, ty = torch.func.jvp(fn(lambda *a: jvp_attention(*a, block_size=8)), p, t)
    _, ty_ref = torch.func.jvp(fn(math_attention), p, t)
    _close(ty, ty_ref, torch.float64)
    tq, tk, tv = (tangents[i] if i in which else None for i in range(3))
    _close(attention_with_tangent(q, k, v, tq, tk, tv, block_size=8)[1], ty_ref, torch.float64)


def test_forward_ad_dual_tensors_and_scale():
    (q, k, v), (tq, tk, tv) = _qkv(30, 45, 16, 8)
    with fwAD.dual_level():
        out = jvp_attention(
            fwAD.make_dual(q, tq),
            fwAD.make_dual(k, tk),
            fwAD.make_dual(v, tv),
            scale=0.3,
            block_size=16,
        )
        y, ty = fwAD.unpack_dual(out)
    y_ref, ty_ref = torch.func.jvp(
        lambda *a: math_attention(*a, scale=0.3), (q, k, v), (tq, tk, tv)
    )
    _close(y, y_ref, torch.float64)
    _close(ty, ty_ref, torch.float64)


def test_plain_forward_and_gradient_match_math():
    (q, k, v), _ = _qkv(21, 34, 8, 8)
    g = torch.randn(2, 3, 21, 8, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    y = jvp_attention(*ours, block_size=8)
    y_ref = math_attention(*ref)
    _close(y, y_ref, torch.float64)
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(ours, ref, strict=True):
        _close(a.grad, b.grad, torch.float64)
    # Only some inputs need a gradient.
    k2 = k.clone().requires_grad_()
    (gk,) = torch.autograd.grad(jvp_attention(q, k2, v), k2, g)
    (gk_ref,) = torch.autograd.grad(math_attention(q, k2, v), k2, g)
    _close(gk, gk_ref, torch.float64)


def test_primal_of_jvp_keeps_its_gradient():
    """Grad-enabled JVP (primal reused for the loss): primal grads equal the reference."""
    (q, k, v), (tq, _, _) = _qkv(16, 24, 8)
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    y, ty = torch.func.jvp(lambda a: jvp_attention(a, k, v, block_size=8), (qa,), (tq,))
    y_ref, _ = torch.func.jvp(lambda a: math_attention(a, k, v), (qb,), (tq,))
    assert not ty.requires_grad  # the tangent is stop-gradient (sCM needs exactly that)
    (y * ty.detach()).sum().backward()
    (y_ref * ty.detach()).sum().backward()
    _close(qa.grad, qb.grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_fp32(dtype):
    (q, k, v), tangents = _qkv(40, 72, 16, dtype=dtype)
    y, ty = torch.func.jvp(lambda *a: jvp_attention(*a, block_size=16), (q, k, v), tangents)
    assert y.dtype == ty.dtype == dtype
    y_ref, ty_ref = torch.func.jvp(
        math_attention, tuple(t.double() for t in (q, k, v)), tuple(t.double() for t in tangents)
    )
    tol = 4e-3 if dtype == torch.float16 else 3e-2  # a few ulps of the output format
    torch.testing.assert_close(ty.double(), ty_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(y.double(), y_ref, atol=tol, rtol=tol)


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), t.numel()))
        return out


def test_never_materialises_the_score_matrix():
    b, h, lq, lk, d, bq, bk = 1, 2, 96, 80, 8, 32, 16
    (q, k, v), tangents = _qkv(lq, lk, d, b=b, h=h)
    with _ShapeRecorder() as rec:
        torch.func.jvp(lambda *a: jvp_attention(*a, block_size=(bq, bk)), (q, k, v), tangents)
    # Largest allowed: one tile per (batch, head), or the O(L·d) operands ([q | t_q] is 2d wide).
    bound = b * h * max(bq * bk, max(lq, lk) * 2 * d)
    worst = max(rec.numels, key=lambda x: x[1])
    assert worst[1] <= bound < b * h * lq * lk, worst
    # The math path does build it (the recorder sees it): the check above can fail.
    with _ShapeRecorder() as rec_math:
        torch.func.jvp(math_attention, (q, k, v), tangents)
    assert max(n for _, n in rec_math.numels) >= b * h * lq * lk


def test_bad_arguments_raise():
    (q, k, v), _ = _qkv(8, 8, 4)
    with pytest.raises(ValueError, match="attn_mask"):
        jvp_attention(q, k, v, attn_mask=torch.ones(8, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"dropout_p=0\.1"):
        jvp_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="is_causal"):
        jvp_attention(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match=r"\(B, H, Lq, D\)"):
        jvp_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"q\.shape"):
        jvp_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="block_size"):
        jvp_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="tangent tk"):
        attention_with_tangent(q, k, v, tk=torch.zeros(1))


# --- diffusers integration ------------------------------------------------------------------


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).double()


def test_unet2d_jvp_and_grad_match_math_backend():
    model = _tiny_unet()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    tx = torch.randn_like(x)
    t = torch.tensor([10.0, 500.0], dtype=torch.float64)
    f = lambda a: model(a, t).sample  # noqa: E731
    keys = list(model.state_dict())
    with sdpa_kernel(SDPBackend.MATH):
        y_ref, ty_ref = torch.func.jvp(f, (x,), (tx,))
        model(x, t).sample.square().sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    assert install_jvp_attention(model, block_size=(16, 8)) == 4  # 2 down/up + mid attention
    assert list(model.state_dict()) == keys  # drop-in: no architecture change
    y, ty = torch.func.jvp(f, (x,), (tx,))
    _close(y, y_ref, torch.float64)
    _close(ty, ty_ref, torch.float64)
    model(x, t).sample.square().sum().backward()
    for n, p in model.named_parameters():
        _close(p.grad, grads_ref[n], torch.float64)


def cross_attention_unet():
    """A float64 UNet2DConditionModel with cross-attention (width 12) at its second level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=8,
        attention_head_dim=4,
    ).double()


def test_unet2d_condition_cross_attention_jvp():
    model = cross_attention_unet()
    x, enc = (
        torch.randn(2, 4, 8, 8, dtype=torch.float64),
        torch.randn(2, 5, 12, dtype=torch.float64),
    )
    tangents = (torch.randn_like(x), torch.randn_like(enc))
    t = torch.tensor([3.0, 700.0], dtype=torch.float64)
    f = lambda a, e: model(a, t, e).sample  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):
        y_ref, ty_ref = torch.func.jvp(f, (x, enc), tangents)
    assert install_jvp_attention(model) == 8  # self + cross attention in 4 transformer blocks
    y, ty = torch.func.jvp(f, (x, enc), tangents)
    _close(y, y_ref, torch.float64)
    _close(ty, ty_ref, torch.float64)


@pytest.mark.parametrize("scale_qk", [True, False])
def test_processor_reproduces_diffusers_semantics(scale_qk):
    """Group norm, 4-D input, norm_cross, qk-norm, residual, output rescale, both scales."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    torch.manual_seed(1)
    attn = Attention(
        query_dim=16,
        cross_attention_dim=6,
        heads=2,
        dim_head=8,
        norm_num_groups=4,
        cross_attention_norm="layer_norm",
        qk_norm="layer_norm",
        residual_connection=True,
        rescale_output_factor=2.0,
        scale_qk=scale_qk,
        bias=True,
    ).double()
    hs = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    enc = torch.randn(2, 7, 6, dtype=torch.float64)
    tangents = (torch.randn_like(hs), torch.randn_like(enc))
    f = lambda a, e: attn(a, encoder_hidden_states=e)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):
        y_ref, ty_ref = torch.func.jvp(f, (hs, enc), tangents)
    assert install_jvp_attention(attn) == 1
    assert isinstance(attn.processor, JVPAttnProcessor)
    assert attn.processor.classic is not scale_qk  # scale_qk=False defaults to AttnProcessor
    y, ty = torch.func.jvp(f, (hs, enc), tangents)
    assert y.is_contiguous()
    _close(y, y_ref, torch.float64)
    _close(ty, ty_ref, torch.float64)
    assert install_jvp_attention(attn) == 1  # idempotent
    _close(attn(hs, encoder_hidden_states=enc), y_ref, torch.float64)
    # A key-padding bias (diffusers' (B, 1, Lk) form) goes into the scores as in SDPA.
    bias = torch.zeros(2, 1, 7, dtype=torch.float64)
    bias[0, :, 4:] = -10000.0
    y_masked = attn(hs, encoder_hidden_states=enc, attention_mask=bias)
    attn.set_processor(AttnProcessor2_0() if scale_qk else AttnProcessor())
    with sdpa_kernel(SDPBackend.MATH):
        _close(y_masked, attn(hs, encoder_hidden_states=enc, attention_mask=bias), torch.float64)


def test_install_errors_are_clear():
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor

    added = Attention(
        query_dim=8, heads=2, dim_head=4, added_kv_proj_dim=6, processor=AttnAddedKVProcessor()
    )
    with pytest.raises(ValueError, match="AttnAddedKVProcessor"):
        install_jvp_attention(torch.nn.Sequential(added))
    added.set_processor(JVPAttnProcessor())
    with pytest.raises(ValueError, match="added KV"):
        install_jvp_attention(torch.nn.Sequential(added))
    custom = Attention(query_dim=8, heads=2, dim_head=4)
    custom.set_processor(lambda *a, **kw: None)
    with pytest.raises(ValueError, match=r"'0'.*function"):
        install_jvp_attention(torch.nn.Sequential(custom))
    ok = Attention(query_dim=8, heads=2, dim_head=4)
    mixed = torch.nn.Sequential(ok, torch.nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        install_jvp_attention(mixed)
    assert not isinstance(ok.processor, JVPAttnProcessor)  # nothing patched on failure
    with pytest.raises(TypeError, match=r"nn\.Module"):
        install_jvp_attention("unet")
