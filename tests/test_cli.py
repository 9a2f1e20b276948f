"""The real CLI end to end: fast dev runs of fit (sCD, sCT) and pretrain, and tangent warmup."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from conftest import run_cli
from scm_lightning.callbacks.warmup import tangent_warmup_factor
from scm_lightning.config import compose_config
from scm_lightning.training import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("loss", ["scd", "sct"])
def test_fit_fast_dev_run_from_the_cli(tmp_path: Path, loss: str):
    res = run_cli("fit", "debug=fdr", f"loss={loss}", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("fd_teacher_nfe35=") and "fd_student_nfe2=" in last, last
    assert (tmp_path / "run" / "samples" / "samples_final_nfe2.png").is_file()


def test_fit_with_student_dropout_from_the_cli(tmp_path: Path):
    """student.dropout=0.2 trains, validates, samples and evaluates end to end (issue 10)."""
    run_dir = tmp_path / "run"
    res = run_cli("fit", "debug=fdr", "student.dropout=0.2", f"run_dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("fd_teacher_nfe35=") and "fd_student_nfe2=" in last, last


def test_student_dropout_reaches_every_layer_of_the_built_student(tmp_path: Path):
    """The config key, through training.build_distillation, sets the student's layers (the
    bundled teacher's own rate, 0, is what the student used to inherit)."""
    from torch import nn

    from scm_lightning.training import build_datamodule, build_distillation

    cfg = compose_config("fit", ["student.dropout=0.2", f"run_dir={tmp_path}"])
    module = build_distillation(cfg, build_datamodule(cfg))
    rates = [m.p for m in module.student.modules() if isinstance(m, nn.Dropout)]
    teacher = [m.p for m in module.teacher.modules() if isinstance(m, nn.Dropout)]
    assert rates and set(rates) == {0.2} and set(teacher) == {0.0}


def test_pretrain_fast_dev_run_from_the_cli(tmp_path: Path):
    res = run_cli(
        "pretrain",
        "debug=fdr",
        f"run_dir={tmp_path / 'run'}",
        f"export_dir={tmp_path / 'exp'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "exp" / "unet" / "config.json").is_file()


def test_tangent_warmup_factor():
    assert [tangent_warmup_factor(s, 4) for s in range(7)] == [0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert tangent_warmup_factor(0, 0) == 1.0
    with pytest.raises(ValueError, match="H must be >= 0"):
        tangent_warmup_factor(0, -1)


class RecordR(L.Callback):
    def __init__(self) -> None:
        self.r: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.r.append(pl_module.tangent_warmup_r)


def _cfg(tmp_path: Path, teacher: Path, *extra: str):
    return compose_config(
        "fit",
        [
            f"teacher.path={teacher}",
            f"run_dir={tmp_path}",
            "data.batch_size=8",
            "loss.warmup_steps=3",
            "trainer.max_steps=5",
            "trainer.enable_progress_bar=false",
            "trainer.val_check_interval=100",
            "callbacks.fid=null",
            "callbacks.progress=null",
            "callbacks.samples=null",
            "callbacks.checkpoint.every_n_train_steps=2",
            "eval=none",
            *extra,
        ],
    )


def test_tangent_warmup_is_exact_across_resume(tmp_path: Path, tiny_teacher: Path, monkeypatch):
    """r = min(1, step/H) reaches 1 and stays there, identically with and without a resume."""
    recorders: list[RecordR] = []

    def build_callbacks_with_recorder(cfg):
        from hydra.utils import instantiate

        cbs = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
        recorders.append(RecordR())
        return [*cbs, recorders[-1]]

    monkeypatch.setattr("scm_lightning.training.build_callbacks", build_callbacks_with_recorder)
    run(_cfg(tmp_path / "a", tiny_teacher))
    straight = recorders[-1].r
    assert straight == [0.0, 1 / 3, 2 / 3, 1.0, 1.0]
    # interrupted at step 2, then resumed from its checkpoint
    run(_cfg(tmp_path / "b", tiny_teacher, "trainer.max_steps=2"))
    ckpt = next((tmp_path / "b" / "checkpoints").glob("step*.ckpt"))
    run(_cfg(tmp_path / "b", tiny_teacher, f"ckpt_path={ckpt}"))
    assert recorders[-2].r + recorders[-1].r == straight


def test_paper_cifar10_experiment_composes_with_the_paper_values(tmp_path: Path):
    cfg = compose_config(
        "fit", ["experiment=cifar10_scd", f"data.root={tmp_path}", f"teacher.path={tmp_path}"]
    )
    assert (cfg.loss.p_mean, cfg.loss.p_std, cfg.loss.tangent_norm_c) == (-1.0, 1.4, 0.1)
    assert cfg.loss.warmup_steps == 10_000 and cfg.optim.lr == 1e-4
    assert list(cfg.optim.betas) == [0.9, 0.99] and cfg.data.batch_size == 512
    assert cfg.callbacks.ema.validate_with == "halflife_500k"
    assert cfg.student.dropout == 0.0  # App. G: sCD without dropout


def test_paper_cifar10_sct_experiment_has_the_paper_dropout(tmp_path: Path):
    cfg = compose_config(
        "fit", ["experiment=cifar10_sct", f"data.root={tmp_path}", f"teacher.path={tmp_path}"]
    )
    assert cfg.loss.mode == "sct" and cfg.student.dropout == 0.2  # App. G: sCT CIFAR-10
    assert (cfg.loss.p_mean, cfg.loss.p_std, cfg.optim.lr) == (-1.0, 1.4, 1e-4)
