"""trainer.compile: the compiled student JVP (and compiled teacher) give eager's loss and grads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from scm_lightning.jvp.install import install_jvp_attention
from scm_lightning.losses import SCMLossConfig, compiled_rearranged_jvp, scm_loss
from scm_lightning.student import Student
from scm_lightning.teachers.loading import load_teacher
from scm_lightning.teachers.trigflow import TrigFlowNative

pytestmark = pytest.mark.slow  # every test here compiles (seconds each on 2 cores)

REPO = Path(__file__).resolve().parents[1]


def _loss_and_grads(student, teacher, x0, **kwargs):
    student.zero_grad(set_to_none=True)
    out = scm_loss(
        student, x0, SCMLossConfig(), 0.7, teacher, generator=torch.Generator().manual_seed(3),
        **kwargs,
    )  # fmt: skip
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out, grads


def _assert_compiled_matches_eager(student, teacher, x0, backend: str) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, eager_grads = _loss_and_grads(student, teacher, x0)
    compiled_teacher = torch.compile(teacher, backend=backend)
    compiled_jvp = compiled_rearranged_jvp(student, backend=backend)
    for _ in range(2):  # the second call runs the cached graph
        comp, comp_grads = _loss_and_grads(student, compiled_teacher, x0, student_jvp=compiled_jvp)
        torch.testing.assert_close(comp.loss, eager.loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(comp.g_norm, eager.g_norm, rtol=1e-4, atol=1e-5)
        assert comp_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
        for name, g in eager_grads.items():
            scale = g.abs().max().clamp(min=1e-6)
            err = (comp_grads[name] - g).abs().max() / scale
            assert err < 1e-3, f"{name}: relative gradient error {err:.2e}"
    # One graph, really compiled: no graph break, no silent fallback to eager.
    assert not counters["graph_break"] and not counters["unimplemented"]
    assert counters["stats"]["unique_graphs"] >= 2  # the student's JVP and the teacher


def test_compiled_step_matches_eager_digits_teacher():
    """The bundled digits teacher (no attention): lean eager rules vs Inductor's code.

    Inductor's compile of the JVP graph takes minutes on a loaded 2-core machine: this is
    the one test that pays it.
    """
    from scm_lightning.assets import asset_path

    teacher = load_teacher(asset_path("digits_teacher")).requires_grad_(False).eval()
    student = Student.from_teacher(teacher)
    torch.manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    _assert_compiled_matches_eager(student, teacher, x0, "inductor")


def test_compiled_step_matches_eager_unet2d_with_attention():
    """diffusers UNet2DModel with attention: eager JVP attention vs the traced graph (math
    attention, GroupNorm from primitives), run by AOTAutograd-free Dynamo ("eager" backend)
    to keep the test's cost down; the digits test covers Inductor's code."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    teacher = TrigFlowNative(net, sigma_data=0.5).requires_grad_(False).eval()
    student = Student.from_teacher(teacher)
    assert install_jvp_attention(student) == 4  # 2 down/up + mid
    x0 = torch.randn(4, 3, 8, 8).clamp(-1, 1)
    _assert_compiled_matches_eager(student, teacher, x0, "eager")


def test_cli_fit_with_trainer_compile(tmp_path):
    """The whole fit path (validation, step, sampling, FID) with the compiled step's plumbing;
    the "eager" backend traces the same graphs without Inductor's minutes of code generation."""
    res = run_cli(
        "fit", "debug=fdr", "trainer.compile=eager", f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results and all(v == v for v in results.values() if isinstance(v, float))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("fit", "trainer.compile=yes"),
            "trainer.compile='yes' is invalid: expected true, false or a torch.compile backend",
        ),
        (("pretrain", "trainer.compile=true"), "trainer.compile=True is invalid: expected false"),
        (
            ("fit", "trainer=fsdp", "trainer.compile=true"),
            "trainer.compile=True is invalid: expected false with trainer=fsdp",
        ),
        (
            ("fit", "trainer.compile=true", "loss.jvp_precision=64"),
            "loss.jvp_precision=64 is invalid: expected null with trainer.compile=True",
        ),
    ],
)
def test_trainer_compile_refused_before_work(tmp_path, args, expected):
    res = run_cli(*args, f"run_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert expected in res.stderr
    assert not (tmp_path / "run").exists()


def test_gpu_benchmark_without_cuda_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("this checks the no-CUDA path")
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA device" in res.stdout
