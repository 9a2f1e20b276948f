"""The one interface every teacher and student speaks: a network in TrigFlow units.

A :class:`TrigFlowModel` maps ``(x_t/σ_d, t)`` to ``F(x_t/σ_d, t)``, the raw output in
TrigFlow units, so that the PF-ODE velocity is ``dx_t/dt = σ_d·F`` (spec §1). Adapters for
EDM, VP/DDPM, flow and TrigFlow-native networks subclass it (spec §2); a student is a
trainable deep copy of the teacher's adapter, so ``student ≡ teacher`` at initialisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TrigFlowModel(nn.Module):
    """Base class: ``forward(x_scaled, t, class_labels, guidance) -> F``.

    Args (of ``forward``):
        x_scaled: ``x_t/σ_d``, shape ``(B, C, H, W)`` (or any ``(B, ...)``).
        t: TrigFlow time in radians, shape ``(B,)``.
        class_labels: optional integer labels ``(B,)`` for conditional networks.
        guidance: optional CFG scale ``(B,)`` fed to a student's guidance embedding.

    Returns ``F`` with the shape of ``x_scaled``.
    """

    sigma_data: float

    def __init__(self, sigma_data: float) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError

    # Properties the framework checks against the data before the first step.
    @property
    def in_channels(self) -> int:
        raise NotImplementedError

    @property
    def sample_size(self) -> int | None:
        return None

    @property
    def num_classes(self) -> int | None:
        return None

    def velocity(
        self,
        x_t: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """PF-ODE velocity ``dx_t/dt = σ_d·F(x_t/σ_d, t)`` in data units (spec §1)."""
        return self.sigma_data * self(x_t / self.sigma_data, t, class_labels, guidance)


def as_time_batch(t: Tensor | float, batch_size: int, like: Tensor) -> Tensor:
    """Broadcast a scalar or ``(B,)`` time to ``(B,)`` on ``like``'s device (float32 or better)."""
    t = torch.as_tensor(t, device=like.device)
    if not t.is_floating_point():
        t = t.float()
    return t.expand(batch_size) if t.ndim == 0 else t
