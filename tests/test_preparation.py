"""Teacher preparation: an EDM/VP teacher rewired to c_noise = t, then fine-tuned (Eq. 4)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, SCMScheduler, UNet2DModel
from torch import Tensor

from conftest import run_cli
from scm_lightning.losses import diffusion_loss
from scm_lightning.nets.weighting import LogVarHead
from scm_lightning.restore import load_prepared_teacher
from scm_lightning.teachers import TrigFlowNative
from scm_lightning.teachers.edm import EDMAdapter
from scm_lightning.teachers.loading import load_teacher
from scm_lightning.teachers.preparation import prepare_trigflow_model
from scm_lightning.teachers.schedule import ScheduleAdapter, TabulatedSchedule


def _unet(**kw) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        **kw,
    )


def _edm_teacher(dtype: torch.dtype = torch.float32) -> EDMAdapter:
    return EDMAdapter(_unet().to(dtype), 0.5, "epsilon").requires_grad_(False)


def _ddpm_teacher() -> ScheduleAdapter:
    schedule = TabulatedSchedule.from_alphas_cumprod(DDPMScheduler().alphas_cumprod)
    return ScheduleAdapter(_unet().double(), 0.5, schedule, "epsilon").requires_grad_(False)


def _dF_dt_rms(model, x: Tensor, t: float, h: float = 1e-4) -> float:
    """RMS of ∂F/∂t at fixed x by float64 central differences."""
    tp = torch.full((x.shape[0],), t + h, dtype=torch.float64)
    tm = torch.full((x.shape[0],), t - h, dtype=torch.float64)
    with torch.no_grad():
        d = (model(x, tp) - model(x, tm)) / (2 * h)
    return float(d.pow(2).mean().sqrt())


def test_prepared_teacher_is_a_trigflow_model_fed_c_noise_equal_t():
    teacher = _edm_teacher()
    prepared = prepare_trigflow_model(teacher)
    assert type(prepared) is TrigFlowNative and prepared.net is not teacher.net
    assert all(p.requires_grad for p in prepared.parameters()) and prepared.training
    assert not any(p.requires_grad for p in teacher.parameters())  # teacher untouched
    seen: dict[str, Tensor] = {}
    for name, model in (("prepared", prepared), ("teacher", teacher)):
        hook = model.net.time_proj.register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].clone())
        )
        model(torch.randn(2, 1, 8, 8), torch.tensor([0.3, 1.2]))
        hook.remove()
    torch.testing.assert_close(seen["prepared"], torch.tensor([0.3, 1.2]))  # spec §4
    edm_c_noise = torch.log(0.5 * torch.tan(torch.tensor([0.3, 1.2]))) / 4
    torch.testing.assert_close(seen["teacher"], edm_c_noise)  # the teacher keeps its own


def test_prepared_edm_teacher_starts_at_the_teacher():
    """The refitted embedding (and the folded EDM sign) give the teacher's own F at init."""
    teacher = _edm_teacher(torch.float64)
    prepared = prepare_trigflow_model(teacher)
    assert 0 < prepared.time_embedding_fit_error < 0.1
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (0.1, 0.5, 1.0, 1.3, 1.5, 1.55):
        tt = torch.full((4,), t, dtype=torch.float64)
        with torch.no_grad():
            want, got = teacher(x, tt), prepared(x, tt)
        assert float((got - want).norm() / want.norm()) < 0.02, t


def test_preparation_removes_the_time_derivative_blow_up_near_pi_over_2():
    """‖∂F/∂t‖ near t = π/2: the teacher's own conditioning moves ever faster there (DDPM:
    timestep ∝ log-SNR; EDM: ln(σ_d tan t)/4), c_noise = t does not."""
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ddpm = _ddpm_teacher()
    ddpm_prepared = prepare_trigflow_model(ddpm)
    edm = _edm_teacher(torch.float64)
    edm_prepared = prepare_trigflow_model(edm)
    for t in (1.55, 1.565):
        assert _dF_dt_rms(ddpm, x, t) > 1e3 * _dF_dt_rms(ddpm_prepared, x, t)
        assert _dF_dt_rms(edm, x, t) > 5 * _dF_dt_rms(edm_prepared, x, t)
    # the prepared derivative stays flat from mid-range to the end
    mid, end = _dF_dt_rms(ddpm_prepared, x, 1.0), _dF_dt_rms(ddpm_prepared, x, 1.565)
    assert end < 5 * mid


