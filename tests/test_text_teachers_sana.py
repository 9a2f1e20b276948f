"""Flow-matching transformer teachers (Sana, SD3) and JVP attention for cross-attention.

Tiny random models are built here (no downloads). References are independent: forward-mode
AD through explicit math attention, diffusers' own ``FlowMatchEulerDiscreteScheduler.step``,
SanaSprintPipeline's flow -> TrigFlow conversion written out from its source.
(To be folded into tests/test_text_teachers.py.)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import run_cli
from scm_lightning.jvp import attention_with_tangent, install_jvp_attention, jvp_attention
from scm_lightning.teachers.conditioning import TextCondition

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SIGMA_DATA = 0.5


def _close(a, b, tol):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def math_attention(q, k, v, mask=None):
    """Independent reference: explicit softmax(q kᵀ/√d + bias) v (bool mask: False = -inf)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        boolean = mask.dtype == torch.bool
        scores = scores.masked_fill(~mask, -math.inf) if boolean else scores + mask
    return torch.softmax(scores, dim=-1) @ v


def _masks(b, h, lq, lk, dtype):
    """Key padding as bool (B, 1, 1, Lk) with the first 8 keys of row 0 masked (a whole key
    tile at block 8), diffusers' additive -10000 bias (B, H, 1, Lk), a full (B, 1, Lq, Lk)
    bool mask (no row fully masked)."""
    g = torch.Generator().manual_seed(3)
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[0, ..., :8] = False
    keep[1, ..., lk - 5 :] = False
    bias = torch.zeros(b, h, 1, lk, dtype=dtype)
    bias[0, :, :, lk // 2 :] = -10000.0
    full = torch.rand(b, 1, lq, lk, generator=g) > 0.4
    full[..., 0] = True
    return {"key_padding_bool": keep, "diffusers_bias": bias, "full_bool": full}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", ["key_padding_bool", "diffusers_bias", "full_bool"])
def test_masked_cross_attention_jvp_matches_math(dtype, mask_kind):
    b, h, lq, lk, d, dv = 2, 3, 21, 29, 8, 12  # cross-attention: Lq != Lk, D != Dv
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    primals = (mk(b, h, lq, d), mk(b, h, lk, d), mk(b, h, lk, dv))
    tangents = tuple(mk(*p.shape) for p in primals)
    mask = _masks(b, h, lq, lk, dtype)[mask_kind]
    y_ref, ty_ref = torch.func.jvp(lambda *a: math_attention(*a, mask), primals, tangents)
    y, ty = torch.func.jvp(
        lambda *a: jvp_attention(*a, block_size=8, attn_mask=mask), primals, tangents
    )
    _close(y, y_ref, TOL[dtype])
    _close(ty, ty_ref, TOL[dtype])
    y2, ty2 = attention_with_tangent(*primals, *tangents, block_size=(4, 8), attn_mask=mask)
    _close(y2, y_ref, TOL[dtype])
    _close(ty2, ty_ref, TOL[dtype])
    # Backward (fused SDPA recomputed with the mask) against autograd through the math path.
    leaves = [p.clone().requires_grad_() for p in primals]
    jvp_attention(*leaves, attn_mask=mask).square().sum().backward()
    ref = [p.clone().requires_grad_() for p in primals]
    math_attention(*ref, mask).square().sum().backward()
    for a, r in zip(leaves, ref, strict=True):
        _close(a.grad, r.grad, TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_jvp_attention_in_half_precision(dtype):
    """Half inputs with diffusers' -10000 bias (cast to the half dtype): fp32 accumulation keeps
    output and tangent within half-precision error of the float64 reference."""
    b, h, lq, lk, d = 2, 2, 17, 23, 16
    g = torch.Generator().manual_seed(0)
    p64 = tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    t64 = tuple(torch.randn_like(p) for p in p64)
    bias = _masks(b, h, lq, lk, torch.float64)["diffusers_bias"]
    y, ty = torch.func.jvp(
        lambda *a: jvp_attention(*a, block_size=8, attn_mask=bias.to(dtype)),
        tuple(p.to(dtype) for p in p64),
        tuple(t.to(dtype) for t in t64),
    )
    assert y.dtype == ty.dtype == dtype
    # Reference on the half-rounded inputs, in float64.
    rounded = tuple(p.to(dtype).double() for p in p64)
    y_ref, ty_ref = torch.func.jvp(
        lambda *a: math_attention(*a, bias.to(dtype).double()),
        rounded,
        tuple(t.to(dtype).double() for t in t64),
    )
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    assert (y.double() - y_ref).abs().max() <= tol
    assert (ty.double() - ty_ref).abs().max() <= tol


def test_mask_shape_errors_and_no_mask_tangent():
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 5\)"):
        jvp_attention(q, k, k, attn_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or floating"):
        jvp_attention(q, k, k, attn_mask=torch.ones(2, 1, 1, 7, dtype=torch.long))
    bias = torch.zeros(2, 1, 1, 7, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="mask carries no tangent"):
        torch.func.jvp(
            lambda m: jvp_attention(q, k, k, attn_mask=m), (bias,), (torch.ones_like(bias),)
        )


def test_key_padding_mask_never_materialises_the_score_matrix():
    """With a (B, 1, 1, Lk) key-padding mask, no tensor of size Lq×Lk per (batch, head)
    appears: neither in the fused primal nor in the tiled tangent (the bias is cut per tile)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _ShapeRecorder(TorchDispatchMode):
        """Elements of storage each op's outputs hold (a broadcast view holds its base's)."""

        def __init__(self):
            super().__init__()
            self.numels: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    size = t.untyped_storage().nbytes() // t.element_size()
                    self.numels.append((str(func), size))
            return out

    b, h, lq, lk, d, bq, bk = 1, 2, 96, 80, 8, 32, 16
    g = torch.Generator().manual_seed(0)
    primals = tuple(torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    tangents = tuple(torch.randn_like(p) for p in primals)
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[..., 60:] = False
    with _ShapeRecorder() as rec:
        torch.func.jvp(
            lambda *a: jvp_attention(*a, block_size=(bq, bk), attn_mask=keep), primals, tangents
        )
    bound = b * h * max(bq * bk, max(lq, lk) * 2 * d)
    worst = max(rec.numels, key=lambda x: x[1])
    assert worst[1] <= bound < b * h * lq * lk, worst
    with _ShapeRecorder() as rec_math:  # the recorder does see the math path's matrix
        torch.func.jvp(lambda *a: math_attention(*a, keep), primals, tangents)
    assert max(n for _, n in rec_math.numels) >= b * h * lq * lk


def test_per_query_masks_take_the_torch_loop_where_triton_would_run(monkeypatch):
    """The Triton kernel takes key padding only; a (Lq, Lk) mask goes to the torch loop even
    where Triton is available (forced on here: the kernel itself would refuse CPU tensors)."""
    import scm_lightning.jvp.attention as attention

    monkeypatch.setattr(attention, "_triton_ok", lambda q: True)
    b, h, lq, lk, d = 2, 2, 9, 11, 4
    g = torch.Generator().manual_seed(0)
    primals = tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    tangents = tuple(torch.randn_like(p) for p in primals)
    mask = _masks(b, h, lq, lk, torch.float64)["full_bool"]
    y, ty = torch.func.jvp(lambda *a: jvp_attention(*a, attn_mask=mask), primals, tangents)
    y_ref, ty_ref = torch.func.jvp(lambda *a: math_attention(*a, mask), primals, tangents)
    _close(y, y_ref, 1e-12)
    _close(ty, ty_ref, 1e-12)


_TRITON_CHILD = textwrap.dedent(
    """
    import json, math, os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from scm_lightning.jvp.attention import mask_to_bias
    from scm_lightning.jvp.triton_attention import triton_attention_with_tangent

    def math_attention(q, k, v, bias):
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, -1) @ v

    g = torch.Generator().manual_seed(0)
    b, h, lq, lk, d = 2, 2, 37, 70, 16
    p = [torch.randn(*s, generator=g) for s in [(b, h, lq, d), (b, h, lk, d), (b, h, lk, d)]]
    t = [torch.randn(*x.shape, generator=g) for x in p]
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[0, ..., :32] = False  # two whole key tiles of 16 masked before the first valid key
    keep[1, ..., 50:] = False
    out = {}
    for name, mask in {"bool": keep, "bias": (~keep).float() * -10000.0}.items():
        bias = mask_to_bias(mask, p[0], p[1])
        y, ty = triton_attention_with_tangent(*p, *t, block_m=16, block_n=16, bias=bias)
        yr, tyr = torch.func.jvp(
            lambda *a: math_attention(*a, bias.double()),
            tuple(x.double() for x in p), tuple(x.double() for x in t))
        out[name] = [(y.double() - yr).abs().max().item(), (ty.double() - tyr).abs().max().item()]
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_key_padding_matches_math():
    """The Triton kernel's key bias (interpreter on CPU, in a child process: see
    tests/test_triton_attention.py), incl. query rows whose first key tiles are all masked."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    for name, (err_y, err_ty) in json.loads(line[len("RESULT") :]).items():
        assert err_y <= 1e-5 and err_ty <= 1e-5, (name, err_y, err_ty)


# --- tiny diffusers models --------------------------------------------------------------------


def tiny_sana(**overrides):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        patch_size=2,
        mlp_ratio=2.0,
    )
    cfg.update(overrides)
    return SanaTransformer2DModel(**cfg)


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=6,
        out_channels=4,
        pos_embed_max_size=16,
    )


def _condition(batch=2, length=5, width=12, pooled=None, dtype=torch.float64, mask=True):
    g = torch.Generator().manual_seed(7)
    embeds = torch.randn(batch, length, width, generator=g, dtype=dtype)
    attention_mask = None
    if mask:
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        attention_mask[0, 3:] = 0  # padded prompt
    pooled_embeds = None if pooled is None else torch.randn(batch, pooled, dtype=dtype)
    return TextCondition(embeds, pooled_embeds, attention_mask)


def test_sana_install_replaces_cross_attention_and_leaves_linear_attention():
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    from scm_lightning.jvp.install import JVPAttnProcessor

    model = tiny_sana().double()
    cond = _condition()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ts = torch.tensor([30.0, 800.0], dtype=torch.float64)

    def f(a, e):
        return model(
            a, encoder_hidden_states=e, timestep=ts, encoder_attention_mask=cond.attention_mask
        ).sample

    tangents = (torch.randn_like(x), torch.randn_like(cond.prompt_embeds))
    with sdpa_kernel(SDPBackend.MATH):
        y_ref, ty_ref = torch.func.jvp(f, (x, cond.prompt_embeds), tangents)
    keys = list(model.state_dict())
    assert install_jvp_attention(model, block_size=(16, 4)) == 2  # the two attn2
    assert list(model.state_dict()) == keys
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, SanaLinearAttnProcessor2_0)
        assert isinstance(block.attn2.processor, JVPAttnProcessor)
        assert block.attn2.processor.norm_before_split
    y, ty = torch.func.jvp(f, (x, cond.prompt_embeds), tangents)
    _close(y, y_ref, 1e-12)
    _close(ty, ty_ref, 1e-12)
    # The mask matters (the check above would not notice a dropped mask otherwise).
    y_nomask = model(x, encoder_hidden_states=cond.prompt_embeds, timestep=ts).sample
    assert (y_nomask - y).abs().max() > 1e-3


def test_sana_qk_norm_processor_matches_sana_processor():
    """Sana's processor normalises q/k before the head split (rms_norm_across_heads)."""
    model = tiny_sana(qk_norm="rms_norm_across_heads").double()
    cond = _condition()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ts = torch.tensor([30.0, 800.0], dtype=torch.float64)
    kw = dict(encoder_attention_mask=cond.attention_mask, timestep=ts)
    with sdpa_kernel(SDPBackend.MATH):
        ref = model(x, encoder_hidden_states=cond.prompt_embeds, **kw).sample
    install_jvp_attention(model)
    _close(model(x, encoder_hidden_states=cond.prompt_embeds, **kw).sample, ref, 1e-12)


