"""`export posthoc_std=...`: EDM2 post-hoc EMA from a run's snapshots, through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from scm_lightning.callbacks.ema import reconstruct_posthoc_ema

pytestmark = pytest.mark.slow


def test_export_posthoc_ema_equals_the_reconstruction(tmp_path: Path, tiny_teacher: Path):
    run = tmp_path / "run"
    res = run_cli(
        "fit",
        f"teacher.path={tiny_teacher}",
        f"run_dir={run}",
        "trainer.max_steps=6",
        "data.batch_size=8",
        "eval=none",
        "callbacks.fid=null",
        "callbacks.samples=null",
        "trainer.enable_progress_bar=false",
        "callbacks.checkpoint.every_n_train_steps=6",
        "+callbacks.ema.profiles.power_010={kind: power, std: 0.10}",
        "callbacks.ema.snapshot_every_n_steps=2",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    snapshots = run / "logs" / "ema_snapshots"
    assert len(list(snapshots.glob("phema-*.safetensors"))) >= 4  # 2 profiles × ≥ 2 steps
    out = tmp_path / "export"
    res = run_cli(
        "export",
        f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
        f"out={out}",
        "posthoc_std=0.07",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    expected = reconstruct_posthoc_ema(snapshots, 0.07)
    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    prefix = "net.net."  # Student.net (adapter) .net (the UNet)
    net_keys = {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}
    assert net_keys and net_keys.keys() == exported.keys()
    for key, value in net_keys.items():
        # the CLI process and this one: the same sum, possibly rounded differently
        torch.testing.assert_close(exported[key], value, rtol=1e-6, atol=1e-7)
    bad = run_cli(
        "export",
        f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
        f"out={tmp_path / 'x'}",
        "posthoc_std=0.5",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "posthoc_std=0.5" in bad.stderr
