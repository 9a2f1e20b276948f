"""Student-only exponential moving averages: constant, EDM half-life and EDM2 power profiles.

Only ``pl_module.student`` is averaged (never the frozen teacher). Parameters are averaged;
buffers are copied from the online student (as EDM/EDM2 do) unless ``average_buffers``.
Several profiles run at once, each updated in place with one fused ``torch._foreach_lerp_``
per step. The averages live in the callback's ``state_dict`` (so in every checkpoint) and
are swapped into the student for validation and, through :meth:`EMA.swapped`, for sampling,
FID and export; the online weights come back afterwards.

FSDP2: when the student's parameters are DTensors the averages are DTensors with the same
placements, and every update/swap works on the local shards (``to_local()`` under no-grad
shares storage), so no communication happens per step. Checkpoints then hold DTensors,
which Lightning's distributed checkpointing saves shard by shard.

EDM2 post-hoc EMA (Karras et al. 2024, §3.1, App. C): with ``snapshot_every_n_steps`` the
power profiles are written as safetensors snapshots, from which
:func:`reconstruct_posthoc_ema` synthesises a power EMA of any other length afterwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

KINDS = ("constant", "halflife", "power")


# --- pure profile math ---------------------------------------------------------------------
def exp_to_std(gamma: float) -> float:
    """Relative std of the power profile ``p(τ) ∝ τ^γ`` (EDM2 Eq. 3): ``√((γ+1)/((γ+2)²(γ+3)))``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(std: float) -> float:
    """Exponent γ of the power EMA with relative std ``σ_rel`` (inverse of EDM2 Eq. 3).

    Squaring Eq. 3 gives the cubic ``γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0``; the EMA is
    its largest real root (the other branch has γ < −1 or describes a near-uniform average).
    """
    if not 0.0 < std < exp_to_std(0.0) * 1.001:
        raise ValueError(f"power EMA std (σ_rel) must be in (0, ~0.289), got {std}")
    s = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    gamma = float(roots[np.abs(roots.imag) < 1e-9].real.max())
    if gamma <= -1.0:
        raise ValueError(f"power EMA std {std} gives exponent {gamma} <= -1")
    return gamma


def power_beta(step: int, gamma: float) -> float:
    """Power EMA decay after ``step ≥ 1`` updates: ``β = (1 − 1/t)^(γ+1)`` (EDM2 App. C)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def halflife_beta(
    nimg_before: float, batch_images: float, halflife_kimg: float, rampup_ratio: float | None
) -> float:
    """EDM's EMA decay: half-life in images, capped at ``rampup_ratio × images seen`` (EDM, App. F).

    ``β = 0.5^(batch / max(h, 1e-8))`` with ``h = min(1000·halflife_kimg, rampup·nimg_before)``.
    """
    h = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        h = min(h, nimg_before * rampup_ratio)
    return 0.5 ** (batch_images / max(h, 1e-8))


@dataclass(frozen=True)
class EMAProfile:
    """One averaging profile; build with :meth:`from_spec`."""

    kind: str
    beta: float = 0.0  # constant
    halflife_kimg: float = 0.0  # halflife
    rampup_ratio: float | None = None  # halflife
    std: float = 0.0  # power: σ_rel
    gamma: float = 0.0  # power: exponent from std

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> EMAProfile:
        spec = dict(spec)
        kind = spec.pop("kind", None)
        allowed = {"constant": {"beta"}, "halflife": {"halflife_kimg", "rampup_ratio"}}
        allowed["power"] = {"std"}
        if kind not in KINDS:
            raise ValueError(f"EMA profile kind must be one of {KINDS}, got {kind!r}")
        if set(spec) - allowed[kind]:
            raise ValueError(f"unknown keys {sorted(set(spec) - allowed[kind])} for {kind} EMA")
        if kind == "constant":
            beta = float(spec["beta"])
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"constant EMA beta must be in [0, 1), got {beta}")
            return cls(kind, beta=beta)
        if kind == "halflife":
            hl = float(spec["halflife_kimg"])
            ratio = spec.get("rampup_ratio", 0.05)
            if hl <= 0:
                raise ValueError(f"halflife_kimg must be > 0, got {hl}")
            return cls(kind, halflife_kimg=hl, rampup_ratio=None if ratio is None else float(ratio))
        std = float(spec["std"])
        return cls(kind, std=std, gamma=std_to_exp(std))

    def decay(self, step: int, nimg_before: float, batch_images: float) -> float:
        """β for the update after optimizer step ``step`` (1-based) on ``batch_images`` images."""
        if self.kind == "constant":
            return self.beta
        if self.kind == "halflife":
            return halflife_beta(nimg_before, batch_images, self.halflife_kimg, self.rampup_ratio)
        return power_beta(step, self.gamma)


# --- helpers -------------------------------------------------------------------------------
def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares storage under no-grad), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: Tensor) -> Tensor:
    """The unsharded value (a collective for DTensors: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _student(pl_module: nn.Module) -> nn.Module:
    student = getattr(pl_module, "student", None)
    if not isinstance(student, nn.Module):
        raise AttributeError(
            f"EMA needs pl_module.student (an nn.Module); {type(pl_module)} has none"
        )
    return student


def _entries(student: nn.Module) -> list[tuple[str, Tensor, bool]]:
    """``(name, tensor, is_parameter)`` for every parameter and buffer of the student."""
    out = [(n, p, True) for n, p in student.named_parameters()]
    return out + [(n, b, False) for n, b in student.named_buffers()]


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, Mapping) and batch:
        return _batch_size(next(iter(batch.values())))
    return None


