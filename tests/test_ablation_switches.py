"""The ablation switches of issue 13 (docs/benchmarks.md, "Paper claims"): each config key
changes one thing of the sCM step, does what it says, and bad values are refused up front."""

from __future__ import annotations

import pytest
import torch

from scm_lightning import trigflow
from scm_lightning.callbacks.warmup import tangent_warmup_factor
from scm_lightning.config import ConfigError, compose_config, validate_config
from scm_lightning.losses import SCMLossConfig, rearranged_jvp, scm_loss, scm_tangent
from test_losses import SD, make

D = 12


def _raw_tangent(student, teacher, x0: torch.Tensor, seed: int, r: float) -> torch.Tensor:
    """g of Alg. 1 before conditioning, recomputed with scm_loss's draws (proposal, then z)."""
    gen = torch.Generator().manual_seed(seed)
    t = trigflow.sample_time(x0.shape[0], -1.0, 1.4, SD, generator=gen, dtype=x0.dtype)
    z = torch.randn(x0.shape, generator=gen, dtype=x0.dtype) * SD
    x_t = trigflow.add_noise(x0, z, t)
    with torch.no_grad():
        dxdt = SD * teacher(x_t / SD, t)
    F, dF = rearranged_jvp(student, x_t, t, dxdt, SD)
    return scm_tangent(x_t, t, F, dF, dxdt, SD, r)


@pytest.mark.parametrize("kind", ["norm", "clip", "none"])
def test_tangent_normalization_switch_regresses_onto_the_said_tangent(kind: str) -> None:
    """adaptive_weighting=false makes w ≡ 0, so each per-sample loss is ‖cond(g)‖²/D exactly
    (F_θ − F⁻ = 0 in value): norm g/(‖g‖+c), clip clamp(g, ±tangent_clip), none g."""
    student, teacher = make(), make()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x0 = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cfg = SCMLossConfig(tangent_normalization=kind, tangent_clip=0.05, adaptive_weighting=False)
    out = scm_loss(student, x0, cfg, 0.5, teacher, generator=torch.Generator().manual_seed(4))
    g = _raw_tangent(student, teacher, x0, 4, 0.5)
    if kind == "norm":
        g = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
    elif kind == "clip":
        assert bool((g.abs() > 0.05).any())  # the bound binds somewhere in this draw
        g = torch.minimum(torch.maximum(g, torch.full_like(g, -0.05)), torch.full_like(g, 0.05))
    torch.testing.assert_close(out.per_sample, g.flatten(1).pow(2).sum(1) / D, rtol=1e-7, atol=0)
    assert float(out.logvar) == 0.0


def test_no_adaptive_weighting_leaves_the_logvar_head_unused() -> None:
    student, teacher = make(), make()
    x0 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for weighting in (True, False):
        student.zero_grad(set_to_none=True)
        cfg = SCMLossConfig(adaptive_weighting=weighting)
        out = scm_loss(student, x0, cfg, 1.0, teacher, generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        head_grads = [p.grad for p in student.logvar.parameters() if p.requires_grad]
        assert all(gr is None for gr in head_grads) is (not weighting)
        assert student.out.weight.grad is not None


def test_no_tangent_warmup_is_r_equal_one_from_the_first_step() -> None:
    assert tangent_warmup_factor(0, 0) == 1.0 and tangent_warmup_factor(0, 400) == 0.0
    validate_config(compose_config("fit", ["loss.warmup_steps=0", "run_dir=unused"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.tangent_normalization=l2", "loss.tangent_normalization"),
        ("loss.tangent_clip=0", "loss.tangent_clip"),
        ("loss.adaptive_weighting=maybe", "loss.adaptive_weighting"),
        ("++loss.num_intervals=16", "loss.num_intervals"),  # sCD has no grid
    ],
)
def test_bad_switch_values_are_refused_before_any_work(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(compose_config("fit", [override, "run_dir=unused"]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["loss.num_intervals=0"], "loss.num_intervals"),
        (["loss.num_intervals=1.5"], "loss.num_intervals"),
        (["loss.jvp_precision=32"], "loss.jvp_precision"),  # dsCM takes no JVP
    ],
)
def test_bad_dscm_settings_are_refused(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(compose_config("fit", ["loss=dscm", *overrides, "run_dir=unused"]))


def test_every_switch_reaches_the_loss_config(tmp_path) -> None:
    """The composed keys land in the module's SCMLossConfig (training.build_distillation)."""
    from scm_lightning.training import build_datamodule, build_distillation

    cfg = compose_config(
        "fit",
        [
            "loss=dscm",
            "loss.num_intervals=64",
            "loss.tangent_normalization=clip",
            "loss.tangent_clip=0.5",
            "loss.adaptive_weighting=false",
            f"run_dir={tmp_path}",
        ],
    )
    validate_config(cfg)
    module = build_distillation(cfg, build_datamodule(cfg))
    lc = module.loss_cfg
    assert module.mode == "dscm" and lc.num_intervals == 64
    assert (lc.tangent_normalization, lc.tangent_clip, lc.adaptive_weighting) == (
        "clip",
        0.5,
        False,
    )
    # without adaptive weighting the w_φ head is frozen: not optimised, no unused DDP params
    assert not any(p.requires_grad for p in module.student.logvar.parameters())
    assert any(p.requires_grad for p in module.student.net.parameters())