def test_sd3_joint_attention_jvp_matches_math():
    model = tiny_sd3().double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    enc = torch.randn(2, 5, 12, dtype=torch.float64)
    pooled = torch.randn(2, 6, dtype=torch.float64)
    ts = torch.tensor([30.0, 800.0], dtype=torch.float64)

    def f(a, e):
        return model(a, encoder_hidden_states=e, pooled_projections=pooled, timestep=ts).sample

    tangents = (torch.randn_like(x), torch.randn_like(enc))
    with sdpa_kernel(SDPBackend.MATH):
        y_ref, ty_ref = torch.func.jvp(f, (x, enc), tangents)
    assert install_jvp_attention(model, block_size=8) == 2
    y, ty = torch.func.jvp(f, (x, enc), tangents)
    _close(y, y_ref, 1e-12)
    _close(ty, ty_ref, 1e-12)


def test_unet2d_condition_cross_attention_with_encoder_mask():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
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
    cond = _condition()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([3.0, 700.0], dtype=torch.float64)

    def f(a, e):
        return model(a, t, e, encoder_attention_mask=cond.attention_mask).sample

    tangents = (torch.randn_like(x), torch.randn_like(cond.prompt_embeds))
    with sdpa_kernel(SDPBackend.MATH):
        y_ref, ty_ref = torch.func.jvp(f, (x, cond.prompt_embeds), tangents)
    assert install_jvp_attention(model) == 8  # attn1 + attn2 in 4 transformer blocks
    y, ty = torch.func.jvp(f, (x, cond.prompt_embeds), tangents)
    _close(y, y_ref, 1e-12)
    _close(ty, ty_ref, 1e-12)