class EMA(Callback):
    """Student-only EMA with several profiles.

    Args:
        profiles: name → spec, e.g. ``{"ema": {"kind": "halflife", "halflife_kimg": 500,
            "rampup_ratio": 0.05}, "pema": {"kind": "power", "std": 0.05},
            "c999": {"kind": "constant", "beta": 0.999}}``. Default: one power EMA σ_rel 0.05.
        validate_with: profile swapped in for validation and used by default for sampling/FID
            (default: the first).
        average_buffers: lerp floating-point buffers too (default: copy them, like EDM2).
        global_batch_size: images per optimizer step over all ranks; by default counted from
            the batches (first tensor's length × world size, summed over accumulation).
        snapshot_every_n_steps: write post-hoc EMA snapshots of every power profile each N
            optimizer steps (EDM2 post-hoc EMA); ``None`` disables.
        snapshot_dir: where snapshots go (default ``<log_dir>/ema_snapshots``).
    """

    def __init__(
        self,
        profiles: Mapping[str, Mapping[str, Any]] | None = None,
        validate_with: str | None = None,
        average_buffers: bool = False,
        global_batch_size: int | None = None,
        snapshot_every_n_steps: int | None = None,
        snapshot_dir: str | None = None,
    ) -> None:
        profiles = profiles if profiles is not None else {"pema": {"kind": "power", "std": 0.05}}
        if not profiles:
            raise ValueError("EMA needs at least one profile")
        self.profiles = {str(k): EMAProfile.from_spec(v) for k, v in profiles.items()}
        self.validate_with = validate_with if validate_with is not None else next(iter(profiles))
        if self.validate_with not in self.profiles:
            raise ValueError(f"validate_with={validate_with!r} is not a profile: {list(profiles)}")
        if snapshot_every_n_steps is not None and int(snapshot_every_n_steps) < 1:
            raise ValueError(f"snapshot_every_n_steps must be >= 1, got {snapshot_every_n_steps}")
        self.average_buffers = bool(average_buffers)
        self.global_batch_size = global_batch_size
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.snapshot_dir = snapshot_dir
        self.nimg = 0  # images seen by completed optimizer steps (all ranks)
        self.last_step = 0  # trainer.global_step at the last update
        self._pending_images = 0
        self._names: list[str] = []
        self._ema: dict[str, list[Tensor]] = {}
        self._loaded: dict[str, Any] | None = None
        self._val_ctx: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(profiles=tuple(self.profiles))

    # --- storage ---------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return bool(self._ema)

    @torch.no_grad()
    def _ensure_init(self, student: nn.Module) -> None:
        if not self._ema:
            entries = _entries(student)
            self._names = [n for n, _, _ in entries]
            self._ema = {k: [t.detach().clone() for _, t, _ in entries] for k in self.profiles}
        if self._loaded is not None:
            self._copy_in(self._loaded)
            self._loaded = None

    def _copy_in(self, state: Mapping[str, Any]) -> None:
        self.nimg = int(state["nimg"])
        self.last_step = int(state["last_step"])
        self._pending_images = int(state.get("pending_images", 0))
        for name, tensors in self._ema.items():
            saved = state["ema"].get(name)
            if saved is None:  # a profile added since the checkpoint: starts from the weights
                continue
            if set(saved) != set(self._names):
                raise ValueError(f"EMA checkpoint for {name!r} does not match the student's keys")
            for key, dst in zip(self._names, tensors, strict=True):
                src = saved[key]
                if hasattr(dst, "device_mesh") and not hasattr(src, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements)
                _local(dst).copy_(_local(src))

    def state_dict(self) -> dict[str, Any]:
        """Counters and the live average tensors (not copies) keyed by profile and student key."""
        if not self._ema and self._loaded is not None:
            return self._loaded
        ema = {k: dict(zip(self._names, ts, strict=True)) for k, ts in self._ema.items()}
        return {
            "nimg": self.nimg,
            "last_step": self.last_step,
            "pending_images": self._pending_images,
            "ema": ema,
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._ema:
            self._copy_in(state_dict)
        else:  # applied at first use, once the student's (possibly sharded) tensors exist
            self._loaded = state_dict

    def ema_state_dict(self, pl_module: nn.Module, name: str | None = None) -> dict[str, Tensor]:
        """Unsharded copy of one profile as a student ``state_dict`` (for export; with sharded
        students every rank must call it, the shards are gathered)."""
        name = self._check_name(name)
        self._ensure_init(_student(pl_module))
        return {
            k: _full(t).detach().clone() for k, t in zip(self._names, self._ema[name], strict=True)
        }

    def _check_name(self, name: str | None) -> str:
        name = self.validate_with if name is None else name
        if name not in self.profiles:
            raise KeyError(f"unknown EMA profile {name!r}; have {list(self.profiles)}")
        return name

    # --- update ----------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, student: nn.Module, step: int, batch_images: float) -> None:
        """Fold the student's current weights into every profile (after optimizer step ``step``)."""
        self._ensure_init(student)
        entries = _entries(student)
        if [n for n, _, _ in entries] != self._names:
            raise RuntimeError("the student's parameters/buffers changed after EMA started")
        avg = [i for i, (_, t, is_param) in enumerate(entries) if is_param or self._avg_buffer(t)]
        copy = sorted(set(range(len(entries))) - set(avg))
        online = [_local(t.detach()) for _, t, _ in entries]
        for name, prof in self.profiles.items():
            beta = prof.decay(step, self.nimg, batch_images)
            ema = [_local(t) for t in self._ema[name]]
            if avg:  # e ← e + (1−β)(w − e) = β·e + (1−β)·w
                torch._foreach_lerp_([ema[i] for i in avg], [online[i] for i in avg], 1.0 - beta)
            if copy:
                torch._foreach_copy_([ema[i] for i in copy], [online[i] for i in copy])
        self.nimg += int(batch_images)
        self.last_step = step

    def _avg_buffer(self, t: Tensor) -> bool:
        return self.average_buffers and t.is_floating_point()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure_init(_student(pl_module))

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.global_batch_size is None:
            n = _batch_size(batch)
            if n is None:
                raise ValueError("EMA cannot count images in this batch; set global_batch_size")
            self._pending_images += n * trainer.world_size
        if trainer.global_step == self.last_step:  # accumulating gradients: no step yet
            return
        images = self.global_batch_size or self._pending_images
        self._pending_images = 0
        if getattr(pl_module, "last_step_skipped", False):
            # The step was skipped (non-finite gradient): the weights did not change, so the
            # averages must not either (nor the image count the power profiles key on).
            self.last_step = trainer.global_step
        else:
            self.update(_student(pl_module), trainer.global_step, images)
        every = self.snapshot_every_n_steps
        if every and trainer.global_step % every == 0:
            self.write_snapshots(trainer, pl_module)

    # --- swapping --------------------------------------------------------------------------
    @contextmanager
    def swapped(self, pl_module: nn.Module, name: str | None = None) -> Iterator[str]:
        """Temporarily load profile ``name`` (default ``validate_with``) into ``pl_module.student``.

        Yields the profile's name.

        Whatever the student held before (online weights, or another profile when nested) is
        restored on exit, also on exceptions.
        """
        name = self._check_name(name)
        student = _student(pl_module)
        self._ensure_init(student)
        with torch.no_grad():
            targets = [_local(t.detach()) for _, t, _ in _entries(student)]
            backup = [t.clone() for t in targets]
            torch._foreach_copy_(targets, [_local(t) for t in self._ema[name]])
        try:
            yield name
        finally:
            with torch.no_grad():
                torch._foreach_copy_(targets, backup)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_ctx is None and (self._ema or self._loaded is not None):
            self._val_ctx = self.swapped(pl_module, self.validate_with)
            self._val_ctx.__enter__()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_ctx is not None:
            ctx, self._val_ctx = self._val_ctx, None
            ctx.__exit__(None, None, None)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exc: BaseException
    ) -> None:
        self.on_validation_end(trainer, pl_module)

    # --- post-hoc snapshots (EDM2 §3.1) ----------------------------------------------------
    def write_snapshots(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Hook body: snapshot into ``snapshot_dir`` (default ``<log_dir>/ema_snapshots``)."""
        root = (
            self.snapshot_dir or Path(trainer.log_dir or trainer.default_root_dir) / "ema_snapshots"
        )
        return self.save_snapshots(root, trainer.global_step, write=trainer.is_global_zero)

    def save_snapshots(self, directory: str | Path, step: int, write: bool = True) -> list[Path]:
        """Save each power profile as ``phema-<step>-<name>.safetensors`` (metadata: step, std).

        Every rank must call it (sharded tensors are gathered); only ``write`` ranks write.
        """
        from safetensors.torch import save_file

        written = []
        for name, prof in self.profiles.items():
            if prof.kind != "power" or not self._ema:
                continue
            tensors = {
                k: _full(t).detach().cpu().contiguous()
                for k, t in zip(self._names, self._ema[name], strict=True)
            }
            if write:
                path = Path(directory) / f"phema-{step:09d}-{name}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(path), metadata={"step": str(step), "std": repr(prof.std)})
                written.append(path)
        return written


def _p_dot_p(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """Inner product ``∫ p_a p_b dτ`` of power profiles ``p(τ) = (γ+1)τ^γ/t^(γ+1)`` on ``[0, t]``.

    ``= (γa+1)(γb+1)·min(ta,tb)^(γa+γb+1) / ((γa+γb+1)·ta^(γa+1)·tb^(γb+1))``, written with the
    ratio of the shorter to the longer time so no power overflows (EDM2 App. C.3).
    """
    lo, hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_long = np.where(t_a >= t_b, g_a, g_b)  # exponent of the profile that runs longer
    return (g_a + 1) * (g_b + 1) * (lo / hi) ** g_long / ((g_a + g_b + 1) * hi)


def posthoc_coefficients(
    steps: np.ndarray, stds: np.ndarray, target_step: float, target_std: float
) -> np.ndarray:
    """Weights ``x`` with ``Σ x_i p_i ≈ p_target`` in L² (EDM2 App. C.3): solve ``A x = b``.

    ``A_ij = ⟨p_i, p_j⟩`` over the snapshot profiles, ``b_i = ⟨p_i, p_target⟩``; least squares
    (``lstsq``) because nearly collinear snapshots make ``A`` ill-conditioned.
    """
    t = np.asarray(steps, np.float64)
    g = np.array([std_to_exp(s) for s in np.asarray(stds, np.float64)])
    a = _p_dot_p(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _p_dot_p(t, g, np.float64(target_step), np.float64(std_to_exp(target_std)))
    return np.linalg.lstsq(a, b, rcond=1e-12)[0]


_SNAPSHOT = re.compile(r"phema-(\d+)-.+\.safetensors$")


def reconstruct_posthoc_ema(
    snapshot_dir: str | Path, target_std: float, target_step: int | None = None
) -> dict[str, Tensor]:
    """Synthesise the power EMA with ``σ_rel = target_std`` at ``target_step`` from snapshots.

    Uses every snapshot at or before ``target_step`` (default: the last one). Floating
    tensors are the coefficient-weighted sum (in float64, cast back); others come from the
    latest snapshot. Returns a student ``state_dict``.
    """
    from safetensors import safe_open

    files = sorted(
        p for p in Path(snapshot_dir).glob("phema-*.safetensors") if _SNAPSHOT.search(p.name)
    )
    if not files:
        raise FileNotFoundError(f"no phema-*.safetensors snapshots in {str(snapshot_dir)!r}")
    metas = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        metas.append((int(meta["step"]), float(meta["std"]), path))
    target_step = max(m[0] for m in metas) if target_step is None else int(target_step)
    metas = [m for m in metas if m[0] <= target_step]
    if not metas:
        raise ValueError(f"no snapshot at or before step {target_step} in {str(snapshot_dir)!r}")
    coef = posthoc_coefficients(
        np.array([m[0] for m in metas]), np.array([m[1] for m in metas]), target_step, target_std
    )
    from safetensors.torch import load_file

    out: dict[str, Tensor] = {}
    latest = max(metas, key=lambda m: m[0])[2]
    for c, (_, _, path) in zip(coef, metas, strict=True):
        for k, v in load_file(str(path)).items():
            if not v.is_floating_point():
                continue
            out[k] = out.get(k, torch.zeros(v.shape, dtype=torch.float64)) + float(c) * v.double()
    dtypes = load_file(str(latest))
    return {k: out[k].to(v.dtype) if k in out else v for k, v in dtypes.items()}
