"""The one interface every teacher and student speaks: a network in TrigFlow units.

A :class:`TrigFlowModel` maps ``(x_t/σ_d, t)`` to ``F(x_t/σ_d, t)``, the raw output in
TrigFlow units, so that the PF-ODE velocity is ``dx_t/dt = σ_d·F`` (spec §1). Adapters for
EDM, VP/DDPM, flow and TrigFlow-native networks subclass it (spec §2); a student is a
trainable deep copy of the teacher's adapter, so ``student ≡ teacher`` at initialisation.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from scm_lightning.teachers.conditioning import Condition, TextCondition, text_net_kwargs


class TrigFlowModel(nn.Module, abc.ABC):
    """Base class: ``forward(x_scaled, t, class_labels, guidance) -> F``.

    Args (of ``forward``):
        x_scaled: ``x_t/σ_d``, shape ``(B, C, H, W)`` (or any ``(B, ...)``).
        t: TrigFlow time in radians, shape ``(B,)``.
        class_labels: the condition: integer labels ``(B,)`` for class-conditional networks
            or a :class:`TextCondition` (prompt embeddings) for text-conditioned ones.
        guidance: optional CFG scale ``(B,)`` fed to a student's guidance embedding.

    Returns ``F`` with the shape of ``x_scaled``.
    """

    sigma_data: float

    def __init__(self, sigma_data: float) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    @abc.abstractmethod
    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """``F(x_t/σ_d, t)`` in TrigFlow units, shape of ``x_scaled``."""

    # Properties the framework checks against the data before the first step.
    @property
    @abc.abstractmethod
    def in_channels(self) -> int:
        """Image channels the network takes."""

    @property
    def sample_size(self) -> int | None:
        return None

    @property
    def num_classes(self) -> int | None:
        return None

    @property
    def text_embed_dim(self) -> int | None:
        """Width D of the prompt embeddings ``(B, L, D)`` a text-conditioned network takes."""
        return None

    @property
    def conditional(self) -> bool:
        """Whether the network takes a condition (class labels or prompt embeddings)."""
        return bool(self.num_classes) or self.text_embed_dim is not None

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


def unwrap_output(out: object) -> Tensor:
    """Return the tensor inside a diffusers output (``.sample``), a tuple, or a raw tensor."""
    if isinstance(out, Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"expected a tensor, a tuple or an object with .sample, got {type(out)!r}")


def net_config_value(net: nn.Module, *names: str) -> object | None:
    """First of ``names`` found in ``net.config`` (diffusers) or as an attribute of ``net``."""
    config = getattr(net, "config", None)
    for name in names:
        if isinstance(config, dict) and name in config:
            value = config[name]
        elif config is not None and not isinstance(config, dict) and hasattr(config, name):
            value = getattr(config, name)
        else:
            value = getattr(net, name, None)
        if value is not None and not callable(value):
            return value
    return None


class NetAdapter(TrigFlowModel):
    """A :class:`TrigFlowModel` that wraps one network ``net`` (a diffusers model or any module).

    Subclasses map TrigFlow ``(x_t/σ_d, t)`` to the net's own input and timestep and call
    :meth:`call_net`, which also routes the CFG scale ``guidance``: to the net itself when it
    declares ``supports_guidance_input``, else to an attached zero-initialised
    ``guidance_embedding`` (see ``teachers.guidance.attach_guidance_embedding``).
    """

    def __init__(self, net: nn.Module, sigma_data: float) -> None:
        super().__init__(sigma_data)
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net)!r}")
        self.net = net
        self.guidance_embedding: nn.Module | None = None

    @property
    def native_guidance(self) -> bool:
        """True when the wrapped net takes ``guidance=`` itself (TrigFlowUNet with guidance)."""
        return bool(getattr(self.net, "supports_guidance_input", False))

    @property
    def accepts_guidance(self) -> bool:
        return self.native_guidance or self.guidance_embedding is not None

    @property
    def in_channels(self) -> int:
        value = net_config_value(self.net, "in_channels")
        if value is None:
            raise AttributeError(f"{type(self.net).__name__} exposes no in_channels")
        return int(value)

    @property
    def sample_size(self) -> int | tuple[int, ...] | None:
        value = net_config_value(self.net, "sample_size")
        return tuple(value) if isinstance(value, (list, tuple)) else value

    @property
    def num_classes(self) -> int | None:
        # UNet2DModel: num_class_embeds; DiT: num_embeds_ada_norm; our nets: num_classes.
        value = net_config_value(self.net, "num_classes", "num_class_embeds", "num_embeds_ada_norm")
        return int(value) if value else None

    @property
    def text_embed_dim(self) -> int | None:
        # The width of encoder_hidden_states as the net takes it: Sana's caption_channels,
        # SD3's joint_attention_dim, a UNet's encoder_hid_dim (projected) or cross_attention_dim.
        if net_config_value(self.net, "num_embeds_ada_norm"):  # DiT: class labels, no text
            return None
        value = net_config_value(
            self.net,
            "caption_channels",
            "joint_attention_dim",
            "encoder_hid_dim",
            "cross_attention_dim",
        )
        return int(value) if isinstance(value, int) else None

    def call_net(
        self,
        sample: Tensor,
        timestep: Tensor,
        class_labels: Condition | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Call ``net(sample, timestep, class_labels=..., guidance=...)`` and return a tensor.

        ``class_labels`` is passed only when given; a :class:`TextCondition` becomes the net's
        ``encoder_hidden_states`` (+ mask, pooled) keywords (:func:`text_net_kwargs`). A net
        predicting ``2C`` channels for a ``C``-channel input (DiT's learned variance) is cut
        to its first ``C`` channels.
        """
        kwargs: dict[str, object] = {}
        if isinstance(class_labels, TextCondition):
            kwargs.update(text_net_kwargs(self.net, class_labels))
            kwargs["timestep"] = timestep  # by keyword: Sana/SD3 take it third
            return self._call_net(sample, (), kwargs, guidance)
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        return self._call_net(sample, (timestep,), kwargs, guidance)

    def _call_net(
        self, sample: Tensor, args: tuple, kwargs: dict[str, object], guidance: Tensor | None
    ) -> Tensor:
        if guidance is not None and not self.accepts_guidance:
            raise ValueError(
                f"guidance was given but {type(self.net).__name__} has no guidance input and no "
                "guidance embedding is attached (build the student with guidance_embedding=True)"
            )
        if self.guidance_embedding is not None and guidance is None:
            raise ValueError(
                "this model has a guidance embedding: pass guidance=(B,) CFG scales "
                "(e.g. ones for unguided sampling at s = 1)"
            )
        if self.native_guidance:
            kwargs["guidance"] = guidance
            out = unwrap_output(self.net(sample, *args, **kwargs))
        elif self.guidance_embedding is not None:
            with self.guidance_embedding.scope(guidance):
                out = unwrap_output(self.net(sample, *args, **kwargs))
        else:
            out = unwrap_output(self.net(sample, *args, **kwargs))
        if out.ndim >= 2 and out.shape[1] == 2 * sample.shape[1]:
            out = out[:, : sample.shape[1]]
        return out


def time_dtype(x: Tensor) -> torch.dtype:
    """dtype for a time input fed to a net: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