def test_unsupported_processor_is_one_line_naming_the_class():
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    model = tiny_sana()
    model.transformer_blocks[1].attn2.set_processor(FusedAttnProcessor2_0())
    with pytest.raises(ValueError) as err:
        install_jvp_attention(model)
    msg = str(err.value)
    assert "\n" not in msg
    assert "transformer_blocks.1.attn2" in msg and "FusedAttnProcessor2_0" in msg
    assert "SanaAttnProcessor2_0" in msg and "SanaLinearAttnProcessor2_0" in msg
    # Nothing patched: the check runs over every module before any swap.
    assert type(model.transformer_blocks[0].attn2.processor).__name__ == "SanaAttnProcessor2_0"


def test_attention_module_mixin_models_are_refused_in_one_line():
    """diffusers' newer attention classes (Flux) run fused kernels inside their own processors."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=6,
        axes_dims_rope=(2, 2, 4),
    )
    with pytest.raises(TypeError) as err:
        install_jvp_attention(model)
    msg = str(err.value)
    assert "\n" not in msg
    assert "FluxAttention" in msg and "FluxAttnProcessor" in msg and "supported:" in msg


# --- Sana teacher through load_teacher ----------------------------------------------------------


def save_sana_folder(path: Path, num_train_timesteps: int = 1000, **overrides) -> Path:
    """A local diffusers pipeline-style folder: transformer/ + scheduler/ (flow matching)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tiny_sana(**overrides).save_pretrained(path / "transformer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=3.0).save_config(
        path / "scheduler"
    )
    return path


