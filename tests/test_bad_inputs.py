"""Bad inputs through the real CLI: exit code 2, one line naming the problem, no traceback,
and an existing run's outputs and checkpoints left byte-for-byte untouched.

The cases run through ``cli.main`` in one fresh interpreter (``run_cli_batch``); the entry
point's own exit code and stderr are checked in separate subprocesses below. Most cases are
caught by ``config.validate_config`` before Lightning is imported; the data, teacher and
resume cases are caught before the Trainer starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import run_cli, run_cli_batch, write_tiny_teacher
from scm_lightning.config import TEACHER_PREDICTION_TYPES
from scm_lightning.teachers.schedule import PREDICTION_TYPES

TINY_NET = [
    "net.block_channels=[8,16]",
    "net.mid_attention=false",
    "net.attention_head_dim=8",
    "+net.norm_num_groups=4",
]
QUIET = [
    "trainer.enable_progress_bar=false",
    "callbacks.fid=null",
    "callbacks.progress=null",
    "callbacks.samples=null",
    "eval=none",
    "data.batch_size=8",
]


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """(size, mtime_ns, bytes) of every file under ``root``."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A finished pretrain run (checkpoints, config, results), a teacher, and bad files."""
    base = tmp_path_factory.mktemp("bad_inputs")
    run = base / "run"
    res = run_cli(
        "pretrain",
        f"run_dir={run}",
        "trainer.max_steps=2",
        "callbacks.checkpoint.every_n_train_steps=1",
        *TINY_NET,
        *QUIET,
        cwd=base,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    teacher = write_tiny_teacher(base / "teacher")

    no_sched = base / "teacher_no_scheduler" / "unet"  # a diffusers model, no scheduler config
    no_sched.mkdir(parents=True)
    (no_sched / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    pkl = base / "edm-snapshot.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")  # a pickle (never unpickled)
    rgb = base / "rgb.npz"
    np.savez(rgb, images=np.random.default_rng(0).uniform(-1, 1, (16, 3, 8, 8)).astype("f4"))
    nan = base / "nan.npz"
    x = np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype("f4")
    x[3, 0, 2, 2] = np.nan
    np.savez(nan, images=x)
    (base / "empty").mkdir()
    corrupt = base / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    text = base / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    (base / "no_ckpts").mkdir()
    return {"base": base, "run": run, "teacher": teacher, "no_sched": no_sched.parent,
            "pkl": pkl, "rgb": rgb, "nan": nan, "empty": base / "empty", "corrupt": corrupt,
            "text": text, "no_ckpts": base / "no_ckpts"}  # fmt: skip


def fit(w: dict[str, Path], *extra: str, run_dir: Path | None = None) -> list[str]:
    return ["fit", "teacher=diffusers", f"teacher.path={w['teacher']}",
            f"run_dir={run_dir or w['run']}", *QUIET, *extra]  # fmt: skip


def pretrain(w: dict[str, Path], *extra: str) -> list[str]:
    return ["pretrain", f"run_dir={w['run']}", *TINY_NET, *QUIET, *extra]


# (id, argv builder, substrings the one error line must contain)
CASES = [
    ("unknown_command", lambda w: ["train"], ["unknown command 'train'", "fit"]),
    ("unknown_experiment", lambda w: fit(w, "experiment=nope"),
     ["unknown experiment 'nope'", "digits_scd"]),
    ("unknown_group_option", lambda w: fit(w, "loss=foo"), ["unknown loss 'foo'", "'sct'"]),
    ("unknown_key", lambda w: fit(w, "loss.pstd=1.0"),
     ["unknown config key 'loss.pstd'", "+loss.pstd"]),
    ("added_unknown_loss_key", lambda w: fit(w, "+loss.pstd=1.0"),
     ["unknown key loss.pstd", "p_std"]),
    ("dict_override_adds_a_key",
     lambda w: fit(w, "callbacks.ema.profiles={p10:{kind:power,std:0.1}}"),
     ["cannot add 'callbacks.ema.profiles.p10'", "+callbacks.ema.profiles.p10=",
      "~callbacks.ema.profiles"]),
    ("bad_override_syntax", lambda w: fit(w, "loss.p_std=[1"), ["cannot parse the overrides"]),
    ("negative_p_std", lambda w: fit(w, "loss.p_std=-1"), ["loss.p_std=-1 is invalid", "> 0"]),
    ("non_number_p_std", lambda w: fit(w, "loss.p_std=abc"), ["loss.p_std='abc' is invalid"]),
    ("zero_sigma_data", lambda w: fit(w, "loss.sigma_data=0"), ["loss.sigma_data=0 is invalid"]),
    ("negative_warmup", lambda w: fit(w, "loss.warmup_steps=-1"),
     ["loss.warmup_steps=-1 is invalid", ">= 0"]),
    ("zero_c", lambda w: fit(w, "loss.tangent_norm_c=0"), ["loss.tangent_norm_c=0 is invalid"]),
    ("t_mid_above_t_max", lambda w: fit(w, "loss.t_mid=2.0"),
     ["loss.t_mid=2.0 is invalid", "t_max = 1.5645"]),
    ("t_mid_zero", lambda w: fit(w, "loss.t_mid=0"), ["loss.t_mid=0 is invalid"]),
    ("bad_loss_mode", lambda w: fit(w, "loss.mode=ect"), ["loss.mode='ect' is invalid"]),
    ("bad_precision", lambda w: fit(w, "trainer.precision=17"),
     ["trainer.precision=17 is invalid", "bf16-mixed"]),
    ("zero_devices", lambda w: fit(w, "trainer.devices=0"), ["trainer.devices=0 is invalid"]),
    ("bad_accelerator", lambda w: fit(w, "trainer.accelerator=abacus"),
     ["trainer.accelerator='abacus' is invalid"]),
    ("zero_max_steps", lambda w: fit(w, "trainer.max_steps=0"), ["trainer.max_steps=0"]),
    ("zero_batch", lambda w: fit(w, "data.batch_size=0"), ["data.batch_size=0 is invalid"]),
    ("zero_lr", lambda w: fit(w, "optim.lr=0"), ["optim.lr=0 is invalid"]),
    ("negative_max_bad_steps", lambda w: fit(w, "max_bad_steps=-1"), ["max_bad_steps=-1"]),
    ("eval_nfe_zero", lambda w: fit(w, "eval=digits", "eval.student_nfes=[1,0]"),
     ["eval.student_nfes=[1, 0] is invalid", "NFEs"]),
    ("dinov2_without_weights", lambda w: fit(w, "eval.feature=dinov2"),
     ["eval.feature_weights=None is invalid", "DINOv2 features need a local checkpoint"]),
    ("feature_weights_missing",
     lambda w: fit(w, "eval.feature=inception", f"eval.feature_weights={w['base'] / 'no.pth'}"),
     ["eval.feature_weights=", "no.pth", "does not exist"]),
    ("guidance_range", lambda w: fit(w, "student.guidance_scale_range=[2,1]"),
     ["student.guidance_scale_range=[2, 1] is invalid"]),
    ("cfg_range_without_guidance_input",
     lambda w: fit(w, "student.guidance_scale_range=[1,2]", "student.uncond_label=10"),
     ["student.guidance_scale_range=[1, 2] is invalid", "student.guidance_embedding=true"]),
    ("cfg_range_without_null_label",
     lambda w: fit(w, "student.guidance_embedding=true", "student.guidance_scale_range=[1,2]"),
     ["student.guidance_scale_range=[1, 2] is invalid", "student.uncond_label"]),
    ("cfg_with_sct", lambda w: fit(w, "loss=sct", "student.guidance_embedding=true",
                                   "student.guidance_scale_range=[1,2]", "student.uncond_label=10"),
     ["student.guidance_scale_range=[1, 2] is invalid", "loss.mode='sct'"]),
    ("guidance_input_without_range", lambda w: fit(w, "student.guidance_embedding=true"),
     ["student.guidance_embedding=True is invalid", "student.guidance_scale_range"]),
    ("cfg_unconditional_teacher", lambda w: fit(w, "student.guidance_embedding=true",
                                                "student.guidance_scale_range=[1,2]",
                                                "student.uncond_label=10"),
     ["needs a class-conditional teacher", "num_classes=None"]),
    ("cond_experiment_unlabelled_data",
     lambda w: ["fit", "experiment=digits_cond_scd", "data.conditional=false",
                f"run_dir={w['run']}", *QUIET],
     ["teacher and data disagree", "teacher is class-conditional", "num_classes=None"]),
    ("cond_experiment_unconditional_teacher",
     lambda w: ["fit", "experiment=digits_cond_scd", f"teacher.path={w['teacher']}",
                f"run_dir={w['run']}", *QUIET],
     ["teacher and data disagree", "teacher is unconditional", "num_classes=10"]),
    ("eval_guidance_without_cfg", lambda w: fit(w, "eval.guidance=2"),
     ["eval.guidance=2 is invalid", "CFG-distilled"]),
    ("eval_labels", lambda w: fit(w, "eval.labels=balanced"),
     ["eval.labels='balanced' is invalid"]),
    ("eval_teacher_grid", lambda w: fit(w, "eval.teacher_grids=[karras]"),
     ["eval.teacher_grids=['karras'] is invalid", "t_mid"]),
    ("custom_teacher_unset", lambda w: ["fit", "teacher=custom", f"run_dir={w['run']}", *QUIET],
     ["teacher._target_ is required but not set"]),
    ("custom_teacher_plain_module",
     lambda w: ["fit", "teacher=custom", "teacher._target_=torch.nn.Identity",
                f"run_dir={w['run']}", *QUIET],
     ["teacher._target_='torch.nn.Identity' returned Identity",
      "wrap a plain module in TrigFlowNative or EDMAdapter"]),
    ("teacher_missing", lambda w: fit(w, f"teacher.path={w['base'] / 'nope'}"),
     ["teacher.path=", "does not exist", "diffusers folder"]),
    ("teacher_pickle", lambda w: fit(w, f"teacher.path={w['pkl']}"),
     ["is a file", "EDM .pkl", "allow_pickle=true"]),
    ("teacher_prediction_type", lambda w: fit(w, "teacher.prediction_type=noise"),
     ["teacher.prediction_type='noise' is invalid", "v_prediction"]),
    ("teacher_no_scheduler", lambda w: fit(w, f"teacher.path={w['no_sched']}"),
     ["no scheduler config found"]),
    ("teacher_data_channels", lambda w: fit(w, "data=tensors", f"data.path={w['rgb']}"),
     ["teacher and data disagree", "1 input channels, data has 3"]),
    ("data_missing_file", lambda w: fit(w, "data=tensors", f"data.path={w['base'] / 'x.npz'}"),
     ["data.path=", "does not exist"]),
    ("data_nan", lambda w: pretrain(w, "data=tensors", f"data.path={w['nan']}"),
     ["non-finite values", "on_nonfinite='skip'"]),
    ("empty_folder", lambda w: pretrain(w, "data=folder", f"data.root={w['empty']}",
                                        "data.channels=1", "data.resolution=8"),
     ["no images found in", str(Path("empty"))]),
    ("corrupt_image", lambda w: pretrain(w, "data=folder", f"data.root={w['corrupt']}",
                                         "data.channels=1", "data.resolution=8"),
     ["unreadable image", "a.png", "on_bad_file='skip'"]),
    ("ckpt_missing", lambda w: fit(w, f"ckpt_path={w['base'] / 'gone.ckpt'}"),
     ["ckpt_path=", "gone.ckpt", "does not exist"]),
    ("ckpt_last_none", lambda w: fit(w, "ckpt_path=last", run_dir=w["no_ckpts"]),
     ["last.ckpt", "does not exist"]),
    ("ckpt_text_file", lambda w: fit(w, f"ckpt_path={w['text']}"),
     ["notes.ckpt", "is not a readable PyTorch checkpoint"]),
    ("ckpt_other_task", lambda w: fit(w, f"ckpt_path={w['run'] / 'checkpoints' / 'last.ckpt'}"),
     ["is a 'pretrain' checkpoint", "cannot resume it with `fit`"]),
    ("ckpt_other_experiment",
     lambda w: pretrain(w, "ckpt_path=last", "trainer.max_steps=4", "net.block_channels=[8,8]"),
     ["comes from a different experiment", "net.block_channels was [8, 16]", "now [8, 8]"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(world) -> dict[str, Any]:
    """Every case run once, in one interpreter, with the existing run and teacher folders
    snapshotted before and after all of them."""
    before = (snapshot(world["run"]), snapshot(world["teacher"]))
    done = run_cli_batch([c[1](world) for c in CASES], cwd=world["base"])
    results = {c[0]: res for c, res in zip(CASES, done, strict=True)}
    after = (snapshot(world["run"]), snapshot(world["teacher"]))
    return {"results": results, "before": before, "after": after}


@pytest.mark.parametrize(
    ("name", "expected"), [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_exits_2_with_one_line(outcomes, name: str, expected: list[str]) -> None:
    res = outcomes["results"][name]
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and res.stderr.rstrip().splitlines()[-1] == errors[0], res.stderr
    assert "Traceback" not in res.stderr
    for part in expected:
        assert part in errors[0], (part, errors[0])


def test_rejected_inputs_left_the_existing_run_untouched(world, outcomes) -> None:
    """Same files, same bytes, same mtimes in the run dir (checkpoints, config.yaml,
    results.json) and the teacher folder; no stray runs/ folder in the working directory."""
    run_before, teacher_before = outcomes["before"]
    run_after, teacher_after = outcomes["after"]
    assert {"checkpoints/last.ckpt", "config.yaml", "results.json"} <= set(run_before)
    assert run_after == run_before
    assert teacher_after == teacher_before
    assert not (world["base"] / "runs").exists()


def test_config_errors_print_nothing_else(world) -> None:
    """Caught before Lightning is imported: stderr is the error line alone."""
    res = run_cli(*fit(world, "loss.tangent_norm_c=-0.5"), cwd=world["base"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: loss.tangent_norm_c=-0.5 is invalid: expected a finite number > 0"
    ]
    assert res.stdout == ""


def test_debug_shows_the_traceback(world) -> None:
    res = run_cli(*fit(world, "loss.p_std=-1"), "--debug", cwd=world["base"])
    assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError" in res.stderr


def test_resume_with_ckpt_path_last_continues_the_run(world, tmp_path: Path) -> None:
    """``ckpt_path=last`` resolves to ``<run_dir>/checkpoints/last.ckpt`` and continues."""
    import shutil

    from scm_lightning.checkpointing import load_checkpoint_file

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    res = run_cli(
        "pretrain", f"run_dir={run}", "ckpt_path=last", "trainer.max_steps=3",
        "callbacks.checkpoint.every_n_train_steps=1", *TINY_NET, *QUIET, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert (run / "checkpoints" / "step0000003.ckpt").is_file()
    # the steps before the resume were not rewritten
    old = snapshot(world["run"] / "checkpoints")
    assert snapshot(run / "checkpoints")["step0000002.ckpt"] == old["step0000002.ckpt"]


def test_prediction_types_match_the_teachers_package() -> None:
    assert tuple(TEACHER_PREDICTION_TYPES) == tuple(PREDICTION_TYPES)
