"""Atomic checkpoint writes (SIGKILL mid-write), weights-only loads, and resume checks."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scm_lightning.checkpointing import (
    AtomicCheckpointIO,
    atomic_save,
    check_resume_config,
    check_resume_state,
    has_own_checkpoint_io,
    last_good_checkpoint,
    load_checkpoint,
    load_checkpoint_file,
)
from scm_lightning.config import ConfigError

KILLED_WRITER = textwrap.dedent(
    """
    import io, os, sys, time, torch
    from scm_lightning.checkpointing import AtomicCheckpointIO

    path = sys.argv[1]
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint({"state_dict": {"w": torch.zeros(64)}, "version": 1}, path)

    real_save = torch.save

    def slow_save(obj, f):  # half the bytes reach the disk, then the process hangs
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print("writing", flush=True)
        time.sleep(120)

    torch.save = slow_save
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(1 << 18)}, "version": 2}, path)
    """
)


def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"  # killed mid-write, not before
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = list(path.parent.glob(".last.ckpt.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the torn write, set aside
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_checkpoint_file(partial[0])
    ckpt = AtomicCheckpointIO().load_checkpoint(path)
    assert ckpt["version"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.zeros(64))
    # The next write (a live process) cleans up the dead writer's temporary file.
    atomic_save({"version": 3}, path)
    assert load_checkpoint_file(path)["version"] == 3
    assert list(path.parent.iterdir()) == [path]


def test_atomic_save_replaces_whole_files_with_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "a" / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(3.0)}}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_save({"state_dict": {"w": torch.zeros(2)}}, path)
    assert torch.equal(load_checkpoint_file(path)["state_dict"]["w"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": 1}, path, save=failing_save)
    assert torch.equal(load_checkpoint_file(path)["state_dict"]["w"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]  # no temp left behind


def test_loads_are_weights_only(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "obj": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(ValueError, match=r"pickled objects \(argparse.Namespace\)"):
        AtomicCheckpointIO().load_checkpoint(unsafe)
    with pytest.raises(ValueError, match="weights_only=True only"):
        AtomicCheckpointIO().load_checkpoint(unsafe, weights_only=False)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match=r"notes\.ckpt' is not a readable PyTorch checkpoint"):
        load_checkpoint_file(text)
    truncated = tmp_path / "cut.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:700])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint_file(truncated)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.ckpt")
    with pytest.raises(IsADirectoryError):
        load_checkpoint_file(tmp_path)


def test_one_loading_path_one_message_per_bad_file(tmp_path: Path) -> None:
    """Commands (load_checkpoint), the Trainer's IO and the resume check fail alike."""
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "obj": argparse.Namespace(a=1)}, unsafe)
    truncated = tmp_path / "cut.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:700])
    cfg = OmegaConf.create({"task": "fit"})
    for path in (text, unsafe, truncated, tmp_path / "nope.ckpt", tmp_path):
        messages = set()
        for load in (
            load_checkpoint,
            load_checkpoint_file,
            AtomicCheckpointIO().load_checkpoint,
            lambda p: check_resume_config(cfg, p),
        ):
            with pytest.raises((ValueError, OSError)) as info:
                load(path)
            messages.add(str(info.value).split(" (")[0])  # (torch's own detail varies)
        assert len(messages) == 1, messages
        (message,) = messages
        assert message.startswith(f"checkpoint {str(path)!r} ") and "\n" not in message
        assert str(info.value).count("\n") == 0
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.ckpt' was not written by scm_lightning"):
        load_checkpoint(foreign)


