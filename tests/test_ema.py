"""EMA callback: profiles against hand-written loops, student-only, checkpoint resume, swaps."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scm_lightning.callbacks.ema import (
    EMA,
    exp_to_std,
    posthoc_coefficients,
    reconstruct_posthoc_ema,
    std_to_exp,
)

BATCH = 4
PROFILES = {
    "c": {"kind": "constant", "beta": 0.7},
    "hl": {"kind": "halflife", "halflife_kimg": 0.01, "rampup_ratio": 0.5},  # 10 images
    "pw": {"kind": "power", "std": 0.2},
}


def gamma_by_bisection(std: float) -> float:
    """Independent inverse of EDM2 Eq. 3 (σ_rel decreases in γ for γ ≥ 0)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = math.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3)))
        lo, hi = (mid, hi) if s > std else (lo, mid)
    return 0.5 * (lo + hi)


def ref_beta(spec: dict, step: int) -> float:
    if spec["kind"] == "constant":
        return spec["beta"]
    if spec["kind"] == "halflife":  # EDM training loop: images seen *before* this step
        h = min(spec["halflife_kimg"] * 1000, (step - 1) * BATCH * spec["rampup_ratio"])
        return 0.5 ** (BATCH / max(h, 1e-8))
    return (1 - 1 / step) ** (gamma_by_bisection(spec["std"]) + 1)


def ref_ema(initial: dict, trajectory: list[dict], spec: dict) -> dict:
    """Plain float64 loop: e ← β·e + (1−β)·w for parameters; buffers copied."""
    e = {k: v.double() for k, v in initial.items()}
    for step, w in enumerate(trajectory, start=1):
        beta = ref_beta(spec, step)
        for k in e:
            e[k] = beta * e[k] + (1 - beta) * w[k].double() if k != "seen" else w[k].double()
    return e


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("seen", torch.zeros(()))  # a buffer: copied, not averaged


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = Student()
        self.teacher = nn.Linear(4, 3).requires_grad_(False)
        self.sigma_data = 0.5
        self.val_seen: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.student.seen += 1
        return ((self.student.lin(x) - self.teacher(x)) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_seen.append((self.global_step, self.student.lin.weight.detach().clone()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.5)


class Recorder(Callback):
    def __init__(self) -> None:
        self.initial: dict = {}
        self.trajectory: list[dict] = []

    def on_fit_start(self, trainer, pl_module):
        self.initial = {k: v.clone() for k, v in pl_module.student.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trajectory.append({k: v.clone() for k, v in pl_module.student.state_dict().items()})


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(20, 4, generator=g), torch.zeros(20))
    return DataLoader(data, batch_size=BATCH, shuffle=False)  # 5 steps per epoch


def fit(max_steps: int, callbacks: list, module: TinyModule | None = None, ckpt=None, root=None):
    module = module or TinyModule()
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader(), ckpt_path=ckpt)
    return trainer, module


def test_std_to_exp_inverts_edm2_eq3() -> None:
    for std in (0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = std_to_exp(std)
        assert gamma == pytest.approx(gamma_by_bisection(std), rel=1e-9)
        assert exp_to_std(gamma) == pytest.approx(std, rel=1e-12)
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's σ_rel = 0.05
    with pytest.raises(ValueError, match="std"):
        std_to_exp(0.5)
    with pytest.raises(ValueError, match="kind"):
        EMA({"x": {"kind": "karras", "beta": 0.9}})
    with pytest.raises(ValueError, match="validate_with"):
        EMA({"x": {"kind": "constant", "beta": 0.9}}, validate_with="y")


def test_profiles_match_reference_and_validation_uses_ema() -> None:
    ema, rec = EMA(PROFILES, validate_with="pw"), Recorder()
    _, module = fit(10, [rec, ema])
    teacher_before = TinyModule().teacher.state_dict()
    assert len(rec.trajectory) == 10
    for name, spec in PROFILES.items():
        expected = ref_ema(rec.initial, rec.trajectory, spec)
        got = dict(zip(ema._names, ema._ema[name], strict=True))
        assert set(got) == {"lin.weight", "lin.bias", "seen"}  # student only, no teacher
        for k in expected:
            torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-6, atol=1e-6)
    # The averages differ from the online weights (so the swap tests below can fail).
    assert not torch.allclose(ema._ema["pw"][0], module.student.lin.weight)
    # Teacher untouched.
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    # Validation (after steps 5 and 10) saw the "pw" average, not the online weights.
    assert [s for s, _ in module.val_seen] == [5, 10]
    for step, w in module.val_seen:
        expected = ref_ema(rec.initial, rec.trajectory[:step], PROFILES["pw"])["lin.weight"]
        torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=1e-6)
    # Training continued with the online weights: identical to a run without EMA.
    rec_plain = Recorder()
    _, plain = fit(10, [rec_plain])
    # (two module instances: equal up to float32 rounding, not necessarily bit for bit)
    for a, b in zip(rec.trajectory, rec_plain.trajectory, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        module.student.lin.weight, plain.student.lin.weight, rtol=1e-6, atol=1e-7
    )
    # The context manager swaps in and back.
    online = module.student.lin.weight.clone()
    with ema.swapped(module, "c") as name:
        assert name == "c" and torch.equal(module.student.lin.weight, ema._ema["c"][0])
    assert torch.equal(module.student.lin.weight, online)
    exported = ema.ema_state_dict(module, "hl")
    assert torch.equal(exported["lin.weight"], ema._ema["hl"][0])


