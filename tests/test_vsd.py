"""Adaptive VSD and sCD + VSD (spec §3c): the generator loss against the literal formula
(float64 autograd), its gradient direction on Gaussians with closed-form scores, the fake
score's diffusion loss, the zero gradient at initialisation, config refusals, the CLI end to
end (validation, sampling, FD, export of the student) and exact stop/resume."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from conftest import run_cli
from scm_lightning.losses import (
    VSDLossConfig,
    diffusion_loss,
    fake_score_loss,
    one_step_generate,
    vsd_generator_loss,
)
from scm_lightning.nets.weighting import LogVarHead
from test_losses import TinyStudent

SD = 0.5
SHAPE = (6, 3, 2, 2)  # D = 12 = TinyStudent's dim


def _nets() -> tuple[nn.Module, nn.Module, nn.Module, LogVarHead]:
    """Student, teacher and fake score: three different float64 TinyStudents; a random w_ψ."""
    torch.manual_seed(0)
    student, teacher, fake = (TinyStudent(12).double() for _ in range(3))
    head = LogVarHead(16).double()
    with torch.no_grad():
        head.linear.weight.normal_(std=0.3)
        head.linear.bias.fill_(0.2)
    return student, teacher, fake, head


def _params(net: nn.Module) -> list[nn.Parameter]:
    """The parameters F uses (TinyStudent also carries frozen frequencies and a w_φ head)."""
    return [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith("logvar")]


def _prior(seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return SD * torch.randn(SHAPE, generator=g, dtype=torch.float64)


def _draws(cfg: VSDLossConfig, seed: int) -> tuple[Tensor, Tensor]:
    """t with log(σ_d tan t) ~ N(p_mean, p_std²), then z ~ N(0, σ_d² I): the documented order."""
    g = torch.Generator().manual_seed(seed)
    tau = cfg.p_mean + cfg.p_std * torch.randn(SHAPE[0], generator=g, dtype=torch.float64)
    t = torch.atan(torch.exp(tau) / SD)
    z = SD * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return t, z


def _literal_loss(student, teacher, fake, head, prior, cfg, seed) -> tuple[Tensor, Tensor, Tensor]:
    """``E[exp(w)/D·‖g − sg(g) + F_T(x_t/σ_d,t) − F_φ(x_t/σ_d,t)‖² − w]`` written out (§3c),
    x_t built from sg(g); returns (loss, g, Δ = F_T − F_φ)."""
    t, z = _draws(cfg, seed)
    t_max = torch.full((SHAPE[0],), math.atan(80.0 / SD), dtype=torch.float64)
    c, s = torch.cos(t_max).view(-1, 1, 1, 1), torch.sin(t_max).view(-1, 1, 1, 1)
    g = c * prior - s * SD * student(prior / SD, t_max)  # f_θ(z', t_max), Eq. 5
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    x_t = ct * g.detach() + st * z
    delta = teacher(x_t / SD, t) - fake(x_t / SD, t)
    w = head(t)
    residual = g - g.detach() + delta
    loss = (torch.exp(w) / 12 * residual.pow(2).sum((1, 2, 3)) - w).mean()
    return loss, g, delta.detach()


def test_vsd_generator_loss_value_and_gradient_match_the_literal_formula():
    student, teacher, fake, head = _nets()
    cfg, prior = VSDLossConfig(), _prior()
    theta = [*_params(student), *head.parameters()]
    out = vsd_generator_loss(
        student, teacher, fake, head, prior, cfg, generator=torch.Generator().manual_seed(7)
    )
    got = torch.autograd.grad(out.loss, theta)
    literal, g, delta = _literal_loss(student, teacher, fake, head, prior, cfg, 7)
    want = torch.autograd.grad(literal, theta, retain_graph=True)
    torch.testing.assert_close(out.loss, literal, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The surrogate's θ-gradient is 2·exp(w)/(D·B)·Δᵀ ∂g/∂θ (value of the residual = Δ).
    t, _ = _draws(cfg, 7)
    coef = (2 * torch.exp(head(t)) / (12 * SHAPE[0])).detach().view(-1, 1, 1, 1)
    closed = torch.autograd.grad(g, _params(student), grad_outputs=coef * delta)
    for a, b in zip(got[: len(closed)], closed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert max(float(a.abs().max()) for a in got) > 1e-6  # a real, non-zero gradient
    # The generator loss does not train F_φ (nor the frozen teacher).
    unused = torch.autograd.grad(
        vsd_generator_loss(student, teacher, fake, head, prior, cfg).loss,
        [*_params(fake), *_params(teacher)],
        allow_unused=True,
    )
    assert all(u is None for u in unused)
    torch.testing.assert_close(out.score_gap, delta.pow(2).sum((1, 2, 3)).mean() / 12)


class GaussianScore(nn.Module):
    """Exact TrigFlow F of data N(μ, s² I): ``F = (cos t·x_t − E[x0|x_t])/(σ_d sin t)`` with
    ``E[x0|x_t] = μ + cos t·s²/(cos²t·s² + sin²t·σ_d²)·(x_t − cos t·μ)``."""

    def __init__(self, mu: Tensor, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x_scaled, t, class_labels=None, guidance=None):
        x_t = x_scaled * SD
        c, si = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
        gain = c * self.s**2 / (c**2 * self.s**2 + si**2 * SD**2)
        x0 = self.mu + gain * (x_t - c * self.mu)
        return (c * x_t - x0) / (si * SD)


class PointGenerator(nn.Module):
    """A student whose 1-step sample is its parameter θ: ``F = (cos t·σ_d·x − θ)/(σ_d sin t)``."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x_scaled, t, class_labels=None, guidance=None):
        c, si = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
        return (c * SD * x_scaled - self.theta) / (SD * si)


