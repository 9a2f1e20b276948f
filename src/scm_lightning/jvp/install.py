"""Swap diffusers attention processors for the JVP-capable one (spec §6), no architecture change.

diffusers' default ``AttnProcessor2_0`` calls fused SDPA, which has no forward-AD formula,
so ``torch.func.jvp`` through a UNet with attention fails. :func:`install_jvp_attention`
walks a model and gives every ``diffusers.models.attention_processor.Attention`` module a
:class:`JVPAttnProcessor`: the same computation as ``AttnProcessor2_0`` (or the classic
``AttnProcessor``, whose scale it keeps) with :func:`jvp_attention` in place of SDPA.
Parameters, state-dict keys and the plain forward are unchanged. (``UNet2DModel`` has no
``set_attn_processor``, so modules are patched one by one.)
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from scm_lightning.jvp.attention import DEFAULT_BLOCK_SIZE, jvp_attention

__all__ = ["JVPAttnProcessor", "install_jvp_attention"]


class JVPAttnProcessor:
    """``AttnProcessor2_0`` semantics with :func:`jvp_attention` instead of fused SDPA.

    ``classic``: False reproduces ``AttnProcessor2_0`` (SDPA's default 1/√head_dim, q/k norms
    applied); True reproduces the classic ``AttnProcessor`` (``attn.scale``, e.g. 1 when
    ``scale_qk=False``, and no q/k norms, which that processor ignores). Attention masks
    raise: the tiled kernel has no mask support.
    """

    def __init__(
        self, block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE, classic: bool = False
    ) -> None:
        self.block_size = block_size
        self.classic = classic

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
        if attention_mask is not None:
            raise ValueError(
                "JVPAttnProcessor does not support attention masks (got attention_mask of shape "
                f"{tuple(attention_mask.shape)}); call the model without a mask"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None and not self.classic:
            query = attn.norm_q(query)
        if attn.norm_k is not None and not self.classic:
            key = attn.norm_k(key)

        scale = attn.scale if self.classic else None
        if torch.compiler.is_compiling():
            # Dynamo cannot trace jvp_attention's custom-jvp Function: inside a compiled graph
            # (trainer.compile) attention is plain math, which forward AD differentiates.
            hidden_states = _math_attention(query, key, value, scale)
        else:
            hidden_states = jvp_attention(
                query, key, value, scale=scale, block_size=self.block_size
            )
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


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None):
    """``softmax(q kᵀ·scale) v`` with explicit ops (default scale 1/√head_dim, as SDPA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _unsupported_reason(attn: Attention) -> str | None:
    proc = attn.processor
    if not isinstance(proc, (AttnProcessor2_0, AttnProcessor, JVPAttnProcessor)):
        return (
            f"processor {type(proc).__name__} (only AttnProcessor2_0 / AttnProcessor are replaced)"
        )
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
    """Give every diffusers ``Attention`` in ``model`` a :class:`JVPAttnProcessor`.

    Returns the number of modules patched. Checks every module first and raises
    ``ValueError`` naming the module and the reason if any is unsupported (custom or
    added-KV processors, grouped KV heads, fused projections, no output projection), or
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
                f"{label!r} is a {type(module).__name__}, which has no forward-mode AD and "
                "cannot be patched; use diffusers' Attention instead"
            )
    for _, module in targets:
        proc = module.processor
        # Keep the replaced processor's flavour (scale and q/k-norm handling differ).
        classic = (
            proc.classic if isinstance(proc, JVPAttnProcessor) else isinstance(proc, AttnProcessor)
        )
        module.set_processor(JVPAttnProcessor(block_size=block_size, classic=classic))
    return len(targets)
