"""Forward-AD rules that ``torch.compile`` can trace (the compiled step, ``trainer.compile``).

Dynamo cannot trace the custom-``jvp`` autograd Functions of :mod:`scm_lightning.jvp.fast`, and
on torch 2.14 tracing the built-in forward-AD formula of ``F.group_norm`` inside a grad-enabled
``torch.func.jvp`` trips an internal assert (``InferenceMode::is_enabled() &&
self.is_inference()``) during fake-tensor propagation. :func:`compilable_jvp` routes
``F.group_norm`` to the same normalisation written with differentiable primitives (mean,
biased variance, rsqrt), which both forward AD and Inductor handle; Inductor then fuses the
tangent's elementwise work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.group_norm`` from primitives: ``(x − mean)/√(var + eps)·γ + β`` per (sample, group)."""
    grouped = x.reshape(x.shape[0], num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    var = grouped.var(-1, keepdim=True, unbiased=False)
    out = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class CompilableJVPMode(TorchFunctionMode):
    """Routes ``F.group_norm`` to :func:`group_norm`; everything else passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm:
            return group_norm(*args, **kwargs)
        return func(*args, **kwargs)


def compilable_jvp() -> CompilableJVPMode:
    """Context manager for the JVP pass inside a ``torch.compile`` d function."""
    return CompilableJVPMode()
