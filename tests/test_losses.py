"""The sCM loss against independent computations (spec §3): autograd, finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from scm_lightning import trigflow
from scm_lightning.losses import (
    SCMLossConfig,
    adaptive_weighted_loss,
    diffusion_loss,
    normalize_tangent,
    per_sample_sq_norm,
    rearranged_jvp,
    scm_loss,
    scm_tangent,
)
from scm_lightning.nets.weighting import LogVarHead

SD = 0.5


class TinyStudent(nn.Module):
    """A small F_θ(x/σ_d, t) with a choice of time conditioning, plus a w_φ head."""

    def __init__(self, dim: int, c_noise: str = "trigflow", fourier_scale: float = 1.0) -> None:
        super().__init__()
        self.c_noise = c_noise
        self.sigma_data = SD
        self.num_classes = None
        self.freqs = nn.Parameter(torch.randn(8) * fourier_scale, requires_grad=False)
        self.inp = nn.Linear(dim, 32)
        self.temb = nn.Linear(16, 32)
        self.out = nn.Linear(32, dim)
        self.logvar = LogVarHead(16)
        with torch.no_grad():
            self.logvar.linear.weight.normal_(std=0.3)  # a non-trivial w_φ for the gradient test

    def noise_cond(self, t: Tensor) -> Tensor:
        if self.c_noise == "edm":  # EDM's c_noise = ln(σ_d tan t)/4 (spec §2)
            return torch.log(SD * torch.tan(t)) / 4
        return t

    def forward(self, x: Tensor, t: Tensor, class_labels=None, guidance=None) -> Tensor:
        c = self.noise_cond(t)[:, None] * self.freqs[None] * 2 * math.pi
        emb = torch.cat([torch.cos(c), torch.sin(c)], 1).to(x.dtype)
        h = torch.tanh(self.inp(x.flatten(1)) + self.temb(emb))
        return self.out(h).view_as(x)


def make(dtype=torch.float64, **kw) -> TinyStudent:
    torch.manual_seed(0)
    return TinyStudent(12, **kw).to(dtype)


def naive_dF_dt_fd(model, x_t, t, dxdt, eps=1e-6) -> Tensor:
    """dF⁻/dt along the PF-ODE by central differences on (x_t/σ_d + h·dxdt/σ_d, t + h)."""
    fp = model((x_t + eps * dxdt) / SD, t + eps)
    fm = model((x_t - eps * dxdt) / SD, t - eps)
    return (fp - fm) / (2 * eps)


@pytest.mark.parametrize("c_noise", ["trigflow", "edm"])
def test_rearranged_jvp_matches_naive_and_finite_differences(c_noise):
    model = make(c_noise=c_noise)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    dxdt = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.4, 0.8, 1.2, 1.5], dtype=torch.float64)
    F, dF = rearranged_jvp(model, x_t, t, dxdt, SD)
    cs = (torch.cos(t) * torch.sin(t)).view(-1, 1, 1, 1)
    _, naive = torch.func.jvp(
        lambda x, tt: model(x, tt), (x_t / SD, t), (dxdt / SD, torch.ones_like(t))
    )
    torch.testing.assert_close(F, model(x_t / SD, t), rtol=1e-12, atol=1e-12)  # JVP primal
    torch.testing.assert_close(dF, cs * naive, rtol=1e-12, atol=1e-12)
    fd = naive_dF_dt_fd(model, x_t, t, dxdt)
    torch.testing.assert_close(dF, cs * fd, rtol=1e-6, atol=1e-8)


def test_tangent_equals_cos_t_times_consistency_derivative():
    """g (r=1) = cos t · df⁻/dt with df⁻/dt from Eq. 6, itself checked by differencing f."""
    model = make()
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    dxdt = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.6, 1.0, 1.4], dtype=torch.float64)
    F, dF = rearranged_jvp(model, x_t, t, dxdt, SD)
    tangent = scm_tangent(x_t, t, F, dF, dxdt, SD, r=1.0)

    def f(h: float) -> Tensor:  # consistency function along the ODE path, Eq. 5
        xt, tt = x_t + h * dxdt, t + h
        return trigflow.denoise(xt, tt, model(xt / SD, tt), SD)

    eps = 1e-6
    df_dt = (f(eps) - f(-eps)) / (2 * eps)
    torch.testing.assert_close(
        tangent, torch.cos(t).view(-1, 1, 1, 1) * df_dt, rtol=1e-6, atol=1e-8
    )
    # r = 0: only the velocity-matching term remains.
    t0 = scm_tangent(x_t, t, F, dF, dxdt, SD, r=0.0)
    expected = -(torch.cos(t) ** 2).view(-1, 1, 1, 1) * (SD * F - dxdt)
    torch.testing.assert_close(t0, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("mode", ["scd", "sct"])
def test_loss_gradient_is_the_continuous_time_cm_gradient(mode):
    """∇θ L = −2·exp(w)/D · gᵀ ∂F_θ/∂θ and ∂L/∂w = exp(w)/D·‖g‖² − 1 (spec §3, value check)."""
    student = make()
    teacher = make()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0 = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cfg = SCMLossConfig(sigma_data=SD, p_mean=-1.0, p_std=1.4)
    r = 0.7
    out = scm_loss(
        student,
        x0,
        cfg,
        r,
        teacher=teacher if mode == "scd" else None,
        generator=torch.Generator().manual_seed(4),
    )
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)

    # Independent recomputation from the spec with the same random draws.
    gen = torch.Generator().manual_seed(4)
    tau = -1.0 + 1.4 * torch.randn(6, generator=gen, dtype=torch.float64)
    t = torch.atan(torch.exp(tau) / SD)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64) * SD
    tt = t.view(-1, 1, 1, 1)
    x_t = torch.cos(tt) * x0 + torch.sin(tt) * z
    with torch.no_grad():
        dxdt = (
            SD * teacher(x_t / SD, t) if mode == "scd" else torch.cos(tt) * z - torch.sin(tt) * x0
        )
        F_minus = student(x_t / SD, t)
        dFdt = naive_dF_dt_fd(student, x_t, t, dxdt)
        df_dt = -torch.cos(tt) * (SD * F_minus - dxdt) - torch.sin(tt) * (
            r * x_t + r * SD * dFdt  # warmup r scales the second term (Alg. 1)
        )
        g = torch.cos(tt) * df_dt
        g = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
    w = student.logvar(t)
    D = x0[0].numel()
    wd = w.detach()
    surrogate = (-2 * torch.exp(wd) / D * (g * student(x_t / SD, t)).flatten(1).sum(1)).mean()
    surrogate = surrogate + (torch.exp(w) / D * g.flatten(1).pow(2).sum(1) - w).mean()
    expected = torch.autograd.grad(surrogate, params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)  # FD-limited
    # Value check: F_θ − F⁻ = 0, so L = exp(w)/D·‖g‖² − w.
    torch.testing.assert_close(
        out.loss, (torch.exp(w) / D * g.flatten(1).pow(2).sum(1) - w).mean(), rtol=1e-6, atol=1e-9
    )


def test_fp16_rearranged_jvp_stays_finite_where_naive_overflows():
    """EDM conditioning + Fourier(scale 16) time features: ∂_t c_noise ~ 1/(4 sin t cos t).

    In fp16 the naive tangent (dx/dt, 1) overflows near both ends of [0, π/2]; the
    rearranged tangents (cos t·sin t·dx/dt, cos t·sin t) keep every intermediate bounded.
    """
    torch.manual_seed(0)
    model = TinyStudent(12, c_noise="edm", fourier_scale=16.0)
    with torch.no_grad():
        model.temb.weight.mul_(40.0)  # a realistically large time-embedding gain
    model = model.half()
    t = torch.tensor([1e-3, 1e-2, 0.3, 0.8, 1.2, 1.56, math.pi / 2 - 1e-3], dtype=torch.float32)
    x_t = torch.randn(len(t), 3, 2, 2).half()
    dxdt = torch.randn(len(t), 3, 2, 2).half()
    _, dF = rearranged_jvp(model, x_t, t, dxdt, SD)
    assert dF.dtype == torch.float16
    assert torch.isfinite(dF).all()
    g = scm_tangent(x_t, t, model(x_t / SD, t), dF, dxdt, SD, 1.0)
    assert torch.isfinite(g).all()
    _, naive = torch.func.jvp(
        lambda x, tt: model(x, tt), (x_t / SD, t.half()), (dxdt / SD, torch.ones_like(t).half())
    )
    assert not torch.isfinite(naive[0]).all() and not torch.isfinite(naive[-1]).all()
    # and the fp16 rearranged tangent points where the float64 one does, at every t
    ref = model.double()
    _, dF64 = rearranged_jvp(ref, x_t.double(), t.double(), dxdt.double(), SD)
    cos = torch.nn.functional.cosine_similarity(dF.double().flatten(1), dF64.flatten(1), dim=1)
    assert (cos > 0.98).all(), cos  # fp16 through ×40 time gains: direction, not digits


def test_nonfinite_teacher_velocity_is_masked_and_counted():
    student = make(dtype=torch.float32)
    x0 = torch.randn(8, 3, 2, 2)

    def bad_teacher(x, t, labels=None, guidance=None):
        out = torch.zeros_like(x)
        out[:3] = float("nan")
        return out

    out = scm_loss(
        student,
        x0,
        SCMLossConfig(),
        1.0,
        teacher=bad_teacher,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.masked_fraction.item() == pytest.approx(3 / 8)
    assert torch.isfinite(out.loss)
    assert (out.per_sample[:3] == 0).all() and (out.per_sample[3:] != 0).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_normalize_tangent_and_config_validation():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    gn, norm = normalize_tangent(g, 0.1)
    torch.testing.assert_close(norm, torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(gn[0], torch.tensor([3.0, 4.0]) / 5.1)
    _, norm_si = normalize_tangent(g, 0.1, spatially_invariant=True)
    torch.testing.assert_close(norm_si, torch.tensor([5.0 / math.sqrt(2), 0.0]))
    for bad in (
        {"p_std": -1.0},
        {"tangent_norm_c": 0.0},
        {"sigma_data": 0.0},
        {"prior_weighting": "x"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SCMLossConfig(**bad)


@pytest.mark.parametrize("fast", [True, False])
def test_reusing_the_jvp_primal_equals_two_passes(fast):
    """One grad-enabled JVP pass (primal reused as F_θ) == no-grad JVP + separate forward."""
    student, teacher = make(), make()
    x0 = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for reuse in (False, True):
        student.zero_grad()
        cfg = SCMLossConfig(reuse_primal=reuse, fast_jvp=fast)
        out = scm_loss(student, x0, cfg, 0.6, teacher, generator=torch.Generator().manual_seed(6))
        out.loss.backward()
        results.append(
            (
                out.loss.detach(),
                [p.grad.clone() for p in student.parameters() if p.grad is not None],
            )
        )
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class DropoutStudent(TinyStudent):
    """TinyStudent with a dropout layer on its hidden features."""

    def __init__(self, p: float) -> None:
        super().__init__(12)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor, t: Tensor, class_labels=None, guidance=None) -> Tensor:
        c = self.noise_cond(t)[:, None] * self.freqs[None] * 2 * math.pi
        emb = torch.cat([torch.cos(c), torch.sin(c)], 1).to(x.dtype)
        h = self.drop(torch.tanh(self.inp(x.flatten(1)) + self.temb(emb)))
        return self.out(h).view_as(x)


@pytest.mark.parametrize("fast", [True, False])
def test_dropout_masks_are_shared_by_the_jvp_and_the_gradient_pass(fast):
    """Spec §3, Dropout: one pass shares the mask by construction; two passes fork the RNG with
    one seed, so both give the same loss and gradient (with masks that really fire)."""
    torch.manual_seed(0)
    student = DropoutStudent(0.3).double().train()
    teacher = make()
    x0 = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for reuse in (False, True):
        student.zero_grad()
        cfg = SCMLossConfig(reuse_primal=reuse, fast_jvp=fast)
        out = scm_loss(student, x0, cfg, 0.6, teacher, generator=torch.Generator().manual_seed(6))
        out.loss.backward()
        grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
        results.append((out.loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # (without the shared seed the gradient pass would draw a new mask: F_θ ≠ F⁻, other loss)
    student.drop.p = 0.0
    no_dropout = scm_loss(
        student, x0, SCMLossConfig(reuse_primal=False), 0.6, teacher,
        generator=torch.Generator().manual_seed(6),
    )  # fmt: skip
    assert abs(float(no_dropout.loss) - float(l0)) > 1e-6  # the masks changed the loss


def _theta_grad_at_the_logvar_optimum(theta, target, prior):
    """∇θ of Σ adaptive_weighted_loss with each sample's w at its own optimum ∂L/∂w = 0, found by
    Newton steps on autograd derivatives (no closed form assumed)."""
    D = target.shape[1]
    residual_sq = per_sample_sq_norm(theta - target)
    w = torch.zeros(target.shape[0], dtype=torch.float64, requires_grad=True)
    for _ in range(60):
        loss = adaptive_weighted_loss(residual_sq.detach(), w, D, prior).sum()
        (dw,) = torch.autograd.grad(loss, w, create_graph=True)
        (d2w,) = torch.autograd.grad(dw.sum(), w)  # per-sample terms: the Hessian is diagonal
        w = (w - dw / d2w).detach().requires_grad_(True)
    assert float(dw.abs().max()) < 1e-12
    loss = adaptive_weighted_loss(residual_sq, w.detach(), D, prior).sum()
    return torch.autograd.grad(loss, theta)[0], w.detach(), residual_sq.detach()


def test_prior_weighting_survives_the_adaptive_weighting():
    """λ·(exp(w)/D·‖·‖² − w): at the w_φ optimum the θ-gradient of each sample is λ times the
    unweighted one (issue 10). Weighting only exp(w)/D·‖·‖² would be cancelled by w_φ."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 6, generator=g, dtype=torch.float64)
    prior = torch.tensor([0.5, 2.0, 3.0, 10.0], dtype=torch.float64)
    weighted, w_prior, residual_sq = _theta_grad_at_the_logvar_optimum(theta, target, prior)
    plain, w_plain, _ = _theta_grad_at_the_logvar_optimum(theta, target, None)
    torch.testing.assert_close(weighted, prior[:, None] * plain, rtol=1e-10, atol=1e-14)
    # closed forms: the optimum exp(w) = D/‖·‖² for both, and ∇θ = 2λ(θ − target)/‖·‖²
    torch.testing.assert_close(w_prior, torch.log(6 / residual_sq), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_plain, w_prior, rtol=1e-12, atol=1e-12)
    closed = 2 * prior[:, None] * (theta - target).detach() / residual_sq[:, None]
    torch.testing.assert_close(weighted, closed, rtol=1e-10, atol=1e-14)


