"""Teacher preparation (spec §3 Initialisation, §4): turn an EDM/VP/flow teacher into TrigFlow.

A teacher whose time conditioning is not ``c_noise = t`` (EDM's ``ln(σ)/4``, DDPM's timestep
index, a flow's ``s``) gives a student whose ``∂_t F`` diverges as ``t → π/2``: the teacher's
own timestep changes ever faster with t there (``d timestep/dt`` grows without bound for EDM,
and reaches ~10⁵ for a 1000-step DDPM near its last trained step). Preparation rewires the
teacher's network to the sCM conditioning (spec §4: ``c_noise = t`` through a *positional*
time embedding), then fine-tunes it with the TrigFlow diffusion loss (Eq. 4; ``pretrain
prepare_from=<teacher config>``). The prepared network is a plain :class:`TrigFlowNative`
model: it exports as a stock diffusers folder and is distilled like any TrigFlow teacher.

Rewiring (:func:`prepare_trigflow_model`), for a diffusers network with a positional
``time_proj`` (``Timesteps``) feeding a ``time_embedding`` MLP (``UNet2DModel``,
``UNet2DConditionModel``):

1. the net is called with ``c_noise = t`` (radians) instead of the teacher's timestep, so the
   positional features are those of t;
2. the embedding MLP's first layer is refitted by least squares so that, over t in
   ``[0, π/2]``, its output on the new features matches the old first-layer output on the
   teacher's own conditioning (the rest of the network is untouched). Features the old
   embedding varied fast (frequencies up to ~600 rad per unit t for a DDPM teacher) cannot be
   matched by smooth features; that is the point, and the fine-tuning takes over from there;
3. an EDM "epsilon" network's output sign (``F_trig = −F_EDM``) is folded into ``conv_out``.

An EDM network then computes its own F at init, up to the time-embedding fit (EDM's input is
already ``x_t/σ_d``). A VP or flow network also sees ``x_t/σ_d`` instead of its ``x_s`` and
still predicts ε, x0 or a flow velocity instead of F: it starts further away, and the
fine-tuning learns those reparameterisations too.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from scm_lightning.teachers.base import NetAdapter, TrigFlowModel
from scm_lightning.teachers.edm import EDMAdapter
from scm_lightning.teachers.trigflow import TrigFlowNative


class _EmbeddingInputCaptured(Exception):
    """Raised by a hook to stop the teacher's forward once its time features are known."""


def _positional_time_proj(net: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The net's positional ``time_proj`` and the first layer of its ``time_embedding`` MLP."""
    from diffusers.models.embeddings import Timesteps

    proj = getattr(net, "time_proj", None)
    first = getattr(getattr(net, "time_embedding", None), "linear_1", None)
    if not isinstance(proj, Timesteps) or not isinstance(first, nn.Linear):
        kind = type(proj).__name__ if proj is not None else "no time_proj"
        raise TypeError(
            f"teacher preparation needs a diffusers network with a positional time embedding "
            f"(time_proj = Timesteps feeding time_embedding.linear_1, as in UNet2DModel and "
            f"UNet2DConditionModel with time_embedding_type='positional'); "
            f"{type(net).__name__} has {kind}"
        )
    return proj, first


def _old_time_features(teacher: NetAdapter, t: Tensor) -> Tensor:
    """``(N, E)``: the teacher's ``time_proj`` output on its own conditioning of each t.

    Runs the teacher adapter (so EDM's ``ln(σ)/4``, VP log-SNR matching with its clamping,
    flow time, ... are exactly the teacher's) and stops at the time embedding's input.
    """
    captured: list[Tensor] = []

    def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach())
        raise _EmbeddingInputCaptured

    c = teacher.in_channels
    size = teacher.sample_size or 8
    hw = tuple(size) if isinstance(size, tuple) else (int(size), int(size))
    dtype = next(teacher.net.parameters()).dtype
    handle = teacher.net.time_embedding.register_forward_pre_hook(grab)
    try:
        x = torch.zeros(t.shape[0], c, *hw, device=t.device, dtype=dtype)
        with torch.no_grad():
            teacher(x, t.to(dtype))
    except _EmbeddingInputCaptured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(teacher.net).__name__} never called its time_embedding")
    return captured[0].double()


