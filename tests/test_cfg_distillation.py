"""CFG distillation end to end (issue 10, item 1).

A student with a guidance input (``student.guidance_embedding``) trained on
``s ~ U[guidance_scale_range]`` must get an s on every path that calls it: validation draws s
like training does, and sampling (FID callback, sample grids, final evaluation) uses the
configured default ``eval.guidance``. Incomplete CFG configs are refused before any work
(the CLI cases live in tests/test_bad_inputs.py).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_cli
from scm_lightning import modules, sampling
from scm_lightning.callbacks.fid import FIDCallback
from scm_lightning.callbacks.samples import SampleGrid
from scm_lightning.config import ConfigError, compose_config, validate_config
from scm_lightning.data.digits import DigitsDataModule
from scm_lightning.evaluation import final_quality
from scm_lightning.modules import DistillationModule, step_generator
from scm_lightning.nets.trigflow_unet import TrigFlowUNet
from scm_lightning.teachers import GuidedTeacher, TrigFlowNative
from scm_lightning.teachers.loading import freeze

K = 10  # classes of the digits data; label K is the null class
SD = 0.5


def conditional_teacher(seed: int = 0, num_classes: int | None = K) -> TrigFlowNative:
    torch.manual_seed(seed)
    net = TrigFlowUNet(
        sample_size=8,
        block_channels=(8, 16),
        attention_head_dim=8,
        norm_num_groups=4,
        mid_attention=False,
        num_classes=num_classes,
    )
    for p in net.parameters():  # a non-trivial teacher (the default init outputs zeros)
        p.data.normal_(std=0.05)
    return freeze(TrigFlowNative(net, SD))


def cfg_module(eval_guidance: float = 1.0, live_embedding: bool = True) -> DistillationModule:
    module = DistillationModule(
        conditional_teacher(),
        image_shape=(1, 8, 8),
        optimizer=lambda params: torch.optim.Adam(params),
        student_guidance_embedding=True,
        guidance_scale_range=(1.0, 2.0),
        uncond_label=K,
        jvp_attention=False,
    )
    module.eval_guidance = eval_guidance  # (training.build_distillation: eval.guidance)
    if live_embedding:  # as after training: s changes the output (it is zero at init)
        torch.manual_seed(1)
        for p in module.student.net.guidance_embedding.parameters():
            p.data.normal_(std=0.5)
    return module


def digits_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(K, (n,), generator=g)


def test_validation_step_draws_guidance_like_training(monkeypatch) -> None:
    module = cfg_module()
    seen: dict = {}
    real = modules.scm_loss

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(modules, "scm_loss", spy)
    x0, labels = digits_batch()
    module.validation_step((x0, labels), batch_idx=3)  # crashed: scm_loss without guidance
    gen = step_generator(module.seed, 3, 0, x0.device)
    expected = module._guidance(x0.shape[0], gen)  # the first draw of the validation RNG
    torch.testing.assert_close(seen["guidance"], expected, rtol=0, atol=0)
    assert ((seen["guidance"] >= 1.0) & (seen["guidance"] <= 2.0)).all()
    assert seen["guidance"].std() > 0  # per-sample scales, not one constant
    assert seen["teacher_guidance"] is not None  # the target is the guided teacher velocity
    # ... and that target is the CFG velocity at those scales (same x_t, t as the loss draws)
    x_t = torch.randn_like(x0)
    t = torch.full((x0.shape[0],), 0.9)
    cfg_teacher = GuidedTeacher(module.teacher, 1.0, K)
    want = SD * cfg_teacher(x_t / SD, t, labels, seen["guidance"])
    torch.testing.assert_close(seen["teacher_guidance"](x_t, t), want, rtol=1e-6, atol=1e-7)


def test_sampling_uses_eval_guidance_by_default() -> None:
    module = cfg_module(eval_guidance=1.5)
    _, labels = digits_batch(4)

    def draw(**kw) -> torch.Tensor:
        return module.sample(4, nfe=2, generator=torch.Generator().manual_seed(0), **kw)

    default = draw(class_labels=labels)  # crashed: the student needs an s
    torch.testing.assert_close(default, draw(class_labels=labels, guidance=1.5))
    assert (default - draw(class_labels=labels, guidance=1.0)).abs().max() > 1e-4
    # the teacher reference is the teacher guided at the same s (s = 1: the plain teacher)
    noise_gen = torch.Generator().manual_seed(7)
    got = module.teacher_sample(4, nfe=2, generator=noise_gen, class_labels=labels)
    noise = SD * torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    guided = GuidedTeacher(module.teacher, 1.5, K)
    want = sampling.teacher_sample(guided, noise, SD, 2, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = cfg_module(eval_guidance=1.0)
    got = plain.teacher_sample(4, nfe=2, generator=torch.Generator().manual_seed(7),
                               class_labels=labels)  # fmt: skip
    want = sampling.teacher_sample(plain.teacher, noise, SD, 2, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _trainer(dm: DigitsDataModule) -> SimpleNamespace:
    return SimpleNamespace(
        global_rank=0, world_size=1, callbacks=[], datamodule=dm, global_step=0,
        is_global_zero=True, loggers=[],
    )  # fmt: skip


def test_fid_callback_sample_grid_and_final_quality_run_with_a_cfg_student(tmp_path: Path):
    module = cfg_module()
    dm = DigitsDataModule(batch_size=8, seed=0, val_size=8, num_workers=0, conditional=True)
    trainer = _trainer(dm)
    fid = FIDCallback(nfes=(1, 2), num_samples=8, batch_size=4, ref_cache_dir=str(tmp_path))
    fds = fid.evaluate(trainer, module)  # crashed: the student needs an s
    assert set(fds) == {1, 2} and all(v > 0 for v in fds.values())
    grid = SampleGrid(str(tmp_path / "samples"), nfes=(1,), num_samples=4, per_class=2)
    grid.on_fit_end(trainer, module)
    assert (tmp_path / "samples" / "samples_final_nfe1.png").is_file()
    assert (tmp_path / "samples" / "samples_final_nfe1_per_class.png").is_file()
    cfg = OmegaConf.create(
        {"eval": {"feature": "digits", "num_samples": 8, "batch_size": 8, "seed": 0,
                  "student_nfes": [1, 2], "teacher_nfes": [2], "teacher_grids": ["t_mid"],
                  "labels": "uniform", "guidance": 1.0}}
    )  # fmt: skip
    results = final_quality(cfg, module, dm, trainer)
    assert {"fd_student_nfe1", "fd_student_nfe2", "fd_teacher_nfe2"} <= set(results)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["student.guidance_scale_range=[1,2]", "student.uncond_label=10"],
         "set student.guidance_embedding=true"),
        (["student.guidance_embedding=true", "student.guidance_scale_range=[1,2]"],
         "student.uncond_label"),
        (["loss=sct", "student.guidance_embedding=true", "student.guidance_scale_range=[1,2]",
          "student.uncond_label=10"], "loss.mode='sct'"),
        (["student.guidance_embedding=true"], "student.guidance_embedding=True is invalid"),
        (["eval.guidance=-1"], "eval.guidance=-1 is invalid"),
    ],
)  # fmt: skip
def test_incomplete_cfg_configs_are_refused(overrides: list[str], message: str) -> None:
    cfg = compose_config("fit", [*overrides, "run_dir=unused"])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        validate_config(cfg)


def test_cfg_config_without_a_conditional_teacher_is_refused() -> None:
    teacher = conditional_teacher(num_classes=None)
    with pytest.raises(ValueError, match="needs a class-conditional teacher"):
        DistillationModule(
            teacher, (1, 8, 8), lambda p: torch.optim.Adam(p), student_guidance_embedding=True,
            guidance_scale_range=(1.0, 2.0), uncond_label=K, jvp_attention=False,
        )  # fmt: skip


TINY_NET = [
    "net.block_channels=[8,16]",
    "net.mid_attention=false",
    "net.attention_head_dim=8",
    "+net.norm_num_groups=4",
]


@pytest.mark.slow
def test_fit_fast_dev_run_cfg_distillation_from_the_cli(tmp_path: Path) -> None:
    """pretrain a class-conditional teacher (label dropout) with the bundled conditional
    teacher's recipe, then distill it with CFG by ``experiment=digits_cond_scd``."""
    teacher = tmp_path / "teacher"
    res = run_cli(
        "pretrain", "debug=fdr", "experiment=digits_cond_teacher", f"export_dir={teacher}",
        f"run_dir={tmp_path / 'pre'}", "eval.teacher_nfes=[2]", "eval.teacher_grids=[t_mid]",
        *TINY_NET, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    resolved = (tmp_path / "pre" / "config.yaml").read_text()
    assert "label_dropout: 0.1" in resolved and "num_classes: 10" in resolved
    run = tmp_path / "fit"
    res = run_cli(
        "fit", "debug=fdr", "experiment=digits_cond_scd", f"teacher.path={teacher}",
        "eval.teacher_nfes=[2]", f"run_dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert "fd_teacher_nfe2=" in last and "fd_student_nfe2=" in last, last
    assert (run / "samples" / "samples_final_nfe2_per_class.png").is_file()