def test_inv_sigma_prior_scales_each_sample_of_the_scm_loss():
    """loss.prior_weighting=inv_sigma multiplies each per-sample sCM term by 1/(σ_d tan t)."""
    student, teacher = make(), make()
    x0 = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    outs = {
        kind: scm_loss(
            student,
            x0,
            SCMLossConfig(prior_weighting=kind),
            0.5,
            teacher,
            generator=torch.Generator().manual_seed(4),
        )
        for kind in ("none", "inv_sigma")
    }
    gen = torch.Generator().manual_seed(4)
    t = trigflow.sample_time(6, -1.0, 1.4, SD, generator=gen, dtype=torch.float64)  # its draws
    prior = 1 / (SD * torch.tan(t))
    torch.testing.assert_close(
        outs["inv_sigma"].per_sample, prior * outs["none"].per_sample, rtol=1e-12, atol=1e-12
    )


def test_float64_runs_keep_their_losses_in_float64():
    """Only half types are promoted (to float32): a float64 run's sCD and diffusion losses
    stay float64 and match a float64 recomputation to 1e-12 (float32 would miss by ~1e-7)."""
    student, teacher = make(), make()
    x0 = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cfg = SCMLossConfig(sigma_data=SD, p_mean=-1.0, p_std=1.4)
    out = scm_loss(student, x0, cfg, 1.0, teacher, generator=torch.Generator().manual_seed(4))
    assert out.loss.dtype == torch.float64

    got = diffusion_loss(
        student,
        x0,
        SD,
        -1.0,
        1.4,
        logvar=student.logvar,
        generator=torch.Generator().manual_seed(4),
    )
    gen = torch.Generator().manual_seed(4)  # the same draws: t from ln σ ~ N(−1, 1.4²), then z
    t = torch.atan(torch.exp(-1.0 + 1.4 * torch.randn(6, generator=gen, dtype=torch.float64)) / SD)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64) * SD
    tt = t.view(-1, 1, 1, 1)
    x_t, v_t = torch.cos(tt) * x0 + torch.sin(tt) * z, torch.cos(tt) * z - torch.sin(tt) * x0
    w = student.logvar(t)
    sq = (student(x_t / SD, t) - v_t / SD).flatten(1).pow(2).sum(1)
    want = (torch.exp(w) / x0[0].numel() * sq - w).mean()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
