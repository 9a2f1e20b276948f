"""Shared fixtures: tiny teacher folders and helpers to run the real CLI."""

from __future__ import annotations

import json
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
    return _python(["-m", "scm_lightning", *args], cwd, timeout)


def _python(
    args: list[str], cwd: Path, timeout: float, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """A fresh interpreter as the CLI tests run it: one thread, unbuffered, no SCM_RUN_DIR."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SCM_RUN_DIR", None)
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# One interpreter runs many CLI invocations: ``cli.main(argv)`` in turn, with file descriptors
# 1 and 2 sent to a file per invocation (so logging handlers and C-level output are caught
# too). Measured reason: ~60 bad-input cases cost 170 s as separate interpreters (start-up
# and imports), against a 20-minute CI budget on 2 cores.
_BATCH_DRIVER = """
import json, os, sys, tempfile
from scm_lightning.cli import main
results = []
for argv in json.loads(sys.stdin.read()):
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            rc = main(argv)
        except SystemExit as stop:
            rc = stop.code if isinstance(stop.code, int) else 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            os.close(saved[0]); os.close(saved[1])
        out.seek(0); err.seek(0)
        results.append({"returncode": rc, "stdout": out.read(), "stderr": err.read()})
print(json.dumps(results))
"""


def run_cli_batch(
    argvs: list[list[str]], cwd: Path, timeout: float = 900
) -> list[subprocess.CompletedProcess]:
    """Run ``cli.main(argv)`` for each argv in turn in one fresh interpreter (environment as
    ``run_cli``); one ``CompletedProcess`` (exit code, stdout, stderr) per argv."""
    res = _python(["-c", _BATCH_DRIVER], cwd, timeout, stdin=json.dumps(argvs))
    assert res.returncode == 0, res.stderr[-3000:]
    return [
        subprocess.CompletedProcess(["scm_lightning", *argv], **r)
        for argv, r in zip(argvs, json.loads(res.stdout.strip().splitlines()[-1]), strict=True)
    ]
