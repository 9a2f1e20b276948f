"""DenoiserAdapter: a denoiser D(x; σ) (k-diffusion, EDM2) as a TrigFlow teacher (spec §2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import EDMEulerScheduler
from torch import Tensor, nn

from scm_lightning.teachers.denoiser import DenoiserAdapter
from scm_lightning.teachers.edm import EDMAdapter
from test_teachers import RES, C, tiny_unet


class EDMPrecond(nn.Module):
    """An EDM-preconditioned denoiser ``D(x_σ; σ) = c_skip·x_σ + c_out·F_EDM(c_in·x_σ,
    c_noise)`` built with diffusers' own ``EDMEulerScheduler.precondition_*`` (independent of
    both adapters)."""

    def __init__(self, f_edm: nn.Module, sigma_data: float, prediction_type: str) -> None:
        super().__init__()
        self.f_edm = f_edm
        self.sched = EDMEulerScheduler(sigma_data=sigma_data, prediction_type=prediction_type)

    def forward(self, x_sigma: Tensor, sigma: Tensor) -> Tensor:
        s4 = sigma.reshape(-1, 1, 1, 1)
        c_noise = self.sched.precondition_noise(sigma)
        out = self.f_edm(self.sched.precondition_inputs(x_sigma, s4), c_noise).sample
        return self.sched.precondition_outputs(x_sigma, out, s4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_denoiser_of_an_edm_net_equals_the_edm_adapter(prediction_type: str, sigma_data: float):
    """Spec §2: for D built from F_EDM, (cos t·x_t − D(x_t/cos t; σ_d tan t))/(σ_d sin t) is
    EDMAdapter's closed form ∓F_EDM, in float64 over the EDM range."""
    f_edm = tiny_unet()  # float64
    denoiser = DenoiserAdapter(EDMPrecond(f_edm, sigma_data, prediction_type), sigma_data)
    edm = EDMAdapter(f_edm, sigma_data, prediction_type)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, C, RES, RES, generator=g, dtype=torch.float64)
    lo, hi = denoiser.t_range
    t = torch.tensor([lo, 0.01, 0.2, 0.8, 1.3, hi], dtype=torch.float64)
    with torch.no_grad():
        got, ref = denoiser(x, t), edm(x, t)
    assert ref.abs().mean() > 0.1
    # the subtraction cancels ~ 1/sin t digits: 1e-16/sin(t_lo) ≈ 1e-13 at σ = 0.002
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_denoiser_is_finite_at_both_ends(dtype: torch.dtype) -> None:
    """t = 0 (sin t = 0) and t = π/2 (cos t = 0): finite; outside [σ_min, σ_max] the F of the
    nearest covered time."""
    denoiser = DenoiserAdapter(EDMPrecond(tiny_unet(dtype=dtype), 0.5, "epsilon"), 0.5)
    x = torch.randn(4, C, RES, RES, dtype=dtype)
    lo, hi = denoiser.t_range
    t = torch.tensor([0.0, 1e-12, torch.pi / 2, 2.0], dtype=torch.float64)
    with torch.no_grad():
        out = denoiser(x, t)
        ends = denoiser(x, torch.tensor([lo, lo, hi, hi], dtype=torch.float64))
    assert torch.isfinite(out).all() and out.dtype == dtype
    torch.testing.assert_close(out, ends)


def test_denoiser_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="sigma_min"):
        DenoiserAdapter(nn.Identity(), 0.5, sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        DenoiserAdapter(nn.Identity(), 0.5, sigma_min=2.0, sigma_max=1.0)


def _denoiser_folder(path: Path) -> Path:
    """A diffusers model folder whose net is read as a denoiser (its output is x̂0)."""
    from test_export import _unet2d

    _unet2d().save_pretrained(path)
    return path


def test_custom_teacher_config_selects_the_denoiser(tmp_path: Path) -> None:
    """The README's custom-teacher overrides compose and build a DenoiserAdapter."""
    from diffusers import UNet2DModel

    from scm_lightning.config import compose_config
    from scm_lightning.training import build_teacher

    folder = _denoiser_folder(tmp_path / "denoiser")
    cfg = compose_config(
        "fit",
        [
            f"run_dir={tmp_path / 'run'}",
            "teacher=custom",
            "teacher._target_=scm_lightning.teachers.denoiser.DenoiserAdapter",
            "+teacher.net._target_=diffusers.UNet2DModel.from_pretrained",
            f"+teacher.net.pretrained_model_name_or_path={folder}",
            "+teacher.sigma_data=0.5",
        ],
    )
    teacher = build_teacher(cfg.teacher)
    assert isinstance(teacher, DenoiserAdapter) and not teacher.training
    direct = DenoiserAdapter(UNet2DModel.from_pretrained(folder), 0.5).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 0.9, 1.4])
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, t), direct(x, t))


@pytest.mark.slow
def test_fit_and_export_with_a_denoiser_teacher(tmp_path: Path) -> None:
    """CLI: fit 2 steps from a denoiser teacher, export, load the folder: kind=denoiser,
    and the exported student's F equals the checkpoint's student."""
    from conftest import run_cli
    from scm_lightning import commands
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.pipeline import load_pipeline
    from scm_lightning.restore import rebuild_module

    folder = _denoiser_folder(tmp_path / "denoiser")
    run = tmp_path / "run"
    res = run_cli(
        "fit",
        f"run_dir={run}",
        "teacher=custom",
        "teacher._target_=scm_lightning.teachers.denoiser.DenoiserAdapter",
        "+teacher.net._target_=diffusers.UNet2DModel.from_pretrained",
        f"+teacher.net.pretrained_model_name_or_path={folder}",
        "+teacher.sigma_data=0.5",
        "trainer.max_steps=2",
        "data.batch_size=8",
        "eval=none",
        "callbacks.fid=null",
        "callbacks.samples=null",
        "trainer.enable_progress_bar=false",
        "callbacks.checkpoint.every_n_train_steps=2",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert (
        commands.main("export", [f"ckpt={ckpt}", f"out={tmp_path / 'export'}", "ema=online"]) == 0
    )
    pipe = load_pipeline(tmp_path / "export")
    assert pipe.adapter_config["kind"] == "denoiser"
    module, _, _ = rebuild_module(load_checkpoint(ckpt))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 0.9, 1.4])
    with torch.no_grad():
        torch.testing.assert_close(pipe.model_F(x, t), module.student(x, t), rtol=0, atol=1e-6)


def test_readme_denoiser_snippet_runs() -> None:
    from test_diffusers_load import readme_block

    scope: dict = {}
    exec(readme_block("Denoiser teachers (k-diffusion / EDM2)"), scope)
    velocity = scope["velocity"]
    assert velocity.shape == (4, 3, 32, 32) and torch.isfinite(velocity).all()
    # the Gaussian's exact denoiser: x0 = cos t·x_t, so the velocity vanishes
    assert velocity.abs().max() < 1e-5
