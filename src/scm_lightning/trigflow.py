"""TrigFlow: the pure math of Lu & Song (2024), §3 and App. B.

Units used throughout the package:

* ``t``     TrigFlow time in radians, ``t ∈ [0, π/2]`` (``t = π/2`` is pure noise).
* ``sigma`` EDM noise level, ``σ = σ_d·tan(t)`` (data units).
* ``x_t``   a TrigFlow state in data units, ``x_t = cos(t)·x0 + sin(t)·z`` with ``z ~ N(0, σ_d²I)``.
* ``F``     the raw network output in TrigFlow units (unit-variance velocity).

Every function broadcasts a per-sample ``t`` of shape ``(B,)`` against ``x`` of shape
``(B, ...)``. Nothing here imports Lightning or Hydra.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SIGMA_MIN_EDM = 0.002
SIGMA_MAX_EDM = 80.0
RHO_EDM = 7.0


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample tensor ``(B,)`` to ``(B, 1, ..., 1)`` so it broadcasts with ``x``."""
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def sigma_to_t(sigma: Tensor | float, sigma_data: float) -> Tensor:
    """EDM noise level σ -> TrigFlow time, ``t = arctan(σ/σ_d)`` (App. B)."""
    return torch.atan(torch.as_tensor(sigma) / sigma_data)


def t_to_sigma(t: Tensor | float, sigma_data: float) -> Tensor:
    """TrigFlow time -> EDM noise level, ``σ = σ_d·tan(t)`` (App. B)."""
    return sigma_data * torch.tan(torch.as_tensor(t))


def t_max_from_sigma_max(sigma_max: float = SIGMA_MAX_EDM, sigma_data: float = 0.5) -> float:
    """Largest sampling time, ``t_max = arctan(σ_max/σ_d)`` (App. G; 1.56454 for σ_d = 0.5)."""
    return math.atan(sigma_max / sigma_data)


