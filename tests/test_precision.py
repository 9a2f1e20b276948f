"""Mixed precision of the sCM step: every ``trainer.precision`` × ``loss.jvp_precision``.

References: the same JVP / loss / gradient in float32 without autocast.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from scm_lightning import losses
from scm_lightning.config import ConfigError, compose_config, validate_config
from scm_lightning.jvp.install import install_jvp_attention
from scm_lightning.losses import SCMLossConfig, rearranged_jvp, scm_loss
from scm_lightning.nets.trigflow_unet import TrigFlowUNet
from scm_lightning.student import Student
from scm_lightning.teachers.trigflow import TrigFlowNative
from scm_lightning.training import JVP_PRECISION


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def models() -> tuple[Student, TrigFlowNative]:
    torch.manual_seed(0)
    net = TrigFlowUNet(sample_size=8, block_channels=(16, 32), attention_head_dim=16)
    for p in net.parameters():
        p.data.normal_(std=0.05)
    teacher = TrigFlowNative(net, sigma_data=0.5).requires_grad_(False).eval()
    return Student.from_teacher(teacher, logvar_channels=16), teacher


def inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x_t = 0.5 * torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.rand(batch, generator=g) * 1.4 + 0.05
    return x_t, t, torch.randn(batch, 1, 8, 8, generator=g)


def autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_bf16_jvp_tangent_agrees_with_fp32_and_jvp_precision_32_is_exact(models) -> None:
    student, _ = models
    x_t, t, dxdt = inputs()
    F32, dF32 = rearranged_jvp(student, x_t, t, dxdt, 0.5)
    with autocast():
        F16, dF16 = rearranged_jvp(student, x_t, t, dxdt, 0.5)  # inherits bf16
        Fx, dFx = rearranged_jvp(student, x_t, t, dxdt, 0.5, jvp_dtype=torch.float32)
    # bf16 has an 8-bit mantissa (unit roundoff 2^-8 ≈ 4e-3): a few roundoffs through the net
    assert 1e-4 < rel(dF16, dF32) < 5e-2 and rel(F16, F32) < 5e-2
    assert rel(dFx, dF32) < 1e-5 and rel(Fx, F32) < 1e-5 and dFx.dtype == torch.float32


def test_bf16_scm_step_keeps_time_embedding_tangent_and_loss_in_fp32(models) -> None:
    student, teacher = models
    x0 = inputs(8)[0].clamp(-1, 1)
    cfg = SCMLossConfig(jvp_dtype=None)
    seen = []
    student.net.net.time_mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with autocast():
        out = scm_loss(
            student, x0, cfg, r=0.5, teacher=teacher, generator=torch.Generator().manual_seed(3)
        )
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert seen and all(d == torch.float32 for d in seen)  # c_noise(t) embedding in fp32
    out.loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    ref = scm_loss(
        copy.deepcopy(student),
        x0,
        cfg,
        r=0.5,
        teacher=teacher,
        generator=torch.Generator().manual_seed(3),
    )
    assert abs(float(out.loss) - float(ref.loss)) < 5e-2 * abs(float(ref.loss)) + 1e-3


def test_bf16_mixed_run_with_fp32_jvp_and_checkpointing(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`trainer.precision=bf16-mixed loss.jvp_precision=32 student.gradient_checkpointing=true`
    through the real config and Trainer on the CPU."""
    from scm_lightning.config import compose_config
    from scm_lightning.training import run

    monkeypatch.delenv("SCM_RUN_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(
        "fit",
        [
            "teacher=diffusers",
            f"teacher.path={tiny_teacher}",
            "trainer=cpu",
            "trainer.precision=bf16-mixed",
            "loss.jvp_precision=32",
            "student.gradient_checkpointing=true",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            "data.batch_size=4",
            "callbacks.fid=null",
            "callbacks.progress=null",
            "callbacks.samples=null",
            "eval=none",
            "logger=csv",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    monkeypatch.delenv("SCM_RUN_DIR", raising=False)
    run(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {}


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_jvp_attention_tangent_under_autocast(input_dtype: torch.dtype) -> None:
    """The tiled tangent under bf16 autocast (it crashed: bf16 products into an fp32
    accumulator) agrees with a float64 math-attention JVP and has its primal's dtype."""
    from scm_lightning.jvp.attention import jvp_attention

    g = torch.Generator().manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(2, 2, 64, 16, generator=g) for _ in range(6))

    def math_attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v

    y_ref, ty_ref = torch.func.jvp(
        math_attention,
        tuple(a.double() for a in (q, k, v)),
        tuple(a.double() for a in (tq, tk, tv)),
    )
    primals = tuple(a.to(input_dtype) for a in (q, k, v))
    tangents = tuple(a.to(input_dtype) for a in (tq, tk, tv))
    with autocast():
        y, ty = torch.func.jvp(lambda *a: jvp_attention(*a, block_size=16), primals, tangents)
    assert y.dtype == ty.dtype == torch.bfloat16
    assert rel(ty, ty_ref) < 2e-2 and rel(y, y_ref) < 2e-2  # a few bf16 roundoffs (4e-3 each)


# -- trainer.precision × loss.jvp_precision ------------------------------------------------

PRECISIONS = ["32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
JVP_PRECISIONS = ["null", "32", "64", "bf16", "16"]
# What validation refuses (key named in the message), and why (docs/validation.md).
REFUSED = {
    **{(p, j): "trainer.precision" for p in ("bf16-true", "16-true") for j in JVP_PRECISIONS},
    ("64-true", "bf16"): "loss.jvp_precision",  # autocast would leave the float64 JVP alone
    ("64-true", "16"): "loss.jvp_precision",
}
LOW = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-5}


def _precision_plugin(precision: str):
    """Lightning's own precision plugin; 16-mixed with a CPU autocast (torch supports fp16 there,
    Lightning's Trainer would switch a CPU run to bf16, which validation refuses)."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    if precision == "16-mixed":
        return MixedPrecision("16-mixed", "cpu")
    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, barebones=True)
    return trainer.precision_plugin


def _reference_step(dtype: torch.dtype) -> float:
    """The same step without autocast, weights and data in ``dtype`` (the draws depend on it)."""
    student, teacher = _default_student()
    student, teacher = student.to(dtype), teacher.to(dtype)
    out = scm_loss(student, _data().to(dtype), SCMLossConfig(), 0.5, teacher, generator=_gen(3))
    return float(out.loss)


def _default_student() -> tuple[Student, TrigFlowNative]:
    """The default student: a TrigFlowUNet with attention and the JVP attention installed."""
    torch.manual_seed(0)
    net = TrigFlowUNet(sample_size=8, block_channels=(16, 32), attention_head_dim=16)
    for p in net.parameters():
        p.data.normal_(std=0.05)
    teacher = TrigFlowNative(net, sigma_data=0.5).requires_grad_(False).eval()
    student = Student.from_teacher(teacher, logvar_channels=16)
    assert install_jvp_attention(student) > 0
    return student, teacher


def _data() -> torch.Tensor:
    return (2 * torch.rand(4, 1, 8, 8, generator=_gen(7)) - 1).clamp(-1, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def reference_losses() -> dict[torch.dtype, float]:
    return {dtype: _reference_step(dtype) for dtype in (torch.float32, torch.float64)}


@pytest.mark.parametrize("jvp", JVP_PRECISIONS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_matrix_runs_or_is_refused(
    precision: str, jvp: str, tiny_teacher: Path, reference_losses: dict
) -> None:
    """Each accepted combination trains a step of the default student (with the tiled JVP
    attention) under Lightning's precision plugin; the rest are refused by validation."""
    # 16-mixed is a GPU setting (refused on the CPU accelerator, tested separately).
    accelerator = "gpu" if precision == "16-mixed" else "cpu"
    cfg = compose_config(
        "fit",
        [
            "teacher=diffusers",
            f"teacher.path={tiny_teacher}",
            f"trainer.accelerator={accelerator}",
            f"trainer.precision={precision}",
            f"loss.jvp_precision={jvp}",
        ],
    )
    if (precision, jvp) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[precision, jvp]) as err:
            validate_config(cfg)
        assert "\n" not in str(err.value) and "expected" in str(err.value)
        return
    validate_config(cfg)

    jvp_dtype = JVP_PRECISION[None if jvp == "null" else jvp]
    seen = {}
    real_jvp = losses.rearranged_jvp

    def recording_jvp(*args, **kwargs):
        F_minus, dF = real_jvp(*args, **kwargs)
        seen["jvp"] = dF.dtype
        return F_minus, dF

    plugin = _precision_plugin(precision)
    student, teacher = _default_student()
    modules = plugin.convert_module(torch.nn.ModuleDict({"student": student, "teacher": teacher}))
    student, teacher = modules["student"], modules["teacher"]
    emb = []
    student.net.net.time_mlp.register_forward_hook(lambda m, i, o: emb.append(o.dtype))
    x0 = plugin.convert_input(_data())
    with plugin.forward_context():
        out = scm_loss(
            student,
            x0,
            SCMLossConfig(jvp_dtype=jvp_dtype),
            0.5,
            teacher,
            generator=_gen(3),
            student_jvp=recording_jvp,
        )
    out.loss.backward()

    run_dtype = {"64-true": torch.float64, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    expected_jvp = jvp_dtype or run_dtype.get(precision, torch.float32)
    assert seen["jvp"] == expected_jvp  # the JVP ran in the precision asked for
    # Time embedding, loss (and g, computed from them) in float32 or better (spec §3).
    assert emb and all(d in (torch.float32, torch.float64) for d in emb)
    assert out.loss.dtype in (torch.float32, torch.float64) and torch.isfinite(out.loss)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for p in student.parameters() if p.requires_grad)
    assert all(torch.isfinite(g).all() for g in grads)
    # Same loss as the step in full precision, to within the least precise of the two passes.
    reference = reference_losses[x0.dtype]
    tol = max(LOW[run_dtype.get(precision, torch.float32)], LOW[expected_jvp])
    assert abs(float(out.loss) - reference) <= tol * abs(reference)


def test_fp64_jvp_in_an_fp32_run_equals_a_float64_jvp() -> None:
    """``loss.jvp_precision=64`` casts the weights as well as the inputs (it used to crash)."""
    student, _ = _default_student()
    x_t, t, dxdt = inputs()
    F64, dF64 = rearranged_jvp(student, x_t, t, dxdt, 0.5, jvp_dtype=torch.float64)
    ref_student = copy.deepcopy(student).double()
    Fr, dFr = rearranged_jvp(ref_student, x_t.double(), t.double(), dxdt.double(), 0.5)
    assert dF64.dtype == torch.float64 and next(student.parameters()).dtype == torch.float32
    torch.testing.assert_close(dF64, dFr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F64, Fr, rtol=1e-12, atol=1e-12)


def test_fp16_mixed_on_the_cpu_accelerator_is_refused(tiny_teacher: Path) -> None:
    cfg = compose_config(
        "fit",
        [
            "teacher=diffusers",
            f"teacher.path={tiny_teacher}",
            "trainer=cpu",
            "trainer.precision=16-mixed",
        ],
    )
    with pytest.raises(ConfigError, match=r"trainer.precision='16-mixed' is invalid.*bf16-mixed"):
        validate_config(cfg)


@pytest.mark.parametrize("precision", ["transformer-engine", "transformer-engine-float16"])
def test_transformer_engine_is_refused_for_fit(precision: str, tiny_teacher: Path) -> None:
    cfg = compose_config(
        "fit",
        ["teacher=diffusers", f"teacher.path={tiny_teacher}", f"trainer.precision={precision}"],
    )
    with pytest.raises(ConfigError, match="forward-mode AD"):
        validate_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [("trainer.precision=bf16-mixed",), ("trainer.precision=64-true", "loss.jvp_precision=32")],
)
def test_cli_fit_precision(overrides: tuple[str, ...], tmp_path: Path) -> None:
    """``fit debug=fdr trainer=cpu trainer.precision=bf16-mixed`` with the bundled teacher (a
    TrigFlowUNet student with the tiled JVP attention) runs end to end, and so does a float64
    run with an fp32 JVP (its sample grids and evaluation used to draw fp32 noise)."""
    proc = run_cli(
        "fit", "debug=fdr", "trainer=cpu", *overrides, f"run_dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fd_student_nfe1=" in proc.stdout + proc.stderr
