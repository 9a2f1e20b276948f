"""TrigFlowUNet: a compact ADM/EDM-style UNet with the sCM stabilising changes (spec §4).

Input ``sample = x_t/σ_d`` ``(B, C, H, W)``, ``timestep = t`` (TrigFlow time in radians,
``(B,)`` or a scalar); output ``F_θ(x_t/σ_d, t)`` with the shape of ``sample``. What differs
from a plain diffusers ``UNet2DModel``:

* ``c_noise(t) = t`` with a *positional* (sinusoidal) embedding computed in float32 or
  better even under autocast. ``t`` is multiplied by ``time_scale`` (default 10) and the
  frequencies span ``[1/time_max_positions, 1]``, so the angular frequencies in ``t`` are
  ``[0.01, 10]``: over ``t ∈ [0, π/2]`` the fastest feature turns ≈ 2.5 times and the
  slowest stays near-linear. No high-frequency features, so ``∂_t F`` stays small — the
  paper's reason for dropping large-scale Fourier embeddings (§4.1).
* Adaptive double normalisation in every residual block (§4.1), the paper's form with the
  scale used directly (not ``1 + scale``):
  ``y = norm(h)·pnorm(s(emb)) + pnorm(b(emb))``, ``pnorm(a) = a/√(mean_channels(a²)+ε)``.
* GroupNorm only (BatchNorm running statistics would mutate in the JVP pass), computed in
  float32 (float64 for float64 inputs) and cast back, so under autocast both the primal
  and the forward-AD tangent keep the input dtype (field notes).
* Attention through diffusers' :class:`~diffusers.models.attention_processor.Attention`
  (so ``install_jvp_attention`` can swap its processor) with the classic math
  ``AttnProcessor`` by default, which supports forward-mode AD.
* Optional class conditioning (``num_classes`` labels plus one null label for CFG dropout,
  index ``num_classes``) and an optional zero-initialised guidance-scale embedding.

Zero-initialised output layers (ADM): the final conv, each residual block's second conv
and each attention output projection. The initial network outputs ``F = 0`` (the
denoiser is ``cos t·x_t``); gradients still reach every layer through the final conv on
the first step, so training from scratch is unaffected.

Gradient checkpointing (``enable_gradient_checkpointing()``) applies to the gradient pass
only: it is skipped when the inputs carry forward-AD tangents (``torch.func.jvp`` or
``torch.autograd.forward_ad``) because differentiating through activation checkpointing in
the JVP pass is unsupported (field notes). ``losses.scm_loss`` therefore runs a checkpointed
student in two passes (a no-grad JVP, then a checkpointed forward for the gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn
from torch.autograd import forward_ad



def positional_embedding(x: Tensor, num_channels: int, max_positions: float = 10000.0) -> Tensor:
    """Sinusoidal positional embedding of a scalar per sample, ``(B,) -> (B, num_channels)``.

    Computed in float32 or better whatever the autocast state (field notes: a low-precision
    time embedding destabilises sCM training).
    """
    if num_channels % 2:
        raise ValueError(f"num_channels must be even, got {num_channels}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = num_channels // 2
    freqs = torch.exp(
        -math.log(max_positions) * torch.arange(half, device=x.device, dtype=dtype) / half
    )
    args = x.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


SKIP_SCALE = math.sqrt(0.5)  # EDM/DDPM++ residual scaling keeps activations at unit scale


@dataclass
class TrigFlowUNetOutput(BaseOutput):
    """``sample``: ``F_θ(x_t/σ_d, t)``, shape ``(B, C, H, W)`` (TrigFlow units)."""

    sample: Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 tensors, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(x: Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


def pnorm(a: Tensor, eps: float = 1e-4) -> Tensor:
    """Pixel-norm over channels (dim 1), ``a/√(mean_channels(a²) + ε)`` (§4.1).

    Computed in float32 or better; returns that dtype.
    """
    a = a.to(_compute_dtype(a.dtype))
    return a * torch.rsqrt(a.square().mean(dim=1, keepdim=True) + eps)


def adaptive_double_norm(
    h_normed: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-4
) -> Tensor:
    """Adaptive double normalisation ``norm(h)·pnorm(s) + pnorm(b)`` (§4.1).

    ``h_normed`` ``(B, C, H, W)`` is already group-normalised; ``scale`` and ``shift`` are
    ``(B, C)`` outputs of the embedding projection. Returns ``h_normed``'s dtype.
    """
    s = pnorm(scale, eps).to(h_normed.dtype)[:, :, None, None]
    b = pnorm(shift, eps).to(h_normed.dtype)[:, :, None, None]
    return h_normed * s + b


def _num_groups(channels: int, max_groups: int) -> int:
    # Largest group count dividing `channels` that is at most `max_groups`.
    return math.gcd(channels, max_groups)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (float64 for float64 inputs) and cast back to the input dtype.

    Autocast-safe, and under forward-mode AD the tangent comes back in the input dtype (a
    plain GroupNorm under CPU autocast returns an fp32 tangent for a bf16 primal).
    """

    def forward(self, x: Tensor) -> Tensor:
        dt = _compute_dtype(x.dtype)
        with _no_autocast(x):
            w = None if self.weight is None else self.weight.to(dt)
            b = None if self.bias is None else self.bias.to(dt)
            y = F.group_norm(x.to(dt), self.num_groups, w, b, self.eps)
        return y.to(x.dtype)


