"""Honest teacher baselines (issue 10, item 6): the teacher is scored on the standard PF-ODE
grids (EDM ρ=7, uniform in t, through t_mid) and reported with the best one, named."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from scm_lightning import trigflow
from scm_lightning.data.digits import DigitsDataModule
from scm_lightning.evaluation import final_quality
from scm_lightning.sampling import (
    TEACHER_GRIDS,
    consistency_times,
    teacher_sample,
    teacher_sampler_name,
    teacher_time_grid,
)

SD = 0.5
T_MAX = math.atan(80 / SD)


def test_time_grids_closed_form() -> None:
    assert teacher_time_grid("uniform", 4, SD) == pytest.approx(
        [T_MAX, 0.75 * T_MAX, 0.5 * T_MAX, 0.25 * T_MAX, 0.0], abs=1e-15
    )
    assert teacher_time_grid("t_mid", 2, SD, t_mid=1.1) == [T_MAX, 1.1, 0.0]
    assert teacher_time_grid("t_mid", 1, SD) == [T_MAX, 0.0]
    # the EDM grid's second time is σ_min = 0.002: why its 2-NFE teacher is ~1-NFE
    edm = teacher_time_grid("edm", 2, SD)
    assert edm == pytest.approx([T_MAX, math.atan(0.002 / SD), 0.0], abs=1e-15)
    for nfe in range(1, 6):  # through-t_mid = the consistency sampler's times + a final 0
        grid = trigflow.t_mid_time_grid(nfe, SD, 0.9)
        assert grid[-1] == 0 and grid[:-1].tolist() == consistency_times(nfe, t_mid=0.9)
        assert all(a > b for a, b in itertools.pairwise(grid.tolist()))
    with pytest.raises(ValueError, match="unknown teacher grid"):
        teacher_time_grid("karras", 2, SD)


class LinearF(nn.Module):
    """Exact TrigFlow velocity of Gaussian data ``x0 ~ N(0, a²I)``: ``σ_d·F = k(t)·x_t`` with
    ``k(t) = cos t sin t (σ_d² − a²) / v(t)``, ``v(t) = cos²t·a² + sin²t·σ_d²`` (E[v_t | x_t])."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def k(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        v = torch.cos(t) ** 2 * self.a**2 + torch.sin(t) ** 2 * SD**2
        return torch.cos(t) * torch.sin(t) * (SD**2 - self.a**2) / v

    def forward(self, x_scaled: Tensor, t: Tensor, class_labels=None, guidance=None) -> Tensor:
        return self.k(t).reshape(-1, 1, 1, 1) * x_scaled  # F = k·x_t/σ_d = k·x_scaled


def test_teacher_sample_follows_the_named_grid_and_t_mid_beats_edm_at_2_nfe() -> None:
    model = LinearF(a=0.25)
    noise = SD * torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)).double()
    # two DDIM steps through t_mid, written out: x_t = cos(s−t)·x_s − sin(s−t)·σ_d·F(x_s, s)
    x = noise
    for s, t in ((T_MAX, 1.1), (1.1, 0.0)):
        x = math.cos(s - t) * x - math.sin(s - t) * model.k(s) * x
    got = teacher_sample(model, noise, SD, 2, grid="t_mid", t_mid=1.1)
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-14)
    # exact PF-ODE solution of the Gaussian: x_0 = x_T·a/√v(t_max); the EDM grid's 2-NFE
    # sample is essentially its 1-NFE one, the t_mid / uniform grids get much closer
    exact = noise * 0.25 / math.sqrt(0.25**2 * math.cos(T_MAX) ** 2 + SD**2 * math.sin(T_MAX) ** 2)

    def err(y: Tensor) -> float:
        return float((y - exact).norm() / exact.norm())

    one = teacher_sample(model, noise, SD, 1)
    edm2 = teacher_sample(model, noise, SD, 2, grid="edm")
    assert float((edm2 - one).norm() / exact.norm()) < 0.02  # the second step moves ~nothing
    assert err(edm2) > 0.95 and err(one) > 0.95
    assert err(teacher_sample(model, noise, SD, 2, grid="t_mid")) < 0.8
    assert err(teacher_sample(model, noise, SD, 2, grid="uniform")) < err(edm2) - 0.1
    # Heun (odd NFE) on each grid gets close to the exact solution (measured 0.1-1.8 %)
    for grid in TEACHER_GRIDS:
        assert err(teacher_sample(model, noise, SD, 35, grid=grid)) < 0.05, grid
    assert teacher_sampler_name(35, "edm") == "heun/edm"
    assert teacher_sampler_name(2, "t_mid") == "ddim/t_mid"


class GridDependentTeacher(nn.Module):
    """A stand-in module whose teacher is good only on the ``t_mid`` grid."""

    def __init__(self, real: Tensor) -> None:
        super().__init__()
        self.real = real
        self.student = SimpleNamespace(num_classes=None)
        self.teacher = nn.Identity()
        self.device = torch.device("cpu")

    def teacher_sample(self, n: int, nfe: int, generator, class_labels=None, grid="edm"):
        if hasattr(self, "calls"):
            self.calls.append(grid)
        idx = torch.randint(len(self.real), (n,), generator=generator)
        noise = torch.rand((n, 1, 8, 8), generator=generator) * 2 - 1
        return self.real[idx] if grid == "t_mid" else noise

    def sample(self, n: int, nfe: int, generator, class_labels=None, **_):
        return torch.rand((n, 1, 8, 8), generator=generator) * 2 - 1


def test_final_quality_reports_the_best_grid_and_names_it(capsys) -> None:
    dm = DigitsDataModule(batch_size=8, seed=0, val_size=8, num_workers=0, conditional=False)
    module = GridDependentTeacher(dm.reference_images(400))
    cfg = OmegaConf.create(
        {"eval": {"feature": "digits", "num_samples": 200, "batch_size": 200, "seed": 0,
                  "student_nfes": [1], "teacher_nfes": [2], "teacher_grids": list(TEACHER_GRIDS),
                  "labels": "uniform"}}
    )  # fmt: skip
    results = final_quality(cfg, module, dm, SimpleNamespace(callbacks=[], is_global_zero=True))
    per_grid = {g: results[f"fd_teacher_nfe2_{g}"] for g in TEACHER_GRIDS}
    assert results["teacher_grid_nfe2"] == "t_mid" == min(per_grid, key=per_grid.get)
    assert results["fd_teacher_nfe2"] == per_grid["t_mid"] < per_grid["edm"] / 10
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fd_teacher_nfe2=") and "teacher_grid_nfe2=t_mid" in last
    assert "fd_teacher_nfe2_edm" not in last  # the headline line holds the best figures
    module.calls = []
    cfg.eval.teacher_nfes = [1]  # one NFE: every grid is [t_max, 0], scored once
    results = final_quality(cfg, module, dm, SimpleNamespace(callbacks=[], is_global_zero=True))
    assert module.calls == ["edm"] and results["teacher_grid_nfe1"] == "edm"
    assert "fd_teacher_nfe1_uniform" not in results
