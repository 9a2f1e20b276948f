"""Samplers: closed-form DDIM step, consistency multistep, exact transport of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from scm_lightning import trigflow
from scm_lightning.nets import TrigFlowUNet
from scm_lightning.sampling import (
    consistency_sample,
    consistency_times,
    ddim_sample,
    heun_sample,
    sampler_nfe,
    teacher_sample,
    validate_times,
)

SD = 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Recorder:
    """Wraps a TrigFlow model, recording the times it is called with and counting calls."""

    def __init__(self, fn):
        self.fn, self.times, self.calls = fn, [], 0

    def __call__(self, x_scaled, t, **kwargs):
        self.calls += 1
        assert t.shape == (x_scaled.shape[0],)
        self.times.append(float(t[0]))
        return self.fn(x_scaled, t, **kwargs)


class NativeLike(torch.nn.Module):
    """TrigFlowNative-like wrapper: the net is called with c_noise = t (spec §4)."""

    def __init__(self, net: TrigFlowUNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_scaled, t, class_labels=None, guidance=None):
        return self.net(x_scaled, t, class_labels=class_labels).sample


class Gaussian:
    """Data x0 ~ N(μ, s²) independently per element; everything in closed form (float64).

    x_t ~ N(m_t, v_t), m_t = cos t·μ, v_t = cos²t·s² + sin²t·σ_d². The PF-ODE flow is the
    affine map keeping (x_t − m_t)/√v_t constant, so the exact consistency function is
    f(x, t) = μ + s·(x − m_t)/√v_t, and E[x0|x_t] = μ + cos t·s²·(x − m_t)/v_t.
    """

    def __init__(self, shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
        self.s = torch.rand(shape, generator=g, dtype=torch.float64) * 0.4 + 0.1

    def _mv(self, t):
        c, sn = torch.cos(t), torch.sin(t)
        return c * self.mu, c**2 * self.s**2 + sn**2 * SD**2, c, sn

    def teacher_F(self, x_scaled, t):
        """Exact diffusion model: σ_d·F = (cos t·x − E[x0|x])/sin t (App. B.2)."""
        t = trigflow.expand_like(t, x_scaled)
        x = SD * x_scaled
        m, v, c, sn = self._mv(t)
        d = self.mu + c * self.s**2 * (x - m) / v
        return (c * x - d) / (sn * SD)

    def flow_to_data(self, x, t):
        t = trigflow.expand_like(t, x)
        m, v, _, _ = self._mv(t)
        return self.mu + self.s * (x - m) / torch.sqrt(v)

    def consistency_F(self, x_scaled, t):
        """F such that denoise(x, t, F) equals the exact consistency function f(x, t)."""
        x = SD * x_scaled
        f = self.flow_to_data(x, t)
        t = trigflow.expand_like(t, x)
        return (torch.cos(t) * x - f) / (torch.sin(t) * SD)


def _noise(b, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return SD * torch.randn((b, *shape), generator=g, dtype=torch.float64)


def test_ddim_step_matches_closed_form_with_native_wrapper() -> None:
    net = TrigFlowUNet(
        block_channels=(8,), attention_head_dim=8, norm_num_groups=4, embedding_channels=16
    ).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    model = Recorder(NativeLike(net))
    x = _noise(3, (1, 8, 8))
    out = ddim_sample(model, x, SD, num_steps=2)
    grid = trigflow.edm_time_grid(2, SD).tolist()
    assert model.times == pytest.approx(grid[:2], abs=0)
    # spec §5: x_t = cos(s−t)·x_s − sin(s−t)·σ_d·F(x_s/σ_d, s), by hand
    with torch.no_grad():
        f0 = net(x / SD, torch.full((3,), grid[0], dtype=torch.float64)).sample
        x1 = math.cos(grid[0] - grid[1]) * x - math.sin(grid[0] - grid[1]) * SD * f0
        f1 = net(x1 / SD, torch.full((3,), grid[1], dtype=torch.float64)).sample
        x2 = math.cos(grid[1]) * x1 - math.sin(grid[1]) * SD * f1
    assert f0.abs().max() > 1e-2
    torch.testing.assert_close(out, x2, rtol=1e-12, atol=1e-12)
    assert not out.requires_grad  # samplers run under no_grad


def test_consistency_function_is_identity_at_zero() -> None:
    x, F = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert torch.equal(trigflow.denoise(x, torch.zeros(4), F, SD), x)


def test_consistency_sampler_times_and_renoising() -> None:
    x = torch.randn(5, 1, 8, 8) * SD
    rec1 = Recorder(lambda xs, t: torch.zeros_like(xs))
    out1 = consistency_sample(rec1, x, consistency_times(1, sigma_data=SD), SD)
    t_max = math.atan(80.0 / SD)
    assert rec1.times == pytest.approx([t_max], rel=1e-6)
    assert out1.shape == x.shape
    torch.testing.assert_close(out1, math.cos(t_max) * x)  # F = 0: x̂0 = cos τ0·x

    times = consistency_times(2, sigma_data=SD)
    assert times == pytest.approx([1.56454, 1.1], abs=1e-5)
    rec2 = Recorder(lambda xs, t: torch.zeros_like(xs))
    out2 = consistency_sample(rec2, x, times, SD, generator=torch.Generator().manual_seed(3))
    assert rec2.times == pytest.approx(times, rel=1e-6) and out2.shape == x.shape
    z = SD * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x_mid = math.cos(1.1) * (math.cos(times[0]) * x) + math.sin(1.1) * z  # spec §5 re-noise
    torch.testing.assert_close(out2, math.cos(1.1) * x_mid)

    labels = torch.arange(5)
    seen = {}

    def cond(xs, t, class_labels=None, guidance=None):
        seen.update(labels=class_labels, guidance=guidance)
        return torch.zeros_like(xs)

    consistency_sample(cond, x, [1.0], SD, class_labels=labels, guidance=torch.full((5,), 1.5))
    assert torch.equal(seen["labels"], labels) and float(seen["guidance"][0]) == 1.5


def test_consistency_times_defaults_and_validation() -> None:
    t4 = consistency_times(4, sigma_data=SD)
    assert len(t4) == 4 and t4[:2] == pytest.approx([math.atan(160.0), 1.1])
    assert t4[2] == pytest.approx(0.40, abs=0.01) and t4[3] == pytest.approx(0.06, abs=0.005)
    assert consistency_times(3, times=[1.5, 1.0, 0.3]) == [1.5, 1.0, 0.3]
    with pytest.raises(ValueError, match="nfe"):
        consistency_times(0)
    with pytest.raises(ValueError, match="decreasing"):
        validate_times([1.0, 1.2])
    with pytest.raises(ValueError, match=r"\(0, π/2\]"):
        validate_times([1.7])
    with pytest.raises(ValueError, match=r"\(0, π/2\]"):
        consistency_sample(lambda xs, t: xs, torch.zeros(1, 2), [1.0, 0.0], SD)
    with pytest.raises(ValueError, match="length"):
        consistency_times(2, times=[1.5])
    with pytest.raises(ValueError, match="t_mid"):
        consistency_times(2, t_max=1.0, t_mid=1.1)


def test_nfe_counts() -> None:
    x = torch.randn(2, 1, 4, 4)
    heun = Recorder(lambda xs, t: -xs)
    heun_sample(heun, x, SD)
    assert heun.calls == 35 == sampler_nfe("heun", 18)
    ddim = Recorder(lambda xs, t: -xs)
    ddim_sample(ddim, x, SD, num_steps=7)
    assert ddim.calls == 7 == sampler_nfe("ddim", 7)
    assert ddim.times == pytest.approx(trigflow.edm_time_grid(7, SD)[:-1].tolist(), rel=1e-6)
    cm = Recorder(lambda xs, t: -xs)
    consistency_sample(cm, x, consistency_times(3), SD)
    assert cm.calls == 3 == sampler_nfe("consistency", 3)
    for budget, first in [(35, 18), (4, 4), (1, 1)]:  # odd: Heun, even or 1: DDIM
        rec = Recorder(lambda xs, t: -xs)
        teacher_sample(rec, x, SD, budget)
        assert rec.calls == budget
        assert rec.times[0] == pytest.approx(math.atan(80.0 / SD), rel=1e-6)
        assert rec.times[-1] == pytest.approx(
            float(trigflow.edm_time_grid(first, SD)[-2]), rel=1e-6
        )
    with pytest.raises(ValueError, match="nfe"):
        teacher_sample(rec, x, SD, 0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_nfe("euler", 3)


def test_exact_gaussian_heun_transports_noise_to_data() -> None:
    shape, b = (2, 4, 4), 2048
    data = Gaussian(shape)
    noise = _noise(b, shape)
    exact = data.flow_to_data(noise, torch.full((b,), math.atan(80.0 / SD), dtype=torch.float64))

    def rms(out):
        return float((out - exact).pow(2).mean().sqrt())

    out = heun_sample(data.teacher_F, noise, SD, num_steps=18)
    # measured: RMS 6.5e-3, max 3.2e-2 (worst for the sharpest, s = 0.1 elements)
    assert rms(out) < 1e-2 and (out - exact).abs().max() < 5e-2
    # 2nd order: doubling the steps divides the error by ≈ 4 (measured 0.23)
    assert rms(heun_sample(data.teacher_F, noise, SD, num_steps=36)) < 0.3 * rms(out)
    # sample statistics match N(μ, s²): 4σ statistical tolerance + a small solver bias
    assert ((out.mean(0) - data.mu).abs() < 4 * data.s / math.sqrt(b) + 0.02).all()
    assert ((out.std(0) / data.s - 1).abs() < 4 / math.sqrt(2 * b) + 0.03).all()
    # first-order DDIM on the same grid: error halves when the steps double (measured 0.51)
    e18 = rms(ddim_sample(data.teacher_F, noise, SD, num_steps=18))
    e36 = rms(ddim_sample(data.teacher_F, noise, SD, num_steps=36))
    assert 3 * rms(out) < e18 < 0.1 and 0.4 < e36 / e18 < 0.6


def test_exact_consistency_model_one_and_two_steps() -> None:
    shape = (2, 4, 4)
    data = Gaussian(shape, seed=3)
    noise = _noise(4096, shape, seed=4)
    out1 = consistency_sample(data.consistency_F, noise, consistency_times(1, sigma_data=SD), SD)
    t_max = torch.full((4096,), math.atan(80.0 / SD), dtype=torch.float64)
    torch.testing.assert_close(out1, data.flow_to_data(noise, t_max), rtol=1e-10, atol=1e-10)
    tol_m = 4 * data.s / math.sqrt(4096) + 0.01 * data.s  # + the tiny cos(t_max)·μ bias
    tol_s = 4 / math.sqrt(2 * 4096)
    assert ((out1.mean(0) - data.mu).abs() < tol_m).all()
    assert ((out1.std(0) / data.s - 1).abs() < tol_s).all()
    out2 = consistency_sample(
        data.consistency_F,
        noise,
        consistency_times(2, sigma_data=SD),
        SD,
        generator=torch.Generator().manual_seed(5),
    )
    assert ((out2.mean(0) - data.mu).abs() < tol_m).all()
    assert ((out2.std(0) / data.s - 1).abs() < tol_s).all()
    assert not torch.allclose(out1, out2)  # the second step used fresh noise