def test_teacher_without_a_positional_time_embedding_is_refused():
    fourier = EDMAdapter(_unet(time_embedding_type="fourier"), 0.5).requires_grad_(False)
    with pytest.raises(TypeError, match=r"positional time embedding.*GaussianFourierProjection"):
        prepare_trigflow_model(fourier)
    with pytest.raises(TypeError, match="NetAdapter"):
        prepare_trigflow_model(torch.nn.Linear(2, 2))


def test_prepared_teacher_reloads_as_a_stock_trigflow_folder(tmp_path: Path):
    prepared = prepare_trigflow_model(_edm_teacher()).eval()
    prepared.net.save_pretrained(tmp_path / "unet")
    SCMScheduler(sigma_data=0.5).save_config(tmp_path / "scheduler")
    loaded = load_teacher(tmp_path)
    assert isinstance(loaded, TrigFlowNative)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.9, 1.5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), prepared(x, t), rtol=1e-5, atol=1e-6)


def test_preparation_fine_tunes_with_the_trigflow_diffusion_loss():
    prepared = prepare_trigflow_model(_edm_teacher())
    logvar = LogVarHead(16)
    opt = torch.optim.Adam([*prepared.parameters(), *logvar.parameters()], lr=2e-3)
    x0 = (torch.rand(4, 1, 8, 8) > 0.5).float().repeat(16, 1, 1, 1) * 2 - 1  # 4 patterns
    gen = torch.Generator().manual_seed(0)

    def loss() -> torch.Tensor:
        return diffusion_loss(
            prepared, x0, 0.5, -0.8, 1.6, generator=torch.Generator().manual_seed(1)
        )

    before = loss().item()
    for _ in range(30):
        opt.zero_grad()
        diffusion_loss(prepared, x0, 0.5, -0.8, 1.6, logvar=logvar, generator=gen).backward()
        opt.step()
    assert loss().item() < 0.85 * before


@pytest.mark.slow
def test_pretrain_prepare_from_runs_and_exports_a_trigflow_teacher(tmp_path: Path):
    """`pretrain prepare_from=<EDM teacher>` end to end; the export loads as c_noise = t."""
    folder = tmp_path / "edm"
    _unet().save_pretrained(folder / "unet")
    EDMEulerScheduler(sigma_data=0.5, prediction_type="epsilon").save_config(folder / "scheduler")
    res = run_cli(
        "pretrain",
        f"prepare_from={{_target_:scm_lightning.teachers.loading.load_teacher,path:'{folder}'}}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "data.batch_size=8",
        "callbacks.fid=null",
        "callbacks.samples.num_samples=4",
        "eval.num_samples=16",
        "eval.batch_size=16",
        f"run_dir={tmp_path / 'run'}",
        f"export_dir={tmp_path / 'prepared'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fd_model_nfe35=" in res.stdout.strip().splitlines()[-1]
    prepared = load_teacher(tmp_path / "prepared")
    assert isinstance(prepared, TrigFlowNative)
    assert math.isclose(prepared.sigma_data, 0.5)
    # the checkpoint rebuilds the same prepared teacher (EMA weights, as exported)
    from_ckpt = load_prepared_teacher(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert isinstance(from_ckpt, TrigFlowNative) and not from_ckpt.training
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.4, 1.4])
    with torch.no_grad():
        out = prepared(x, t)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(from_ckpt(x, t), out, rtol=1e-5, atol=1e-6)
