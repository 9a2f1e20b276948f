"""Samplers in TrigFlow units (spec §5): multistep consistency sampling and teacher PF-ODE solvers.

``model`` is any callable ``F = model(x_scaled, t, class_labels=None, guidance=None)`` in
TrigFlow units (a :class:`scm_lightning.teachers.base.TrigFlowModel`): ``x_scaled = x_t/σ_d``
``(B, ...)``, ``t`` TrigFlow time in radians ``(B,)``, ``F`` the shape of ``x_scaled``.
``class_labels`` / ``guidance`` are passed as keywords only when given, so a plain
``lambda x, t: ...`` works for unconditional models.

``noise`` is the starting state in data units, ``σ_d·n`` with ``n`` unit normal, treated as
``x_{t_max}``. Every sampler returns ``x̂0`` in data units with ``noise``'s shape and dtype.
Times are carried in float64 when ``noise`` is float64, float32 otherwise. The samplers
never build autograd graphs (``torch.no_grad``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from scm_lightning.trigflow import (
    RHO_EDM,
    SIGMA_MAX_EDM,
    SIGMA_MIN_EDM,
    add_noise,
    ddim_step,
    denoise,
    edm_sigmas,
    edm_time_grid,
    sigma_to_t,
    t_max_from_sigma_max,
)

Model = Callable[..., Tensor]

__all__ = [
    "consistency_sample",
    "consistency_times",
    "ddim_sample",
    "heun_sample",
    "sampler_nfe",
    "teacher_sample",
    "validate_times",
]


def _call(
    model: Model,
    x: Tensor,
    t: Tensor,
    sigma_data: float,
    class_labels: Tensor | None,
    guidance: Tensor | None,
) -> Tensor:
    """``F(x/σ_d, t)`` in TrigFlow units, checked to have ``x``'s shape."""
    kwargs = {}
    if class_labels is not None:
        kwargs["class_labels"] = class_labels
    if guidance is not None:
        kwargs["guidance"] = guidance
    F = model(x / sigma_data, t, **kwargs)
    if F.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(F.shape)}, expected {tuple(x.shape)}")
    return F


def _time_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_common(noise: Tensor, sigma_data: float) -> None:
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have shape (B, ...) with B >= 1, got {tuple(noise.shape)}")


def validate_times(times: Sequence[float] | Tensor) -> list[float]:
    """Check consistency-sampling times: non-empty, strictly decreasing, each in ``(0, π/2]``.

    Returns them as a list of floats (radians).
    """
    ts = [float(v) for v in (times.tolist() if isinstance(times, Tensor) else times)]
    if not ts:
        raise ValueError("times must contain at least one TrigFlow time, got an empty list")
    bad = [v for v in ts if not (0.0 < v <= math.pi / 2) or math.isnan(v)]
    if bad:
        raise ValueError(f"times must lie in (0, π/2] (radians, 0 excluded), got {ts}")
    if any(a <= b for a, b in itertools.pairwise(ts)):
        raise ValueError(f"times must be strictly decreasing, got {ts}")
    return ts