def fit_time_embedding(
    teacher: NetAdapter, net: nn.Module, num_points: int = 1024, ridge: float = 1e-4
) -> float:
    """Refit ``net.time_embedding.linear_1`` for ``c_noise = t`` (module docstring, step 2).

    Ridge regression in float64 over ``num_points`` uniform t in ``[0, π/2]``: the new first
    layer on ``time_proj(t)`` matches the teacher's first layer on its
    ``time_proj(c_teacher(t))``. The low-frequency positional features are nearly collinear on
    ``[0, π/2]`` (singular values down to 1e-10): a plain least-squares fit reaches weights
    ~1e7 that amplify the float32 rounding of t into a large ``∂_t F``; ``ridge`` (per point)
    keeps them at the old layer's scale for a slightly larger error. Returns the relative RMS
    error of the match (0 = exact).
    """
    proj, first = _positional_time_proj(net)
    t = torch.linspace(0.0, math.pi / 2, num_points, dtype=torch.float64)
    old_first = teacher.net.time_embedding.linear_1
    target = nn.functional.linear(
        _old_time_features(teacher, t), old_first.weight.double(), old_first.bias.double()
    )  # (N, hidden): the old pre-activations
    feats = proj(t).double()  # positional features of c_noise = t
    design = torch.cat([feats, torch.ones(num_points, 1, dtype=torch.float64)], 1)
    gram = design.T @ design + ridge * num_points * torch.eye(design.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, design.T @ target)  # (E + 1, hidden)
    with torch.no_grad():
        first.weight.copy_(solution[:-1].T.to(first.weight.dtype))
        first.bias.copy_(solution[-1].to(first.bias.dtype))
    residual = design @ solution - target
    return float(residual.norm() / target.norm().clamp_min(1e-30))


def _negate_output(net: nn.Module) -> None:
    """``F → −F`` exactly, by negating the final convolution (EDM "epsilon" networks)."""
    conv_out = getattr(net, "conv_out", None)
    blocks = [*(getattr(getattr(net, "config", None), "down_block_types", None) or ())]
    if not isinstance(conv_out, nn.Conv2d) or any("Skip" in b for b in blocks):
        raise TypeError(
            f"cannot fold the EDM output sign into {type(net).__name__}: it needs a final "
            "conv_out and no skip blocks (whose outputs bypass it)"
        )
    with torch.no_grad():
        conv_out.weight.neg_()
        if conv_out.bias is not None:
            conv_out.bias.neg_()


def prepare_trigflow_model(teacher: TrigFlowModel, num_fit_points: int = 1024) -> TrigFlowNative:
    """A trainable :class:`TrigFlowNative` (``c_noise = t``) made from a copy of ``teacher``'s net.

    A TrigFlow teacher is copied as it is. Other teachers are rewired as the module docstring
    says; the fit's relative error is kept in ``.time_embedding_fit_error``. The teacher itself
    is not modified.
    """
    if not isinstance(teacher, NetAdapter):
        raise TypeError(
            f"teacher preparation needs a teacher that wraps one network (a NetAdapter), got "
            f"{type(teacher).__name__}"
        )
    if teacher.guidance_embedding is not None:
        raise TypeError("teacher preparation does not take a teacher with a guidance embedding")
    net = copy.deepcopy(teacher.net)
    error = 0.0
    if not isinstance(teacher, TrigFlowNative):
        error = fit_time_embedding(teacher, net, num_fit_points)
        if isinstance(teacher, EDMAdapter) and teacher.prediction_type == "epsilon":
            _negate_output(net)
    prepared = TrigFlowNative(net.requires_grad_(True).train(), teacher.sigma_data)
    prepared.time_embedding_fit_error = error
    return prepared
