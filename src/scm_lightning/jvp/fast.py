"""Lean forward-mode rules for the JVP pass, installed by a scoped TorchFunctionMode.

PyTorch's generic forward-AD of ``conv2d`` issues three convolutions per layer (primal, input
tangent, and one for the weight tangent even when there is none), and ``group_norm``'s rule
is a long chain of small ops. In sCM's JVP pass the weights are θ⁻ (stop-gradient), so the
tangent of a conv is one convolution of the input tangent, and GroupNorm's tangent has the
closed form ``ty = γ·(t̃ − x̂·mean(x̂·t̃))·rstd`` with ``t̃ = tx − mean(tx)`` per group.

SiLU's own rule is cheap, but with grad on (the one-pass JVP, whose primal is the loss's
F_θ) PyTorch records its tangent in the autograd graph, so every SiLU's tangent stays alive
until the pass ends; the rule here computes it under no-grad.

:func:`fast_jvp` intercepts ``F.conv2d``, ``F.linear``, ``F.group_norm`` and ``F.silu`` calls
of *any* model (diffusers or ours, no architecture change) and routes them to
autograd Functions carrying these rules. Weight/bias tangents, if a caller supplies them,
are still honoured, so the rules are exact in general. Tested against ``torch.func.jvp``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def _no_forward_ad() -> Iterator[None]:
    """The primal of a rule: without this the built-in forward-AD formula would run as well."""
    previous = torch._C._is_fwd_grad_enabled()
    torch._C._set_fwd_grad_enabled(False)
    try:
        yield
    finally:
        torch._C._set_fwd_grad_enabled(previous)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, *conv_args: Any) -> Tensor:
        with _no_forward_ad():
            return F.conv2d(x, w, b, *conv_args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, w, _, *conv_args = inputs
        ctx.conv_args = conv_args
        ctx.has_bias = inputs[2] is not None
        ctx.set_materialize_grads(False)  # absent weight tangents arrive as None, not zeros
        ctx.save_for_forward(x, w)
        ctx.save_for_backward(x, w)

    @staticmethod
    def jvp(ctx: Any, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None, *_: Any) -> Tensor:
        x, w = ctx.saved_tensors
        with torch.no_grad():  # the tangent is a stop-gradient in sCM: never record it
            out = F.conv2d(tx, w, None, *ctx.conv_args) if tx is not None else None
            if tw is not None or tb is not None:  # only when weights carry tangents (not sCM)
                zw = tw if tw is not None else torch.zeros_like(w)
                extra = F.conv2d(x, zw, tb, *ctx.conv_args)
                out = extra if out is None else out + extra
        return out

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None) -> tuple:
        x, w = ctx.saved_tensors
        if gy is None:
            return (None,) * (3 + len(ctx.conv_args))
        stride, padding, dilation, groups = ctx.conv_args
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy,
            x,
            w,
            [w.shape[0]] if ctx.has_bias else None,
            _pair(stride),
            _pair(padding),
            _pair(dilation),
            False,
            [0, 0],
            groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias],
        )
        return gx, gw, gb if ctx.has_bias else None, None, None, None, None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        with _no_forward_ad():
            return F.linear(x, w, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, w, b = inputs
        ctx.has_bias = b is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(x, w)
        ctx.save_for_backward(x, w)

    @staticmethod
    def jvp(ctx: Any, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None) -> Tensor:
        x, w = ctx.saved_tensors
        with torch.no_grad():
            out = F.linear(tx, w) if tx is not None else None
            if tw is not None or tb is not None:
                extra = F.linear(x, tw if tw is not None else torch.zeros_like(w), tb)
                out = extra if out is None else out + extra
        return out

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None) -> tuple:
        x, w = ctx.saved_tensors
        if gy is None:
            return None, None, None
        gx = gy @ w if ctx.needs_input_grad[0] else None
        g2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
        gw = g2.T @ x2 if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias else None
        return gx, gw, gb


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        x: Tensor, num_groups: int, w: Tensor | None, b: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[0], x.shape[1]
        with _no_forward_ad():  # the fused kernel, which also returns the group statistics
            out, mean, rstd = torch.native_group_norm(
                x, w, b, n, c, x[0, 0].numel(), num_groups, eps
            )
        return out, mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, num_groups, w, _, _ = inputs
        _, mean, rstd = output
        ctx.num_groups = num_groups
        ctx.x_shape = x.shape
        ctx.has_bias = inputs[3] is not None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_forward(x, mean, rstd, w)
        ctx.save_for_backward(x, mean, rstd, w)

    @staticmethod
    def jvp(ctx: Any, tx: Tensor | None, _g: Any, tw: Tensor | None, tb: Tensor | None, _e: Any):
        x, mean, rstd, w = ctx.saved_tensors
        with torch.no_grad():
            return _GroupNorm._tangent(ctx, x, mean, rstd, w, tx, tw, tb), None, None

    @staticmethod
    def _tangent(ctx: Any, x: Tensor, mean: Tensor, rstd: Tensor, w: Tensor | None, tx, tw, tb):
        shape = (1, -1) + (1,) * (len(ctx.x_shape) - 2)
        mean, rstd = mean.unsqueeze(-1), rstd.unsqueeze(-1)  # (N, G, 1)
        xhat = (x.reshape(x.shape[0], ctx.num_groups, -1) - mean) * rstd
        out = torch.zeros(ctx.x_shape, dtype=x.dtype, device=x.device)
        if tx is not None:
            tg = tx.reshape(tx.shape[0], ctx.num_groups, -1)
            tg = tg - tg.mean(-1, keepdim=True)
            ty = (tg - xhat * (xhat * tg).mean(-1, keepdim=True)) * rstd  # tangent of x̂
            out = ty.reshape(ctx.x_shape)
            if w is not None:
                out = out * w.view(shape)
        if tw is not None:  # only when weights carry tangents (not in sCM)
            out = out + xhat.reshape(ctx.x_shape) * tw.view(shape)
        if tb is not None:
            out = out + tb.view(shape)
        return out

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, _gm: Any, _gr: Any) -> tuple:
        x, mean, rstd, w = ctx.saved_tensors
        if gy is None:
            return None, None, None, None, None
        n, c = x.shape[0], x.shape[1]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            gy.contiguous(),
            x,
            mean,
            rstd,
            w,
            n,
            c,
            x[0, 0].numel(),
            ctx.num_groups,
            [ctx.needs_input_grad[0], w is not None and ctx.needs_input_grad[2], ctx.has_bias],
        )
        return gx, None, gw, gb if ctx.has_bias else None, None


class _SiLU(torch.autograd.Function):
    # PyTorch's own rule records the tangent in the autograd graph when grad is on (the
    # one-pass JVP), keeping every SiLU's tangent alive until the pass ends: peak memory.
    @staticmethod
    def forward(x: Tensor) -> Tensor:
        with _no_forward_ad():
            return F.silu(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(inputs[0])
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def jvp(ctx: Any, tx: Tensor | None) -> Tensor | None:
        (x,) = ctx.saved_tensors
        with torch.no_grad():  # silu'(x) = s·(1 + x·(1 − s)), s = sigmoid(x)
            return torch.ops.aten.silu_backward(tx, x) if tx is not None else None

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None) -> Tensor | None:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(gy, x) if gy is not None else None


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


class FastJVPMode(TorchFunctionMode):
    """Routes conv2d / linear / group_norm / silu to lean forward-AD rules (exact backward)."""

    def __init__(self) -> None:
        super().__init__()
        self._inside = False  # functorch re-enters the mode from a Function's forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside or func not in _RULES or _autocast_on():
            return func(*args, **kwargs)  # under autocast the generic rules handle the casts
        self._inside = True
        try:
            return _RULES[func](args, kwargs)
        finally:
            self._inside = False


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _conv2d(args: tuple, kwargs: dict) -> Tensor:
    x, w = args[0], _arg(args, kwargs, 1, "weight", None)
    if isinstance(_arg(args, kwargs, 4, "padding", 0), str):  # "same"/"valid": generic rule
        return F.conv2d(*args, **kwargs)
    conv_args = (
        _arg(args, kwargs, 3, "stride", 1),
        _arg(args, kwargs, 4, "padding", 0),
        _arg(args, kwargs, 5, "dilation", 1),
        _arg(args, kwargs, 6, "groups", 1),
    )
    return _Conv2d.apply(x, w, _arg(args, kwargs, 2, "bias", None), *conv_args)


def _linear(args: tuple, kwargs: dict) -> Tensor:
    x, w = args[0], _arg(args, kwargs, 1, "weight", None)
    return _Linear.apply(x, w, _arg(args, kwargs, 2, "bias", None))


def _group_norm(args: tuple, kwargs: dict) -> Tensor:
    x, groups = args[0], _arg(args, kwargs, 1, "num_groups", None)
    weight = _arg(args, kwargs, 2, "weight", None)
    bias = _arg(args, kwargs, 3, "bias", None)
    eps = _arg(args, kwargs, 4, "eps", 1e-5)
    return _GroupNorm.apply(x, groups, weight, bias, eps)[0]


def _silu(args: tuple, kwargs: dict) -> Tensor:
    if _arg(args, kwargs, 1, "inplace", False):  # an in-place SiLU keeps the generic rule
        return F.silu(*args, **kwargs)
    return _SiLU.apply(args[0])


_RULES = {F.conv2d: _conv2d, F.linear: _linear, F.group_norm: _group_norm, F.silu: _silu}


def fast_jvp() -> FastJVPMode:
    """Context manager enabling the lean JVP rules (use around ``torch.func.jvp`` under no-grad)."""
    return FastJVPMode()