def _load(path, **kw):
    from scm_lightning.teachers.loading import load_teacher

    return load_teacher(path, sigma_data=SIGMA_DATA, **kw).double()


def test_sana_adapter_step_equals_flow_match_euler_scheduler(tmp_path):
    """A TrigFlow DDIM step of the adapter is the scheduler's Euler step, mapped to flow space:
    x_s = (1 − s)·x_t/cos t with σ_d·tan t = s/(1 − s)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from scm_lightning.teachers.schedule import FlowSchedule, ScheduleAdapter

    teacher = _load(save_sana_folder(tmp_path / "sana"))
    assert isinstance(teacher, ScheduleAdapter) and isinstance(teacher.schedule, FlowSchedule)
    assert teacher.schedule.num_train_timesteps == 1000.0
    assert teacher.text_embed_dim == 12 and teacher.in_channels == 4
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "sana" / "scheduler")
    scheduler.set_timesteps(5)
    cond = _condition()
    net = teacher.net
    g = torch.Generator().manual_seed(1)
    for i in (1, 2, 3):  # sigmas[0] = 1 is pure noise (no finite t)
        s, s_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        t, t_next = (math.atan(v / ((1 - v) * SIGMA_DATA)) for v in (s, s_next))
        x_t = SIGMA_DATA * torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        x_s = (1 - s) * x_t / math.cos(t)
        v = net(
            x_s,
            encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.attention_mask,
            timestep=scheduler.timesteps[i].double().expand(2),
        ).sample
        scheduler._step_index = i
        x_s_next = scheduler.step(v, scheduler.timesteps[i], x_s).prev_sample
        F = teacher(x_t / SIGMA_DATA, torch.full((2,), t, dtype=torch.float64), cond)
        x_t_next = math.cos(t - t_next) * x_t - math.sin(t - t_next) * SIGMA_DATA * F
        # The scheduler steps in float32 (its sigmas and step() upcast): fp32 tolerance.
        _close((1 - s_next) * x_t_next / math.cos(t_next), x_s_next, 1e-6)


def sprint_F(net, x_scaled, t, cond, guidance=None):
    """SanaSprintPipeline's TrigFlow output (diffusers/pipelines/sana/pipeline_sana_sprint.py,
    the denoising loop), written out: ``s = sin t/(cos t + sin t)``, input
    ``x_t/σ_d·√(s² + (1−s)²)``, timestep ``s``, output
    ``((1−2s)·x + (1−2s+2s²)·v)/√(s² + (1−s)²)``."""
    s = (torch.sin(t) / (torch.cos(t) + torch.sin(t))).view(-1, 1, 1, 1)
    norm = torch.sqrt(s**2 + (1 - s) ** 2)
    x_in = x_scaled * norm
    kw = {} if guidance is None else {"guidance": guidance}
    v = net(
        x_in,
        encoder_hidden_states=cond.prompt_embeds,
        encoder_attention_mask=cond.attention_mask,
        timestep=s.flatten(),
        **kw,
    ).sample
    return ((1 - 2 * s) * x_in + (1 - 2 * s + 2 * s**2) * v) / norm


def test_flow_adapter_equals_sana_sprint_conversion_only_for_unit_timesteps(tmp_path):
    """Our flow adapter (data_scale = 1/σ_d, the net's timestep s·N·timestep_scale) is
    SanaSprintPipeline's conversion exactly when N·timestep_scale = 1: Sprint feeds the net s.
    A stock Sana teacher (N = 1000, timestep_scale = 1) does not satisfy it."""
    cond = _condition()
    t = torch.tensor([0.2, 1.1], dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    unit = _load(
        save_sana_folder(tmp_path / "unit", timestep_scale=1e-3), data_scale=1 / SIGMA_DATA
    )
    assert unit.schedule.num_train_timesteps == pytest.approx(1.0)
    _close(unit(x, t, cond), sprint_F(unit.net, x, t, cond), 1e-10)
    stock = _load(save_sana_folder(tmp_path / "stock"), data_scale=1 / SIGMA_DATA)
    assert (stock(x, t, cond) - sprint_F(stock.net, x, t, cond)).abs().max() > 1e-3


def test_stock_sana_sprint_pipeline_samples_as_our_consistency_sampler(tmp_path):
    """Pipeline level: diffusers' own SanaSprintPipeline (SCMScheduler, its flow conversion,
    guidance × guidance_embeds_scale) on a Sana with guidance_embeds and unit timesteps equals
    our consistency sampler on our flow adapter (data_scale = 1/σ_d), 1 and 2 steps, same
    noise. Sana's native guidance input is switched on for this check only: our CFG students
    carry the zero-initialised GuidanceEmbedding instead, so they export through pipeline_scm."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    from scm_lightning.sampling import consistency_sample

    folder = save_sana_folder(tmp_path / "s", guidance_embeds=True, timestep_scale=1e-3)
    adapter = _load(folder, data_scale=1 / SIGMA_DATA).float()
    adapter.net.supports_guidance_input = True  # route guidance= to Sana's guidance embedder
    pipe = SanaSprintPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=adapter.net,
        scheduler=SCMScheduler(sigma_data=SIGMA_DATA),
    )
    pipe.set_progress_bar_config(disable=True)
    cond = _condition(dtype=torch.float32)
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    guidance = torch.full((2,), 4.5 * adapter.net.config.guidance_embeds_scale)
    for times in ([1.5], [1.5, 1.3]):
        got = pipe(
            prompt_embeds=cond.prompt_embeds,
            prompt_attention_mask=cond.attention_mask,
            num_inference_steps=len(times),
            max_timesteps=times[0],
            intermediate_timesteps=times[1] if len(times) == 2 else None,
            guidance_scale=4.5,
            latents=eps.clone(),
            height=256,  # 8×8 latents at the pipeline's default VAE factor 32 (no VAE here)
            width=256,
            use_resolution_binning=False,
            generator=torch.Generator().manual_seed(5),
            output_type="latent",  # x̂0/σ_d
        ).images
        ref = consistency_sample(
            adapter,
            SIGMA_DATA * eps,
            times,
            SIGMA_DATA,
            cond,
            guidance,
            torch.Generator().manual_seed(5),
        )
        torch.testing.assert_close(got, ref / SIGMA_DATA, rtol=0, atol=1e-5)
        assert ref.abs().max() > 1e-1