class ResBlock(nn.Module):
    """Residual block with adaptive double normalisation.

    ``h = conv1(silu(gn1(x)))``; ``h = conv2(dropout(silu(ADN(gn2(h), emb))))``;
    ``out = (skip(x) + h)·√½``. ``x``: ``(B, C_in, H, W)``, ``emb``: ``(B, E)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        num_groups: int,
        dropout: float = 0.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.norm1 = GroupNorm32(_num_groups(in_channels, num_groups), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        # The ADN norm carries no affine of its own: pnorm(s), pnorm(b) are the affine.
        self.norm2 = GroupNorm32(_num_groups(out_channels, num_groups), out_channels, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        with _no_autocast(emb):  # conditioning path in float32 or better (spec §3 precision)
            w = self.emb_proj.weight
            ss = F.linear(F.silu(emb).to(w.dtype), w, self.emb_proj.bias)
        scale, shift = ss.chunk(2, dim=1)
        h = adaptive_double_norm(self.norm2(h), scale, shift, self.eps)
        h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.skip is None else self.skip(x)
        return (skip + h) * SKIP_SCALE


class AttentionBlock(nn.Module):
    """Self-attention over pixels with a diffusers ``Attention`` (math ``AttnProcessor``).

    ``out = (x + attn(gn(x)))·√½``; the normalisation and residual live here so any
    processor installed on ``self.attn`` only has to compute attention.
    """

    def __init__(self, channels: int, head_dim: int, num_groups: int, dropout: float) -> None:
        super().__init__()
        if channels % head_dim:
            raise ValueError(
                f"attention_head_dim={head_dim} must divide the channel count {channels}"
            )
        self.norm = GroupNorm32(_num_groups(channels, num_groups), channels)
        self.attn = Attention(
            query_dim=channels,
            heads=channels // head_dim,
            dim_head=head_dim,
            dropout=dropout,
            bias=True,
            out_bias=True,
            residual_connection=False,
            processor=AttnProcessor(),
        )
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return (x + self.attn(self.norm(x).contiguous())) * SKIP_SCALE


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _has_tangent(x: Tensor) -> bool:
    """True if ``x`` is inside ``torch.func`` transforms or carries a forward-AD tangent."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return True
    return forward_ad.unpack_dual(x).tangent is not None


