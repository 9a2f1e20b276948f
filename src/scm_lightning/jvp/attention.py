"""Flash-style attention with a forward-mode (JVP) rule computed blockwise (spec §6, App. F).

Fused SDPA kernels (flash, memory-efficient, cuDNN, CPU flash) have no forward-AD formula,
and the MATH backend materialises the Lq×Lk score matrix, its softmax and both tangents.
:func:`jvp_attention` is a drop-in for ``F.scaled_dot_product_attention`` (no dropout,
no causal flag) that

* runs the fused SDPA kernel for the primal output (plain forward, and the primal of a JVP),
* computes the output tangent over (query block × key block) tiles with online-softmax
  statistics, so memory is O(block_q·block_k) per (batch, head) instead of O(Lq·Lk),
* recomputes the normal SDPA gradient in ``backward``.

An optional ``attn_mask`` (bool, True = attend, or an additive float bias, broadcastable to
(B, H, Lq, Lk), as in SDPA) covers cross-attention key padding (diffusers'
``encoder_attention_mask``); the mask is data, so it carries no tangent. A query row whose
keys are all masked gives NaN, as softmax does.

Works under ``torch.func.jvp``, ``torch.autograd.forward_ad`` and ordinary backprop. The
tangent it returns is not itself differentiable (torch detaches the primals that an
``autograd.Function``'s ``jvp`` sees), which is what sCM needs: the tangent is stop-gradient.

Shapes: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "attention_with_tangent",
    "jvp_attention",
    "mask_to_bias",
]

# (query block, key block). Measured on a 2-core CPU (benchmarks/attention_jvp.py): large
# tiles amortise Python/dispatch overhead; 512×512 fp32 tiles are 1 MiB per (batch, head).
DEFAULT_BLOCK_SIZE: tuple[int, int] = (512, 512)

_HALF = (torch.float16, torch.bfloat16)


def _block_sizes(block_size: int | tuple[int, int]) -> tuple[int, int]:
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if not (isinstance(bq, int) and isinstance(bk, int) and bq > 0 and bk > 0):
        raise ValueError(
            f"block_size must be a positive int or (block_q, block_k), got {block_size!r}"
        )
    return bq, bk


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "jvp_attention expects q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); got "
            f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            "q, k, v must share batch and head dims (no broadcasting, no GQA); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"need q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"empty sequence: Lq={q.shape[-2]}, Lk={k.shape[-2]}")


def _check_tangent(name: str, t: Tensor | None, like: Tensor) -> None:
    if t is not None and t.shape != like.shape:
        raise ValueError(f"tangent {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")


@torch.no_grad()
def _tiled_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
    scale: float,
    block_size: tuple[int, int],
    y: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One blockwise pass over (query block, key block) tiles; returns (y, t_y), both 4-D.

    Online-softmax state per query row (spec §6): running max m, ℓ = Σe^{x−m},
    f = Σe^{x−m}v (skipped when the primal ``y`` is given), μ = Σe^{x−m}·t_x and one
    accumulator for a + g = Σe^{x−m}·t_v + Σ(e^{x−m}⊙t_x)v (the finish divides both by ℓ,
    so they are summed in place). Every merge rescales by e^{m_old−m_new}.

    ``bias`` (4-D, broadcastable to (B, H, Lq, Lk), −inf = masked) is added to each score
    tile; a tile row with every key masked contributes nothing (its max is treated as 0).

    Autocast is switched off here: the loop picks its own accumulation dtype, and autocast
    would run the score/product matmuls in bf16/fp16 against the fp32 accumulators.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _tiled_tangent_loop(q, k, v, tq, tk, tv, scale, block_size, y, bias)


def _tiled_tangent_loop(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
    scale: float,
    block_size: tuple[int, int],
    y: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    B, H, Lq = q.shape[:3]
    Lk, Dv = k.shape[-2], v.shape[-1]
    N = B * H
    bq, bk = block_size
    out_dtype = q.dtype
    acc = torch.float32 if out_dtype in _HALF else out_dtype  # fp32 accumulation for half

    def flat(t: Tensor) -> Tensor:
        # (B, H, L, d) -> (B·H, L, d) in the accumulation dtype; O(L·d), never O(Lq·Lk).
        return t.reshape(N, t.shape[-2], t.shape[-1]).to(acc)

    # Fold the softmax scale into q (and t_q): x = (s·q)kᵀ, t_x = (s·t_q)kᵀ + (s·q)t_kᵀ.
    qs = flat(q) * scale
    k3, v3 = flat(k), flat(v)
    has_tx = tq is not None or tk is not None
    if tq is not None and tk is not None:
        # t_x = [s·q | s·t_q]·[t_k | k]ᵀ: one matmul with a 2D inner dimension.
        qx = torch.cat([qs, flat(tq) * scale], dim=-1)
        kx = torch.cat([flat(tk), k3], dim=-1)
    elif tq is not None:
        qx, kx = flat(tq) * scale, k3
    elif tk is not None:
        qx, kx = qs, flat(tk)
    tv3 = flat(tv) if tv is not None else None
    y3 = flat(y) if y is not None else None
    # A broadcast view (B, H, Lq, Lk) of the bias: tiles are cut from it, never the whole.
    bias4 = bias.to(acc).expand(B, H, Lq, Lk) if bias is not None else None

    y_out = torch.empty(N, Lq, Dv, dtype=acc, device=q.device) if y is None else None
    ty_out = torch.empty(N, Lq, Dv, dtype=acc, device=q.device)
    for i0 in range(0, Lq, bq):
        i1 = min(i0 + bq, Lq)
        q_blk = qs[:, i0:i1]
        qx_blk = qx[:, i0:i1] if has_tx else None
        m = ell = mu = f = ag = None
        for j0 in range(0, Lk, bk):
            j1 = min(j0 + bk, Lk)
            v_blk = v3[:, j0:j1]
            p = torch.bmm(q_blk, k3[:, j0:j1].transpose(1, 2))  # scores x, (N, bq, bk)
            if bias4 is not None:
                p.add_(bias4[:, :, i0:i1, j0:j1].reshape(N, i1 - i0, j1 - j0))
            m_blk = p.amax(dim=-1, keepdim=True)
            m_new = m_blk if m is None else torch.maximum(m, m_blk)
            # Rows with every key masked so far have max −inf: shift them by 0 instead
            # (e^{−inf−0} = 0), so no −inf − (−inf) = NaN appears.
            m_exp = m_new if bias4 is None else m_new.masked_fill(m_new == -math.inf, 0.0)
            # e^{m_old − m_new}; none for the first key block (nothing to rescale).
            alpha = None if m is None else torch.exp(m - m_exp)
            p.sub_(m_exp).exp_()  # e^{x − m}
            if alpha is None:
                ell = p.sum(dim=-1, keepdim=True)
                ag = torch.zeros(N, i1 - i0, Dv, dtype=acc, device=q.device)
                mu = torch.zeros_like(ell)
                if y is None:
                    f = torch.bmm(p, v_blk)
            else:
                ell.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
                ag.mul_(alpha)
                mu.mul_(alpha)
                if y is None:
                    f.mul_(alpha).baddbmm_(p, v_blk)
            if has_tx:
                ptx = torch.bmm(qx_blk, kx[:, j0:j1].transpose(1, 2)).mul_(p)  # e^{x−m} ⊙ t_x
                mu.add_(ptx.sum(dim=-1, keepdim=True))
                ag.baddbmm_(ptx, v_blk)  # g
            if tv3 is not None:
                ag.baddbmm_(p, tv3[:, j0:j1])  # a
            m = m_new
        # Finish (spec §6): y = f/ℓ, t_y = a/ℓ + g/ℓ − (μ/ℓ)·y.
        inv = ell.reciprocal_()
        y_blk = f.mul_(inv) if y is None else y3[:, i0:i1]
        if y is None:
            y_out[:, i0:i1] = y_blk
        ty_out[:, i0:i1] = ag.mul_(inv).sub_(y_blk * (mu * inv))
    y_res = y if y is not None else y_out.to(out_dtype).view(B, H, Lq, Dv)
    return y_res, ty_out.to(out_dtype).view(B, H, Lq, Dv)


def attention_with_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None = None,
    tk: Tensor | None = None,
    tv: Tensor | None = None,
    scale: float | None = None,
    block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention output and its tangent in one blockwise pass (spec §6), no autograd.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); tangents have the shapes of their
    primals, ``None`` meaning zero. ``scale`` defaults to 1/√D. ``attn_mask``: bool (True =
    attend) or additive float, broadcastable to (B, H, Lq, Lk). Returns (y, t_y), each
    (B, H, Lq, Dv) in the input dtype (accumulated in fp32 for fp16/bf16). Uses the Triton
    kernel for CUDA tensors when triton is importable (masks: key padding only, one bias per
    key), else the tiled torch loop.
    """
    _check_qkv(q, k, v)
    for name, t, like in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        _check_tangent(name, t, like)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bs = _block_sizes(block_size)
    bias = mask_to_bias(attn_mask, q, k)
    if _is_key_bias(bias) and _triton_ok(q):
        from scm_lightning.jvp.triton_attention import triton_attention_with_tangent

        return triton_attention_with_tangent(q, k, v, tq, tk, tv, scale=scale, bias=bias)
    return _tiled_tangent(q, k, v, tq, tk, tv, scale, bs, bias=bias)