def consistency_times(
    nfe: int,
    t_max: float | None = None,
    t_mid: float = 1.1,
    sigma_data: float = 0.5,
    sigma_min: float = SIGMA_MIN_EDM,
    rho: float = RHO_EDM,
    times: Sequence[float] | None = None,
) -> list[float]:
    """Times ``τ_0 > … > τ_{N−1} > 0`` for N-step consistency sampling (spec §5).

    * ``nfe = 1``: ``[t_max]``; ``nfe = 2``: ``[t_max, t_mid]`` (paper: ``t_mid = 1.1``).
    * ``nfe > 2`` (our default, the paper gives none): ``τ_0 = t_max``, ``τ_1 = t_mid``, then
      the EDM ρ-schedule (ρ = 7) of ``nfe`` noise levels from ``σ_d·tan(t_mid)`` down to
      ``sigma_min`` with the last (≈ clean) level dropped, mapped by ``t = arctan(σ/σ_d)``.
      For ``nfe = 2`` this rule gives ``[t_max, t_mid]`` too. For σ_d = 0.5, nfe = 4:
      ≈ ``[1.5645, 1.1, 0.40, 0.06]``.
    * ``times``: an explicit list, validated and returned (its length must equal ``nfe``).

    ``t_max`` defaults to ``arctan(80/σ_d)``. Raises ValueError on ``nfe < 1``, on times
    outside ``(0, π/2]`` or not strictly decreasing.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if times is not None:
        ts = validate_times(times)
        if len(ts) != nfe:
            raise ValueError(f"explicit times {ts} have length {len(ts)}, expected nfe={nfe}")
        return ts
    if t_max is None:
        t_max = t_max_from_sigma_max(SIGMA_MAX_EDM, sigma_data)
    if nfe == 1:
        return validate_times([t_max])
    if not 0.0 < t_mid < t_max:
        raise ValueError(f"t_mid must lie in (0, t_max={t_max:.5f}), got {t_mid}")
    sigma_mid = sigma_data * math.tan(t_mid)
    if not sigma_min < sigma_mid:
        raise ValueError(f"sigma_min={sigma_min} must be below σ_d·tan(t_mid)={sigma_mid:.4g}")
    sigmas = edm_sigmas(nfe, sigma_min=sigma_min, sigma_max=sigma_mid, rho=rho)[:-1]
    tail = sigma_to_t(sigmas, sigma_data).tolist()
    tail[0] = t_mid  # exact, not round-tripped through tan/arctan
    return validate_times([t_max, *tail])


@torch.no_grad()
def consistency_sample(
    model: Model,
    noise: Tensor,
    times: Sequence[float] | Tensor,
    sigma_data: float,
    class_labels: Tensor | None = None,
    guidance: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023; spec §5).

    Starting from ``x = noise`` at ``τ_0``, alternate ``x̂0 = f_θ(x, τ_i) = cos τ_i·x −
    sin τ_i·σ_d·F(x/σ_d, τ_i)`` (Eq. 5) and, except after the last time, re-noise
    ``x = cos τ_{i+1}·x̂0 + sin τ_{i+1}·z`` with fresh ``z ~ N(0, σ_d²I)`` drawn from
    ``generator``. ``times`` (radians) come from :func:`consistency_times`. NFE = ``len(times)``.
    Returns ``x̂0`` ``(B, ...)`` in data units.
    """
    _check_common(noise, sigma_data)
    ts = validate_times(times)
    b, dt = noise.shape[0], _time_dtype(noise)
    x = noise
    x0 = noise
    for i, tau in enumerate(ts):
        t = torch.full((b,), tau, dtype=dt, device=noise.device)
        F = _call(model, x, t, sigma_data, class_labels, guidance)
        x0 = denoise(x, t, F, sigma_data).to(noise.dtype)
        if i + 1 < len(ts):
            z = sigma_data * torch.randn(
                noise.shape, generator=generator, device=noise.device, dtype=noise.dtype
            )
            t_next = torch.full((b,), ts[i + 1], dtype=dt, device=noise.device)
            x = add_noise(x0, z, t_next).to(noise.dtype)
    return x0


def _edm_grid(
    num_steps: int, sigma_data: float, sigma_min: float, sigma_max: float, rho: float
) -> list[float]:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    return edm_time_grid(
        num_steps, sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho
    ).tolist()