def test_sana_student_equals_teacher_at_init_and_jvp_attention_is_exact(tmp_path):
    from scm_lightning.student import Student

    teacher = _load(save_sana_folder(tmp_path / "sana"))
    student = Student.from_teacher(teacher).double()
    cond = _condition()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for t in (0.05, 0.8, 1.5):
        tt = torch.full((2,), t, dtype=torch.float64)
        _close(student(x, tt, cond), teacher(x, tt, cond), 1e-12)
    # The student's JVP in (x, t) with JVP attention installed equals the math backend's.
    tt = torch.tensor([0.3, 1.2], dtype=torch.float64)
    tangents = (torch.randn_like(x), torch.ones_like(tt))
    f = lambda a, b: student(a, b, cond)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(f, (x, tt), tangents)
    assert install_jvp_attention(student) == 2
    out = torch.func.jvp(f, (x, tt), tangents)
    _close(out[0], ref[0], 1e-12)
    _close(out[1], ref[1], 1e-12)


# --- end to end from the CLI (needs wip-text's text_pairs data module) ---------------------------

_HAS_TEXT_PAIRS = (Path(__file__).parents[1] / "conf" / "data" / "text_pairs.yaml").is_file()


def write_text_pairs(
    folder: Path, n: int = 48, length: int = 5, width: int = 12, channels: int = 4
) -> Path:
    """The agreed text_pairs layout: shards with images/prompt_embeds/attention_mask, plus
    null.safetensors (the empty prompt)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, 3:] = 0
    save_file(
        {
            "images": torch.rand(n, channels, 8, 8, generator=g) * 2 - 1,
            "prompt_embeds": torch.randn(n, length, width, generator=g),
            "attention_mask": mask,
        },
        str(folder / "shard_000.safetensors"),
    )
    null_mask = torch.zeros(1, length, dtype=torch.long)
    null_mask[0, 0] = 1
    save_file(
        {
            "prompt_embeds": torch.zeros(1, length, width),
            "attention_mask": null_mask,
        },
        str(folder / "null.safetensors"),
    )
    return folder


@pytest.mark.slow
@pytest.mark.skipif(
    not _HAS_TEXT_PAIRS, reason="data=text_pairs comes with wip-text (passes once merged)"
)
def test_fit_debug_sana_teacher_from_the_cli(tmp_path):
    # One channel at 8×8: debug=fdr's evaluation scores with the bundled digits classifier.
    teacher = save_sana_folder(tmp_path / "sana", in_channels=1, out_channels=1)
    data = write_text_pairs(tmp_path / "pairs", channels=1)
    res = run_cli(
        "fit",
        "debug=fdr",
        "data=text_pairs",
        f"data.path={data}",
        "data.val_size=16",
        "data.batch_size=8",
        f"teacher.path={teacher}",
        f"run_dir={tmp_path / 'run'}",
        "eval.teacher_nfes=[2]",  # one teacher row: the student's rows are what this checks
        "eval.teacher_grids=[edm]",
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert "fd_teacher_nfe2=" in last and "fd_student_nfe2=" in last, last


def test_sd3_teacher_x0_equals_flow_closed_form(tmp_path):
    """SD3 (pooled_projections, no mask) through load_teacher: the adapter's x̂0 = cos t·x_t −
    sin t·σ_d·F equals the flow closed form x_s − s·v at the matched s, x_s = (1 − s)·x_t/cos t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from scm_lightning.student import Student

    tiny_sd3().save_pretrained(tmp_path / "sd3" / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path / "sd3" / "scheduler")
    teacher = _load(tmp_path / "sd3")
    cond = _condition(pooled=6, mask=False)
    t = torch.tensor([0.3, 1.1], dtype=torch.float64)
    x_t = SIGMA_DATA * torch.randn(2, 4, 8, 8, dtype=torch.float64)
    F = teacher(x_t / SIGMA_DATA, t, cond)
    s = SIGMA_DATA * torch.tan(t) / (1 + SIGMA_DATA * torch.tan(t))
    x_s = ((1 - s) / torch.cos(t)).view(-1, 1, 1, 1) * x_t
    v = teacher.net(
        x_s,
        encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled_prompt_embeds,
        timestep=s * 1000,
    ).sample
    c, sn = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    _close(c * x_t - sn * SIGMA_DATA * F, x_s - s.view(-1, 1, 1, 1) * v, 1e-10)
    student = Student.from_teacher(teacher).double()
    _close(student(x_t / SIGMA_DATA, t, cond), F, 1e-12)


