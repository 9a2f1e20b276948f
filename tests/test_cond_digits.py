"""Class-conditional digits with CFG end to end (issue 12, item 1).

* The bundled class-conditional teacher (``assets/digits_cond_teacher``) has a null class for
  CFG: its guided velocity is ``u + s(c − u)`` (two independent plain calls) and a student
  with a guidance input equals it at initialisation for every s.
* ``metrics.quality.class_accuracy`` on known predictions.
* ``experiment=digits_cond_scd`` (with a tiny conditional teacher written here): export →
  ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` in a fresh process that
  cannot import the project → samples with labels and guidance equal our sampler to 1e-5;
  ``evaluate guidances=[1,2]`` scores teacher and student once per scale with the digits
  classifier's class accuracy beside FD/precision/recall.
* Bad inputs (labels, guidance) stop with one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fit_two_steps, write_tiny_teacher
from scm_lightning import commands
from scm_lightning.assets import asset_path
from scm_lightning.metrics.quality import class_accuracy
from scm_lightning.student import Student
from scm_lightning.teachers import GuidedTeacher
from scm_lightning.teachers.loading import load_teacher
from test_diffusers_load import LOAD_PIPELINE, run_without_project

K = 10  # digits; label K is the null class


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bundled_cond_teacher_guidance_and_student_at_init() -> None:
    teacher = load_teacher(asset_path("digits_cond_teacher")).double()
    assert teacher.num_classes == K and teacher.sigma_data == 0.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9, 1.2, 1.5], dtype=torch.float64)
    labels = torch.tensor([0, 3, 5, 7, 9])
    s = torch.tensor([0.0, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        c = teacher(x, t, labels)  # two separate plain calls: conditional and null class
        u = teacher(x, t, torch.full((5,), K))
        want = u + s[:, None, None, None] * (c - u)
        got = GuidedTeacher(teacher, 1.0, K)(x, t, labels, guidance=s)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        # the null class is a trained unconditional branch: it differs from every digit
        assert ((c - u).flatten(1).norm(dim=1) > 1e-2 * c.flatten(1).norm(dim=1)).all()

        student = Student.from_teacher(teacher, guidance_embedding=True)
        for scale in (0.0, 1.0, 1.5, 2.0, 4.0):
            out = student(x, t, labels, guidance=torch.full((5,), scale, dtype=torch.float64))
            torch.testing.assert_close(out, c, rtol=1e-12, atol=1e-12)


def test_class_accuracy_overall_and_per_class() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 3])
    predicted = torch.tensor([0, 0, 2, 0, 1, 0, 3])
    overall, per_class = class_accuracy(predicted, labels, 4)
    assert overall == pytest.approx(5 / 7)
    assert per_class[0] == pytest.approx(0.75) and per_class[1] == pytest.approx(0.5)
    assert math.isnan(per_class[2]) and per_class[3] == 1.0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        class_accuracy(predicted, labels.clamp(max=3) + 1, 4)


# --- a CFG-distilled student of a tiny conditional teacher ---------------------------------
@pytest.fixture(scope="module")
def cfg_run(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cond")
    teacher = write_tiny_teacher(base / "teacher", num_classes=K)
    ckpt = fit_two_steps(base / "run", teacher, "experiment=digits_cond_scd", "callbacks.ema=null")
    # Two steps barely move the zero-initialised guidance embedding: give it random weights (as
    # after training), so that s visibly changes the samples and a path ignoring it fails.
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(1)
    for key, value in state["state_dict"].items():
        if ".guidance_embedding." in key:
            value.copy_(0.5 * torch.randn(value.shape, generator=g))
    torch.save(state, ckpt)
    return {"base": base, "teacher": teacher, "ckpt": ckpt}


FRESH_SAMPLE = (
    LOAD_PIPELINE
    + r"""
import numpy as np

labels = torch.tensor([0, 1, 2, 3, 7, 9])
for nfe in (1, 2):
    for s in (1.0, 2.0):
        gen = torch.Generator().manual_seed(0)
        images = pipe(6, nfe, generator=gen, guidance_scale=s, class_labels=labels,
                      output_type="latent").images
        np.save(f"{out}/nfe{nfe}_s{s:g}.npy", images.numpy())
