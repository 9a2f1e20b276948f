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
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from scm_lightning.trigflow import (
    RHO_EDM,
    SIGMA_MAX_EDM,
    SIGMA_MIN_EDM,
    add_noise,
    ddim_step,
    denoise,
    edm_time_grid,
    t_max_from_sigma_max,
    t_mid_time_grid,
    uniform_time_grid,
)

if TYPE_CHECKING:  # (importing the teachers package here would pull in diffusers)
    from scm_lightning.teachers.conditioning import Condition, TextCondition

Model = Callable[..., Tensor]

__all__ = [
    "LABEL_MODES",
    "TEACHER_GRIDS",
    "class_label_rows",
    "consistency_sample",
    "consistency_times",
    "ddim_sample",
    "draw_class_labels",
    "draw_condition",
    "heun_sample",
    "sampler_nfe",
    "teacher_sample",
    "teacher_sampler_name",
    "teacher_time_grid",
    "validate_times",
]

# The teacher's standard PF-ODE time grids (all end at t = 0), see :func:`teacher_time_grid`.
TEACHER_GRIDS = ("edm", "uniform", "t_mid")
# How evaluation draws class labels (`eval.labels`): uniform over classes, or the training
# labels' frequencies (data.base.class_label_probs); see :func:`draw_class_labels`.
LABEL_MODES = ("uniform", "data")


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
    grid = t_mid_time_grid(nfe, sigma_data, t_mid, t_max, sigma_min=sigma_min, rho=rho)
    return validate_times(grid[:-1].tolist())  # the PF-ODE grid without its final t = 0


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


