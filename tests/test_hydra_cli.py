"""`fit`/`pretrain` behave as Hydra apps: sweeps (-m), --cfg, --help, --config-dir,
hydra.run.dir and the .hydra/ run record, through the real CLI (subprocesses)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from scm_lightning.hydra_app import hydra_argv

TESTS = Path(__file__).parent

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


def error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_a_bare_cfg_means_the_job_config() -> None:
    assert hydra_argv(["--cfg", "loss=sct"]) == ["--cfg", "job", "loss=sct"]
    assert hydra_argv(["loss=sct", "--cfg"]) == ["loss=sct", "--cfg", "job"]
    assert hydra_argv(["--cfg", "hydra"]) == ["--cfg", "hydra"]


@pytest.mark.slow
def test_cfg_prints_the_composed_config_to_stdout(tmp_path: Path) -> None:
    res = run_cli("fit", "--cfg", "loss=sct", "optim.lr=3e-5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["loss"]["mode"] == "sct" and cfg["optim"]["lr"] == 3e-5 and "hydra" not in cfg
    res = run_cli("pretrain", "--cfg", "hydra", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    hydra = yaml.safe_load(res.stdout)["hydra"]
    assert hydra["run"]["dir"] == "runs/${task}/${now:%Y-%m-%d_%H-%M-%S}"
    assert hydra["sweep"]["dir"] == "runs/${task}/multirun/${now:%Y-%m-%d_%H-%M-%S}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_help_lists_each_commands_config_groups_and_options(tmp_path: Path) -> None:
    res = run_cli("fit", "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "usage: python -m scm_lightning fit" in res.stdout
    assert "loss: dscm, scd, scd_vsd, sct, vsd" in res.stdout
    assert "teacher: bundled_digits, bundled_digits_cond, custom, diffusers" in res.stdout
    assert "trainer: cpu, ddp, default, fsdp, gpu" in res.stdout
    assert "tangent_norm_c:" in res.stdout  # the composed config follows the groups
    res = run_cli("pretrain", "--help", "net.block_channels=[8,8]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "usage: python -m scm_lightning pretrain" in res.stdout
    assert "net: digits_unet" in res.stdout and "- 8\n" in res.stdout
    assert "prepare_from: null" in res.stdout  # pretrain's own config


@pytest.mark.slow
def test_config_dir_adds_options_to_the_packaged_groups(tmp_path: Path) -> None:
    mine = tmp_path / "my_conf" / "loss"
    mine.mkdir(parents=True)
    (mine / "wide.yaml").write_text("defaults:\n  - scd\n  - _self_\np_std: 2.5\n")
    conf = str(tmp_path / "my_conf")
    res = run_cli("fit", "--config-dir", conf, "loss=wide", "--cfg", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    loss = yaml.safe_load(res.stdout)["loss"]
    assert loss["p_std"] == 2.5 and loss["mode"] == "scd"
    # without the folder the option is unknown
    line = error_line(run_cli("fit", "loss=wide", cwd=tmp_path))
    assert "unknown loss 'wide'" in line
    line = error_line(run_cli("fit", "--config-dir", str(tmp_path / "nope"), cwd=tmp_path))
    assert "--config-dir" in line and "no such directory" in line


@pytest.mark.slow
def test_unknown_flag_is_one_line(tmp_path: Path) -> None:
    line = error_line(run_cli("fit", "--frobnicate", cwd=tmp_path))
    assert "--frobnicate" in line


@pytest.mark.slow
def test_a_bad_value_in_a_sweep_stops_it_before_the_first_job(tmp_path: Path) -> None:
    line = error_line(run_cli("fit", "-m", "debug=fdr", "optim.lr=1e-4,0", cwd=tmp_path))
    assert line == "error: optim.lr=0 is invalid: expected a finite number > 0"
    line = error_line(run_cli("fit", "--multirun", "loss=scd,nope", cwd=tmp_path))
    assert "unknown loss 'nope'" in line
    line = error_line(run_cli("fit", "-m", f"run_dir={tmp_path}", "seed=0,1", cwd=tmp_path))
    assert "hydra.sweep.dir" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_hydra_run_dir_is_the_run_dir_and_holds_the_run_record(tmp_path: Path) -> None:
    out = tmp_path / "where"
    res = run_cli(
        "pretrain", f"hydra.run.dir={out}", "trainer.max_steps=1", *TINY_NET, *QUIET, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    record = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    assert Path(record["run_dir"]) == out and record["trainer"]["max_steps"] == 1
    overrides = yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.max_steps=1" in overrides
    hydra = yaml.safe_load((out / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert Path(hydra["runtime"]["output_dir"]) == out
    assert (out / "pretrain.log").is_file()  # Hydra's job log
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_multirun_sweep_of_two_learning_rates(tmp_path: Path, monkeypatch) -> None:
    """`fit -m optim.lr=1e-4,5e-5 debug=fdr`: two jobs in runs/fit/multirun/<time>/{0,1},
    each with its .hydra record and its own run_dir; a DDP child would rerun its job alone."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    res = run_cli(
        "fit", "-m", "debug=fdr", "eval=none", "callbacks.samples=null", "optim.lr=1e-4,5e-5",
        "+callbacks.argv._target_=_hydra_probe.RecordArgv",
        "+callbacks.argv.path=${run_dir}/argv.json", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    runs = tmp_path / "runs" / "fit"
    assert [p.name for p in runs.iterdir()] == ["multirun"]  # no single-run folder
    (sweep,) = (runs / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job, lr in zip(jobs, ("0.0001", "5e-05"), strict=True):
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["optim"]["lr"] == float(lr)
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"optim.lr={lr}" in overrides and "debug=fdr" in overrides
        resolved = yaml.safe_load((job / "config.yaml").read_text())
        assert Path(resolved["run_dir"]) == job.resolve() and resolved["optim"]["lr"] == float(lr)
        assert (job / "checkpoints" / "last.ckpt").is_file()
        # what Lightning relaunches DDP children with: this job alone, in this folder
        argv = json.loads((job / "argv.json").read_text())
        assert argv[1] == "fit" and "-m" not in argv and f"optim.lr={lr}" in argv
        assert not any("," in a for a in argv[2:])  # the job's values, not the sweep
        assert argv[-1] == f"run_dir='{resolved['run_dir']}'"


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sweep_of_ddp_jobs_runs_each_job_with_its_own_ranks(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    """Lightning relaunches rank 1 of each job with that job's argv into that job's folder; the
    second job starts its own process group (the first one's is gone with its ranks)."""
    sweep = tmp_path / "sweep"
    res = run_cli(
        "fit", "-m", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "debug=fdr",
        "eval=none", "callbacks.samples=null", "teacher=diffusers",
        f"teacher.path={tiny_teacher}", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "results.json").is_file()
        assert (sweep / job / "train_ddp_process_1.log").is_file()  # rank 1 ran in this folder
        assert yaml.safe_load((sweep / job / "config.yaml").read_text())["seed"] == int(job)


@pytest.mark.slow
def test_ckpt_path_last_resumes_the_latest_run_in_its_own_folder(tmp_path: Path) -> None:
    """No run_dir: the first run lands in runs/pretrain/<time>; `ckpt_path=last` continues
    that folder (Hydra's output folder follows it) instead of opening a new one."""
    common = ["callbacks.checkpoint.every_n_train_steps=1", *TINY_NET, *QUIET]
    res = run_cli("pretrain", "trainer.max_steps=1", *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (first,) = (tmp_path / "runs" / "pretrain").iterdir()
    res = run_cli("pretrain", "trainer.max_steps=2", "ckpt_path=last", *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert list((tmp_path / "runs" / "pretrain").iterdir()) == [first]
    assert (first / "checkpoints" / "step0000002.ckpt").is_file()
    overrides = yaml.safe_load((first / ".hydra" / "overrides.yaml").read_text())
    assert "ckpt_path=last" in overrides  # the record is the latest invocation's
    record = yaml.safe_load((first / ".hydra" / "config.yaml").read_text())
    assert record["ckpt_path"] == str(first / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_an_input_rejected_inside_the_job_is_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    """Caught by training.run's data check (inside Hydra's job): still one error line (no
    Hydra report), no .hydra record, no log, and the run folder Hydra created is removed."""
    import numpy as np

    data = np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype("f4")
    data[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", images=data)
    res = run_cli(
        "pretrain", "data=tensors", f"data.path={tmp_path / 'nan.npz'}", *TINY_NET, *QUIET,
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Error executing job" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.lower().startswith("error")]
    assert len(errors) == 1 and "non-finite values" in errors[0], res.stderr
    assert not (tmp_path / "runs").exists()