def test_checkpoint_resume_is_exact(tmp_path) -> None:
    straight = EMA(PROFILES)
    fit(10, [straight])
    first = EMA(PROFILES)
    trainer, _ = fit(5, [first], root=tmp_path)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert saved["last_step"] == 5 and saved["nimg"] == 5 * BATCH
    resumed = EMA(PROFILES)
    fit(10, [resumed], ckpt=str(ckpt), root=tmp_path)
    assert resumed.last_step == 10 and resumed.nimg == straight.nimg == 10 * BATCH
    for name in PROFILES:
        for a, b in zip(resumed._ema[name], straight._ema[name], strict=True):
            assert torch.equal(a, b)


def test_posthoc_reconstruction_matches_direct_power_ema(tmp_path) -> None:
    student = nn.Linear(3, 2)
    snap = EMA({"a": {"kind": "power", "std": 0.05}, "b": {"kind": "power", "std": 0.10}})
    direct = EMA({"t": {"kind": "power", "std": 0.07}})
    g = torch.Generator().manual_seed(1)
    phase = torch.randn(8, generator=g)
    for t in range(1, 401):  # a drifting, noisy "training trajectory"
        w = torch.sin(t / 60.0 + phase) + 0.3 * torch.randn(8, generator=g)
        nn.utils.vector_to_parameters(w, student.parameters())
        snap.update(student, t, BATCH)
        direct.update(student, t, BATCH)
        if t % 20 == 0:
            snap.save_snapshots(tmp_path, t)
    assert len(list(tmp_path.glob("phema-*.safetensors"))) == 40
    rec = reconstruct_posthoc_ema(tmp_path, target_std=0.07)
    for i, (k, target) in enumerate(zip(direct._names, direct._ema["t"], strict=True)):
        err = (rec[k] - target).abs().max().item()
        nearest = min((snap._ema[n][i] - target).abs().max().item() for n in ("a", "b"))
        assert err < 1e-3 and err < 0.01 * nearest  # measured ≈1e-4 vs ≈0.1
    # A target that is a snapshot is reproduced by weight 1 on that snapshot.
    x = posthoc_coefficients([100, 200, 100, 200], [0.05, 0.05, 0.1, 0.1], 200, 0.1)
    assert x == pytest.approx([0, 0, 0, 1], abs=1e-6)


def test_snapshots_written_during_fit(tmp_path) -> None:
    ema = EMA(
        {"p": {"kind": "power", "std": 0.1}, "c": {"kind": "constant", "beta": 0.9}},
        snapshot_every_n_steps=2,
        snapshot_dir=str(tmp_path / "snaps"),
    )
    fit(5, [ema])
    names = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert names == [f"phema-{s:09d}-p.safetensors" for s in (2, 4)]


def test_dtensor_student_local_shards(tmp_path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = nn.Linear(4, 6)
        sharded = nn.Linear(4, 6)
        sharded.load_state_dict(plain.state_dict())
        fully_shard(sharded)
        assert isinstance(sharded.weight, DTensor)
        spec = {"c": {"kind": "constant", "beta": 0.6}, "p": {"kind": "power", "std": 0.1}}
        ema_plain, ema_sharded = EMA(spec), EMA(spec)
        for step in range(1, 4):
            with torch.no_grad():
                for m in (plain, sharded):
                    m.weight.mul_(0.9).add_(0.1 * step)
                    m.bias.add_(0.2)
            ema_plain.update(plain, step, BATCH)
            ema_sharded.update(sharded, step, BATCH)
        for name in spec:
            for a, b in zip(ema_sharded._ema[name], ema_plain._ema[name], strict=True):
                assert isinstance(a, DTensor)
                torch.testing.assert_close(a.full_tensor(), b, rtol=0, atol=1e-7)
        holder = nn.Module()
        holder.student = sharded
        online = sharded.weight.full_tensor().clone()
        with ema_sharded.swapped(holder, "p"):
            torch.testing.assert_close(sharded.weight.full_tensor(), ema_plain._ema["p"][0])
        assert torch.equal(sharded.weight.full_tensor(), online)
        restored = EMA(spec)
        restored.load_state_dict(ema_sharded.state_dict())
        restored._ensure_init(sharded)
        assert torch.equal(
            restored._ema["p"][0].full_tensor(), ema_sharded._ema["p"][0].full_tensor()
        )
    finally:
        dist.destroy_process_group()