def test_vsd_gradient_moves_the_generator_toward_the_teacher_distribution():
    """Teacher = data N(μ_real, s²), fake score = N(θ, s²) (closed-form scores), generator
    g_θ ≡ θ: a descent step on the VSD loss moves θ straight toward μ_real (the sign check of
    the docstring's derivation, independent of it)."""
    g = torch.Generator().manual_seed(3)
    theta0 = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64)
    mu_real = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64)
    student = PointGenerator(theta0)
    prior = SD * torch.randn((64, *SHAPE[1:]), generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        one_step_generate(student, prior, VSDLossConfig().t_max, SD),
        theta0.expand_as(prior),
        rtol=1e-9,
        atol=1e-9,
    )
    out = vsd_generator_loss(
        student,
        GaussianScore(mu_real, 0.3),
        GaussianScore(theta0, 0.3),
        LogVarHead(16).double(),
        prior,
        VSDLossConfig(),
        generator=g,
    )
    (grad,) = torch.autograd.grad(out.loss, [student.theta])
    step, toward = -grad.flatten(), (mu_real - theta0).flatten()
    assert float(torch.nn.functional.cosine_similarity(step, toward, dim=0)) > 0.9999


def test_the_trained_generator_is_the_1_step_sampler():
    """g_θ(z') is exactly what 1-NFE sampling (FID, grids, export) draws from the prior."""
    from scm_lightning.sampling import consistency_sample, consistency_times

    student, _, _, _ = _nets()
    prior = _prior()
    times = consistency_times(1, sigma_data=SD)
    with torch.no_grad():
        want = consistency_sample(student, prior, times, SD)
        got = one_step_generate(student, prior, VSDLossConfig().t_max, SD)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fake_score_loss_is_the_diffusion_loss_on_detached_generator_samples():
    student, _, fake, _ = _nets()
    cfg, prior = VSDLossConfig(), _prior()
    samples = one_step_generate(student, prior, cfg.t_max, SD)  # carries θ's graph
    loss = fake_score_loss(fake, samples, cfg, generator=torch.Generator().manual_seed(5))
    # Independent: t, z from the same stream; ‖σ_d F_φ − v_t‖² per element / σ_d² (Eq. 4).
    t, z = _draws(cfg, 5)
    x0 = samples.detach()
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    x_t, v_t = ct * x0 + st * z, ct * z - st * x0
    want = (SD * fake(x_t / SD, t) - v_t).pow(2).mean() / SD**2
    # diffusion_loss draws t in float32 and reduces in float32: float32 tolerance
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-7)
    same = diffusion_loss(fake, x0, SD, cfg.p_mean, cfg.p_std, generator=torch.Generator())
    assert same.shape == ()  # the one diffusion loss of losses.py, no second copy
    phi = _params(fake)
    grads = torch.autograd.grad(loss, [*phi, *_params(student)], allow_unused=True)
    assert all(gr is not None for gr in grads[: len(phi)])
    assert all(gr is None for gr in grads[len(phi) :])  # nothing reaches θ