def sample_time(
    batch_size: int,
    p_mean: float,
    p_std: float,
    sigma_data: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Log-normal time proposal ``τ ~ N(P_mean, P_std²)``, ``t = arctan(e^τ/σ_d)`` (Alg. 1).

    Returns ``(B,)`` TrigFlow times in ``(0, π/2)``.
    """
    tau = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float64)
    tau = p_mean + p_std * tau
    return torch.atan(torch.exp(tau) / sigma_data).to(dtype)


def add_noise(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """Forward process ``x_t = cos(t)·x0 + sin(t)·z`` with ``z ~ N(0, σ_d²I)`` (§3, Eq. 3)."""
    t = expand_like(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * z


def velocity_target(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """Diffusion velocity target ``v_t = dx_t/dt = cos(t)·z − sin(t)·x0`` (§3)."""
    t = expand_like(t, x0)
    return torch.cos(t) * z - torch.sin(t) * x0


def denoise(x_t: Tensor, t: Tensor, F: Tensor, sigma_data: float) -> Tensor:
    """x0 prediction / consistency function ``cos(t)·x_t − sin(t)·σ_d·F`` (§3, Eq. 5).

    Equals one DDIM step from t to 0; at ``t = 0`` it returns ``x_t`` exactly.
    """
    t = expand_like(t, x_t)
    return torch.cos(t) * x_t - torch.sin(t) * (sigma_data * F)


consistency_function = denoise


def ddim_step(x_s: Tensor, s: Tensor, t: Tensor, F: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow DDIM step s -> t: ``x_t = cos(s−t)·x_s − sin(s−t)·σ_d·F(x_s/σ_d, s)`` (App. E)."""
    d = expand_like(s - t, x_s)
    return torch.cos(d) * x_s - torch.sin(d) * (sigma_data * F)


def velocity_from_x0(x_t: Tensor, t: Tensor, x0_hat: Tensor) -> Tensor:
    """PF-ODE velocity implied by an x0 estimate: ``σ_d·F = (cos t·x_t − x̂0)/sin t`` (App. B.2)."""
    t = expand_like(t, x_t)
    return (torch.cos(t) * x_t - x0_hat) / torch.sin(t)


def edm_sigmas(
    num_steps: int,
    sigma_min: float = SIGMA_MIN_EDM,
    sigma_max: float = SIGMA_MAX_EDM,
    rho: float = RHO_EDM,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """EDM ρ-schedule: ``num_steps`` decreasing noise levels σ_max..σ_min (Karras et al. Eq. 5)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=dtype)
    i = torch.arange(num_steps, dtype=dtype)
    inv = 1.0 / rho
    return (sigma_max**inv + i / (num_steps - 1) * (sigma_min**inv - sigma_max**inv)) ** rho


def edm_time_grid(num_steps: int, sigma_data: float, **kwargs) -> Tensor:
    """EDM schedule mapped to TrigFlow times by ``t = arctan(σ/σ_d)``, with a final ``t = 0``.

    Returns ``num_steps + 1`` decreasing times (float64), the last one exactly 0.
    """
    t = sigma_to_t(edm_sigmas(num_steps, **kwargs), sigma_data)
    return torch.cat([t, t.new_zeros(1)])


def uniform_time_grid(num_steps: int, t_max: float) -> Tensor:
    """``num_steps + 1`` TrigFlow times uniform in t from ``t_max`` down to exactly 0 (float64)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < t_max <= math.pi / 2:
        raise ValueError(f"t_max must lie in (0, π/2], got {t_max}")
    grid = torch.linspace(t_max, 0.0, num_steps + 1, dtype=torch.float64)
    grid[-1] = 0.0
    return grid


def t_mid_time_grid(
    num_steps: int,
    sigma_data: float,
    t_mid: float = 1.1,
    t_max: float | None = None,
    sigma_min: float = SIGMA_MIN_EDM,
    rho: float = RHO_EDM,
) -> Tensor:
    """``num_steps + 1`` times ``[t_max, t_mid, …, 0]`` through the paper's ``t_mid`` (§5).

    ``num_steps = 1``: ``[t_max, 0]``; ``2``: ``[t_max, t_mid, 0]``; more: after ``t_mid`` the
    EDM ρ-schedule of ``num_steps`` levels from ``σ_d·tan(t_mid)`` to ``sigma_min`` with its
    last level dropped, mapped by ``t = arctan(σ/σ_d)``, then 0. Without the final 0 these are
    the multistep consistency-sampling times. ``t_max`` defaults to ``arctan(80/σ_d)``.
    Returns float64 radians; ``t_mid`` is exact (not round-tripped through tan/arctan).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if t_max is None:
        t_max = t_max_from_sigma_max(SIGMA_MAX_EDM, sigma_data)
    if num_steps == 1:
        return torch.tensor([t_max, 0.0], dtype=torch.float64)
    if not 0.0 < t_mid < t_max:
        raise ValueError(f"t_mid must lie in (0, t_max={t_max:.5f}), got {t_mid}")
    sigma_mid = sigma_data * math.tan(t_mid)
    if not sigma_min < sigma_mid:
        raise ValueError(f"sigma_min={sigma_min} must be below σ_d·tan(t_mid)={sigma_mid:.4g}")
    tail = sigma_to_t(
        edm_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_mid, rho=rho)[:-1], sigma_data
    )
    tail[0] = t_mid
    return torch.cat([torch.tensor([t_max], dtype=torch.float64), tail, tail.new_zeros(1)])


def dscm_time_grid(num_intervals: int, sigma_data: float) -> Tensor:
    """The discrete-time sCM grid (App. E, spec §3b): ``num_intervals + 1`` increasing times.

    ``t_0 = 0`` followed by the EDM ρ=7 levels σ_min = 0.002 … σ_max = 80 mapped by
    ``t_i = arctan(σ_i/σ_d)``, i = 1..N. Returns float64 radians, ``(N + 1,)``, ascending.
    """
    return edm_time_grid(num_intervals, sigma_data).flip(0)


def sample_grid_index(t: Tensor, grid: Tensor) -> Tensor:
    """The proposal discretised onto a dsCM grid (spec §3b): index ``i ∈ [1, N]`` of ``t``.

    ``t`` ``(B,)`` are proposal draws (radians), ``grid`` the ascending ``(N + 1,)`` times of
    :func:`dscm_time_grid`. Interval ``(t_{i−1}, t_i]`` maps to i (draws beyond t_N to N),
    so index i carries the proposal's mass on its interval. Returns int64 ``(B,)``.
    """
    i = torch.searchsorted(grid.to(t.device, torch.float64), t.to(torch.float64).contiguous())
    return i.clamp(1, grid.numel() - 1)


# sCT's unbiased single-sample estimate of dx_t/dt (Alg. 1) is the diffusion velocity target.
sct_velocity = velocity_target
