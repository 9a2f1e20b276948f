"""Teacher preparation (spec §3, Initialisation): turn an EDM/VP/flow teacher into TrigFlow.

A teacher whose time conditioning is not ``c_noise = t`` (EDM's ``ln(σ)/4``, DDPM's integer
timesteps, a flow's ``s``) gives a student whose ``∂_t`` diverges as ``t → π/2``. Preparation
re-wires the teacher's own network to take TrigFlow time directly and fine-tunes it with the
TrigFlow diffusion loss (Eq. 4; ``pretrain prepare_from=<teacher config>``), after which the
prepared network is distilled like any TrigFlow teacher.

Rewiring: the network is called with ``c = a·t + b``, an affine map of TrigFlow time that
sends ``[t_lo, t_hi]`` (the teacher's trained range) onto the ends of its own conditioning
range, so the positional/Fourier features it already knows are reused; an affine c_noise is
``c_noise = t`` up to the scale of the embedding frequencies. EDM outputs keep their sign
(``F_trig = −F_EDM`` for EDM "epsilon"), so an EDM teacher starts close to its own velocity;
ε- or x0-predicting VP teachers start further away and need more fine-tuning.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import Tensor, nn

from scm_lightning.teachers.base import NetAdapter, TrigFlowModel, as_time_batch, time_dtype
from scm_lightning.teachers.edm import EDMAdapter
from scm_lightning.trigflow import SIGMA_MAX_EDM, SIGMA_MIN_EDM


class PreparedTrigFlow(NetAdapter):
    """``F(x_t/σ_d, t) = sign·net(x_t/σ_d, a·t + b)``: a teacher network on TrigFlow time.

    Args:
        net: the teacher's raw network (a trainable copy).
        sigma_data: σ_d.
        time_scale, time_shift: ``a``, ``b`` of the affine time map (radians -> net units).
        output_sign: ``−1`` for EDM "epsilon" (F-prediction) networks, else ``+1``.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float,
        time_scale: float = 1.0,
        time_shift: float = 0.0,
        output_sign: float = 1.0,
    ) -> None:
        super().__init__(net, sigma_data)
        if output_sign not in (1.0, -1.0):
            raise ValueError(f"output_sign must be +1 or -1, got {output_sign}")
        self.time_scale, self.time_shift = float(time_scale), float(time_shift)
        self.output_sign = float(output_sign)

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        t = as_time_batch(t, x_scaled.shape[0], x_scaled).to(time_dtype(x_scaled))
        c_noise = self.time_scale * t + self.time_shift  # affine c_noise = t (module docstring)
        return self.output_sign * self.call_net(x_scaled, c_noise, class_labels, guidance)


def _edm_time_map(sigma_data: float) -> tuple[float, float]:
    """Affine map of the EDM range in t, ``arctan(σ/σ_d)``, onto its ``ln(σ)/4`` range."""
    t_lo, t_hi = math.atan(SIGMA_MIN_EDM / sigma_data), math.atan(SIGMA_MAX_EDM / sigma_data)
    c_lo, c_hi = math.log(SIGMA_MIN_EDM) / 4, math.log(SIGMA_MAX_EDM) / 4
    scale = (c_hi - c_lo) / (t_hi - t_lo)
    return scale, c_lo - scale * t_lo


def prepare_trigflow_model(teacher: TrigFlowModel, **overrides: Any) -> PreparedTrigFlow:
    """A trainable :class:`PreparedTrigFlow` built from a copy of ``teacher``'s network.

    The time map follows the teacher's kind: EDM -> its ``ln(σ)/4`` range; schedule teachers ->
    ``[0, π/2]`` onto ``[0, num_train_timesteps]`` (or the flow's ``[0, 1]·scale``); TrigFlow
    networks -> identity. ``overrides`` (``time_scale``, ``time_shift``, ``output_sign``) win.
    """
    if not isinstance(teacher, NetAdapter):
        raise TypeError(
            f"teacher preparation needs a teacher that wraps one network (a NetAdapter), got "
            f"{type(teacher).__name__}"
        )
    net = copy.deepcopy(teacher.net).requires_grad_(True).train()
    kwargs: dict[str, Any] = {"time_scale": 1.0, "time_shift": 0.0, "output_sign": 1.0}
    if isinstance(teacher, EDMAdapter):
        kwargs["time_scale"], kwargs["time_shift"] = _edm_time_map(teacher.sigma_data)
        kwargs["output_sign"] = -1.0 if teacher.prediction_type == "epsilon" else 1.0
    elif hasattr(teacher, "schedule"):  # VP / flow: the net's own timestep units
        schedule = teacher.schedule
        span = getattr(schedule, "num_train_timesteps", None)
        if span is None:  # tabulated DDPM schedule: its largest trained timestep
            span = float(schedule.knot_timestep.max())
        kwargs["time_scale"] = float(span) / (math.pi / 2)
    kwargs.update(overrides)
    return PreparedTrigFlow(net, teacher.sigma_data, **kwargs)
