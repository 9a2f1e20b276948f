"""Swap diffusers attention processors for the JVP-capable one (spec §6), no architecture change.

diffusers' default ``AttnProcessor2_0`` calls fused SDPA, which has no forward-AD formula,
so ``torch.func.jvp`` through a UNet with attention fails. :func:`install_jvp_attention`
walks a model and gives every ``diffusers.models.attention_processor.Attention`` module a
JVP twin of its processor, with :func:`jvp_attention` in place of SDPA:

* ``AttnProcessor2_0`` / classic ``AttnProcessor`` (UNet2DModel, UNet2DConditionModel
  ``attn1``/``attn2``, Transformer2DModel) and Sana's cross-attention
  ``SanaAttnProcessor2_0`` -> :class:`JVPAttnProcessor` (self- and cross-attention, masks as
  additive key biases, e.g. ``encoder_attention_mask``);
* SD3's ``JointAttnProcessor2_0`` -> :class:`JVPJointAttnProcessor`;
* Sana's ``SanaLinearAttnProcessor2_0`` is left alone: ReLU-kernel linear attention is plain
  matmuls that forward-mode AD differentiates natively with O(L·d²) memory (no L×L matrix).

Any other processor raises before anything is patched. Parameters, state-dict keys and the
plain forward are unchanged. (``UNet2DModel`` has no ``set_attn_processor``, so modules are
patched one by one.)
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    JointAttnProcessor2_0,
    SanaLinearAttnProcessor2_0,
)
from torch import nn

from scm_lightning.jvp.attention import DEFAULT_BLOCK_SIZE, jvp_attention

__all__ = ["JVPAttnProcessor", "JVPJointAttnProcessor", "install_jvp_attention"]

# Processors forward-mode AD already differentiates without an L×L matrix: left in place.
NATIVE_JVP_PROCESSORS: tuple[type, ...] = (SanaLinearAttnProcessor2_0,)


def _sana_attn_processor() -> type | None:
    try:  # lives in the Sana transformer module (diffusers >= 0.32)
        from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
    except ImportError:
        return None
    return SanaAttnProcessor2_0


def _attention(q, k, v, scale: float | None, mask, block_size) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace jvp_attention's custom-jvp Function: inside a compiled graph
        # (trainer.compile) attention is plain math, which forward AD differentiates.
        return _math_attention(q, k, v, scale, mask)
    return jvp_attention(q, k, v, scale=scale, block_size=block_size, attn_mask=mask)


class JVPAttnProcessor:
    """``AttnProcessor2_0`` semantics with :func:`jvp_attention` instead of fused SDPA.

    ``classic``: False reproduces ``AttnProcessor2_0`` (SDPA's default 1/√head_dim, q/k norms
    applied); True reproduces the classic ``AttnProcessor`` (``attn.scale``, e.g. 1 when
    ``scale_qk=False``, and no q/k norms, which that processor ignores). ``norm_before_split``
    reproduces ``SanaAttnProcessor2_0``, which applies q/k norms to the (B, L, heads·d)
    projections rather than per head. ``attention_mask`` is prepared as diffusers does
    (``attn.prepare_attention_mask``, viewed (B, heads, 1|Lq, Lk)) and added to the scores.
    """

    def __init__(
        self,
        block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
        classic: bool = False,
        norm_before_split: bool = False,
    ) -> None:
        self.block_size = block_size
        self.classic = classic
        self.norm_before_split = norm_before_split

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attention_mask is not None:
            kv_length = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            attention_mask = attn.prepare_attention_mask(
                attention_mask, kv_length.shape[1], batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if self.norm_before_split:
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        per_head_norm = not self.classic and not self.norm_before_split
        if attn.norm_q is not None and per_head_norm:
            query = attn.norm_q(query)
        if attn.norm_k is not None and per_head_norm:
            key = attn.norm_k(key)

        scale = attn.scale if self.classic else None
        hidden_states = _attention(query, key, value, scale, attention_mask, self.block_size)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        # Contiguous: GroupNorm's forward-AD rule rejects strided inputs on torch 2.13.
        return hidden_states.contiguous()


class JVPJointAttnProcessor:
    """``JointAttnProcessor2_0`` (SD3/MMDiT) with :func:`jvp_attention` instead of fused SDPA.

    Sample and context tokens are projected separately (``to_q/k/v`` and ``add_q/k/v_proj``),
    attended jointly, and split back (context through ``to_add_out`` unless
    ``context_pre_only``). No masks (SD3 passes none).
    """

    def __init__(self, block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE) -> None:
        self.block_size = block_size

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("JVPJointAttnProcessor takes no attention_mask (SD3 passes none)")
        batch_size, sample_length = hidden_states.shape[:2]

        def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        key = attn.to_k(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = heads(attn.to_q(hidden_states), head_dim)
        key = heads(key, head_dim)
        value = heads(attn.to_v(hidden_states), head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            ctx_q = heads(attn.add_q_proj(encoder_hidden_states), head_dim)
            ctx_k = heads(attn.add_k_proj(encoder_hidden_states), head_dim)
            ctx_v = heads(attn.add_v_proj(encoder_hidden_states), head_dim)
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)

        out = _attention(query, key, value, None, None, self.block_size)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :sample_length], out[:, sample_length:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        if encoder_hidden_states is not None:
            return out, encoder_hidden_states
        return out


def _math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ·scale + mask) v`` with explicit ops (default scale 1/√head_dim, as SDPA)."""
    from scm_lightning.jvp.attention import mask_to_bias

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    bias = mask_to_bias(mask, q, k)
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ v


