"""TextCondition: indexing, concatenation, device/dtype moves and torch.func pass-through."""

import pytest
import torch

from scm_lightning.teachers.conditioning import (
    TextCondition,
    concat_conditions,
    condition_batch_size,
    repeat_condition,
)


def _cond(batch: int = 3) -> TextCondition:
    return TextCondition(
        torch.randn(batch, 5, 8), torch.randn(batch, 4), torch.ones(batch, 5, dtype=torch.long)
    )


def test_index_concat_repeat_keep_rows_aligned():
    cond = _cond()
    picked = cond[torch.tensor([0, 2])]
    assert condition_batch_size(picked) == 2
    torch.testing.assert_close(picked.prompt_embeds[1], cond.prompt_embeds[2])
    joined = concat_conditions([cond, picked])
    assert len(joined) == 5
    torch.testing.assert_close(joined.pooled_prompt_embeds[3], cond.pooled_prompt_embeds[0])
    null = repeat_condition(cond[1], 4)
    assert null.prompt_embeds.shape == (4, 5, 8)
    torch.testing.assert_close(null.prompt_embeds[3], cond.prompt_embeds[1])
    labels = concat_conditions([torch.tensor([1, 2]), torch.tensor([3])])
    assert labels.tolist() == [1, 2, 3]


def test_to_keeps_the_mask_integer():
    moved = _cond().to(torch.float64)
    assert moved.prompt_embeds.dtype == torch.float64
    assert moved.attention_mask.dtype == torch.long


def test_shape_errors_name_the_field():
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        TextCondition(torch.randn(3, 8))
    with pytest.raises(ValueError, match="attention_mask must be"):
        TextCondition(torch.randn(3, 5, 8), attention_mask=torch.ones(3, 4))
    with pytest.raises(TypeError, match="cannot concatenate"):
        concat_conditions([torch.tensor([1]), _cond(1)])


def test_passes_through_torch_func_jvp():
    cond = _cond()

    def scaled(x: torch.Tensor, c: TextCondition) -> torch.Tensor:
        return x * c.prompt_embeds.sum((1, 2))[:, None]

    x = torch.randn(3, 2, dtype=torch.float64)
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(lambda x_: scaled(x_, cond.to(torch.float64)), (x,), (tangent,))
    torch.testing.assert_close(jvp, tangent * cond.prompt_embeds.double().sum((1, 2))[:, None])
    leaves, spec = torch.utils._pytree.tree_flatten(cond)
    assert len(leaves) == 3
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, TextCondition)
