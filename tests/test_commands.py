"""`sample`, `evaluate`, `export` commands: outputs, metrics against torch-fidelity, and one-line
errors (exit code 2) for bad input."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scm_lightning import cli, commands
from scm_lightning.config import ConfigError
from scm_lightning.metrics import quality
from test_export import tiny_run  # the shared tiny pretrain + fit run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_export.one_thread
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_run(tmp_path_factory.getbasetemp() / "scm_tiny_run")


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err.strip()


# --- metrics -----------------------------------------------------------------------------------
def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel() -> None:
    """torch-fidelity's KID against the unbiased MMD² written out pair by pair."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64) + 0.3

    def k(u, v):
        return (float(u @ v) / 4 + 1) ** 3

    pairs = list(itertools.permutations(range(6), 2))
    xx = sum(k(x[i], x[j]) for i, j in pairs) / len(pairs)
    yy = sum(k(y[i], y[j]) for i, j in pairs) / len(pairs)
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    # one subset of all 6 points: a permutation, and MMD² does not depend on the order
    mean, std = quality.kernel_inception_distance(x, y, subsets=1, subset_size=6)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0.0
    # the subset size is capped by the smaller set; a fixed seed gives the same subsets
    a = quality.kernel_inception_distance(x, y[:5], subsets=4, subset_size=100, seed=3)
    assert a == quality.kernel_inception_distance(x, y[:5], subsets=4, subset_size=100, seed=3)
    same, _ = quality.kernel_inception_distance(x, x.clone(), subsets=5, subset_size=6)
    far, _ = quality.kernel_inception_distance(x, x + 5.0, subsets=5, subset_size=6)
    assert abs(same) < far
    with pytest.raises(ValueError, match="at least 2 samples"):
        quality.kernel_inception_distance(x[:1], y)


def test_precision_recall_on_known_points() -> None:
    """1-d points where the k-NN balls (k = 3) are known by hand."""
    real = torch.arange(10.0, dtype=torch.float64)[:, None]  # radii 3 at the ends, 2 inside
    gen = torch.tensor([[0.5], [1.5], [2.5], [3.5]], dtype=torch.float64)  # radii 3, 2, 2, 3
    # every generated point lies in a real ball; the generated balls cover [-2.5, 6.5]: 0..6
    assert quality.precision_recall(gen, real, k=3) == pytest.approx((1.0, 0.7), abs=1e-6)
    # an outlier at 100 lies in no real ball (precision 4/5), and its own ball (radius 98.5,
    # to its 3rd neighbour 1.5) covers 2..9 (the known outlier weakness: recall 1)
    outlier = torch.cat([gen, torch.tensor([[100.0]], dtype=torch.float64)])
    assert quality.precision_recall(outlier, real, k=3) == pytest.approx((0.8, 1.0), abs=1e-6)
    assert quality.precision_recall(real, real.clone()) == (1.0, 1.0)
    with pytest.raises(ValueError, match="needs more than 3 samples"):
        quality.precision_recall(gen[:3], real, k=3)


