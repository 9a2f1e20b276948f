"""EDM-preconditioned teachers as TrigFlow models (spec §2; Karras et al. 2022, Table 1).

EDM: ``D(x_σ; σ) = c_skip·x_σ + c_out·F_EDM(c_in·x_σ, c_noise)`` with
``c_skip = σ_d²/(σ²+σ_d²)``, ``c_out = ±σ·σ_d/√(σ²+σ_d²)``, ``c_in = 1/√(σ²+σ_d²)``,
``c_noise = ln(σ)/4`` — exactly diffusers' ``EDMEulerScheduler.precondition_*`` (the sign of
``c_out`` is ``+`` for its "epsilon" and ``−`` for its "v_prediction").
At ``σ = σ_d·tan t`` and ``x_σ = x_t/cos t``: ``c_in·x_σ = x_t/σ_d``, ``c_skip = cos²t``,
``c_out = ±σ_d·sin t``, so ``D = cos t·x_t ± σ_d·sin t·F_EDM`` and comparing with the TrigFlow
denoiser ``D = cos t·x_t − σ_d·sin t·F`` gives ``F = ∓F_EDM`` — a closed form, no cancellation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scm_lightning.teachers.base import NetAdapter, as_time_batch, time_dtype

EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")

# ln(σ) is evaluated for σ ≥ this floor, so t = 0 gives a finite (far extrapolated) c_noise
# instead of −inf; its ∂/∂t is then 0. The EDM proposal never goes below σ ≈ 1e-4.
EDM_SIGMA_FLOOR = 1e-20


def edm_c_noise(t: Tensor, sigma_data: float) -> Tensor:
    """EDM noise conditioning ``c_noise = ln(σ_d·tan t)/4`` (Karras et al. Table 1), in float64.

    ``t`` is TrigFlow time (radians, ``(B,)``), clamped to ``[0, π/2]`` (a float32 π/2 rounds
    above π/2, where tan changes sign).
    """
    t64 = t.to(torch.float64).clamp(0.0, math.pi / 2)
    sigma = (sigma_data * torch.tan(t64)).clamp_min(EDM_SIGMA_FLOOR)
    return 0.25 * torch.log(sigma)


class EDMAdapter(NetAdapter):
    """An EDM ``F_EDM`` network (diffusers ``EDMEulerScheduler``/``EDMDPMSolverMultistepScheduler``
    convention) seen as a TrigFlow model: ``F = −F_EDM(x_t/σ_d, ln(σ_d tan t)/4)`` for
    ``prediction_type="epsilon"`` and ``F = +F_EDM(...)`` for ``"v_prediction"``.

    ``sigma_data`` must be the teacher's own σ_d (its scheduler config's ``sigma_data``).
    ``c_noise`` is computed in float64 and fed to the net as float32 (float64 for a float64
    input).
    """

    def __init__(self, net: nn.Module, sigma_data: float, prediction_type: str = "epsilon") -> None:
        super().__init__(net, sigma_data)
        if prediction_type not in EDM_PREDICTION_TYPES:
            raise ValueError(
                f"unknown EDM prediction_type {prediction_type!r}; expected one of "
                f"{EDM_PREDICTION_TYPES}"
            )
        self.prediction_type = prediction_type
        # Sign of c_out in D = c_skip·x + c_out·F_EDM, hence F_trig = −sign·F_EDM (module doc).
        self._sign = -1.0 if prediction_type == "epsilon" else 1.0

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        t = as_time_batch(t, x_scaled.shape[0], x_scaled)
        c_noise = edm_c_noise(t, self.sigma_data).to(time_dtype(x_scaled))
        out = self.call_net(x_scaled, c_noise, class_labels, guidance)
        return self._sign * out
