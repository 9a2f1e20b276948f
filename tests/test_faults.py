"""Numerical fault injection through the real training path (``training.run`` and the CLI).

A forward hook on the frozen teacher turns its velocity into NaN for some samples or whole
batches at chosen steps. Expected: partial NaN is masked and counted; a whole bad batch (or a
non-finite loss) is a skipped step that leaves weights and EMA untouched; ``max_bad_steps``
bad steps in a row stop the run with a message naming the last good checkpoint, intact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from scm_lightning import cli, training
from scm_lightning.callbacks.ema import EMA
from scm_lightning.checkpointing import load_checkpoint_file
from scm_lightning.config import compose_config

Rule = Callable[[int], slice | None]  # global step -> samples to poison (None: none)


def _cfg(run_dir: Path, teacher: Path, *extra: str):
    return compose_config(
        "fit",
        [
            "teacher=diffusers",
            f"teacher.path={teacher}",
            f"run_dir={run_dir}",
            "data.batch_size=8",
            "loss.warmup_steps=0",
            "trainer.max_steps=6",
            "trainer.enable_progress_bar=false",
            "trainer.val_check_interval=1000",
            "trainer.log_every_n_steps=1",
            "callbacks.fid=null",
            "callbacks.progress=null",
            "callbacks.samples=null",
            "callbacks.checkpoint.every_n_train_steps=1",
            "eval=none",
            "optim.lr=1e-3",
            *extra,
        ],
    )


class Record(L.Callback):
    """Per optimizer step: skipped?, masked fraction, student weights and EMA averages."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.names: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        self.names = [name for name, _ in pl_module.student.named_parameters()]
        self.steps.append(
            {
                "step": trainer.global_step,
                "skipped": pl_module.last_step_skipped,
                "masked": float(trainer.callback_metrics["train/masked_fraction"]),
                "weights": torch.cat(
                    [p.detach().flatten() for p in pl_module.student.parameters()]
                ),
                "ema": torch.cat([t.flatten() for t in ema._ema[ema.validate_with]]).clone(),
            }
        )


def _install(monkeypatch, rule: Rule, recorder: Record, nan_loss_steps: frozenset = frozenset()):
    """Poison the teacher's output per ``rule`` (and the loss at ``nan_loss_steps``); record."""
    real_callbacks, real_distillation = training.build_callbacks, training.build_distillation

    def build_distillation(cfg, dm):
        module = real_distillation(cfg, dm)

        def hook(_mod, _inputs, out):
            bad = rule(module.global_step) if module.training else None
            if bad is None:
                return out
            out = out.clone()
            out[bad] = float("nan")
            return out

        # On the module's teacher, after the student was copied from it: only the teacher.
        module.teacher.register_forward_hook(hook)
        step = module.training_step

        def training_step(batch, batch_idx):
            loss = step(batch, batch_idx)
            return loss * float("nan") if module.global_step in nan_loss_steps else loss

        module.training_step = training_step
        return module

    monkeypatch.setattr(training, "build_distillation", build_distillation)
    monkeypatch.setattr(training, "build_callbacks", lambda cfg: [*real_callbacks(cfg), recorder])


def test_partial_nan_is_masked_and_counted(tmp_path: Path, tiny_teacher: Path, monkeypatch):
    rec = Record()
    _install(monkeypatch, lambda step: slice(0, 2) if step % 2 == 0 else None, rec)
    training.run(_cfg(tmp_path / "run", tiny_teacher, "trainer.max_steps=4"))
    assert [s["masked"] for s in rec.steps] == [0.25, 0.0, 0.25, 0.0]  # 2 of 8 samples
    assert not any(s["skipped"] for s in rec.steps)
    for a, b in zip(rec.steps, rec.steps[1:], strict=False):  # every step trained
        assert torch.isfinite(b["weights"]).all() and not torch.equal(a["weights"], b["weights"])


def test_bad_steps_below_the_limit_are_skipped(tmp_path: Path, tiny_teacher: Path, monkeypatch):
    """Steps 2-3: the whole batch NaN (all masked); step 4: a NaN loss. Limit 4 in a row."""
    rec = Record()
    _install(monkeypatch, lambda step: slice(None) if step in (2, 3) else None, rec, {4})
    training.run(_cfg(tmp_path / "run", tiny_teacher, "max_bad_steps=4", "trainer.max_steps=7"))
    assert [s["step"] for s in rec.steps] == [1, 2, 3, 4, 5, 6, 7]
    assert [s["skipped"] for s in rec.steps] == [False, False, True, True, True, False, False]
    assert [s["masked"] for s in rec.steps][2:4] == [1.0, 1.0]
    for prev, cur in zip(rec.steps, rec.steps[1:], strict=False):
        if cur["skipped"]:  # no optimiser update, EMA untouched
            assert torch.equal(cur["weights"], prev["weights"])
            assert torch.equal(cur["ema"], prev["ema"])
        else:
            assert not torch.equal(cur["weights"], prev["weights"])
            assert not torch.equal(cur["ema"], prev["ema"])
        assert torch.isfinite(cur["weights"]).all() and torch.isfinite(cur["ema"]).all()
    last = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 7  # training went on to max_steps


def test_k_bad_steps_stop_the_run_with_the_last_good_checkpoint(
    tmp_path: Path, tiny_teacher: Path, monkeypatch, capsys
):
    """From step 3 on every batch is NaN; max_bad_steps=3: the CLI exits 1 with one line
    naming the last checkpoint, which is intact and holds the last good weights."""
    rec = Record()
    _install(monkeypatch, lambda step: slice(None) if step >= 3 else None, rec)
    run_dir = tmp_path / "run"
    argv = [
        "fit", "teacher=diffusers", f"teacher.path={tiny_teacher}", f"run_dir={run_dir}",
        "data.batch_size=8", "loss.warmup_steps=0", "trainer.max_steps=50",
        "trainer.enable_progress_bar=false", "callbacks.fid=null", "callbacks.progress=null",
        "callbacks.samples=null", "callbacks.checkpoint.every_n_train_steps=1", "eval=none",
        "max_bad_steps=3",
    ]  # fmt: skip
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_RUNTIME
    assert err[-1].startswith("error (FloatingPointError): 3 consecutive steps"), err[-1]
    assert sum(ln.startswith("error") for ln in err) == 1
    assert "limit max_bad_steps=3" in err[-1] and "stopped at global step 5" in err[-1]
    named = err[-1].split("the last good checkpoint is ")[1].split(" (intact")[0]
    assert Path(named).parent == run_dir / "checkpoints" and Path(named).is_file()
    assert not (run_dir / "results.json").exists()  # no figures from a diverged run
    # Steps 1-3 trained; steps 4-5 were skipped (the 3rd bad step raised before stepping).
    assert [s["skipped"] for s in rec.steps] == [False, False, False, True, True]
    state = load_checkpoint_file(named)["state_dict"]
    saved = torch.cat([state[f"student.{name}"].flatten() for name in rec.names])
    assert torch.equal(saved, rec.steps[2]["weights"]) and torch.isfinite(saved).all()
