"""Teachers on any schedule ``x_s = α(s)·x0 + σ(s)·ε`` as TrigFlow models (spec §2, App. B.2).

SNR matching: the TrigFlow state ``x_t = cos t·x0 + sin t·z`` (z ~ N(0, σ_d²I)) divided by
``cos t`` is ``x0 + σ_d tan t·n``. A teacher trained on data ``c·x0`` (``c = data_scale``)
sees the same state at its time s with ``σ(s)/α(s) = c·σ_d·tan t``, fed as
``x_s = α(s)·c·x_t/cos t``. Its prediction gives ``x̂0_teacher``, our ``x̂0 = x̂0_teacher/c``,
and ``σ_d·F = (cos t·x_t − x̂0)/sin t`` (``trigflow.velocity_from_x0``). All of this runs in
float64; the net itself sees ``x_s`` in the input's dtype and a float timestep.

Range: a schedule covers ``log(σ/α) ∈ [λ_min, λ_max]`` (a DDPM schedule from its first to its
last trained timestep; a flow schedule for ``s ∈ [s_min, s_max]``). ``t`` is clamped to the
matching TrigFlow interval ``[t_lo, t_hi]`` first, so outside it the adapter returns the
teacher's F at the nearest covered time: finite at ``t → 0`` and ``t → π/2``, with
``∂F/∂t = 0`` there. The proposal of Alg. 1 rarely leaves that interval (a linear-β DDPM
covers σ ∈ [0.01, 157] at σ_d = 0.5).

Example (spec §2): a rectified-flow teacher on unit-std latents with our data at σ_d:
``data_scale = 1/σ_d`` gives ``s = sin t/(sin t + cos t)`` and input ``(x_t/σ_d)/(sin t + cos t)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scm_lightning.teachers.base import NetAdapter, as_time_batch, time_dtype
from scm_lightning.trigflow import velocity_from_x0

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


class TabulatedSchedule(nn.Module):
    """A schedule known at knots: teacher timesteps ``τ_i`` with ``α_i``, ``σ_i``.

    Between knots ``τ`` and ``log α`` are interpolated linearly in ``λ = log(σ/α)`` (which
    must increase strictly along the knots), and ``σ = α·e^λ``. At a knot this is exact.
    ``__call__(lam)`` maps ``λ`` ``(B,)`` float64 to ``(timestep, α, σ)``, differentiable in
    ``λ`` (searchsorted picks the interval, ``lerp`` is smooth inside it).
    """

    def __init__(self, timesteps: Tensor, alphas: Tensor, sigmas: Tensor) -> None:
        super().__init__()
        timesteps, alphas, sigmas = (
            torch.as_tensor(v, dtype=torch.float64) for v in (timesteps, alphas, sigmas)
        )
        if not (timesteps.ndim == alphas.ndim == sigmas.ndim == 1) or not (
            len(timesteps) == len(alphas) == len(sigmas) >= 2
        ):
            raise ValueError("timesteps, alphas and sigmas must be 1-D with the same length >= 2")
        if not (torch.all(alphas > 0) and torch.all(sigmas > 0)):
            raise ValueError("alphas and sigmas must be > 0 at every knot")
        lam = torch.log(sigmas) - torch.log(alphas)
        if not torch.all(lam[1:] > lam[:-1]):
            raise ValueError("log(sigma/alpha) must increase strictly along the schedule's knots")
        self.register_buffer("knot_lambda", lam, persistent=False)
        self.register_buffer("knot_timestep", timesteps, persistent=False)
        self.register_buffer("knot_log_alpha", torch.log(alphas), persistent=False)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor, min_alpha_cumprod: float = 2.0**-24):
        """DDPM/VP: knot i is the integer timestep i, ``α_i = √ᾱ_i``, ``σ_i = √(1−ᾱ_i)``.

        ``ᾱ`` is clamped to ``[min_alpha_cumprod, 1 − 1e-12]`` so a zero-terminal-SNR schedule
        keeps a finite ``λ_max`` (diffusers uses the same 2⁻²⁴ floor).
        """
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(
            min_alpha_cumprod, 1 - 1e-12
        )
        steps = torch.arange(len(ac), dtype=torch.float64)
        return cls(steps, ac.sqrt(), (1 - ac).sqrt())

    @property
    def lambda_range(self) -> tuple[float, float]:
        return float(self.knot_lambda[0]), float(self.knot_lambda[-1])

    def forward(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        knots = self.knot_lambda
        lam = lam.clamp(knots[0], knots[-1])
        idx = torch.searchsorted(knots, lam.detach().contiguous()).clamp(1, len(knots) - 1)
        lo, hi = knots[idx - 1], knots[idx]
        w = (lam - lo) / (hi - lo)
        timestep = torch.lerp(self.knot_timestep[idx - 1], self.knot_timestep[idx], w)
        alpha = torch.exp(torch.lerp(self.knot_log_alpha[idx - 1], self.knot_log_alpha[idx], w))
        return timestep, alpha, alpha * torch.exp(lam)


class FlowSchedule(nn.Module):
    """Rectified flow ``α = 1 − s``, ``σ = s``, ``s ∈ [s_min, s_max]`` (diffusers
    ``FlowMatchEulerDiscreteScheduler``: the model's timestep is ``s·num_train_timesteps``;
    its ``shift`` only moves sampling steps and does not enter here).

    ``λ = log(s/(1−s))`` so ``s = sigmoid(λ)``.
    """

    def __init__(
        self, num_train_timesteps: float = 1000.0, s_min: float = 1e-5, s_max: float = 1 - 1e-5
    ) -> None:
        super().__init__()
        if not 0 < s_min < s_max < 1:
            raise ValueError(f"need 0 < s_min < s_max < 1, got s_min={s_min}, s_max={s_max}")
        self.num_train_timesteps = float(num_train_timesteps)
        self.s_min, self.s_max = float(s_min), float(s_max)

    @property
    def lambda_range(self) -> tuple[float, float]:
        return math.log(self.s_min / (1 - self.s_min)), math.log(self.s_max / (1 - self.s_max))

    def forward(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lo, hi = self.lambda_range
        s = torch.sigmoid(lam.clamp(lo, hi))
        return s * self.num_train_timesteps, 1 - s, s


def x0_from_prediction(
    pred: Tensor, x_s: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str
) -> Tensor:
    """Teacher's x0 estimate from its prediction at ``x_s = α x0 + σ ε`` (all broadcastable).

    epsilon ``ε̂``; v_prediction ``v = α ε − σ x0`` (Salimans & Ho 2022); sample ``x̂0``;
    flow ``u = ε − x0`` (rectified flow velocity ``dx_s/ds`` for α = 1 − s, σ = s).
    """
    if prediction_type == "epsilon":
        return (x_s - sigma * pred) / alpha
    if prediction_type == "v_prediction":
        return (alpha * x_s - sigma * pred) / (alpha**2 + sigma**2)
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow":
        return (x_s - sigma * pred) / (alpha + sigma)
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
    )


class ScheduleAdapter(NetAdapter):
    """Any ``α(s), σ(s)`` teacher as a TrigFlow model via float64 SNR matching (module doc).

    Args:
        net: the teacher, called as ``net(x_s, timestep, class_labels=...)``.
        sigma_data: our TrigFlow σ_d (std of the data we train on).
        schedule: a :class:`TabulatedSchedule` (DDPM/VP, cosine, ...) or :class:`FlowSchedule`.
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``.
        data_scale: ``c`` with teacher data = ``c``·our data (e.g. ``1/σ_d`` for a teacher
            trained on unit-std data when ours has std σ_d); default 1.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float,
        schedule: nn.Module,
        prediction_type: str,
        data_scale: float = 1.0,
    ) -> None:
        super().__init__(net, sigma_data)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )
        if not data_scale > 0:
            raise ValueError(f"data_scale must be > 0, got {data_scale}")
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.data_scale = float(data_scale)
        lam_lo, lam_hi = schedule.lambda_range
        k = self.data_scale * self.sigma_data  # σ/α = k·tan t
        self.t_range = (math.atan(math.exp(lam_lo) / k), math.atan(math.exp(lam_hi) / k))

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        c, sd = self.data_scale, self.sigma_data
        t = as_time_batch(t, x_scaled.shape[0], x_scaled).to(torch.float64)
        t = t.clamp(*self.t_range)  # stay inside the teacher's trained noise range (module doc)
        lam = math.log(c * sd) + torch.log(torch.tan(t))  # λ = log(σ/α) = log(c·σ_d·tan t)
        timestep, alpha, sigma = self.schedule(lam)
        shape = (-1,) + (1,) * (x_scaled.ndim - 1)
        alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
        x_t = sd * x_scaled.to(torch.float64)
        x_s = alpha * c * x_t / torch.cos(t).reshape(shape)
        pred = self.call_net(
            x_s.to(x_scaled.dtype), timestep.to(time_dtype(x_scaled)), class_labels, guidance
        )
        x0_hat = x0_from_prediction(pred.to(torch.float64), x_s, alpha, sigma, self.prediction_type)
        return (velocity_from_x0(x_t, t, x0_hat / c) / sd).to(x_scaled.dtype)