# --- export -> diffusers (fresh process) -> sample ----------------------------------------------
LOAD_SANA_SCRIPT = r"""
import importlib.abc, sys

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "scm_lightning" or name.startswith("scm_lightning."):
            raise ImportError("scm_lightning must not be needed to load an export")
        return None

sys.meta_path.insert(0, NoProject())
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

folder, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, low_cpu_mem_usage=False)
cond = load_file(f"{out}/cond.safetensors")
result = {}
for nfe in (1, 2):
    result[f"nfe{nfe}"] = pipe(
        num_inference_steps=nfe, prompt_embeds=cond["prompt_embeds"],
        prompt_attention_mask=cond["attention_mask"], guidance_scale=1.5,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).images
save_file(result, f"{out}/images.safetensors")
"""


@pytest.mark.slow
def test_sana_student_export_samples_in_diffusers_as_our_sampler(tmp_path):
    """A CFG-distilled student of a Sana teacher (guidance embedding on Sana's timestep
    embedder; 2 training steps with JVP attention on the masked cross-attention) exports
    through pipeline_scm.py; diffusers' loader in a fresh process (no scm_lightning) samples
    with prompt_embeds + prompt_attention_mask as our sampler does (1e-5)."""
    from safetensors.torch import load_file, save_file

    from conftest import fit_two_steps
    from scm_lightning import commands
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_swapped, resolve_profile
    from scm_lightning.restore import rebuild_module
    from test_diffusers_load import fresh_process_env

    teacher = save_sana_folder(tmp_path / "sana")
    data = write_text_pairs(tmp_path / "pairs")
    ckpt_path = fit_two_steps(
        tmp_path / "run",
        teacher,
        "data=text_pairs",
        f"data.path={data}",
        "data.val_size=16",
        "student.guidance_embedding=true",
        "student.guidance_scale_range=[1,2]",
    )
    folder = tmp_path / "export"
    assert commands.main("export", [f"ckpt={ckpt_path}", f"out={folder}"]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["adapter"]["net_class"] == "SanaTransformer2DModel"
    assert index["adapter"]["kind"] == "flow"

    cond = _condition(batch=3, dtype=torch.float32)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    save_file(
        {"prompt_embeds": cond.prompt_embeds, "attention_mask": cond.attention_mask},
        str(fresh / "cond.safetensors"),
    )
    script = fresh / "load.py"
    script.write_text(LOAD_SANA_SCRIPT)
    res = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(fresh)],
        env=fresh_process_env(fresh),
        cwd=fresh,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = load_file(str(fresh / "images.safetensors"))

    ckpt = load_checkpoint(ckpt_path)
    module, _, _ = rebuild_module(ckpt, with_teacher=False)
    with ema_swapped(module, ckpt, resolve_profile(ckpt, None)):
        for nfe in (1, 2):
            ref = module.sample(
                3,
                nfe=nfe,
                generator=torch.Generator().manual_seed(0),
                class_labels=cond,
                guidance=1.5,
            )
            torch.testing.assert_close(got[f"nfe{nfe}"], ref, rtol=0, atol=1e-5)
            assert ref.abs().max() > 1e-2


