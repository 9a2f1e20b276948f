"""Teacher preparation: an EDM teacher rewired to TrigFlow time, then fine-tuned (Eq. 4)."""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel

from scm_lightning.losses import diffusion_loss
from scm_lightning.nets.weighting import LogVarHead
from scm_lightning.teachers.edm import EDMAdapter
from scm_lightning.teachers.preparation import PreparedTrigFlow, prepare_trigflow_model


def _edm_teacher() -> EDMAdapter:
    torch.manual_seed(0)
    net = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    return EDMAdapter(net, sigma_data=0.5, prediction_type="epsilon").requires_grad_(False)


def test_prepared_edm_teacher_maps_trigflow_time_affinely_onto_c_noise():
    teacher = _edm_teacher()
    prepared = prepare_trigflow_model(teacher)
    assert isinstance(prepared, PreparedTrigFlow) and prepared.output_sign == -1.0
    assert all(p.requires_grad for p in prepared.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # teacher untouched
    # at the ends of the EDM range the prepared net sees exactly the teacher's c_noise,
    # so there F_prepared == F_teacher
    for sigma in (0.002, 80.0):
        t = torch.full((2,), math.atan(sigma / 0.5), dtype=torch.float64)
        c = prepared.time_scale * t + prepared.time_shift
        torch.testing.assert_close(c, torch.full_like(t, math.log(sigma) / 4), rtol=0, atol=1e-12)
        x = torch.randn(2, 1, 8, 8)
        torch.testing.assert_close(
            prepared(x, t.float()), teacher(x, t.float()), rtol=1e-4, atol=1e-5
        )


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