# --- option parsing and bad input ----------------------------------------------------------------
def test_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'nfes'.*allowed keys: \[.*'nfe'"):
        commands.parse_options("sample", ["ckpt=a", "out=b", "nfes=2"])
    with pytest.raises(ConfigError, match="missing required out="):
        commands.parse_options("export", ["ckpt=a"])
    with pytest.raises(ConfigError, match="expected key=value, got 'ckpt'"):
        commands.parse_options("sample", ["ckpt"])
    opts = commands.parse_options("sample", ["ckpt=a", "out=b", "times=[1.56,1.1]", "labels=3"])
    assert opts["times"] == [1.56, 1.1] and opts["labels"] == 3 and opts["num"] == 64


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.ckpt"
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    unsafe = tmp_path / "unsafe.ckpt"  # loadable only with weights_only=False
    torch.save({"state_dict": {}, "obj": argparse.Namespace(a=1)}, unsafe)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    cases = [
        (missing, "does not exist"),
        (text, "is not a readable PyTorch checkpoint"),
        (unsafe, "pickled objects (argparse.Namespace) that torch.load(weights_only=True) refuses"),
        (foreign, "no 'scm_config'"),
    ]
    for path, msg in cases:
        for cmd in ("sample", "evaluate", "export"):
            code, err = _cli([cmd, f"ckpt={path}", f"out={tmp_path / 'o'}"], capsys)
            assert code == 2, (cmd, path, err)
            assert err.startswith("error: ") and msg in err and str(path) in err
            assert len(err.splitlines()) == 1
    code, err = _cli(["sample", f"ckpt={tmp_path}", f"out={tmp_path / 'o'}"], capsys)
    assert code == 2 and "neither a checkpoint file nor an exported folder" in err


def test_bad_options_on_a_real_checkpoint(
    run_paths: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    ckpt, out = run_paths["fit_ckpt"], f"out={tmp_path / 'o'}"
    code, err = _cli(["sample", f"ckpt={ckpt}", out, "ema=ema_0.999"], capsys)
    assert code == 2 and "'ema_0.999'" in err and "stored: ['power_0.05']" in err
    code, err = _cli(["export", f"ckpt={ckpt}", out, "ema=nope"], capsys)
    assert code == 2 and "stored: ['power_0.05']" in err
    code, err = _cli(["sample", f"ckpt={ckpt}", out, "nfe=0"], capsys)
    assert code == 2 and "nfe=0 is invalid: expected an integer >= 1" in err
    code, err = _cli(["evaluate", f"ckpt={ckpt}", out, "nfes=[1,0]"], capsys)
    assert code == 2 and "nfes=[1, 0] is invalid" in err
    code, err = _cli(["sample", f"ckpt={ckpt}", out, "nfe=2", "times=[1.1,1.3]"], capsys)
    assert code == 2 and "strictly decreasing" in err
    code, err = _cli(["sample", f"ckpt={run_paths['pretrain_ckpt']}", out, "t_mid=1.0"], capsys)
    assert code == 2 and "t_mid= applies to consistency students" in err
    code, err = _cli(["evaluate", f"ckpt={ckpt}", out, "feature=dinov2"], capsys)
    assert code == 2 and "feature_weights=None is invalid for feature='dinov2'" in err
    assert "DINOv2 features need a local checkpoint" in err and len(err.splitlines()) == 1

    # Inception without weights and without network (simulated: no download possible)
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    code, err = _cli(
        ["evaluate", f"ckpt={ckpt}", out, "feature=inception", "num_samples=8"], capsys
    )
    assert code == 2 and "Inception requested without weights and without network" in err
    assert "feature_weights=" in err and len(err.splitlines()) == 1
    code, err = _cli(
        [
            "evaluate",
            f"ckpt={ckpt}",
            out,
            "feature=inception",
            f"feature_weights={tmp_path / 'missing.pth'}",
        ],
        capsys,
    )
    assert code == 2 and "missing.pth' does not exist: expected a local weights file" in err


# --- the commands ----------------------------------------------------------------------------
def test_sample_writes_png_and_npz(run_paths: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = [f"ckpt={run_paths['fit_ckpt']}", f"out={out}", "nfe=2", "num=6", "seed=3"]
    assert commands.main("sample", [*args, "batch_size=4"]) == 0
    data = np.load(out / "samples_nfe2_seed3.npz")
    assert data["samples"].shape == (6, 8, 8, 1) and data["samples"].dtype == np.uint8
    assert data["labels"].tolist() == [-1] * 6  # unconditional
    grid = Image.open(out / "samples_nfe2_seed3.png")
    assert grid.size == ((3 * 9 + 1) * 4, (2 * 9 + 1) * 4)  # 3 per row, 1 px pad, scale 4
    # The same seed from the exported folder: the same uint8 images (batched the same way).
    folder = tmp_path / "exported"
    assert commands.main("export", [f"ckpt={run_paths['fit_ckpt']}", f"out={folder}"]) == 0
    assert (
        commands.main(
            "sample", [f"ckpt={folder}", f"out={tmp_path / 'f'}", *args[2:], "batch_size=4"]
        )
        == 0
    )
    again = np.load(tmp_path / "f" / "samples_nfe2_seed3.npz")
    # two module instances: float rounding may flip a uint8 rounding boundary, nothing more
    diff = np.abs(again["samples"].astype(np.int16) - data["samples"].astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    # explicit times and the raw (non-EMA) weights
    assert (
        commands.main("sample", [*args[:2], "num=6", "seed=3", "times=[1.5,1.0]", "ema=online"])
        == 0
    )
    raw = np.load(out / "samples_nfe2_seed3.npz")
    assert raw["samples"].shape == (6, 8, 8, 1)


def test_evaluate_writes_json_and_history_plot(run_paths: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    args = [
        f"ckpt={run_paths['fit_ckpt']}",
        f"out={out}",
        "num_samples=24",
        "batch_size=12",
        "nfes=[1,2]",
        "teacher_nfes=[3,2]",
        "kid_subsets=4",
        "kid_subset_size=16",
    ]
    assert commands.main("evaluate", args) == 0
    result = json.loads((out / "evaluation.json").read_text())
    rows = {(r["model"], r["nfe"], r["sampler"]): r for r in result["results"]}
    grids = ("edm", "uniform", "t_mid")  # the run's eval.teacher_grids
    assert set(rows) == {("student", 1, "consistency"), ("student", 2, "consistency")} | {
        ("teacher", nfe, f"{solver}/{grid}") for nfe, solver in ((3, "heun"), (2, "ddim"))
        for grid in grids
    }  # fmt: skip
    for nfe in (3, 2):  # the best grid is the one with the lowest FD, and it is named
        teacher = [r for r in result["results"] if r["model"] == "teacher" and r["nfe"] == nfe]
        best = min(teacher, key=lambda r: r["fd"])
        assert result["best_grid"][f"teacher_nfe{nfe}"] == {"sampler": best["sampler"],
                                                            "fd": best["fd"]}  # fmt: skip
        assert [r["sampler"] for r in teacher if r["best"]] == [best["sampler"]]
    for r in rows.values():
        assert r["fd"] > 0 and np.isfinite(r["kid"]) and 0 <= r["precision"] <= 1
        assert 0 <= r["recall"] <= 1
    assert result["ema_profile"] == "power_0.05" and result["reference_images"] == 24
    # FD agrees with the framework's own Fréchet code on the same features (checked by
    # recomputing the teacher's 3-NFE FD through evaluation.sampled_stats)
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.evaluation import reference_stats, sampled_stats
    from scm_lightning.metrics.features import build_feature_extractor
    from scm_lightning.metrics.frechet import frechet_distance_from_stats
    from scm_lightning.restore import rebuild_module

    module, _, dm = rebuild_module(load_checkpoint(run_paths["fit_ckpt"]))
    net = build_feature_extractor("digits")
    ref = reference_stats(dm.reference_images(24), 12, net, torch.device("cpu"))
    gen = sampled_stats(
        lambda n, g: module.teacher_sample(n, nfe=3, generator=g),
        24,
        12,
        result["seed"],
        net,
        torch.device("cpu"),
    )
    assert rows[("teacher", 3, "heun/edm")]["fd"] == pytest.approx(
        frechet_distance_from_stats(gen, ref), rel=1e-9
    )
    # the FID history of the run (FID at steps 1 and 2) is plotted
    assert result["fid_history_plot"] == str(out / "fid_history.png")
    history = json.loads((out / "fid_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    assert Image.open(out / "fid_history.png").size[0] > 100


def test_print_cfg(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["export", "ckpt=x.ckpt", "out=exported", "--cfg"]) == 0
    printed = capsys.readouterr().out
    assert "ckpt: x.ckpt" in printed and "out: exported" in printed
