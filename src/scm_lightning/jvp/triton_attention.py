"""Triton kernel: attention output and its tangent in one pass (spec §6, App. F).

One program handles a BLOCK_M tile of query rows of one (batch, head) and walks the keys in
BLOCK_N tiles with online-softmax state: running max m, ℓ = Σe^{x−m}, f = Σe^{x−m}v,
μ = Σe^{x−m}·t_x and the tangent accumulator a + g = Σe^{x−m}·t_v + Σ(e^{x−m}⊙t_x)v.
Each tile rescales the state by e^{m_old−m_new}; the finish is y = f/ℓ,
t_y = (a + g)/ℓ − (μ/ℓ)·y. Nothing of size Lq×Lk is stored.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` (set before triton is imported) it runs
on CPU tensors, which the tests use. Tiles are upcast to fp32 before ``tl.dot`` (exact in
the interpreter; bf16 ``tl.dot`` is not) and accumulate in fp32.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

__all__ = ["triton_attention_with_tangent", "triton_available"]

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # optional dependency: the torch path covers every device
    _HAVE_TRITON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    """True when triton imports and can run here (a CUDA device, or the interpreter)."""
    return _HAVE_TRITON and (torch.cuda.is_available() or _interpreting())


if _HAVE_TRITON:

    @triton.jit
    def _attn_tangent_kernel(
        Q,
        K,
        V,
        TQ,
        TK,
        TV,
        BIAS,
        Y,
        TY,
        scale,
        Lq,
        Lk,
        D: tl.constexpr,
        DV: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HAS_TQ: tl.constexpr,
        HAS_TK: tl.constexpr,
        HAS_TV: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cd = tl.arange(0, BLOCK_D)
        cv = tl.arange(0, BLOCK_DV)
        cn = tl.arange(0, BLOCK_N)
        row_ok = rows < Lq
        q_off = bh * Lq * D + rows[:, None] * D + cd[None, :]
        q_msk = row_ok[:, None] & (cd[None, :] < D)
        # Scale folded into q and t_q: x = (s·q)kᵀ, t_x = (s·t_q)kᵀ + (s·q)t_kᵀ.
        q = tl.load(Q + q_off, mask=q_msk, other=0.0).to(tl.float32) * scale
        if HAS_TQ:
            tq = tl.load(TQ + q_off, mask=q_msk, other=0.0).to(tl.float32) * scale

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        mu_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        f = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        ag = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start in range(0, Lk, BLOCK_N):
            cols = start + cn
            col_ok = cols < Lk
            k_off = bh * Lk * D + cols[:, None] * D + cd[None, :]
            k_msk = col_ok[:, None] & (cd[None, :] < D)
            v_off = bh * Lk * DV + cols[:, None] * DV + cv[None, :]
            v_msk = col_ok[:, None] & (cv[None, :] < DV)
            k = tl.load(K + k_off, mask=k_msk, other=0.0).to(tl.float32)
            v = tl.load(V + v_off, mask=v_msk, other=0.0).to(tl.float32)
            x = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            if HAS_BIAS:  # key-padding bias, one value per (batch·head, key); −inf = masked
                x += tl.load(BIAS + bh * Lk + cols, mask=col_ok, other=0.0)[None, :]
            x = tl.where(col_ok[None, :], x, float("-inf"))  # padded keys get weight 0
            m_new = tl.maximum(m_i, tl.max(x, 1))
            # Rows masked so far (max −inf, only with a bias) shift by 0: no −inf − (−inf).
            m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_exp)  # e^{m_old − m_new}
            p = tl.exp(x - m_exp[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            f = f * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            ag = ag * alpha[:, None]
            if HAS_TQ or HAS_TK:
                tx = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if HAS_TQ:
                    tx += tl.dot(tq, tl.trans(k), input_precision=PRECISION)
                if HAS_TK:
                    tk = tl.load(TK + k_off, mask=k_msk, other=0.0).to(tl.float32)
                    tx += tl.dot(q, tl.trans(tk), input_precision=PRECISION)
                ptx = p * tx
                mu_i = mu_i * alpha + tl.sum(ptx, 1)
                ag += tl.dot(ptx, v, input_precision=PRECISION)  # g
            if HAS_TV:
                tv = tl.load(TV + v_off, mask=v_msk, other=0.0).to(tl.float32)
                ag += tl.dot(p, tv, input_precision=PRECISION)  # a
            m_i = m_new
        # Finish (spec §6): y = f/ℓ, t_y = a/ℓ + g/ℓ − (μ/ℓ)·y.
        inv = 1.0 / l_i
        y = f * inv[:, None]
        ty = ag * inv[:, None] - (mu_i * inv)[:, None] * y
        o_off = bh * Lq * DV + rows[:, None] * DV + cv[None, :]
        o_msk = row_ok[:, None] & (cv[None, :] < DV)
        tl.store(Y + o_off, y.to(Y.dtype.element_ty), mask=o_msk)
        tl.store(TY + o_off, ty.to(TY.dtype.element_ty), mask=o_msk)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE dots. Half inputs on a GPU: TF32 keeps a 10-bit mantissa
    # (fp16's own) at tensor-core speed. The interpreter only emulates IEEE.
    return "ieee" if dtype == torch.float32 or _interpreting() else "tf32"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (n - 1).bit_length())


def triton_attention_with_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None = None,
    tk: Tensor | None = None,
    tv: Tensor | None = None,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(y, t_y) for q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); tangents may be None.

    ``bias``: an additive key-padding bias broadcastable to (B, H, 1, Lk) (−inf = masked;
    ``attention.mask_to_bias`` builds it from SDPA masks); per-query masks are not handled
    here (the torch loop takes them). Same contract as ``attention_with_tangent``; outputs
    are (B, H, Lq, Dv) in q's dtype.
    fp32 inputs use IEEE dots (no TF32), so fp32 tangents match the torch path; fp16/bf16
    inputs use TF32 dots on a GPU, all accumulated in fp32.
    """
    if not _HAVE_TRITON:
        raise RuntimeError("triton_attention_with_tangent needs triton (pip install triton)")
    if not (q.is_cuda or _interpreting()):
        raise ValueError(
            f"triton kernel needs CUDA tensors (or TRITON_INTERPRET=1); got device {q.device}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, d); got shape {tuple(t.shape)}")
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[-2], v.shape[-1]
    if k.shape != (B, H, Lk, D) or v.shape[:3] != (B, H, Lk):
        raise ValueError(
            f"incompatible q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # Contiguous (B·H, L, d) layout: the kernel's offsets assume it (O(L·d) copy at most).
    q, k, v = (t.contiguous() for t in (q, k, v))
    tq, tk, tv = (None if t is None else t.to(q.dtype).contiguous() for t in (tq, tk, tv))
    if bias is not None:
        if bias.dim() != 4 or bias.shape[-2] != 1:
            raise ValueError(
                f"bias must be (B|1, H|1, 1, Lk) key padding; got shape {tuple(bias.shape)}"
            )
        # (B·H, Lk) fp32: O(B·H·Lk), never Lq×Lk.
        bias = bias.to(torch.float32).expand(B, H, 1, Lk).reshape(B * H, Lk).contiguous()
    y = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    ty = torch.empty_like(y)
    grid = (triton.cdiv(Lq, block_m), B * H)
    _attn_tangent_kernel[grid](
        q,
        k,
        v,
        q if tq is None else tq,
        k if tk is None else tk,
        v if tv is None else tv,
        q if bias is None else bias,
        y,
        ty,
        scale,
        Lq,
        Lk,
        D=D,
        DV=Dv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=_pow2(D),
        BLOCK_DV=_pow2(Dv),
        HAS_TQ=tq is not None,
        HAS_TK=tk is not None,
        HAS_TV=tv is not None,
        HAS_BIAS=bias is not None,
        PRECISION=_precision(q.dtype),
    )
    return y, ty