def teacher_time_grid(
    grid: str,
    num_steps: int,
    sigma_data: float,
    t_mid: float = 1.1,
    sigma_min: float = SIGMA_MIN_EDM,
    sigma_max: float = SIGMA_MAX_EDM,
    rho: float = RHO_EDM,
) -> list[float]:
    """``num_steps + 1`` decreasing TrigFlow times (radians) ending at exactly 0.

    ``grid`` is one of :data:`TEACHER_GRIDS`, all starting at ``t_max = arctan(σ_max/σ_d)``:

    * ``"edm"``: the EDM ρ-schedule σ_max..σ_min mapped by ``t = arctan(σ/σ_d)``, then 0
      (:func:`trigflow.edm_time_grid`). With 2 steps it is ``[t_max, arctan(σ_min/σ_d), 0]``:
      the second evaluation sits at σ = 0.002 and barely moves the sample.
    * ``"uniform"``: uniform in t (:func:`trigflow.uniform_time_grid`).
    * ``"t_mid"``: through ``t_mid`` (``[t_max, t_mid, 0]`` for 2 steps), the consistency
      sampler's times plus a final 0 (:func:`trigflow.t_mid_time_grid`).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    t_max = t_max_from_sigma_max(sigma_max, sigma_data)
    if grid == "edm":
        times = edm_time_grid(
            num_steps, sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho
        )
    elif grid == "uniform":
        times = uniform_time_grid(num_steps, t_max)
    elif grid == "t_mid":
        times = t_mid_time_grid(num_steps, sigma_data, t_mid, t_max, sigma_min=sigma_min, rho=rho)
    else:
        raise ValueError(f"unknown teacher grid {grid!r}; expected one of {list(TEACHER_GRIDS)}")
    return times.tolist()


def _pf_ode_grid(times: Sequence[float] | Tensor) -> list[float]:
    """An explicit PF-ODE grid: strictly decreasing, in ``[0, π/2]``, ending at exactly 0."""
    ts = [float(v) for v in (times.tolist() if isinstance(times, Tensor) else times)]
    if len(ts) < 2 or ts[-1] != 0.0:
        raise ValueError(f"a PF-ODE grid needs >= 2 times ending at exactly 0, got {ts}")
    validate_times(ts[:-1])
    return ts


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
    times: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Teacher PF-ODE sampler: Heun (2nd order) in t with ``dx/dt = σ_d·F(x/σ_d, t)`` (spec §5).

    Grid: ``times`` (radians, decreasing, ending at 0) when given, else the EDM ρ-schedule of
    ``num_steps`` levels (σ_max..σ_min) mapped by ``t = arctan(σ/σ_d)`` plus a final ``t = 0``
    (:func:`teacher_time_grid` ``"edm"``). Each step is Heun except the last, an Euler step to
    ``t = 0`` (EDM Alg. 1), so NFE = ``2·num_steps − 1`` (35 for 18 steps). Returns ``x_0``
    in data units.
    """
    _check_common(noise, sigma_data)
    grid = (
        teacher_time_grid("edm", num_steps, sigma_data, 1.1, sigma_min, sigma_max, rho)
        if times is None
        else _pf_ode_grid(times)
    )
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
    times: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """First-order TrigFlow DDIM sampler on the same grid as :func:`heun_sample`.

    Step from s to t: ``x_t = cos(s−t)·x_s − sin(s−t)·σ_d·F(x_s/σ_d, s)`` (spec §5,
    :func:`trigflow.ddim_step`); the last step (to t = 0) is the consistency function.
    NFE = ``num_steps`` (= ``len(times) − 1`` for an explicit grid). Returns ``x_0`` in data
    units.
    """
    _check_common(noise, sigma_data)
    grid = (
        teacher_time_grid("edm", num_steps, sigma_data, 1.1, sigma_min, sigma_max, rho)
        if times is None
        else _pf_ode_grid(times)
    )
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
    grid: str = "edm",
    t_mid: float = 1.1,
) -> Tensor:
    """PF-ODE sample with a budget of ``nfe`` evaluations (spec §5 teacher reference).

    Odd ``nfe ≥ 3``: :func:`heun_sample` with ``(nfe + 1)/2`` steps (35 -> the paper's 18);
    otherwise (even, or 1): first-order :func:`ddim_sample` with ``nfe`` steps (1 -> the
    teacher's own consistency function at ``t_max``). The steps follow ``grid``, one of
    :data:`TEACHER_GRIDS` (:func:`teacher_time_grid`; ``t_mid`` in radians for ``"t_mid"``).
    For a 2-NFE teacher use ``"t_mid"`` or ``"uniform"``: on the ``"edm"`` grid its second
    evaluation is at σ = 0.002 and adds almost nothing to the first.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    heun = nfe % 2 == 1 and nfe > 1
    steps = (nfe + 1) // 2 if heun else nfe
    times = teacher_time_grid(grid, steps, sigma_data, t_mid, sigma_min, sigma_max, rho)
    sampler = heun_sample if heun else ddim_sample
    return sampler(
        model, noise, sigma_data, steps, class_labels=class_labels, guidance=guidance, times=times
    )


def teacher_sampler_name(nfe: int, grid: str = "edm") -> str:
    """How :func:`teacher_sample` integrates at ``nfe``: ``"heun/edm"``, ``"ddim/t_mid"``, ..."""
    return f"{'heun' if nfe % 2 == 1 and nfe > 1 else 'ddim'}/{grid}"


def draw_class_labels(
    num: int,
    num_classes: int | None,
    generator: torch.Generator | None = None,
    class_probs: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """The class labels every evaluation path samples with: ``(num,)`` int64, or None.

    None for an unconditional model (``num_classes`` None/0); else i.i.d. uniform over
    ``[0, num_classes)`` or, with ``class_probs`` ``(num_classes,)``, from that distribution
    (e.g. the training labels' frequencies). Drawn from ``generator`` (on ``device``, which
    must be the generator's device), so a fixed seed gives the same labels everywhere.
    """
    if not num_classes:
        return None
    if class_probs is None:
        return torch.randint(
            int(num_classes), (num,), generator=generator, device=device, dtype=torch.long
        )
    probs = class_probs.to(device=device, dtype=torch.float64)
    if probs.shape != (num_classes,) or not (probs >= 0).all() or not probs.sum() > 0:
        raise ValueError(
            f"class_probs must be ({num_classes},) non-negative weights, got {tuple(probs.shape)}"
        )
    return torch.multinomial(probs, num, replacement=True, generator=generator)


def draw_condition(
    num: int,
    num_classes: int | None,
    generator: torch.Generator | None = None,
    class_probs: Tensor | None = None,
    device: torch.device | str | None = None,
    prompts: TextCondition | None = None,
) -> Condition | None:
    """The condition every evaluation path samples with: ``num`` prompts drawn uniformly (with
    replacement) from ``prompts`` (a text-conditioned run's held-out pairs, see
    ``data.text_pairs``), else :func:`draw_class_labels`. Drawn from ``generator``."""
    if prompts is None:
        return draw_class_labels(num, num_classes, generator, class_probs, device)
    rows = torch.randint(len(prompts), (num,), generator=generator, device=device)
    return prompts.to(rows.device)[rows]


def class_label_rows(num_classes: int, per_class: int) -> Tensor:
    """``[0]*per_class + [1]*per_class + …``: one grid row per class (``nrow=per_class``)."""
    return torch.arange(int(num_classes)).repeat_interleave(int(per_class))


def sampler_nfe(sampler: str, num_steps: int) -> int:
    """Network evaluations per sample and CFG pass: ``heun`` 2N−1, ``ddim``/``consistency`` N."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if sampler == "heun":
        return 2 * num_steps - 1
    if sampler in ("ddim", "consistency"):
        return num_steps
    raise ValueError(f"unknown sampler {sampler!r}; expected 'heun', 'ddim' or 'consistency'")
