"""DDP and FSDP2 on CPU/gloo with 2 processes through the real CLI, against single-process runs.

Why the comparisons are exact: the training sampler gives W ranks × batch B exactly the images
one process sees in W micro-batches of B (``EpochShuffleSampler``), and the noise of a
micro-batch is keyed by (seed, step, micro·W + rank) (``modules.step_rng``). So a 2-rank run
and a 1-process run with ``accumulate_grad_batches=2`` draw the same data and the same noise,
and their weights may differ only by float summation order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scm_lightning.losses import scm_loss
from scm_lightning.modules import step_generator

TESTS = Path(__file__).parent
STEPS = 3
BATCH = 4
FSDP_TOL = 1e-5  # FSDP2 vs DDP (different reduction order)


def overrides(teacher: Path, run_dir: Path, dump: Path, *extra: str) -> list[str]:
    return [
        "teacher=diffusers",
        f"teacher.path={teacher}",
        "trainer.accelerator=cpu",
        f"trainer.max_steps={STEPS}",
        "trainer.enable_progress_bar=false",
        f"data.batch_size={BATCH}",
        "loss.warmup_steps=4",
        "callbacks.fid=null",
        "callbacks.progress=null",
        "callbacks.samples=null",
        "callbacks.checkpoint.every_n_train_steps=1",
        "+callbacks.dump._target_=_scale_probe.Dump",
        f"+callbacks.dump.path={dump}",
        "eval=none",
        f"run_dir={run_dir}",
        *extra,
    ]


def launch(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m scm_lightning fit ...``: Lightning relaunches the other ranks the same way."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.pop("SCM_RUN_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "scm_lightning", "fit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def load(dump: Path, rank: int) -> dict:
    return torch.load(dump / f"rank{rank}.pt", weights_only=False)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 1-process reference (accumulating 2 micro-batches), one DDP and one FSDP2 run."""
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for name, extra in {
        "single": ["trainer=cpu", "trainer.accumulate_grad_batches=2"],
        "ddp": ["trainer=ddp", "trainer.devices=2"],
        "fsdp": ["trainer=fsdp", "trainer.devices=2"],
    }.items():
        launch(overrides(tiny_teacher, root / name, root / f"dump_{name}", *extra), cwd=root)
        out[name] = root
    return {name: root / f"dump_{name}" for name in out} | {"root": root}


@pytest.mark.distributed
def test_ddp_ranks_agree_and_equal_single_process(runs: dict[str, Path]) -> None:
    r0, r1, single = load(runs["ddp"], 0), load(runs["ddp"], 1), load(runs["single"], 0)
    assert r0["step"] == r1["step"] == single["step"] == STEPS
    assert max_diff(r0["student"], r1["student"]) == 0.0  # DDP keeps replicas bit-identical
    assert max_diff(r0["student"], single["student"]) < 1e-6
    assert max_diff(r0["ema"], single["ema"]) < 1e-6
    # the gradients themselves agree, and they are far larger than the tolerance
    assert max_diff(r0["first_grad"], single["first_grad"]) < 1e-6
    assert max(float(g.abs().max()) for g in single["first_grad"].values()) > 1e-3


@pytest.mark.distributed
def test_fsdp2_equals_ddp_and_resumes_from_its_distributed_checkpoint(
    runs: dict[str, Path], tiny_teacher: Path
) -> None:
    f0, f1, ddp = load(runs["fsdp"], 0), load(runs["fsdp"], 1), load(runs["ddp"], 0)
    assert f0["sharded"] and f1["sharded"]
    assert max_diff(f0["student"], f1["student"]) == 0.0
    assert max_diff(f0["student"], ddp["student"]) < FSDP_TOL
    assert max_diff(f0["ema"], ddp["ema"]) < FSDP_TOL
    ckpt = runs["root"] / "fsdp" / "checkpoints" / "step0000001.ckpt"
    assert ckpt.is_dir()  # a distributed (per-rank shard) checkpoint
    dump = runs["root"] / "dump_fsdp_resumed"
    args = overrides(tiny_teacher, runs["root"] / "fsdp_resumed", dump, "trainer=fsdp")
    launch([*args, "trainer.devices=2", f"ckpt_path={ckpt}"], cwd=runs["root"])
    resumed = load(dump, 0)
    assert resumed["step"] == STEPS and resumed["r"] == f0["r"]
    assert max_diff(resumed["student"], f0["student"]) < 1e-6
    assert max_diff(resumed["ema"], f0["ema"]) < 1e-6


@pytest.mark.distributed
def test_fsdp2_without_fully_shard_diverges(runs: dict[str, Path], tiny_teacher: Path) -> None:
    """The failure mode the checks above guard against: ModelParallelStrategy without
    ``fully_shard`` syncs nothing, and the two ranks (different images) drift apart."""
    dump = runs["root"] / "dump_noshard"
    args = overrides(tiny_teacher, runs["root"] / "noshard", dump, "trainer=fsdp")
    launch(
        [*args, "trainer.devices=2", "+callbacks.noshard._target_=_scale_probe.SkipSharding"],
        cwd=runs["root"],
    )
    r0, r1 = load(dump, 0), load(dump, 1)
    assert not r0["sharded"]
    # the replica check of the FSDP test would fail on this run
    assert max_diff(r0["student"], r1["student"]) > FSDP_TOL


@pytest.mark.distributed  # shares the runs fixture
def test_accumulating_two_micro_batches_equals_one_double_batch(runs: dict[str, Path]) -> None:
    """Lightning's accumulated gradient (2 micro-batches of B, noise slots 0 and 1) equals the
    autograd gradient of the loss of one batch of 2B images whose noise is drawn the same way."""
    import lightning as L
    from omegaconf import OmegaConf

    from scm_lightning.data.sampler import EpochShuffleSampler
    from scm_lightning.training import build_datamodule, build_distillation

    cfg = OmegaConf.load(runs["root"] / "single" / "config.yaml")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    module = build_distillation(cfg, dm)
    module.tangent_warmup_r = 0.0  # step 0 of a warmup
    data = dm.train_dataset()
    idx = list(EpochShuffleSampler(len(data), 2 * BATCH, cfg.seed))[: 2 * BATCH]
    x0 = torch.stack([data[i][0] for i in idx])
    losses = []
    for micro in range(2):  # the same (t, z) draws as micro-batch `micro` of step 0
        gen = step_generator(cfg.seed, 0, micro, x0.device)
        out = scm_loss(
            module.student,
            x0[micro * BATCH : (micro + 1) * BATCH],
            module.loss_cfg,
            r=0.0,
            teacher=module.teacher,
            generator=gen,
        )
        assert float(out.masked_fraction) == 0.0
        losses.append(out.loss)
    (sum(losses) / 2).backward()  # the mean over all 2B images: one batch of twice the size
    lightning_grad = load(runs["single"], 0)["first_grad"]
    grads = {n: p.grad for n, p in module.student.named_parameters() if p.grad is not None}
    assert max_diff(grads, lightning_grad) < 1e-6