def test_fsspec_paths_round_trip_through_the_checkpoint_io(tmp_path: Path, monkeypatch) -> None:
    """A remote (fsspec) path is written by Lightning's _atomic_save into that file system."""
    import fsspec

    monkeypatch.chdir(tmp_path)  # a path misread as local would appear here
    memory = fsspec.filesystem("memory")
    url = "memory://scm-test-ckpt/checkpoints/last.ckpt"
    ckpt = {"state_dict": {"w": torch.arange(4.0)}, "scm_config": {"task": "fit"}}
    try:
        AtomicCheckpointIO().save_checkpoint(ckpt, url)
        assert memory.isfile("/scm-test-ckpt/checkpoints/last.ckpt")
        assert list(tmp_path.iterdir()) == []
        for load in (AtomicCheckpointIO().load_checkpoint, load_checkpoint):
            loaded = load(url)
            assert loaded["scm_config"] == {"task": "fit"}
            torch.testing.assert_close(loaded["state_dict"]["w"], torch.arange(4.0))
        atomic_save({"version": 2}, url)
        assert load_checkpoint_file(url) == {"version": 2}
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_checkpoint_file("memory://scm-test-ckpt/nope.ckpt")
        AtomicCheckpointIO().remove_checkpoint(url)
        assert not memory.exists("/scm-test-ckpt/checkpoints/last.ckpt")
    finally:
        if memory.exists("/scm-test-ckpt"):
            memory.rm("/scm-test-ckpt", recursive=True)


def test_no_unsafe_loads_in_the_package() -> None:
    """Every torch.load passes weights_only=True; no np.load(allow_pickle=True), no pickle.load."""
    root = Path(__file__).resolve().parents[1] / "src" / "scm_lightning"
    for path in root.rglob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("#")[0]
            call = " ".join(lines[i : i + 3]).replace(" ", "")
            if "torch.load(" in code:
                assert "weights_only=True" in call, f"{path}:{i + 1}: {line}"
            if "np.load(" in code:
                assert "allow_pickle=True" not in call, f"{path}:{i + 1}: {line}"
            assert "pickle.load(" not in code and "pickle.loads(" not in code, f"{path}:{i + 1}"


def test_strategies_with_their_own_checkpoint_io() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    assert has_own_checkpoint_io(ModelParallelStrategy()) and has_own_checkpoint_io("fsdp")
    assert has_own_checkpoint_io(FSDPStrategy()) and has_own_checkpoint_io("deepspeed_stage_2")
    assert not has_own_checkpoint_io("ddp") and not has_own_checkpoint_io("auto")
    assert not has_own_checkpoint_io(DDPStrategy())