class TrigFlowUNet(ModelMixin, ConfigMixin):
    """Compact UNet predicting TrigFlow ``F_θ(x_t/σ_d, t)`` (spec §1, §4).

    Args:
        sample_size: spatial size (H = W); must be divisible by ``2**(len(block_channels)-1)``.
        in_channels, out_channels: image channels.
        block_channels: channels per resolution level (level 0 is full resolution).
        layers_per_block: residual blocks per level on the way down (one more on the way up).
        attention_levels: levels with self-attention after each residual block; ``None``
            means the lowest resolution only. The middle block always has one attention
            unless ``mid_attention=False``.
        attention_head_dim: channels per head.
        norm_num_groups: GroupNorm groups (``gcd(channels, norm_num_groups)`` per layer).
        embedding_channels: width of the conditioning embedding (default ``4·block_channels[0]``).
        time_scale, time_max_positions: positional embedding of ``time_scale·t`` with
            frequencies ``[1/time_max_positions, 1]`` (module docstring).
        num_classes: number of classes for class conditioning; label ``num_classes`` is
            the null (unconditional) label used for CFG dropout. ``None``: unconditional.
        guidance_embedding: add a zero-initialised embedding of the CFG scale ``s`` (spec §2).
        dropout: dropout rate in residual blocks and attention (paper's sCD: 0).
        adn_eps: ε of ``pnorm``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        out_channels: int = 1,
        block_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        attention_levels: Sequence[int] | None = None,
        mid_attention: bool = True,
        attention_head_dim: int = 32,
        norm_num_groups: int = 8,
        embedding_channels: int | None = None,
        time_scale: float = 10.0,
        time_max_positions: float = 1000.0,
        num_classes: int | None = None,
        guidance_embedding: bool = False,
        dropout: float = 0.0,
        adn_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        chs = tuple(int(c) for c in block_channels)
        if not chs or any(c <= 0 for c in chs):
            raise ValueError(
                f"block_channels must be non-empty positive ints, got {block_channels}"
            )
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
        if chs[0] % 2:
            raise ValueError(f"block_channels[0] must be even (positional embedding), got {chs[0]}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        levels = len(chs)
        attn_levels = {levels - 1} if attention_levels is None else set(attention_levels)
        if any(not 0 <= a < levels for a in attn_levels):
            raise ValueError(f"attention_levels {sorted(attn_levels)} must lie in [0, {levels})")
        emb_ch = embedding_channels or 4 * chs[0]
        self.gradient_checkpointing = False
        self.supports_guidance_input = bool(guidance_embedding)
        self._pos_channels = chs[0]

        # c_noise = t -> positional embedding -> MLP (computed in float32 or better).
        self.time_mlp = nn.Sequential(
            nn.Linear(chs[0], emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        self.class_embedding = (
            nn.Embedding(num_classes + 1, emb_ch) if num_classes is not None else None
        )
        self.guidance_proj = nn.Linear(chs[0], emb_ch) if guidance_embedding else None
        if self.guidance_proj is not None:  # zero init: the student starts equal to the teacher
            nn.init.zeros_(self.guidance_proj.weight)
            nn.init.zeros_(self.guidance_proj.bias)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_ch, norm_num_groups, dropout, adn_eps)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, attention_head_dim, norm_num_groups, dropout)

        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [chs[0]]
        cur = chs[0]
        for lvl, ch in enumerate(chs):
            for _ in range(layers_per_block):
                self.down.append(res(cur, ch))
                cur = ch
                if lvl in attn_levels:
                    self.down.append(attn(cur))
                skips.append(cur)
            if lvl < levels - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
        self.mid = nn.ModuleList([res(cur, cur)])
        if mid_attention:
            self.mid.append(attn(cur))
        self.mid.append(res(cur, cur))
        self.up = nn.ModuleList()
        for lvl in reversed(range(levels)):
            for _ in range(layers_per_block + 1):
                self.up.append(res(cur + skips.pop(), chs[lvl]))
                cur = chs[lvl]
                if lvl in attn_levels:
                    self.up.append(attn(cur))
            if lvl > 0:
                self.up.append(Upsample(cur))
        self.norm_out = GroupNorm32(_num_groups(cur, norm_num_groups), cur)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def null_class_label(self) -> int | None:
        """Label index of the unconditional (CFG-dropped) class, or ``None`` if unconditional."""
        return self.config.num_classes

    def _embed(self, t: Tensor, class_labels: Tensor | None, guidance: Tensor | None) -> Tensor:
        """Conditioning embedding ``(B, E)`` in float32 or better, autocast off."""
        cfg = self.config
        w = self.time_mlp[0].weight
        with _no_autocast(t):
            pos = positional_embedding(
                cfg.time_scale * t, self._pos_channels, cfg.time_max_positions
            )
            emb = self.time_mlp(pos.to(w.dtype))
            if self.class_embedding is not None:
                if class_labels is None:  # unconditional = the null label
                    class_labels = torch.full(
                        (t.shape[0],), cfg.num_classes, device=t.device, dtype=torch.long
                    )
                emb = emb + self.class_embedding(class_labels).to(emb.dtype)
            if self.guidance_proj is not None:
                s = torch.ones_like(t) if guidance is None else guidance
                pos_s = positional_embedding(
                    cfg.time_scale * s, self._pos_channels, cfg.time_max_positions
                )
                emb = emb + self.guidance_proj(pos_s.to(w.dtype))
        return emb

    def _check_inputs(
        self,
        sample: Tensor,
        timestep: Tensor | float,
        class_labels: Tensor | None,
        guidance: Tensor | float | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"sample must have shape (B, {cfg.in_channels}, H, W), got {tuple(sample.shape)}"
            )
        factor = 2 ** (len(cfg.block_channels) - 1)
        if sample.shape[-1] % factor or sample.shape[-2] % factor:
            raise ValueError(
                f"spatial size {tuple(sample.shape[-2:])} must be divisible by {factor} "
                f"({len(cfg.block_channels)} resolution levels)"
            )
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if not t.is_floating_point():
            t = t.float()
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(
                f"timestep must be a scalar or have shape ({b},), got {tuple(t.shape)}"
            )
        if class_labels is not None:
            if self.class_embedding is None:
                raise ValueError(
                    "class_labels given but the model is unconditional (num_classes=None)"
                )
            class_labels = torch.as_tensor(class_labels, device=sample.device).long()
            if class_labels.shape != (b,):
                raise ValueError(
                    f"class_labels must have shape ({b},), got {tuple(class_labels.shape)}"
                )
            if ((class_labels < 0) | (class_labels > cfg.num_classes)).any():
                raise ValueError(
                    f"class_labels must lie in [0, {cfg.num_classes}] "
                    f"({cfg.num_classes} = null label), "
                    f"got min {int(class_labels.min())}, max {int(class_labels.max())}"
                )
        if guidance is not None:
            if self.guidance_proj is None:
                raise ValueError("guidance given but the model has no guidance embedding")
            guidance = torch.as_tensor(guidance, device=sample.device, dtype=t.dtype)
            guidance = guidance.expand(b) if guidance.ndim == 0 else guidance
            if guidance.shape != (b,):
                raise ValueError(
                    f"guidance must be a scalar or have shape ({b},), got {tuple(guidance.shape)}"
                )
        return t, class_labels, guidance

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float,
        class_labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
        return_dict: bool = True,
    ) -> TrigFlowUNetOutput | tuple[Tensor]:
        """``F_θ(x_t/σ_d, t)``.

        Args:
            sample: ``x_t/σ_d``, ``(B, C, H, W)``.
            timestep: TrigFlow time ``t`` in radians, ``(B,)`` or scalar.
            class_labels: ``(B,)`` ints in ``[0, num_classes]`` (``num_classes`` = null label);
                ``None`` on a conditional model means the null label.
            guidance: CFG scale ``s`` ``(B,)`` or scalar; ``None`` means ``s = 1``.
            return_dict: return :class:`TrigFlowUNetOutput` (else a 1-tuple).
        """
        t, class_labels, guidance = self._check_inputs(sample, timestep, class_labels, guidance)
        emb = self._embed(t, class_labels, guidance)
        ckpt = (
            self.gradient_checkpointing
            and torch.is_grad_enabled()
            and not (_has_tangent(sample) or _has_tangent(t))
        )

        def run(block: nn.Module, h: Tensor) -> Tensor:
            if ckpt:
                return self._gradient_checkpointing_func(block, h, emb)
            return block(h, emb)

        h = self.conv_in(sample)
        hs = [h]
        for block in self.down:
            h = run(block, h)
            if not isinstance(block, AttentionBlock):
                hs.append(h)
            else:
                hs[-1] = h  # the skip is taken after the level's attention
        for block in self.mid:
            h = run(block, h)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = run(block, h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if not return_dict:
            return (out,)
        return TrigFlowUNetOutput(sample=out)
