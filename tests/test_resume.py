"""Exact resume: a CPU run SIGKILLed mid-training and resumed from its last checkpoint ends
bit-identical (student, EMA, step and tangent-warmup state) to the uninterrupted run.

A 24-image data set with batch 4 makes 6 batches per epoch, so the kills land mid-epoch
(step 7) and exactly on an epoch boundary (step 6): the sampler must continue the same
(seed, epoch) order after Lightning's restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).parent
STEPS = 10


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.pop("SCM_RUN_DIR", None)
    return env


def _args(teacher: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "scm_lightning",
        "fit",
        "teacher=diffusers",
        f"teacher.path={teacher}",
        "data=tensors",
        f"data.path={data}",
        "data.batch_size=4",
        "trainer=cpu",
        f"trainer.max_steps={STEPS}",
        "trainer.enable_progress_bar=false",
        "loss.warmup_steps=8",  # r keeps changing across the kill points
        "callbacks.fid=null",
        "callbacks.progress=null",
        "callbacks.samples=null",
        "callbacks.checkpoint.every_n_train_steps=1",
        "eval=none",
        f"run_dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def setup(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", images=rng.uniform(-1, 1, (24, 1, 8, 8)).astype(np.float32))
    ref = root / "uninterrupted"
    proc = subprocess.run(
        _args(tiny_teacher, root / "data.npz", ref),
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "teacher": tiny_teacher, "data": root / "data.npz", "ref": ref}


def _final(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    return {
        "state": ckpt["state_dict"],
        "ema": ema,
        "step": ckpt["global_step"],
        "loops": ckpt["loops"]["fit_loop"]["epoch_progress"],
    }


@pytest.mark.parametrize("kill_at", [7, 6])
def test_sigkill_and_resume_is_bit_identical(setup: dict[str, Path], kill_at: int) -> None:
    run_dir = setup["root"] / f"killed_at_{kill_at}"
    marker = setup["root"] / f"paused_{kill_at}"
    pause = [
        "+callbacks.pause._target_=_scale_probe.PauseAt",
        f"+callbacks.pause.step={kill_at}",
        f"+callbacks.pause.marker={marker}",
    ]
    proc = subprocess.Popen(
        _args(setup["teacher"], setup["data"], run_dir, *pause),
        cwd=setup["root"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _final(run_dir)["step"] == kill_at  # killed for real: the run stopped there

    resumed = subprocess.run(
        _args(setup["teacher"], setup["data"], run_dir, "ckpt_path=last"),
        cwd=setup["root"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _final(setup["ref"]), _final(run_dir)
    assert a["step"] == b["step"] == STEPS
    # epochs completed (Lightning's ready/started counters differ after a restart on an epoch
    # boundary: bookkeeping only)
    assert a["loops"]["current"]["completed"] == b["loops"]["current"]["completed"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert a["ema"]["nimg"] == b["ema"]["nimg"] and a["ema"]["last_step"] == b["ema"]["last_step"]
    for profile, tensors in a["ema"]["ema"].items():
        for key, value in tensors.items():
            assert torch.equal(value, b["ema"]["ema"][profile][key]), (profile, key)