def test_vsd_gradient_is_zero_when_the_fake_score_is_the_teacher():
    """At initialisation F_φ = F_teacher: Δ = 0, so θ gets no gradient and the loss is −E[w]."""
    student, teacher, _, head = _nets()
    fake = copy.deepcopy(teacher)
    out = vsd_generator_loss(
        student, teacher, fake, head, _prior(), VSDLossConfig(), generator=torch.Generator()
    )
    grads = torch.autograd.grad(out.loss, [*_params(student), *head.parameters()])
    n = len(_params(student))
    assert max(float(gr.abs().max()) for gr in grads[:n]) <= 1e-12
    assert float(out.score_gap) <= 1e-24
    torch.testing.assert_close(out.loss, -out.per_sample.new_tensor(0) - out.logvar)
    assert max(float(gr.abs().max()) for gr in grads[n:]) > 1e-3  # w_ψ still learns


def test_vsd_module_starts_its_fake_score_at_the_teacher_and_splits_the_optimisers(tmp_path):
    """build_distillation(loss=scd_vsd): F_φ is a trainable copy of the teacher; θ's optimiser
    holds the student (with w_φ) and w_ψ, φ's the fake score at loss.fake_score_lr."""
    from scm_lightning.config import compose_config
    from scm_lightning.modules import VSDDistillationModule
    from scm_lightning.training import build_datamodule, build_distillation

    overrides = ["loss=scd_vsd", "loss.fake_score_lr=3e-4", "loss.vsd_weight=2.5"]
    cfg = compose_config("fit", [*overrides, f"run_dir={tmp_path}"])
    module = build_distillation(cfg, build_datamodule(cfg))
    assert isinstance(module, VSDDistillationModule) and module.mode == "scd_vsd"
    teacher = module.teacher.state_dict()
    for key, value in module.fake_score.state_dict().items():
        torch.testing.assert_close(value, teacher[key])  # a copy: dtype tolerance
    assert all(p.requires_grad for p in module.fake_score.parameters())
    assert not any(p.requires_grad for p in module.teacher.parameters())
    opt_student, opt_fake = module.configure_optimizers()
    ids = [{id(p) for g in o.param_groups for p in g["params"]} for o in (opt_student, opt_fake)]
    want_student = {id(p) for p in [*module.student.parameters(), *module.vsd_logvar.parameters()]}
    assert ids[0] == want_student and ids[1] == {id(p) for p in module.fake_score.parameters()}
    assert opt_fake.param_groups[0]["lr"] == 3e-4
    assert opt_student.param_groups[0]["lr"] == cfg.optim.lr
    assert not any(k.startswith("teacher.") for k in module.state_dict())
    # θ's loss is L_sCD + λ_VSD·L_VSD
    x0 = 0.5 * torch.randn(4, *module.image_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        total, parts, _, _ = module._losses(x0, torch.zeros(4), torch.Generator(), 1.0)
    torch.testing.assert_close(total, parts["scd_loss"] + 2.5 * parts["vsd_loss"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["loss=scd_vsd", "trainer.compile=true"], "trainer.compile=True"),
        (["loss=vsd", "trainer=ddp"], "trainer.strategy='ddp'"),
        (["loss=vsd", "trainer=fsdp"], "trainer.strategy='fsdp2'"),
        (["loss=vsd", "trainer.devices=2"], "trainer.devices=2"),
        (["loss=vsd", "trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0"),
        (["loss=vsd", "trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2"),
        (["loss=scd_vsd", "loss.vsd_p_std=0"], "loss.vsd_p_std=0"),
        (["loss=vsd", "loss.vsd_weight=-1"], "loss.vsd_weight=-1"),
        (["loss=vsd", "loss.fake_score_lr=0"], "loss.fake_score_lr=0"),
    ],
)
def test_unsupported_vsd_settings_are_refused_before_any_work(tmp_path, overrides, key):
    from scm_lightning.config import ConfigError, compose_config, validate_config

    cfg = compose_config("fit", [*overrides, f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith(key) and "expected" in message and "\n" not in message, message


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["vsd", "scd_vsd"])
def test_fit_vsd_from_the_cli_then_export_writes_the_student(tmp_path: Path, loss: str):
    """`fit debug=fdr loss=...`: training, validation, sample grids and the final FDs; then
    `export` of its checkpoint writes the student's (EMA) weights, not the fake score's."""
    from scm_lightning import commands

    run_dir = tmp_path / "run"
    res = run_cli(
        "fit", "debug=fdr", f"loss={loss}", "optim=adam", "optim.lr=1e-2",
        f"run_dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("fd_teacher_nfe35=") and "fd_student_nfe1=" in last, last
    assert (run_dir / "samples" / "samples_final_nfe1.png").is_file()
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("fake_score.") for k in state)
    assert any(k.startswith("vsd_logvar.") for k in state)
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["global_step"] == 1
    out = tmp_path / "exported"
    assert commands.main("export", [f"ckpt={ckpt_path}", f"out={out}"]) == 0
    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))["ema"]
    student = next(iter(ema.values()))
    far_from_fake = 0.0
    for key, value in exported.items():
        torch.testing.assert_close(value, student[f"net.net.{key}"], rtol=0, atol=1e-7)
        fake = state[f"fake_score.net.{key}"]
        far_from_fake = max(far_from_fake, float((value - fake).abs().max()))
    assert far_from_fake > 1e-4  # Adam at lr 1e-2 moved both nets apart by ~lr


def _fit(run_dir: Path, teacher: Path, data: Path, steps: int, *extra: str) -> None:
    from scm_lightning.config import compose_config
    from scm_lightning.training import run

    run(
        compose_config(
            "fit",
            [
                "loss=scd_vsd", "teacher=diffusers", f"teacher.path={teacher}", "data=tensors",
                f"data.path={data}", "data.batch_size=4", "trainer=cpu",
                f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
                "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
                "loss.warmup_steps=3", "optim=adam", "optim.lr=1e-3", "loss.fake_score_lr=2e-3",
                "callbacks.fid=null", "callbacks.progress=null", "callbacks.samples=null",
                "callbacks.checkpoint.every_n_train_steps=1", "eval=none",
                "lr_scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,"
                "step_size:2,gamma:0.5}",
                f"run_dir={run_dir}", *extra,
            ],
        )
    )  # fmt: skip


@pytest.mark.slow
def test_scd_vsd_stop_and_resume_matches_the_uninterrupted_run(tiny_teacher, tmp_path):
    """5 steps in one go vs 3 steps, stop, resume to 5 (mid-epoch: 6 batches per epoch): the
    student, fake score, w_ψ, both optimisers and their LR schedulers, EMA and step count
    agree; φ's updates do not count as trainer steps; both parts' losses and grad norms are
    logged."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.uniform(-1, 1, (24, 1, 8, 8)).astype(np.float32))
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _fit(ref, tiny_teacher, data, 5)
    _fit(cut, tiny_teacher, data, 3)
    _fit(cut, tiny_teacher, data, 5, "ckpt_path=last")
    a, b = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for d in (ref, cut)
    )
    assert a["global_step"] == b["global_step"] == 5
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert len(a["optimizer_states"]) == len(b["optimizer_states"]) == 2
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["param_groups"][0]["lr"] == pytest.approx(
            opt_b["param_groups"][0]["lr"], rel=1e-12
        )
        for idx, slot in opt_a["state"].items():
            for name, value in slot.items():
                torch.testing.assert_close(value, opt_b["state"][idx][name], rtol=1e-5, atol=1e-7)
    # Both schedulers stepped once per batch (StepLR: ×0.5 every 2 steps, 5 steps -> ×0.25)
    # and resumed with their state.
    lrs = [o["param_groups"][0]["lr"] for o in a["optimizer_states"]]
    assert lrs == pytest.approx([1e-3 * 0.25, 2e-3 * 0.25], rel=1e-12)
    assert [s["last_epoch"] for s in b["lr_schedulers"]] == [5, 5]
    ema_a, ema_b = (
        next(v for k, v in c["callbacks"].items() if k.startswith("EMA")) for c in (a, b)
    )
    assert ema_a["nimg"] == ema_b["nimg"] == 20 and ema_a["last_step"] == 5
    for profile, tensors in ema_a["ema"].items():
        for key, value in tensors.items():
            torch.testing.assert_close(value, ema_b["ema"][profile][key], rtol=1e-5, atol=1e-6)
    # The fake score trained (it started as the teacher) and the teacher is not stored.
    teacher = load_file(str(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max(
        float((a["state_dict"][f"fake_score.net.{k}"] - v).abs().max()) for k, v in teacher.items()
    )
    assert moved > 1e-4 and not any(k.startswith("teacher.") for k in a["state_dict"])
    with open(ref / "logs" / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    for name in (
        "train/loss", "train/scd_loss", "train/vsd_loss", "train/fake_score_loss",
        "train/grad_norm", "train/fake_score_grad_norm", "train/vsd_score_gap",
        "train/vsd_logvar", "train/g_norm",
    ):  # fmt: skip
        assert name in columns, (name, sorted(columns))
