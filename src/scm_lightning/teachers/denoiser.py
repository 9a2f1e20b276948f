"""Denoiser networks ``D(x_σ; σ)`` (k-diffusion, EDM2 ``Precond``) as TrigFlow models (spec §2).

A denoiser predicts the clean image from ``x_σ = x0 + σ·n`` at EDM noise level ``σ``. At
``σ = σ_d·tan t`` the TrigFlow state is ``x_t = cos t·x_σ`` (spec §1), so ``x̂0 = D(x_t/cos t;
σ_d tan t)`` and the TrigFlow denoiser ``D = cos t·x_t − σ_d·sin t·F`` (spec §1) gives

    ``F = (cos t·x_t − D(x_t/cos t; σ_d tan t)) / (σ_d·sin t)``.

For an EDM-preconditioned ``D = c_skip·x_σ + c_out·F_EDM(c_in·x_σ, c_noise)`` this is exactly
``EDMAdapter``'s ``F = −F_EDM`` (tests check it in float64). The subtraction cancels as
``t → 0`` (``sin t → 0``); it runs in float64 and ``t`` is clamped to the denoiser's noise range
``[arctan(σ_min/σ_d), arctan(σ_max/σ_d)]``, so F stays finite at ``t = 0`` and ``t = π/2``
(outside the range it is the F at the nearest end, as for ``ScheduleAdapter``).

The net is called as ``net(x_σ, σ, class_labels=...)`` (k-diffusion's ``model(x, sigma)``,
EDM2's ``Precond(x, sigma, class_labels)``, or a diffusers model whose ``timestep`` is σ),
with ``σ`` a ``(B,)`` tensor; its output (tensor, tuple or ``.sample``) is ``D``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scm_lightning.teachers.base import NetAdapter, as_time_batch, time_dtype

DENOISER_SIGMA_MIN = 0.002  # EDM's trained range (Karras et al. 2022, Table 1)
DENOISER_SIGMA_MAX = 80.0


class DenoiserAdapter(NetAdapter):
    """A denoiser ``D(x_σ; σ)`` seen as a TrigFlow model (module doc).

    Args:
        net: the denoiser, ``net(x_σ (B, C, H, W), σ (B,), class_labels=...) -> x̂0``.
        sigma_data: σ_d of the data (EDM/EDM2: 0.5; EDM2 latents: 0.5 after their scaling).
        sigma_min, sigma_max: the noise range the denoiser was trained on; t is clamped to it.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float,
        sigma_min: float = DENOISER_SIGMA_MIN,  # σ below which t is clamped (t → 0 end)
        sigma_max: float = DENOISER_SIGMA_MAX,  # σ above which t is clamped (t → π/2 end)
    ) -> None:
        super().__init__(net, sigma_data)
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}"
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_range = (
            math.atan(self.sigma_min / self.sigma_data),
            math.atan(self.sigma_max / self.sigma_data),
        )

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        sd = self.sigma_data
        t = as_time_batch(t, x_scaled.shape[0], x_scaled).to(torch.float64).clamp(*self.t_range)
        shape = (-1,) + (1,) * (x_scaled.ndim - 1)
        cos_t, sin_t = torch.cos(t).reshape(shape), torch.sin(t).reshape(shape)
        x_t = sd * x_scaled.to(torch.float64)
        sigma = sd * torch.tan(t)  # EDM noise level σ = σ_d·tan t (spec §1)
        x_sigma = x_t / cos_t  # x_σ = x_t / cos t (spec §1)
        denoised = self.call_net(
            x_sigma.to(x_scaled.dtype), sigma.to(time_dtype(x_scaled)), class_labels, guidance
        )
        # F = (cos t·x_t − D(x_t/cos t; σ_d tan t)) / (σ_d sin t)  (spec §2)
        F = (cos_t * x_t - denoised.to(torch.float64)) / (sd * sin_t)
        return F.to(x_scaled.dtype)