@pytest.mark.slow
def test_sd3_student_with_pooled_embeddings_exports_and_samples_as_our_sampler(tmp_path):
    """SD3 end to end: text pairs with pooled embeddings and no mask, CFG distillation (guidance
    embedding on SD3's time_text_embed, JVP attention on joint attention), export, and the
    exported pipeline (loaded here; the fresh-process load is the Sana test's) samples with
    prompt_embeds + pooled_prompt_embeds as our sampler does."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    from conftest import fit_two_steps
    from scm_lightning import commands
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_swapped, resolve_profile
    from scm_lightning.pipeline import load_pipeline
    from scm_lightning.restore import rebuild_module

    tiny_sd3().save_pretrained(tmp_path / "sd3" / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path / "sd3" / "scheduler")
    data = tmp_path / "pairs"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "images": torch.rand(48, 4, 8, 8, generator=g) * 2 - 1,
            "prompt_embeds": torch.randn(48, 5, 12, generator=g),
            "pooled_prompt_embeds": torch.randn(48, 6, generator=g),
        },
        str(data / "shard_000.safetensors"),
    )
    save_file(
        {"prompt_embeds": torch.zeros(1, 5, 12), "pooled_prompt_embeds": torch.zeros(1, 6)},
        str(data / "null.safetensors"),
    )
    ckpt_path = fit_two_steps(
        tmp_path / "run",
        tmp_path / "sd3",
        "data=text_pairs",
        f"data.path={data}",
        "data.val_size=16",
        "student.guidance_embedding=true",
        "student.guidance_scale_range=[1,2]",
    )
    folder = tmp_path / "export"
    assert commands.main("export", [f"ckpt={ckpt_path}", f"out={folder}"]) == 0
    pipe = load_pipeline(folder)
    cond = _condition(batch=3, dtype=torch.float32, pooled=6, mask=False)
    cond = TextCondition(cond.prompt_embeds, cond.pooled_prompt_embeds.float())
    ckpt = load_checkpoint(ckpt_path)
    module, _, _ = rebuild_module(ckpt, with_teacher=False)
    for nfe in (1, 2):
        got = pipe(
            num_inference_steps=nfe,
            prompt_embeds=cond.prompt_embeds,
            pooled_prompt_embeds=cond.pooled_prompt_embeds,
            guidance_scale=1.5,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images
        with ema_swapped(module, ckpt, resolve_profile(ckpt, None)):
            ref = module.sample(
                3,
                nfe=nfe,
                generator=torch.Generator().manual_seed(0),
                class_labels=cond,
                guidance=1.5,
            )
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        assert ref.abs().max() > 1e-2
