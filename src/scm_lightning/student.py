"""The sCM student: a trainable copy of the teacher's TrigFlow model plus w_φ(t) (spec §3).

sCD/sCT initialise θ from the teacher (spec §3 "Initialisation"): the student is a deep copy
of the teacher's :class:`TrigFlowModel` adapter, so it keeps the teacher's conditioning
(``c_noise = t``, EDM's ``ln(σ)/4`` or a DDPM timestep, all computed from t) and
``student ≡ teacher`` at step 0. With CFG distillation it also takes the guidance scale s,
through a zero-initialised embedding (or the net's own guidance input).

Dropout is the student's own hyperparameter (paper App. G: sCD 0, sCT 0.20 on CIFAR-10), not
the teacher's: :func:`set_dropout` gives every dropout layer of the copy the configured rate.
"""

from __future__ import annotations

import copy

from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from scm_lightning.nets.weighting import LogVarHead
from scm_lightning.teachers.base import NetAdapter, TrigFlowModel
from scm_lightning.teachers.guidance import GuidedTeacher, attach_guidance_embedding


def set_dropout(net: nn.Module, p: float) -> int:
    """Set every dropout layer of ``net`` to rate ``p``; returns how many layers were set.

    Covers ``nn.Dropout*`` modules anywhere (diffusers ``ResnetBlock2D.dropout``, attention
    ``to_out[1]``, feed-forwards, TrigFlowUNet's blocks), the float ``dropout`` a diffusers
    :class:`Attention` keeps from construction, and a diffusers/TrigFlowUNet config's
    ``dropout`` entry, so an exported or rebuilt copy reports the rate it was trained with.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"student dropout must be in [0, 1), got {p}")
    count = 0
    for m in net.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = float(p)
            count += 1
        elif isinstance(m, Attention):
            m.dropout = float(p)
        config = getattr(m, "config", None)
        if hasattr(m, "register_to_config") and "dropout" in (config or {}):
            m.register_to_config(dropout=float(p))
    return count


class Student(nn.Module):
    """``F_θ`` (``.net``, a :class:`TrigFlowModel`) and the adaptive weighting ``.logvar``.

    ``forward(x_scaled=x_t/σ_d (B, C, H, W), t (B,) radians, class_labels (B,), guidance (B,))``
    returns F in TrigFlow units. Call ``student.net`` directly inside ``torch.func.jvp``.
    """

    def __init__(self, net: TrigFlowModel, logvar: LogVarHead, guidance_input: bool) -> None:
        super().__init__()
        if not isinstance(net, TrigFlowModel):
            raise TypeError(f"net must be a TrigFlowModel, got {type(net)!r}")
        self.net = net
        self.logvar = logvar
        self.guidance_input = guidance_input

    @classmethod
    def from_teacher(
        cls,
        teacher_model: TrigFlowModel,
        guidance_embedding: bool = False,
        logvar_channels: int = 128,
        guidance_channels: int = 128,
        dropout: float = 0.0,
    ) -> Student:
        """Deep-copy ``teacher_model`` into a trainable student with dropout rate ``dropout``.

        A :class:`GuidedTeacher` is unwrapped: the student copies the plain conditional model
        and, with ``guidance_embedding=True``, learns the scale s as an input instead — via a
        zero-initialised :class:`GuidanceEmbedding` on the net's time embedding, or the
        net's own guidance input when it has one (``supports_guidance_input``).
        """
        base = teacher_model.model if isinstance(teacher_model, GuidedTeacher) else teacher_model
        if not isinstance(base, TrigFlowModel):
            raise TypeError(f"teacher_model must be a TrigFlowModel, got {type(base)!r}")
        net = copy.deepcopy(base)
        set_dropout(net, dropout)  # the teacher's own rate is not the student's (App. G)
        net.requires_grad_(True)
        net.train()
        if guidance_embedding:
            if not isinstance(net, NetAdapter):
                raise TypeError(
                    f"guidance_embedding=True needs a NetAdapter teacher, got {type(net)!r}"
                )
            if not net.native_guidance:
                attach_guidance_embedding(net, num_channels=guidance_channels)
        return cls(net, LogVarHead(logvar_channels), guidance_input=guidance_embedding)

    @property
    def sigma_data(self) -> float:
        return self.net.sigma_data

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def sample_size(self) -> int | tuple[int, ...] | None:
        return self.net.sample_size

    @property
    def num_classes(self) -> int | None:
        return self.net.num_classes

    @property
    def text_embed_dim(self) -> int | None:
        return self.net.text_embed_dim

    @property
    def conditional(self) -> bool:
        return self.net.conditional

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        return self.net(x_scaled, t, class_labels, guidance)
