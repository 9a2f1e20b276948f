"""Mixed precision and activation checkpointing of the sCM step (CPU autocast).

References: the same JVP / loss / gradient in float32 without autocast.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from scm_lightning.losses import SCMLossConfig, rearranged_jvp, scm_loss
from scm_lightning.nets.trigflow_unet import TrigFlowUNet
from scm_lightning.student import Student
from scm_lightning.teachers.trigflow import TrigFlowNative


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def models() -> tuple[Student, TrigFlowNative]:
    torch.manual_seed(0)
    net = TrigFlowUNet(sample_size=8, block_channels=(16, 32), attention_head_dim=16)
    for p in net.parameters():
        p.data.normal_(std=0.05)
    teacher = TrigFlowNative(net, sigma_data=0.5).requires_grad_(False).eval()
    return Student.from_teacher(teacher, logvar_channels=16), teacher


def inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x_t = 0.5 * torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.rand(batch, generator=g) * 1.4 + 0.05
    return x_t, t, torch.randn(batch, 1, 8, 8, generator=g)


def autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_bf16_jvp_tangent_agrees_with_fp32_and_jvp_precision_32_is_exact(models) -> None:
    student, _ = models
    x_t, t, dxdt = inputs()
    F32, dF32 = rearranged_jvp(student, x_t, t, dxdt, 0.5)
    with autocast():
        F16, dF16 = rearranged_jvp(student, x_t, t, dxdt, 0.5)  # inherits bf16
        Fx, dFx = rearranged_jvp(student, x_t, t, dxdt, 0.5, jvp_dtype=torch.float32)
    # bf16 has an 8-bit mantissa (unit roundoff 2^-8 ≈ 4e-3): a few roundoffs through the net
    assert 1e-4 < rel(dF16, dF32) < 5e-2 and rel(F16, F32) < 5e-2
    assert rel(dFx, dF32) < 1e-5 and rel(Fx, F32) < 1e-5 and dFx.dtype == torch.float32


def test_bf16_scm_step_keeps_time_embedding_tangent_and_loss_in_fp32(models) -> None:
    student, teacher = models
    x0 = inputs(8)[0].clamp(-1, 1)
    cfg = SCMLossConfig(jvp_dtype=None)
    seen = []
    student.net.net.time_mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with autocast():
        out = scm_loss(
            student, x0, cfg, r=0.5, teacher=teacher, generator=torch.Generator().manual_seed(3)
        )
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert seen and all(d == torch.float32 for d in seen)  # c_noise(t) embedding in fp32
    out.loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    ref = scm_loss(
        copy.deepcopy(student),
        x0,
        cfg,
        r=0.5,
        teacher=teacher,
        generator=torch.Generator().manual_seed(3),
    )
    assert abs(float(out.loss) - float(ref.loss)) < 5e-2 * abs(float(ref.loss)) + 1e-3


def test_gradient_checkpointing_gives_the_same_gradients(models) -> None:
    student, teacher = models
    x0 = inputs(4)[0].clamp(-1, 1)
    other = copy.deepcopy(student)
    other.net.net.enable_gradient_checkpointing()
    grads = []
    for model in (student, other):
        out = scm_loss(
            model,
            x0,
            SCMLossConfig(),
            r=1.0,
            teacher=teacher,
            generator=torch.Generator().manual_seed(5),
        )
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_bf16_mixed_run_with_fp32_jvp_and_checkpointing(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`trainer.precision=bf16-mixed loss.jvp_precision=32 student.gradient_checkpointing=true`
    through the real config and Trainer on the CPU."""
    from scm_lightning.config import compose_config
    from scm_lightning.training import run

    monkeypatch.delenv("SCM_RUN_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(
        "fit",
        [
            "teacher=diffusers",
            f"teacher.path={tiny_teacher}",
            "trainer=cpu",
            "trainer.precision=bf16-mixed",
            "loss.jvp_precision=32",
            "student.gradient_checkpointing=true",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            "data.batch_size=4",
            "callbacks.fid=null",
            "callbacks.progress=null",
            "callbacks.samples=null",
            "eval=none",
            "logger=csv",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    monkeypatch.delenv("SCM_RUN_DIR", raising=False)
    run(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {}
