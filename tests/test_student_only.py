"""Student-only commands: `sample`/`export` rebuild the student from the checkpoint alone (the
teacher folder may be gone, the working directory another), saved paths are absolute, and
`evaluate` builds the teacher only for teacher rows and also reads an exported folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fit_two_steps, run_cli
from scm_lightning import commands
from scm_lightning.checkpointing import load_checkpoint
from scm_lightning.export import ema_swapped, resolve_profile
from scm_lightning.images import to_uint8
from scm_lightning.restore import TeacherNotLoaded, rebuild_module
from test_export import tiny_run

EVAL_SMALL = ["num_samples=16", "batch_size=16", "kid_subsets=2", "kid_subset_size=8"]


@pytest.fixture(scope="module")
def run_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_run(tmp_path_factory.getbasetemp() / "scm_tiny_run")


def test_checkpoint_records_the_student(run_paths: dict[str, Path]) -> None:
    """The student record rebuilds the same student as the teacher route, without a teacher."""
    ckpt = load_checkpoint(run_paths["fit_ckpt"])
    record = ckpt["scm_student"]
    assert record["net_class"] == "scm_lightning.nets.trigflow_unet.TrigFlowUNet"
    assert record["adapter"]["kind"] == "trigflow"
    full, _, _ = rebuild_module(ckpt)
    alone, _, _ = rebuild_module(ckpt, with_teacher=False)
    assert isinstance(alone.teacher, TeacherNotLoaded)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.9, 1.5])
    with torch.no_grad():
        torch.testing.assert_close(alone.student(x, t), full.student(x, t), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="teacher was not rebuilt"):
        alone.teacher_sample(2, nfe=3)


def test_evaluate_an_exported_folder(run_paths: dict[str, Path], tmp_path: Path) -> None:
    """`evaluate ckpt=<export>` scores the folder's student (same FD as from the checkpoint,
    whose samples it reproduces) and rebuilds the teacher from the run record for its rows."""
    folder = tmp_path / "export"
    assert commands.main("export", [f"ckpt={run_paths['fit_ckpt']}", f"out={folder}"]) == 0
    args = [*EVAL_SMALL, "nfes=[1]", "teacher_nfes=[3]"]
    assert commands.main("evaluate", [f"ckpt={folder}", f"out={tmp_path / 'f'}", *args]) == 0
    from_folder = json.loads((tmp_path / "f" / "evaluation.json").read_text())
    ckpt_args = [f"ckpt={run_paths['fit_ckpt']}", f"out={tmp_path / 'c'}", *args]
    assert commands.main("evaluate", ckpt_args) == 0
    from_ckpt = json.loads((tmp_path / "c" / "evaluation.json").read_text())
    rows = {(r["model"], r["nfe"]): r for r in from_folder["results"]}
    ref = {(r["model"], r["nfe"]): r for r in from_ckpt["results"]}
    assert set(rows) == set(ref) == {("student", 1), ("teacher", 3)}
    for key in rows:
        assert rows[key]["fd"] == pytest.approx(ref[key]["fd"], rel=1e-3)
    assert from_folder["ema_profile"] == from_ckpt["ema_profile"] == "power_0.05"
    # teacher_nfes=[]: student rows only
    only = [f"ckpt={folder}", f"out={tmp_path / 's'}", *EVAL_SMALL, "nfes=[1]", "teacher_nfes=[]"]
    assert commands.main("evaluate", only) == 0
    rows = json.loads((tmp_path / "s" / "evaluation.json").read_text())["results"]
    assert [(r["model"], r["nfe"]) for r in rows] == [("student", 1)]


def _fit_relative(work: Path, run_dir: Path) -> Path:
    """`fit` 2 steps with ``teacher.path=teacher`` relative to ``work`` (the cwd)."""
    return fit_two_steps(run_dir, "teacher")


@pytest.mark.slow
def test_sample_and_export_after_the_teacher_is_gone(
    tmp_path: Path,
    tiny_teacher: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_teacher, work / "teacher")
    monkeypatch.chdir(work)
    ckpt_path = _fit_relative(work, tmp_path / "run")
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["scm_config"]["teacher"]["path"] == str(work / "teacher")  # saved absolute
    module, _, _ = rebuild_module(ckpt)
    with ema_swapped(module, ckpt, resolve_profile(ckpt, None)):
        ref = module.sample(4, nfe=2, generator=torch.Generator().manual_seed(0))

    shutil.rmtree(work / "teacher")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run_cli("sample", f"ckpt={ckpt_path}", "out=s", "nfe=2", "num=4", cwd=elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]
    samples = np.load(elsewhere / "s" / "samples_nfe2_seed0.npz")["samples"].astype(int)
    assert np.abs(samples - to_uint8(ref).astype(int)).max() <= 1
    res = run_cli("export", f"ckpt={ckpt_path}", "out=export", cwd=elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]
    index = json.loads((elsewhere / "export" / "model_index.json").read_text())
    assert index["adapter"]["kind"] == "trigflow"
    # evaluate: student rows need no teacher; teacher rows say which teacher is missing
    args = [*EVAL_SMALL, "nfes=[1]", "teacher_nfes=[]"]
    assert commands.main("evaluate", [f"ckpt={ckpt_path}", f"out={tmp_path / 'e'}", *args]) == 0
    from scm_lightning import cli

    code = cli.main(["evaluate", f"ckpt={ckpt_path}", *EVAL_SMALL, "nfes=[1]", "teacher_nfes=[3]"])
    assert code == 2 and "teacher directory" in capsys.readouterr().err


def test_absolute_paths_only_rewrites_existing_local_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scm_lightning.checkpointing import absolute_paths

    (tmp_path / "teacher").mkdir()
    monkeypatch.chdir(tmp_path)
    tree = {
        "teacher": {"path": "teacher", "net": {"pretrained_model_name_or_path": "org/model"}},
        "data": {"root": "s3://bucket/images", "path": str(tmp_path / "x.npz")},
        "notes": ["teacher"],
        "name": "teacher",  # not a path key
    }
    out = absolute_paths(tree)
    assert out["teacher"]["path"] == str(tmp_path / "teacher")
    assert out["teacher"]["net"]["pretrained_model_name_or_path"] == "org/model"  # a hub id
    assert out["data"] == tree["data"] and out["notes"] == ["teacher"]
    assert out["name"] == "teacher"
