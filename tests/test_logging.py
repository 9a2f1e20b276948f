"""What a run leaves in its logs: the resolved config as hyperparameters, sample grids as
images (read back from the TensorBoard event file), FID once per measurement (metrics.csv),
the loss curve, and rich progress for FID, the final evaluation and `evaluate`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import run_cli
from scm_lightning.callbacks.loss_curve import LossCurve


def test_loss_curve_averages_optimizer_steps_over_accumulated_micro_batches(tmp_path: Path):
    """Lightning hands on_train_batch_end the loss / accumulate_grad_batches; a point is the
    mean of the steps' mean losses over its window."""
    cb = LossCurve(every_n_steps=2)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=50)
    cb.on_train_start(trainer, None)
    losses = [1.0, 3.0, 5.0, 7.0, 2.0, 2.0, 4.0, 8.0]  # micro-batches, 2 per optimizer step
    for i, loss in enumerate(losses):
        trainer.global_step = i // 2 + (i % 2)  # the step counter moves on the 2nd micro-batch
        cb.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss / 2)}, None, i)
    # steps: 2, 6, 2, 6 -> windows of 2 steps: (2 + 6) / 2 = 4 at step 2, 4 at step 4
    assert cb.history == [{"step": 2, "loss": 4.0}, {"step": 4, "loss": 4.0}]
    cb.history.append({"step": 6, "loss": float("nan")})  # a skipped non-finite step
    path = cb.write(tmp_path)
    assert path.name == "loss_curve.png" and path.stat().st_size > 1000
    assert json.loads((tmp_path / "loss_history.json").read_text())[0] == cb.history[0]
    restored = LossCurve()
    restored.load_state_dict(cb.state_dict())
    assert restored.history[:2] == cb.history[:2]


def test_sample_grids_go_to_a_loggers_own_log_image(tmp_path: Path) -> None:
    """Loggers other than TensorBoard that take images (W&B-style ``log_image``) get the grid."""
    from lightning.pytorch.loggers.logger import DummyLogger
    from PIL import Image

    from scm_lightning.callbacks.samples import log_grid
    from scm_lightning.images import save_grid

    class ImageLogger:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def log_image(self, key: str, images: list, step: int | None = None) -> None:
            self.calls.append((key, images, step))

    path = save_grid(torch.rand(4, 1, 8, 8) * 2 - 1, tmp_path / "grid.png")
    wandb_like = ImageLogger()
    log_grid(SimpleNamespace(global_step=7, loggers=[DummyLogger(), wandb_like]), "s/nfe1", path)
    ((key, images, step),) = wandb_like.calls
    assert (key, step) == ("s/nfe1", 7) and isinstance(images[0], Image.Image)
    assert images[0].size == Image.open(path).size


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = folder.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _hparams(acc) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    out = {}
    for key, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind)
    return out


@pytest.fixture(scope="module")
def logged_run(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4-step fit logging to TensorBoard and CSV, FID and sample grids every 2 steps."""
    base = tmp_path_factory.mktemp("logged")
    run = base / "run"
    res = run_cli(
        "fit", "teacher=diffusers", f"teacher.path={tiny_teacher}", f"run_dir={run}",
        "data.batch_size=8", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=100", "trainer.enable_progress_bar=false",
        "callbacks.progress=null", "callbacks.checkpoint.every_n_train_steps=4",
        "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=8",
        "+callbacks.fid.batch_size=8", "callbacks.fid.nfes=[1]",
        f"callbacks.fid.ref_cache_dir={base}",
        "callbacks.samples.every_n_steps=2", "callbacks.samples.num_samples=4",
        "callbacks.samples.nfes=[1]", "eval.num_samples=8", "eval.batch_size=8",
        "eval.teacher_nfes=[2]", "eval.student_nfes=[1]", "logger=tensorboard",
        "+logger.csv._target_=lightning.pytorch.loggers.CSVLogger",
        "+logger.csv.save_dir=${run_dir}", "+logger.csv.name=logs", "+logger.csv.version=''",
        cwd=base,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return {"run": run, "base": base, "stderr": res.stderr}


@pytest.mark.slow
def test_resolved_config_and_sample_grids_reach_tensorboard(logged_run: dict) -> None:
    run = logged_run["run"]
    acc = _events(run / "tensorboard")
    hparams = _hparams(acc)
    assert hparams["task"] == "fit" and hparams["loss/mode"] == "scd"
    assert hparams["optim/lr"] == pytest.approx(5e-5) and hparams["trainer/max_steps"] == 4
    assert hparams["run_dir"] == str(run)
    assert "samples/nfe1" in acc.Tags()["images"]
    images = acc.Images("samples/nfe1")
    assert [im.step for im in images] == [2, 4, 4]  # steps 2 and 4, and the final grid
    assert images[0].width > 8 and images[0].height > 8
    # CSV has no images, but its hparams.yaml is the resolved config too (it was {})
    saved = yaml.safe_load((run / "logs" / "hparams.yaml").read_text())
    assert saved["loss"]["mode"] == "scd" and saved["run_dir"] == str(run)


@pytest.mark.slow
def test_fid_is_logged_once_per_measurement(logged_run: dict) -> None:
    run = logged_run["run"]
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    fid_rows = [(int(r["step"]), float(r["fid/nfe1"])) for r in rows if r.get("fid/nfe1")]
    history = json.loads((run / "tensorboard" / "fid_history.json").read_text())
    assert fid_rows == [(h["step"], pytest.approx(h["fd"])) for h in history]
    assert [s for s, _ in fid_rows] == [2, 4]
    loss_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert len(loss_steps) == 4  # the loss is logged at every step: FID rows are not repeats
    acc = _events(run / "tensorboard")
    assert [e.step for e in acc.Scalars("fid/nfe1")] == [2, 4]


@pytest.mark.slow
def test_loss_curve_is_written_next_to_the_fid_history(logged_run: dict) -> None:
    logs = logged_run["run"] / "tensorboard"  # the first logger's folder
    assert (logs / "fid_history.png").is_file() and (logs / "loss_curve.png").is_file()
    history = json.loads((logs / "loss_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]  # log_every_n_steps=1


@pytest.mark.slow
def test_fid_and_final_evaluation_show_progress(logged_run: dict) -> None:
    err = logged_run["stderr"]
    assert "FID nfe=1 (step 2)" in err and "FID nfe=1 (step 4)" in err
    assert "FD teacher nfe=2" in err and "FD student nfe=1" in err
    assert err.count("8/8") >= 4


@pytest.mark.slow
def test_evaluate_shows_progress(logged_run: dict) -> None:
    run, base = logged_run["run"], logged_run["base"]
    res = run_cli(
        "evaluate", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"out={base / 'eval'}",
        "num_samples=8", "batch_size=8", "nfes=[1]", "teacher_nfes=[2]", "kid_subsets=2",
        "kid_subset_size=4", cwd=base,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    assert any("teacher ddim/" in ln and "nfe=2" in ln and "8/8" in ln for ln in lines), res.stderr
    assert any("student consistency nfe=1" in ln and "8/8" in ln for ln in lines), res.stderr