def test_build_trainer_plugs_in_the_atomic_io(tmp_path: Path) -> None:
    from scm_lightning.config import compose_config
    from scm_lightning.training import build_trainer

    cfg = compose_config("pretrain", [f"run_dir={tmp_path}", "~logger"])
    trainer = build_trainer(cfg, [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# --- resume checks ---------------------------------------------------------------------------


def _saved(tmp_path: Path, scm_config: dict | None, state: dict, shape=(1, 8, 8)) -> Path:
    path = tmp_path / "r.ckpt"
    ckpt = {"state_dict": state, "scm_image_shape": list(shape), "global_step": 3}
    if scm_config is not None:
        ckpt["scm_config"] = scm_config
    atomic_save(ckpt, path)
    return path


FIT = {
    "task": "fit",
    "loss": {"mode": "scd", "p_std": 1.4},
    "teacher": {"_target_": "load_teacher", "path": "teachers/t"},
    "data": {"_target_": "Digits", "batch_size": 8},
    "student": {"guidance_embedding": False, "logvar_channels": 128},
}


def test_resume_config_check(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _saved(tmp_path, FIT, {"student.w": torch.zeros(2)})
    same = OmegaConf.create({**FIT, "loss": {"mode": "scd", "p_std": 1.0}})  # a hyperparameter
    same.teacher.path = str(tmp_path / "teachers" / "t")  # same folder, spelled absolute
    assert check_resume_config(same, path)["global_step"] == 3
    cases = [
        ({"loss": {"mode": "sct", "p_std": 1.4}}, "loss.mode was 'scd' in that run, now 'sct'"),
        ({"teacher": {"_target_": "load_teacher", "path": "/elsewhere"}}, "teacher.path was"),
        ({"data": {"_target_": "Folder", "batch_size": 8}}, "data._target_ was 'Digits'"),
        (
            {"student": {"guidance_embedding": True, "logvar_channels": 128}},
            "student.guidance_embedding was False in that run, now True",
        ),
        ({"task": "pretrain"}, "is a 'fit' checkpoint; cannot resume it with `pretrain`"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            check_resume_config(OmegaConf.create({**FIT, **change}), path)
    with pytest.raises(ConfigError, match="not written by scm_lightning"):
        check_resume_config(OmegaConf.create(FIT), _saved(tmp_path, None, {}))


def test_resume_state_check(tmp_path: Path) -> None:
    module = torch.nn.Module()
    module.student = torch.nn.Linear(3, 2)
    module.image_shape = (1, 8, 8)
    good = {f"student.{k}": v for k, v in module.student.state_dict().items()}
    check_resume_state({"state_dict": {**good, "teacher.x": torch.zeros(9)}}, module)
    wide = {**good, "student.weight": torch.zeros(2, 4)}
    with pytest.raises(ConfigError, match=r"student.weight: checkpoint \(2, 4\) vs model \(2, 3\)"):
        check_resume_state({"state_dict": wide}, module)
    with pytest.raises(ConfigError, match="1 weights missing from it"):
        check_resume_state({"state_dict": {"student.weight": good["student.weight"]}}, module)
    with pytest.raises(ConfigError, match="1 unexpected weights"):
        check_resume_state({"state_dict": {**good, "student.extra": torch.zeros(1)}}, module)
    with pytest.raises(ConfigError, match=r"images of shape \(3, 8, 8\)"):
        check_resume_state({"state_dict": good, "scm_image_shape": [3, 8, 8]}, module)


def test_last_good_checkpoint_picks_the_newest_existing(tmp_path: Path) -> None:
    old, new = tmp_path / "step1.ckpt", tmp_path / "last.ckpt"
    old.write_bytes(b"1")
    new.write_bytes(b"2")
    os.utime(old, (1, 1))
    cb = argparse.Namespace(
        _last_checkpoint_saved=str(old), last_model_path=str(new), best_model_path=""
    )
    trainer = argparse.Namespace(checkpoint_callbacks=[cb], ckpt_path=None)
    assert last_good_checkpoint(trainer) == str(new)
    new.unlink()
    assert last_good_checkpoint(trainer) == str(old)
    old.unlink()
    trainer.ckpt_path = None
    assert last_good_checkpoint(trainer) is None and last_good_checkpoint(None) is None


def test_pickled_teachers_need_allow_pickle_and_warn(tmp_path: Path) -> None:
    from diffusers import SCMScheduler

    from scm_lightning.nets.trigflow_unet import TrigFlowUNet
    from scm_lightning.teachers.loading import load_teacher

    pkl = tmp_path / "network-snapshot.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match=r"is a file; supported: a diffusers .*EDM \.pkl"):
        load_teacher(pkl)
    folder = tmp_path / "bin_teacher"
    net = TrigFlowUNet(
        sample_size=8, block_channels=(8, 16), attention_head_dim=8, norm_num_groups=4
    )
    net.save_pretrained(folder / "unet", safe_serialization=False)  # pickled .bin weights
    SCMScheduler(sigma_data=0.5).save_config(folder / "scheduler")
    with pytest.raises(ValueError, match=r"no \.safetensors weights.*allow_pickle=True"):
        load_teacher(folder)
    with pytest.warns(UserWarning, match=r"pickled \(.bin\) teacher weights"):
        teacher = load_teacher(folder, allow_pickle=True)
    assert teacher.in_channels == 1


def test_last_checkpoint_holds_the_final_step_between_checkpoint_steps(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    """3 steps with a checkpoint every 2: Lightning alone left last.ckpt at step 2."""
    from conftest import fit_two_steps
    from scm_lightning.checkpointing import load_checkpoint

    last = fit_two_steps(tmp_path / "run", tiny_teacher, "++trainer.max_steps=3")
    assert load_checkpoint(last)["global_step"] == 3
    assert (
        load_checkpoint(tmp_path / "run" / "checkpoints" / "step0000002.ckpt")["global_step"] == 2
    )
