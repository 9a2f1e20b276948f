"""Activation checkpointing of the student in the default (one-pass) sCM step.

Checkpointing cannot be differentiated through inside the JVP (field notes), so a checkpointed
student takes two passes: a no-grad JVP and a checkpointed forward for the gradient. The
reference is the same step without checkpointing (one pass), in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from diffusers import DDIMScheduler, UNet2DModel

from conftest import run_cli
from scm_lightning.jvp.install import install_jvp_attention
from scm_lightning.losses import SCMLossConfig, scm_loss, uses_gradient_checkpointing
from scm_lightning.nets.trigflow_unet import TrigFlowUNet
from scm_lightning.student import Student
from scm_lightning.teachers.base import TrigFlowModel
from scm_lightning.teachers.schedule import ScheduleAdapter, TabulatedSchedule
from scm_lightning.teachers.trigflow import TrigFlowNative


def _trigflow_unet_teacher() -> TrigFlowModel:
    torch.manual_seed(0)
    # dropout > 0: the recomputation must replay the dropout masks of the forward
    net = TrigFlowUNet(sample_size=8, block_channels=(16, 32), attention_head_dim=16, dropout=0.2)
    for p in net.parameters():
        p.data.normal_(std=0.05)
    return TrigFlowNative(net, sigma_data=0.5)


def _tiny_unet2d() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )


def _unet2d_teacher() -> TrigFlowModel:
    schedule = TabulatedSchedule.from_alphas_cumprod(DDIMScheduler().alphas_cumprod)
    return ScheduleAdapter(_tiny_unet2d(), 0.5, schedule, "v_prediction")


TEACHERS = {"trigflow_unet": _trigflow_unet_teacher, "unet2d": _unet2d_teacher}


class CheckpointCounter:
    """Counts torch.utils.checkpoint.checkpoint calls (diffusers and TrigFlowUNet both use it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = torch.utils.checkpoint.checkpoint

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)


def _step(student: Student, teacher: TrigFlowModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x0 = 2 * torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 1
    out = scm_loss(
        student,
        x0.double(),
        SCMLossConfig(),  # the default: one pass (reuse_primal), fast JVP rules
        r=0.7,
        teacher=teacher,
        generator=torch.Generator().manual_seed(2),
    )
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in student.named_parameters()}


@pytest.mark.parametrize("name", list(TEACHERS))
def test_checkpointed_student_gives_the_same_loss_and_gradients(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = TEACHERS[name]().double().requires_grad_(False).eval()
    counter = CheckpointCounter(monkeypatch)
    results = {}
    for checkpointing in (False, True):
        student = Student.from_teacher(teacher, logvar_channels=16).double()
        assert install_jvp_attention(student) > 0
        if checkpointing:
            student.net.net.enable_gradient_checkpointing()
        assert uses_gradient_checkpointing(student) is checkpointing
        counter.calls = 0
        results[checkpointing] = (*_step(student, teacher), counter.calls)
    (loss_ref, grads_ref, calls_ref), (loss, grads, calls) = results[False], results[True]
    assert calls_ref == 0 and calls > 0  # blocks are checkpointed in the default mode
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    assert grads.keys() == grads_ref.keys()
    for n, g in grads_ref.items():
        assert g is not None and grads[n] is not None, n
        torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-14, msg=n)


@pytest.mark.slow
def test_cli_fit_with_checkpointing_trigflow_unet(tmp_path: Path) -> None:
    """The bundled default teacher (a TrigFlowUNet) with ``student.gradient_checkpointing``."""
    res = run_cli(
        "fit",
        "debug=fdr",
        "student.gradient_checkpointing=true",
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fd_student_nfe1=" in res.stdout + res.stderr


@pytest.mark.slow
def test_cli_fit_with_checkpointing_unet2d_student(tmp_path: Path) -> None:
    """A diffusers ``UNet2DModel`` teacher folder (v-prediction DDIM) distilled with
    ``student.gradient_checkpointing``; it used to die with a CheckpointError."""
    teacher = tmp_path / "teacher"
    net = _tiny_unet2d()
    for p in net.parameters():  # a non-trivial teacher
        p.data.normal_(std=0.05)
    net.save_pretrained(teacher / "unet")
    DDIMScheduler(prediction_type="v_prediction").save_pretrained(teacher / "scheduler")
    res = run_cli(
        "fit",
        "debug=fdr",
        "teacher=diffusers",
        f"teacher.path={teacher}",
        "student.gradient_checkpointing=true",
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fd_student_nfe1=" in res.stdout + res.stderr