@torch.no_grad()
def heun_sample(
    model: Model,
    noise: Tensor,
    sigma_data: float,
    num_steps: int = 18,
    class_labels: Tensor | None = None,
    guidance: Tensor | None = None,
    sigma_min: float = SIGMA_MIN_EDM,
    sigma_max: float = SIGMA_MAX_EDM,
    rho: float = RHO_EDM,
) -> Tensor:
    """Teacher PF-ODE sampler: Heun (2nd order) in t with ``dx/dt = σ_d·F(x/σ_d, t)`` (spec §5).

    Grid: the EDM ρ-schedule of ``num_steps`` levels (σ_max..σ_min) mapped by
    ``t = arctan(σ/σ_d)`` plus a final ``t = 0`` (:func:`trigflow.edm_time_grid`). Each step
    is Heun except the last, an Euler step to ``t = 0`` (EDM Alg. 1), so NFE =
    ``2·num_steps − 1`` (35 for 18 steps). Returns ``x_0`` in data units.
    """
    _check_common(noise, sigma_data)
    grid = _edm_grid(num_steps, sigma_data, sigma_min, sigma_max, rho)
    b, dt = noise.shape[0], _time_dtype(noise)
    x = noise
    for t_cur, t_next in itertools.pairwise(grid):
        h = t_next - t_cur  # negative: integrating from noise to data
        tc = torch.full((b,), t_cur, dtype=dt, device=noise.device)
        d = sigma_data * _call(model, x, tc, sigma_data, class_labels, guidance)
        x_next = x + h * d
        if t_next > 0:  # 2nd-order correction (trapezoid), skipped on the last step
            tn = torch.full((b,), t_next, dtype=dt, device=noise.device)
            d2 = sigma_data * _call(model, x_next, tn, sigma_data, class_labels, guidance)
            x_next = x + h * 0.5 * (d + d2)
        x = x_next.to(noise.dtype)
    return x


@torch.no_grad()
def ddim_sample(
    model: Model,
    noise: Tensor,
    sigma_data: float,
    num_steps: int = 18,
    class_labels: Tensor | None = None,
    guidance: Tensor | None = None,
    sigma_min: float = SIGMA_MIN_EDM,
    sigma_max: float = SIGMA_MAX_EDM,
    rho: float = RHO_EDM,
) -> Tensor:
    """First-order TrigFlow DDIM sampler on the same grid as :func:`heun_sample`.

    Step from s to t: ``x_t = cos(s−t)·x_s − sin(s−t)·σ_d·F(x_s/σ_d, s)`` (spec §5,
    :func:`trigflow.ddim_step`); the last step (to t = 0) is the consistency function.
    NFE = ``num_steps``. Returns ``x_0`` in data units.
    """
    _check_common(noise, sigma_data)
    grid = _edm_grid(num_steps, sigma_data, sigma_min, sigma_max, rho)
    b, dt = noise.shape[0], _time_dtype(noise)
    x = noise
    for t_cur, t_next in itertools.pairwise(grid):
        s = torch.full((b,), t_cur, dtype=dt, device=noise.device)
        t = torch.full((b,), t_next, dtype=dt, device=noise.device)
        F = _call(model, x, s, sigma_data, class_labels, guidance)
        x = ddim_step(x, s, t, F, sigma_data).to(noise.dtype)
    return x


@torch.no_grad()
def teacher_sample(
    model: Model,
    noise: Tensor,
    sigma_data: float,
    nfe: int = 35,
    class_labels: Tensor | None = None,
    guidance: Tensor | None = None,
    sigma_min: float = SIGMA_MIN_EDM,
    sigma_max: float = SIGMA_MAX_EDM,
    rho: float = RHO_EDM,
) -> Tensor:
    """PF-ODE sample with a budget of ``nfe`` evaluations (spec §5 teacher reference).

    Odd ``nfe ≥ 3``: :func:`heun_sample` with ``(nfe + 1)/2`` steps (35 -> the paper's 18);
    otherwise (even, or 1): first-order :func:`ddim_sample` with ``nfe`` steps (2 -> the
    "2-NFE teacher"; 1 -> the teacher's own consistency function at ``t_max``).
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    kw = dict(
        class_labels=class_labels,
        guidance=guidance,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
    )
    if nfe % 2 == 1 and nfe > 1:
        return heun_sample(model, noise, sigma_data, (nfe + 1) // 2, **kw)
    return ddim_sample(model, noise, sigma_data, nfe, **kw)


def sampler_nfe(sampler: str, num_steps: int) -> int:
    """Network evaluations per sample and CFG pass: ``heun`` 2N−1, ``ddim``/``consistency`` N."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if sampler == "heun":
        return 2 * num_steps - 1
    if sampler in ("ddim", "consistency"):
        return num_steps
    raise ValueError(f"unknown sampler {sampler!r}; expected 'heun', 'ddim' or 'consistency'")
