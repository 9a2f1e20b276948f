"""Triton JVP-attention kernel, checked on CPU with the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so every check runs in one
child process (started once per module); this process and other test modules never see
the variable. The child compares against forward-mode AD through explicit math attention
in float64 and reports the worst error per case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

_CHILD = textwrap.dedent(
    """
    import json, os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    import scm_lightning.jvp.attention as attention
    from scm_lightning.jvp.triton_attention import triton_attention_with_tangent, triton_available

    def math_attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v

    def errors(dtype, lq, lk, d, dv, which, bm, bn, via_function=False):
        g = torch.Generator().manual_seed(0)
        shapes = [(2, 2, lq, d), (2, 2, lk, d), (2, 2, lk, dv)]
        p = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
        t = [torch.randn(*s, generator=g).to(dtype) if i in which else None
             for i, s in enumerate(shapes)]
        if via_function:
            # The autograd.Function's CUDA branch, forced on for CPU tensors.
            attention._triton_ok = lambda q: True
            idx = list(which)
            def fn(*args):
                full = list(p)
                for i, a in zip(idx, args):
                    full[i] = a
                return attention.jvp_attention(*full)
            y, ty = torch.func.jvp(fn, tuple(p[i] for i in idx), tuple(t[i] for i in idx))
        else:
            y, ty = triton_attention_with_tangent(*p, *t, block_m=bm, block_n=bn)
        assert y.dtype == ty.dtype == dtype, (y.dtype, ty.dtype)
        tt = [torch.zeros_like(a) if b is None else b for a, b in zip(p, t)]
        y_ref, ty_ref = torch.func.jvp(
            math_attention, tuple(a.double() for a in p), tuple(b.double() for b in tt))
        return [(y.double() - y_ref).abs().max().item(),
                (ty.double() - ty_ref).abs().max().item()]

    cases = {
        "fp32_self": (torch.float32, 64, 64, 16, 16, (0, 1, 2), 16, 16),
        "fp32_cross_ragged": (torch.float32, 37, 70, 24, 20, (0, 1, 2), 16, 32),
        "fp32_only_k": (torch.float32, 21, 45, 8, 8, (1,), 16, 16),
        "fp32_q_and_v": (torch.float32, 21, 45, 8, 8, (0, 2), 32, 16),
        "fp32_only_v": (torch.float32, 17, 33, 16, 16, (2,), 16, 16),
        "fp16_cross": (torch.float16, 33, 50, 16, 16, (0, 1, 2), 16, 16),
        "bf16_cross": (torch.bfloat16, 33, 50, 16, 16, (0, 1, 2), 16, 16),
    }
    out = {"available": triton_available()}
    out.update({name: errors(*args) for name, args in cases.items()})
    out["function_path"] = errors(torch.float32, 30, 41, 16, 16, (0, 2), 0, 0, True)
    print("RESULT" + json.dumps(out))
    """
)

# max |error| allowed against the float64 reference (outputs and tangents are O(1)).
_TOL = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2, "function": 1e-5}
_CASES = [
    "fp32_self",
    "fp32_cross_ragged",
    "fp32_only_k",
    "fp32_q_and_v",
    "fp32_only_v",
    "fp16_cross",
    "bf16_cross",
    "function_path",
]


@pytest.fixture(scope="module")
def child_result() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_interpreter_is_isolated_to_the_child(child_result):
    assert child_result["available"] is True
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"


@pytest.mark.parametrize("case", _CASES)
def test_kernel_matches_math_jvp(child_result, case):
    tol = _TOL[case.split("_")[0]]
    err_y, err_ty = child_result[case]
    assert err_y <= tol, f"{case}: output error {err_y:.3g} > {tol}"
    assert err_ty <= tol, f"{case}: tangent error {err_ty:.3g} > {tol}"