def mask_to_bias(attn_mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """SDPA's ``attn_mask`` as a 4-D additive bias in q's dtype (bool: True → 0, False → −inf).

    Accepts any shape broadcastable to (B, H, Lq, Lk) and returns a view of at most that size
    (a (B, 1, 1, Lk) key-padding mask stays that small). Raises ValueError otherwise.
    """
    if attn_mask is None:
        return None
    B, H, Lq = q.shape[:3]
    target = (B, H, Lq, k.shape[-2])
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must broadcast to {target}, got {tuple(attn_mask.shape)}")
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if any(m not in (1, t) for m, t in zip(mask.shape, target, strict=True)):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Lq, Lk) = "
            f"{target}"
        )
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        return zero.masked_fill(~mask, -math.inf)
    if not mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool or floating, got {mask.dtype}")
    return mask.to(q.dtype)


def _is_key_bias(bias: Tensor | None) -> bool:
    """True for no bias or a bias constant along the query axis (key padding)."""
    return bias is None or bias.shape[-2] == 1


def _triton_ok(q: Tensor) -> bool:
    if not q.is_cuda:
        return False
    from scm_lightning.jvp.triton_attention import triton_available

    return triton_available()


def _unwrap_functorch(t: Tensor | None) -> Tensor | None:
    """Peel torch.func's JVP/grad wrappers off a tensor the jvp rule received.

    Under ``torch.func.jvp`` the rule sees level-wrapped tensors; a Triton launch needs real
    storage, and plain tensors also skip per-op functorch dispatch in the torch loop. The
    tangent is not differentiable either way (see the module docstring).
    """
    from torch._C import _functorch

    while t is not None and _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            raise NotImplementedError("jvp_attention has no vmap rule (torch.func.vmap/jacfwd)")
        t = _functorch.get_unwrapped(t)
    return t


