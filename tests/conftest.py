"""Shared fixtures: tiny teacher folders and helpers to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny test networks run fastest single-threaded (and the CI box has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Reference statistics and cached teacher rows go to a per-session folder, not ~/.cache
    (the CLI subprocesses inherit the variable)."""
    old = os.environ.get("SCM_CACHE_DIR")
    os.environ["SCM_CACHE_DIR"] = str(tmp_path_factory.mktemp("scm_cache"))
    yield
    if old is None:
        os.environ.pop("SCM_CACHE_DIR", None)
    else:
        os.environ["SCM_CACHE_DIR"] = old


def write_tiny_teacher(
    path: Path, seed: int = 0, sample_size: int = 8, num_classes: int | None = None
) -> Path:
    """A random TrigFlowUNet teacher folder (unet/ + SCMScheduler config), loadable offline;
    ``num_classes``: class-conditional, with the null class ``num_classes`` for CFG."""
    from diffusers import SCMScheduler

    from scm_lightning.nets.trigflow_unet import TrigFlowUNet

    torch.manual_seed(seed)
    net = TrigFlowUNet(
        sample_size=sample_size,
        block_channels=(16, 32),
        attention_head_dim=16,
        num_classes=num_classes,
    )
    for p in net.parameters():  # a non-trivial teacher (the default init outputs zeros)
        p.data.normal_(std=0.05)
    net.save_pretrained(path / "unet")
    SCMScheduler(sigma_data=0.5).save_config(path / "scheduler")
    return path


def fit_two_steps(run_dir: Path, teacher_path: str | Path, *overrides: str) -> Path:
    """In-process `fit` of 2 steps with nothing but a checkpoint (no evaluation, callbacks,
    validation or progress bar); returns ``run_dir/checkpoints/last.ckpt``."""
    from scm_lightning.config import compose_config
    from scm_lightning.training import run

    run(
        compose_config(
            "fit",
            [
                f"run_dir={run_dir}",
                f"teacher.path={teacher_path}",
                "++trainer.max_steps=2",
                "++data.batch_size=8",
                "eval=none",
                "callbacks.fid=null",
                "callbacks.samples=null",
                "callbacks.progress=null",
                "++trainer.enable_progress_bar=false",
                "++trainer.limit_val_batches=0",
                "++callbacks.checkpoint.every_n_train_steps=2",
                *overrides,
            ],
        )
    )
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return write_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m scm_lightning`` in a subprocess (single-threaded, no progress bar)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SCM_RUN_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "scm_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
