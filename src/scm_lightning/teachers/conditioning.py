"""What a conditional teacher is conditioned on: class labels or prompt embeddings.

The condition travels through the teacher, the student, the losses and the samplers in the
slot named ``class_labels`` (kept for the class-conditional networks that name it so): either
integer labels ``(B,)`` or a :class:`TextCondition`. The helpers here index, concatenate and
move both kinds alike, so that CFG (a conditional and an unconditional pass in one batch),
masking and sampling never branch on the kind.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class TextCondition:
    """Prompt embeddings of a text-conditioned teacher (one row per sample).

    Attributes:
        prompt_embeds: ``(B, L, D)`` the text encoder's hidden states (diffusers'
            ``encoder_hidden_states``).
        pooled_prompt_embeds: ``(B, P)`` pooled embedding for models that take one (SD3's
            ``pooled_projections``), else ``None``.
        attention_mask: ``(B, L)`` 1 for a token, 0 for padding (Sana's
            ``encoder_attention_mask``), else ``None``.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    attention_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3:
            raise ValueError(
                f"prompt_embeds must be (B, L, D), got shape {tuple(self.prompt_embeds.shape)}"
            )
        batch, length = self.prompt_embeds.shape[:2]
        if self.pooled_prompt_embeds is not None and (
            self.pooled_prompt_embeds.ndim != 2 or self.pooled_prompt_embeds.shape[0] != batch
        ):
            raise ValueError(
                f"pooled_prompt_embeds must be ({batch}, P), "
                f"got shape {tuple(self.pooled_prompt_embeds.shape)}"
            )
        if self.attention_mask is not None and tuple(self.attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must be ({batch}, {length}), "
                f"got shape {tuple(self.attention_mask.shape)}"
            )

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index: Tensor | slice | int) -> TextCondition:
        """Rows ``index`` of every field (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda tensor: tensor[index])

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    def to(self, *args: object, **kwargs: object) -> TextCondition:
        """``Tensor.to`` on every field; the mask keeps its dtype (only moves device)."""
        moved = self._map(lambda tensor: tensor.to(*args, **kwargs))
        if self.attention_mask is None:
            return moved
        return replace(moved, attention_mask=self.attention_mask.to(moved.device))

    def _map(self, fn) -> TextCondition:
        return TextCondition(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )


Condition = Tensor | TextCondition


def _flatten(cond: TextCondition) -> tuple[list[Tensor | None], None]:
    return [getattr(cond, f.name) for f in fields(cond)], None


def _unflatten(values: Sequence[Tensor | None], _context: None) -> TextCondition:
    return TextCondition(*values)


# A pytree node, so torch.func (jvp, functional_call) and torch.compile pass it through.
pytree.register_pytree_node(TextCondition, _flatten, _unflatten)


def condition_batch_size(cond: Condition) -> int:
    """Rows of a condition: labels ``(B,)`` or a TextCondition of ``B`` prompts."""
    return len(cond)


def concat_conditions(conditions: Sequence[Condition]) -> Condition:
    """Concatenate conditions of one kind along the batch (e.g. conditional + null for CFG)."""
    first = conditions[0]
    if not all(isinstance(c, type(first)) for c in conditions):
        raise TypeError("cannot concatenate class labels with prompt embeddings")
    if isinstance(first, Tensor):
        return torch.cat(list(conditions))
    values = {}
    for f in fields(first):
        parts = [getattr(c, f.name) for c in conditions]
        if any(p is None for p in parts) and not all(p is None for p in parts):
            raise ValueError(f"TextCondition.{f.name} is set on some conditions and not others")
        values[f.name] = None if parts[0] is None else torch.cat(parts)
    return TextCondition(**values)


def repeat_condition(cond: TextCondition, batch_size: int) -> TextCondition:
    """One prompt's condition (B = 1) repeated to ``batch_size`` rows (e.g. the null prompt)."""
    if len(cond) != 1:
        raise ValueError(f"repeat_condition needs a single prompt, got {len(cond)}")
    return cond._map(lambda tensor: tensor.expand(batch_size, *tensor.shape[1:]))


def where_condition(keep: Tensor, cond: Condition, null: Condition) -> Condition:
    """Row-wise ``cond if keep else null`` (label dropout; ``null``: one row or ``B`` rows).

    ``keep`` is a bool ``(B,)``. For a TextCondition every field is selected row-wise (a
    field set on ``cond`` must be set on ``null``).
    """
    if isinstance(cond, Tensor):
        return torch.where(keep, cond, torch.as_tensor(null, device=cond.device))
    if not isinstance(null, TextCondition):
        raise TypeError("a TextCondition needs a TextCondition as its null condition")
    if len(null) == 1:
        null = repeat_condition(null, len(cond))
    values = {}
    for f in fields(cond):
        value, other = getattr(cond, f.name), getattr(null, f.name)
        if (value is None) != (other is None):
            raise ValueError(f"TextCondition.{f.name} is set on only one of condition and null")
        if value is None:
            values[f.name] = None
            continue
        mask = keep.reshape(-1, *([1] * (value.ndim - 1)))
        values[f.name] = torch.where(mask, value, other.to(value.device, value.dtype))
    return TextCondition(**values)


def text_net_kwargs(net: nn.Module, cond: TextCondition) -> dict[str, object]:
    """The keywords a diffusers text-conditioned network takes for ``cond``.

    ``prompt_embeds`` -> ``encoder_hidden_states``; ``attention_mask`` ->
    ``encoder_attention_mask``; ``pooled_prompt_embeds`` -> ``pooled_projections`` (SD3) or
    ``added_cond_kwargs={"text_embeds": ...}`` (a UNet with an ``addition_embed_type``). A field
    the network has no input for raises ValueError instead of being dropped silently.
    """
    params = inspect.signature(net.forward).parameters
    name = type(net).__name__
    if "encoder_hidden_states" not in params:
        raise ValueError(f"{name} takes no encoder_hidden_states: it is not text-conditioned")
    kwargs: dict[str, object] = {"encoder_hidden_states": cond.prompt_embeds}
    if cond.attention_mask is not None:
        if "encoder_attention_mask" not in params:
            raise ValueError(f"{name} takes no encoder_attention_mask; drop attention_mask")
        kwargs["encoder_attention_mask"] = cond.attention_mask
    pooled = cond.pooled_prompt_embeds
    if pooled is not None:
        config = getattr(net, "config", None)
        if "pooled_projections" in params:
            kwargs["pooled_projections"] = pooled
        elif "added_cond_kwargs" in params and getattr(config, "addition_embed_type", None):
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled}
        else:
            raise ValueError(f"{name} takes no pooled embeddings; drop pooled_prompt_embeds")
    return kwargs
