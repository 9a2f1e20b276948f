"""Classifier-free guidance (spec §2; paper §5, App. G.2).

* :class:`GuidedTeacher`: ``dx/dt = v_u + s·(v_c − v_u)`` from one batched call (affine in F,
  so the same combination holds for F, D and the velocity).
* :class:`GuidanceEmbedding`: the student's extra input s — a positional embedding of s and a
  zero-initialised linear layer whose output is added to the net's time embedding through a
  forward hook on its ``time_embedding`` module, so ``student(x, t, guidance=s) == teacher(x, t)``
  at initialisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from scm_lightning.nets.weighting import positional_embedding
from scm_lightning.teachers.base import NetAdapter, TrigFlowModel
from scm_lightning.teachers.conditioning import (
    Condition,
    TextCondition,
    concat_conditions,
    repeat_condition,
)

# The (B, D) time embedding a guidance embedding is added to. diffusers UNets:
# `time_embedding`; TrigFlowUNet: `time_mlp`; Sana (AdaLayerNormSingle): its timestep
# embedder, which feeds both the block modulation and the output norm (as Sana-Sprint's
# guidance embedder does); SD3: `time_text_embed` (timestep + pooled text conditioning).
TIME_EMBEDDING_NAMES = (
    "time_embedding",
    "time_mlp",
    "time_embed.emb.timestep_embedder",
    "time_text_embed",
)


def _submodule(net: nn.Module, name: str) -> nn.Module | None:
    try:
        return net.get_submodule(name)
    except AttributeError:
        return None


class GuidedTeacher(TrigFlowModel):
    """CFG teacher: ``F = F_u + s·(F_c − F_u)`` with ``F_u`` at the null condition ``uncond``:
    the null class label (an int) or the empty/negative prompt's :class:`TextCondition` (1 row).

    ``forward(x_scaled, t, class_labels, guidance=None)``: ``guidance`` ``(B,)`` gives a
    per-sample scale s (sCD draws ``s ~ U[1, s_max]``) and overrides ``guidance_scale``. The
    conditional and unconditional passes run as one batch of ``2B``.
    """

    def __init__(
        self, model: TrigFlowModel, guidance_scale: float, uncond_label: int | TextCondition
    ) -> None:
        super().__init__(model.sigma_data)
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.uncond_label = (
            uncond_label if isinstance(uncond_label, TextCondition) else int(uncond_label)
        )

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def sample_size(self) -> int | None:
        return self.model.sample_size

    @property
    def num_classes(self) -> int | None:
        return self.model.num_classes

    @property
    def text_embed_dim(self) -> int | None:
        return self.model.text_embed_dim

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        s = self.guidance_scale if guidance is None else guidance
        return guided_F(self.model, x_scaled, t, class_labels, s, self.uncond_label)


def guided_F(
    model: TrigFlowModel,
    x_scaled: Tensor,
    t: Tensor,
    class_labels: Condition | None,
    guidance: Tensor | float,
    uncond_label: int | TextCondition,
) -> Tensor:
    """CFG in TrigFlow units, ``F_u + s·(F_c − F_u)``, from one batched call of ``2B``.

    ``x_scaled = x_t/σ_d`` ``(B, ...)``, ``t`` ``(B,)`` radians, ``class_labels`` ``(B,)``
    labels with ``uncond_label`` the null class, or a :class:`TextCondition` of ``B`` prompts
    with ``uncond_label`` the null prompt's (1 row); ``guidance`` s: a float or ``(B,)``.
    """
    if class_labels is None:
        raise ValueError(
            "classifier-free guidance needs class_labels (B,) or prompt embeddings (a "
            "TextCondition) for the conditional pass"
        )
    b = x_scaled.shape[0]
    t = torch.as_tensor(t, device=x_scaled.device)
    t = t.expand(b) if t.ndim == 0 else t
    if isinstance(class_labels, TextCondition):
        if not isinstance(uncond_label, TextCondition):
            raise TypeError("prompt embeddings need the null prompt's TextCondition for CFG")
        uncond: Condition = repeat_condition(uncond_label.to(class_labels.device), b)
    else:
        uncond = torch.full_like(class_labels, int(uncond_label))
    out = model(
        torch.cat([x_scaled, x_scaled]),
        torch.cat([t, t]),
        concat_conditions([class_labels, uncond]),
    )
    f_c, f_u = out[:b], out[b:]
    s = torch.as_tensor(guidance, device=x_scaled.device, dtype=out.dtype)
    s = s.reshape(-1, *([1] * (x_scaled.ndim - 1))) if s.ndim else s
    return f_u + s * (f_c - f_u)  # §5: v_u + s(v_c − v_u), affine in F


def guided_velocity(
    model: TrigFlowModel,
    x_t: Tensor,
    t: Tensor,
    class_labels: Condition | None,
    guidance: Tensor | float,
    uncond_label: int | TextCondition,
) -> Tensor:
    """Guided PF-ODE velocity in data units, ``dx_t/dt = σ_d·guided_F(x_t/σ_d, ...)`` (§5)."""
    sd = model.sigma_data
    return sd * guided_F(model, x_t / sd, t, class_labels, guidance, uncond_label)


class GuidanceEmbedding(nn.Module):
    """Zero-initialised embedding of the CFG scale s, ``(B,) -> (B, embed_dim)``.

    ``positional_embedding(input_scale·s, num_channels)`` (float32 or better) followed by a
    Linear whose weight and bias start at exactly zero. While inside :meth:`scope`, the hook
    installed by :func:`attach_guidance_embedding` adds it to the host net's time embedding.
    """

    def __init__(self, embed_dim: int, num_channels: int = 128, input_scale: float = 1.0) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.input_scale = float(input_scale)
        self.linear = nn.Linear(num_channels, embed_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self._current: Tensor | None = None

    def forward(self, s: Tensor) -> Tensor:
        feats = positional_embedding(s * self.input_scale, self.num_channels)
        return self.linear(feats.to(self.linear.weight.dtype))

    @contextmanager
    def scope(self, guidance: Tensor | float) -> Iterator[None]:
        """Make ``guidance`` the scale the time-embedding hook adds during one net call."""
        self._current = torch.as_tensor(guidance, device=self.linear.weight.device)
        try:
            yield
        finally:
            self._current = None

    def hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        """Forward hook on ``time_embedding``: ``emb + E(s)``; a no-op outside :meth:`scope`."""
        if self._current is None:
            return output
        s = self._current
        s = s.expand(output.shape[0]) if s.ndim == 0 else s
        if s.shape != (output.shape[0],):
            raise ValueError(f"guidance must have shape ({output.shape[0]},), got {tuple(s.shape)}")
        return output + self(s).to(output.dtype)


def _embedding_dim(time_embedding: nn.Module) -> int:
    """Output width of a time-embedding module (diffusers TimestepEmbedding: ``linear_2``)."""
    last = getattr(time_embedding, "linear_2", None)
    if not isinstance(last, nn.Linear):
        linears = [m for m in time_embedding.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"cannot infer the output width of {type(time_embedding).__name__}; "
                "pass embed_dim to attach_guidance_embedding"
            )
        last = linears[-1]
    return last.out_features


def attach_guidance_embedding(
    model: NetAdapter, num_channels: int = 128, embed_dim: int | None = None
) -> GuidanceEmbedding:
    """Give ``model`` a zero-initialised guidance input (spec §2) and return the embedding.

    The embedding becomes ``model.guidance_embedding`` (so its parameters train and save with
    the model) and is added to the output of ``model.net.time_embedding`` by a forward hook.
    A net that natively takes ``guidance`` needs none: this raises for it.
    """
    if not isinstance(model, NetAdapter):
        raise TypeError(f"expected a NetAdapter (a teacher adapter), got {type(model)!r}")
    if model.native_guidance:
        raise ValueError(f"{type(model.net).__name__} takes guidance natively; nothing to attach")
    if model.guidance_embedding is not None:
        raise ValueError("a guidance embedding is already attached")
    time_embedding = next(
        (m for n in TIME_EMBEDDING_NAMES if isinstance(m := _submodule(model.net, n), nn.Module)),
        None,
    )
    if time_embedding is None:
        raise ValueError(
            f"{type(model.net).__name__} has no `time_embedding` module to add a guidance "
            "embedding to; use a net with a native guidance input (TrigFlowUNet)"
        )
    dim = embed_dim if embed_dim is not None else _embedding_dim(time_embedding)
    param = next(model.net.parameters(), None)
    emb = GuidanceEmbedding(dim, num_channels)
    if param is not None:
        emb = emb.to(device=param.device, dtype=param.dtype)
    model.guidance_embedding = emb
    # A bound method: deepcopy/pickle of the whole model re-binds it to the copied embedding.
    time_embedding.register_forward_hook(emb.hook)
    return emb