_REPLACED = "AttnProcessor2_0, AttnProcessor, SanaAttnProcessor2_0, JointAttnProcessor2_0"
_LEFT_ALONE = "SanaLinearAttnProcessor2_0"


def _replacement(
    attn: Attention, block_size: int | tuple[int, int]
) -> JVPAttnProcessor | JVPJointAttnProcessor | None:
    """The JVP twin of ``attn``'s processor; None to leave it (native forward AD)."""
    proc = attn.processor
    if isinstance(proc, NATIVE_JVP_PROCESSORS):
        return None
    if isinstance(proc, (JointAttnProcessor2_0, JVPJointAttnProcessor)):
        return JVPJointAttnProcessor(block_size=block_size)
    sana = _sana_attn_processor()
    if isinstance(proc, JVPAttnProcessor):
        classic, before_split = proc.classic, proc.norm_before_split
    else:
        classic = isinstance(proc, AttnProcessor)
        before_split = sana is not None and isinstance(proc, sana)
    return JVPAttnProcessor(block_size=block_size, classic=classic, norm_before_split=before_split)


def _unsupported_reason(attn: Attention) -> str | None:
    proc = attn.processor
    sana = _sana_attn_processor()
    supported = (AttnProcessor2_0, AttnProcessor, JVPAttnProcessor, *NATIVE_JVP_PROCESSORS)
    supported += (JointAttnProcessor2_0, JVPJointAttnProcessor) + ((sana,) if sana else ())
    if not isinstance(proc, supported):
        return (
            f"attention processor {type(proc).__name__} is not supported (replaced: "
            f"{_REPLACED}; left alone, forward AD handles it: {_LEFT_ALONE})"
        )
    if isinstance(proc, NATIVE_JVP_PROCESSORS):
        return None
    if isinstance(proc, (JointAttnProcessor2_0, JVPJointAttnProcessor)):
        if attn.fused_projections:
            return "fused QKV projections"
        return None
    if attn.added_kv_proj_dim is not None or attn.to_k is None:
        return "added KV projections / only_cross_attention"
    if attn.inner_kv_dim != attn.inner_dim:
        return f"grouped KV heads (inner_kv_dim={attn.inner_kv_dim} != inner_dim={attn.inner_dim})"
    if attn.to_out is None or len(attn.to_out) != 2:
        return "no to_out projection (pre_only)"
    if attn.fused_projections:
        return "fused QKV projections"
    return None


def install_jvp_attention(
    model: nn.Module, block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE
) -> int:
    """Give every diffusers ``Attention`` in ``model`` the JVP twin of its processor.

    Returns the number of modules patched (Sana's linear self-attention is left alone and not
    counted: module doc). Checks every module first and raises ``ValueError`` naming the
    module and the reason if any is unsupported (other processors, added-KV projections
    outside SD3's joint attention, grouped KV heads, fused projections, no output projection), or
    ``TypeError`` for attention layers it cannot patch (``nn.MultiheadAttention``, diffusers'
    ``AttentionModuleMixin`` classes), so the model is never left half patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"install_jvp_attention expects an nn.Module, got {type(model).__name__}")
    from diffusers.models.attention import AttentionModuleMixin

    targets: list[tuple[str, Attention]] = []
    for name, module in model.named_modules():
        label = name or "<root>"
        if isinstance(module, Attention):
            reason = _unsupported_reason(module)
            if reason is not None:
                raise ValueError(f"cannot install JVP attention on {label!r}: {reason}")
            targets.append((name, module))
        elif isinstance(module, (nn.MultiheadAttention, AttentionModuleMixin)):
            raise TypeError(
                f"{label!r} is a {type(module).__name__} (processor "
                f"{type(getattr(module, 'processor', None)).__name__}), whose fused attention "
                "has no forward-mode AD and cannot be patched; supported: diffusers' Attention "
                f"with {_REPLACED} (replaced) or {_LEFT_ALONE} (left alone)"
            )
    patched = 0
    for _, module in targets:
        # Keep the replaced processor's flavour (scale and q/k-norm handling differ).
        replacement = _replacement(module, block_size)
        if replacement is not None:
            module.set_processor(replacement)
            patched += 1
    return patched
