"""dsCM, the discrete-time baseline (spec §3b): grid, index draw, finite-difference tangent
(float64, against the continuous sCD tangent) and one `fit debug=fdr loss=dscm` from the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from scm_lightning import trigflow
from scm_lightning.losses import (
    SCMLossConfig,
    dscm_loss,
    dscm_tangent,
    rearranged_jvp,
    scm_tangent,
)
from test_losses import SD, make


def test_grid_is_the_edm_rho7_schedule_in_trigflow_time_with_t0_zero():
    grid = trigflow.dscm_time_grid(16, SD)
    assert grid.shape == (17,) and grid.dtype == torch.float64
    assert grid[0] == 0 and bool((grid[1:] > grid[:-1]).all())
    # independent: σ_i = (σ_max^(1/ρ) + (i/(N−1))(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, descending
    sig = [(80 ** (1 / 7) + i / 15 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(16)]
    expected = torch.tensor([0.0] + [math.atan(s / SD) for s in reversed(sig)], dtype=torch.float64)
    torch.testing.assert_close(grid, expected, rtol=1e-13, atol=1e-15)


def test_grid_index_carries_the_proposal_mass_of_its_interval():
    """P(i) = Φ((ln(σ_d tan t_i) − P_mean)/P_std) − Φ(… t_{i−1} …) (first/last absorb the tails)."""
    n, p_mean, p_std = 8, -1.0, 1.4
    grid = trigflow.dscm_time_grid(n, SD)
    draws = trigflow.sample_time(
        400_000, p_mean, p_std, SD, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    idx = trigflow.sample_grid_index(draws, grid)
    assert int(idx.min()) >= 1 and int(idx.max()) <= n
    freq = torch.bincount(idx, minlength=n + 1)[1:].double() / idx.numel()

    def cdf(t: float) -> float:
        if t <= 0:
            return 0.0
        return 0.5 * (1 + math.erf((math.log(SD * math.tan(t)) - p_mean) / (p_std * math.sqrt(2))))

    edges = [cdf(float(t)) for t in grid]
    mass = torch.tensor([edges[i] - edges[i - 1] for i in range(1, n + 1)], dtype=torch.float64)
    mass[-1] += 1 - edges[-1]  # draws above t_N are clamped to N
    torch.testing.assert_close(freq, mass, rtol=0, atol=3e-3)  # ~4σ of 400k draws


def _tangents(n: int, target_t: float, model, teacher) -> tuple[torch.Tensor, torch.Tensor, float]:
    """dsCM's g and the continuous sCD g at the grid time nearest ``target_t`` (float64)."""
    grid = trigflow.dscm_time_grid(n, SD)
    i = int((grid - target_t).abs().argmin())
    t, t_prev = grid[i].repeat(4), grid[i - 1].repeat(4)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    z = SD * torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    x_t = trigflow.add_noise(x0, z, t)
    with torch.no_grad():
        F_teacher = teacher(x_t / SD, t)
        x_prev = trigflow.ddim_step(x_t, t, t_prev, F_teacher, SD)
        F_minus, F_minus_prev = model(x_t / SD, t), model(x_prev / SD, t_prev)
    dxdt = SD * F_teacher
    g_discrete = dscm_tangent(x_t, t, t_prev, F_minus, F_minus_prev, dxdt, SD, r=0.8)
    F_jvp, dF = rearranged_jvp(model, x_t, t, dxdt, SD)
    g_continuous = scm_tangent(x_t, t, F_jvp, dF, dxdt, SD, r=0.8)
    return g_discrete, g_continuous, float(t[0] - t_prev[0])


def test_finite_difference_tangent_converges_to_the_continuous_one_at_first_order():
    """‖g_dsCM − g_sCD‖ = O(t − t') = O(1/N): the one-sided difference quotient is first order,
    and the EDM grid's spacing at a fixed t shrinks like 1/N. Checked in float64 at three times
    over N = 64 … 4096: the error falls ~4× per 4× N and ~linearly in the step h."""
    student, teacher = make(), make()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for target in (0.3, 0.9, 1.3):
        errs, steps = [], []
        for n in (64, 256, 1024, 4096):
            g_d, g_c, h = _tangents(n, target, student, teacher)
            errs.append(float((g_d - g_c).norm() / g_c.norm()))
            steps.append(h)
        assert errs[-1] < 1e-2, (target, errs)  # N = 4096: ~0.3 % (measured)
        for k in range(3):
            ratio = errs[k + 1] / errs[k]
            assert 0.12 < ratio < 0.4, (target, errs)  # first order: ≈ 1/4 per 4× N
            # error/h is the first-order constant: it settles as h → 0
        consts = [e / h for e, h in zip(errs, steps, strict=True)]
        assert abs(consts[-1] / consts[-2] - 1) < 0.1, (target, consts)


def test_dscm_loss_value_is_the_adaptive_loss_of_its_normalised_tangent():
    """F_θ − F⁻ = 0 in value, so L = exp(w)/D·‖g/(‖g‖+c)‖² − w with g recomputed from the spec
    (same draws: the proposal, then z)."""
    student, teacher = make(), make()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0 = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cfg = SCMLossConfig(num_intervals=32)
    out = dscm_loss(student, x0, cfg, 0.6, teacher, generator=torch.Generator().manual_seed(4))

    gen = torch.Generator().manual_seed(4)
    tau = -1.0 + 1.4 * torch.randn(6, generator=gen, dtype=torch.float64)
    draw = torch.atan(torch.exp(tau) / SD)
    grid = trigflow.dscm_time_grid(32, SD)
    i = torch.tensor([int((grid < d).sum()) for d in draw]).clamp(1, 32)  # (t_{i−1}, t_i] -> i
    t, tp = grid[i], grid[i - 1]
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64) * SD
    tt, ttp = t.view(-1, 1, 1, 1), tp.view(-1, 1, 1, 1)
    x_t = torch.cos(tt) * x0 + torch.sin(tt) * z
    with torch.no_grad():
        v = SD * teacher(x_t / SD, t)
        x_p = torch.cos(tt - ttp) * x_t - torch.sin(tt - ttp) * v
        Fm, Fp = student(x_t / SD, t), student(x_p / SD, tp)
        f_now = torch.cos(tt) * x_t - torch.sin(tt) * SD * Fm  # consistency function, Eq. 5
        f_prev = torch.cos(ttp) * x_p - torch.sin(ttp) * SD * Fp
        # r = 1 part from the raw difference quotient; the r-split (spec §3b) checked below.
        g1 = torch.cos(tt) * (f_now - f_prev) / torch.sin(tt - ttp)
        g0 = -torch.cos(tt) * torch.cos(ttp) * (SD * Fm - v)
        g = g0 + 0.6 * (g1 - g0)
        gn = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
        w = student.logvar(t)
    expected = (torch.exp(w) / 12 * gn.flatten(1).pow(2).sum(1) - w).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-9)  # w_φ is float32


@pytest.mark.slow
def test_fit_debug_fdr_loss_dscm_from_the_cli(tmp_path: Path) -> None:
    res = run_cli(
        "fit", "debug=fdr", "loss=dscm", "loss.num_intervals=16", f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    figures = dict(kv.split("=") for kv in last.split())
    assert all(math.isfinite(float(v)) for k, v in figures.items() if k.startswith("fd_")), last