"""
)


@pytest.mark.slow
def test_export_loads_in_diffusers_and_samples_with_labels_and_guidance(
    cfg_run: dict[str, Path], tmp_path: Path
) -> None:
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_swapped, resolve_profile
    from scm_lightning.restore import rebuild_module

    folder = tmp_path / "export"
    assert commands.main("export", [f"ckpt={cfg_run['ckpt']}", f"out={folder}"]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["adapter"]["guidance"] == "embedding"
    out = tmp_path / "fresh"
    out.mkdir()
    run_without_project(FRESH_SAMPLE, folder, out, cwd=out)

    ckpt = load_checkpoint(cfg_run["ckpt"])
    module, _, _ = rebuild_module(ckpt)
    labels = torch.tensor([0, 1, 2, 3, 7, 9])
    with ema_swapped(module, ckpt, resolve_profile(ckpt, None)):
        for nfe in (1, 2):
            by_s = {}
            for s in (1.0, 2.0):
                gen = torch.Generator().manual_seed(0)
                ref = module.sample(6, nfe=nfe, generator=gen, class_labels=labels, guidance=s)
                got = torch.from_numpy(np.load(out / f"nfe{nfe}_s{s:g}.npy"))
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
                by_s[s] = ref
            assert by_s[1.0].abs().max() > 1e-2
            assert (by_s[2.0] - by_s[1.0]).abs().max() > 1e-4  # s reaches the student
            # labels reach the network: other labels give other images
            gen = torch.Generator().manual_seed(0)
            other = module.sample(6, nfe=nfe, generator=gen, class_labels=labels.flip(0))
            assert (other - by_s[1.0]).abs().max() > 1e-4


@pytest.mark.slow
def test_evaluate_guidances_reports_class_accuracy_per_scale(
    cfg_run: dict[str, Path], tmp_path: Path
) -> None:
    from scm_lightning.metrics.features import load_digits_classifier

    out = tmp_path / "eval"
    opts = [f"ckpt={cfg_run['ckpt']}", f"out={out}", "guidances=[1,2]", "num_samples=40",
            "batch_size=20", "nfes=[1,2]", "teacher_nfes=[2]", "teacher_grids=[t_mid]",
            "kid_subset_size=10", "kid_subsets=5"]  # fmt: skip
    assert commands.main("evaluate", opts) == 0
    result = json.loads((out / "evaluation.json").read_text())
    rows = {(r["model"], r["nfe"], r["guidance"]): r for r in result["results"]}
    assert set(rows) == {(m, n, s) for m, n in [("teacher", 2), ("student", 1), ("student", 2)]
                         for s in (1.0, 2.0)}  # fmt: skip
    for row in rows.values():
        assert 0 <= row["class_accuracy"] <= 1 and len(row["per_class_accuracy"]) == K
        for key in ("fd", "precision", "recall"):
            assert math.isfinite(row[key])
    # the guided teacher at s = 2 is another sampler than the conditional one
    assert rows[("teacher", 2, 2.0)]["fd"] != rows[("teacher", 2, 1.0)]["fd"]
    assert set(result["best_grid"]) == {"teacher_nfe2_s1", "teacher_nfe2_s2"}

    # the accuracy is the digits classifier's on exactly the images `sample` draws
    # (same seed, same labels drawn per batch of 20)
    sampled = tmp_path / "sampled"
    args = [f"ckpt={cfg_run['ckpt']}", f"out={sampled}", "nfe=2", "num=40", "batch_size=20",
            "guidance=2", f"seed={result['seed']}"]  # fmt: skip
    assert commands.main("sample", args) == 0
    npz = np.load(sampled / f"samples_nfe2_seed{result['seed']}.npz")
    images = torch.from_numpy(npz["samples"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    predicted = load_digits_classifier().logits(images).argmax(1)
    labels = torch.from_numpy(npz["labels"])
    want = (predicted == labels).double().mean().item()
    # uint8 quantisation of the saved samples may flip a borderline prediction
    assert abs(rows[("student", 2, 2.0)]["class_accuracy"] - want) <= 2 / 40
    per_class = rows[("student", 2, 2.0)]["per_class_accuracy"]
    counts = torch.bincount(labels, minlength=K).double()
    recombined = sum(c * a for c, a in zip(counts.tolist(), per_class, strict=True) if c)
    assert recombined / 40 == pytest.approx(rows[("student", 2, 2.0)]["class_accuracy"])


# --- bad inputs: one line, exit 2, nothing written -----------------------------------------
@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory) -> Path:
    """A student of an unconditional teacher: no labels, no guidance input."""
    base = tmp_path_factory.mktemp("plain")
    return fit_two_steps(base / "run", write_tiny_teacher(base / "teacher"))


def test_labels_and_guidance_errors_before_work(
    cfg_run: dict[str, Path], plain_ckpt: Path, tmp_path: Path, capsys
) -> None:
    from scm_lightning import cli
    from scm_lightning.config import ConfigError, compose_config, validate_config

    out = tmp_path / "never"
    cond, plain = f"ckpt={cfg_run['ckpt']}", f"ckpt={plain_ckpt}"
    cases = [
        (["sample", cond, "labels=[11]"], "labels=[11] is invalid: expected integers in [0, 10]"),
        (["sample", cond, "num=4", "labels=[1,2,3]"], "labels has 3 entries; expected 1 or num=4"),
        (["sample", cond, "labels=[[1]]"], "labels=[[1]] is invalid"),
        (["evaluate", cond, "guidance=1", "guidances=[1,2]"], "both given"),
        (["evaluate", cond, "guidances=[]"], "guidances=[] is invalid"),
        (["evaluate", cond, "guidances=[1,-2]"], "guidances=-2 is invalid"),
        (["evaluate", cond, "classifier=inception"], "classifier='inception' is invalid"),
        (["sample", plain, "labels=3"], "labels=3 given but the model is unconditional"),
        (["sample", plain, "guidance=2"], "guidance=2 given but the student has no guidance"),
        (["evaluate", plain, "guidances=[1,2]"], "guidances=[1, 2] given but the student has no"),
        (["evaluate", plain, "classifier=digits"], "classifier='digits' is invalid"),
    ]
    for args, message in cases:
        extra = ["nfes=[1]", "num_samples=8"] if args[0] == "evaluate" else []
        code = cli.main([*args, *extra, f"out={out}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, (args, err)
        assert not out.exists(), args
    # a guidance scale for a run without CFG distillation would be ignored: refused
    cfg = compose_config("fit", ["eval.guidance=2", "run_dir=unused"])
    with pytest.raises(ConfigError, match=r"eval\.guidance=2 is invalid: expected 1 unless"):
        validate_config(cfg)