class _JVPAttention(torch.autograd.Function):
    """Fused SDPA forward/backward plus a blockwise forward-mode rule."""

    @staticmethod
    def forward(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        scale: float,
        block_size: tuple[int, int],
    ) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        q, k, v, bias, scale, block_size = inputs
        ctx.scale, ctx.block_size = scale, block_size
        ctx.has_bias = bias is not None
        # None tangents / grads instead of materialised zeros: skips whole matmuls.
        ctx.set_materialize_grads(False)
        extra = (bias,) if bias is not None else ()
        ctx.save_for_forward(q, k, v, output, *extra)
        ctx.save_for_backward(q, k, v, *extra)

    @staticmethod
    def jvp(
        ctx: Any,
        tq: Tensor | None,
        tk: Tensor | None,
        tv: Tensor | None,
        tbias: Tensor | None,
        *_: Any,
    ) -> Tensor:
        if tbias is not None:
            raise NotImplementedError(
                "jvp_attention: the attention mask carries no tangent (masks are data); "
                "detach it or build it from non-dual tensors"
            )
        saved = ctx.saved_tensors
        bias = _unwrap_functorch(saved[4]) if ctx.has_bias else None
        if tq is None and tk is None and tv is None:
            return torch.zeros_like(saved[3])
        q, k, v, y, tq, tk, tv = (_unwrap_functorch(t) for t in (*saved[:4], tq, tk, tv))
        # Under autocast a tangent may come in wider than its primal (fp32 tangent of a bf16
        # q): the rule works in the primals' dtype.
        tq, tk, tv = (None if t is None else t.to(q.dtype) for t in (tq, tk, tv))
        with torch._C._DisableFuncTorch(), torch.autocast(q.device.type, enabled=False):
            if _is_key_bias(bias) and _triton_ok(q):
                from scm_lightning.jvp.triton_attention import triton_attention_with_tangent

                ty = triton_attention_with_tangent(q, k, v, tq, tk, tv, scale=ctx.scale, bias=bias)[
                    1
                ]
            else:
                # The primal y from the fused forward stands in for f/ℓ: one block matmul fewer.
                ty = _tiled_tangent(q, k, v, tq, tk, tv, ctx.scale, ctx.block_size, y=y, bias=bias)[
                    1
                ]
        # fp32 q, k, v under autocast give a bf16/fp16 y: the tangent follows its primal.
        return ty.to(y.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad_out is None:
            return None, None, None, None, None, None
        q, k, v = ctx.saved_tensors[:3]
        bias = ctx.saved_tensors[3] if ctx.has_bias else None
        needs = ctx.needs_input_grad[:3]
        if not any(needs):  # only the mask asked for a gradient: it is data (None)
            return None, None, None, None, None, None
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs, strict=True)]
            mask = None if bias is None else bias.detach()
            y = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=ctx.scale)
            wrt = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(y, wrt, grad_out))
        return *(next(grads) if n else None for n in needs), None, None, None


def jvp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> Tensor:
    """softmax(q kᵀ·scale) v with a memory-lean forward-mode rule (spec §6).

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv); Lq ≠ Lk allowed.
    ``scale`` defaults to 1/√D (as in SDPA). ``block_size`` is the (query, key) tile of the
    torch tangent loop. ``attn_mask`` as in SDPA: bool (True = attend) or an additive float
    bias, broadcastable to (B, H, Lq, Lk), without a tangent. Dropout and causal attention
    are not supported and raise.
    """
    if dropout_p != 0.0:
        raise ValueError(f"jvp_attention does not support dropout; got dropout_p={dropout_p}")
    if is_causal:
        raise ValueError("jvp_attention does not support is_causal=True")
    _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bias = mask_to_bias(attn_mask, q, k)
    return _JVPAttention.apply(q, k, v, bias, scale, _block_sizes(block_size))
