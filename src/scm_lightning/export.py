"""EMA profiles swapped in, and diffusers export (spec §5).

Reading checkpoints is :func:`scm_lightning.checkpointing.load_checkpoint`; rebuilding their
module is :func:`scm_lightning.restore.rebuild_module` (above the training builders); the
``export`` command is :func:`scm_lightning.commands.export_checkpoint`.

* :func:`ema_swapped` swaps a stored EMA profile into the student (and back on exit).
* :func:`export_module` writes the folder described in :mod:`scm_lightning.pipeline_scm`:
  ``unet/`` (the raw network's ``save_pretrained``), ``scheduler/`` (``SCMScheduler``,
  ``prediction_type="trigflow"``, ``sigma_data``, ``max_timesteps``, ``intermediate_timesteps``),
  ``model_index.json`` (with the adapter description) and the self-contained
  ``pipeline_scm.py`` that diffusers' own loader runs; a latent model (``data.latent``) adds
  ``vae/`` and its per-channel ``latent_statistics``, so the pipeline returns images.
  ``teachers.loading.load_teacher`` reads the same folder as a teacher (with its adapter).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from scm_lightning.config import ConfigError
from scm_lightning.pipeline import pipeline_from_adapter, save_pipeline
from scm_lightning.teachers.base import NetAdapter, TrigFlowModel

ONLINE = ("online", "none", "raw")  # ema=<one of these>: the raw (non-averaged) weights
RUN_CONFIG = "scm_run_config.json"  # an export's run record: `evaluate` reads its data/eval


def ema_state(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The EMA callback's state (``{"nimg", "last_step", "ema": {profile: {key: tensor}}}``)."""
    for key, value in (ckpt.get("callbacks") or {}).items():
        if key.startswith("EMA") and isinstance(value, dict) and isinstance(value.get("ema"), dict):
            return value
    return None


def stored_profiles(ckpt: dict[str, Any]) -> list[str]:
    state = ema_state(ckpt)
    return list(state["ema"]) if state else []


def resolve_profile(ckpt: dict[str, Any], requested: str | None, where: str = "") -> str | None:
    """The EMA profile to use: ``requested``; None -> the run's ``validate_with`` (or the first
    stored, or the raw weights when none is stored); ``online`` -> None (raw weights)."""
    stored = stored_profiles(ckpt)
    if requested is not None and str(requested) in ONLINE:
        return None
    if requested is None:
        if not stored:
            return None
        ema_cfg = ((ckpt["scm_config"].get("callbacks") or {}).get("ema")) or {}
        preferred = ema_cfg.get("validate_with") if isinstance(ema_cfg, dict) else None
        return preferred if preferred in stored else stored[0]
    if str(requested) not in stored:
        have = f"stored: {stored}" if stored else "the checkpoint stores no EMA profiles"
        raise ConfigError(
            f"ema={requested!r} is not an EMA profile of {where or 'the checkpoint'}; {have} "
            f"(or ema=online for the raw weights)"
        )
    return str(requested)


@contextmanager
def ema_swapped(
    module: nn.Module, ckpt: dict[str, Any], profile: str | None
) -> Iterator[str | None]:
    """Load EMA ``profile`` from ``ckpt`` into ``module.student`` for the block (None: no swap)."""
    if profile is None:
        yield None
        return
    from scm_lightning.callbacks.ema import EMA

    state = ema_state(ckpt)
    if state is None or profile not in state["ema"]:
        raise ConfigError(f"EMA profile {profile!r} is not stored; stored: {stored_profiles(ckpt)}")
    # Only the stored averages matter for swapping, not how they were accumulated.
    ema = EMA(profiles={name: {"kind": "constant", "beta": 0.0} for name in state["ema"]})
    ema.load_state_dict(state)
    with ema.swapped(module, profile):
        yield profile


def network_adapter(module: nn.Module) -> TrigFlowModel:
    """The trained TrigFlow adapter: ``student.net`` of a Student, else the model itself."""
    from scm_lightning.student import Student

    student = module.student
    return student.net if isinstance(student, Student) else student


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"export folder {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ValueError(
            f"export folder {str(out)!r} is not empty and holds no earlier export "
            "(model_index.json); choose a new or empty folder"
        )


def export_module(module: nn.Module, out: str | Path, **extra: Any) -> Path:
    """Write the module's current student network as an ``SCMPipeline`` folder; returns it.

    ``extra`` entries (EMA profile, step, model type, image shape, t_max, t_mid, ...) join the
    adapter description in ``model_index.json`` (:func:`pipeline.pipeline_from_adapter`).
    Call inside :func:`ema_swapped` (or ``EMA.swapped``) to export averages.
    """
    out = Path(out)
    _check_out_dir(out)
    adapter = network_adapter(module)
    if not isinstance(adapter, NetAdapter):
        raise TypeError(f"cannot export {type(adapter).__name__}: not a single-network adapter")
    net = adapter.net
    if not (hasattr(net, "save_pretrained") and hasattr(net, "config")):
        raise TypeError(
            f"cannot export {type(net).__name__}: the raw network must be a diffusers ModelMixin "
            "(save_pretrained/from_pretrained), e.g. TrigFlowUNet or UNet2DModel"
        )
    from scm_lightning.pipeline import load_text_components

    # A text-conditioned student takes prompts when its teacher folder held a text encoder.
    teacher_path = ((getattr(module, "run_config", None) or {}).get("teacher") or {}).get("path")
    text = load_text_components(teacher_path) if adapter.text_embed_dim is not None else {}
    codec = getattr(module, "latent_codec", None)  # a latent model: its VAE and statistics
    if codec is not None:
        extra.update(vae=codec.vae, latent_statistics=codec.statistics())
    was_training = module.training
    module.eval()
    try:
        save_pipeline(pipeline_from_adapter(adapter, text, **extra), out)
    finally:
        module.train(was_training)
    run_config = getattr(module, "run_config", None)
    if run_config is not None:  # diffusers ignores it; `evaluate ckpt=<folder>` reads it
        (out / RUN_CONFIG).write_text(json.dumps(run_config, indent=2) + "\n")
    return out


def describe_module(module: Any, cfg: Any | None = None) -> dict[str, Any]:
    """Metadata for the adapter description: model type, image shape, default sampling times."""
    from scm_lightning.modules import DistillationModule
    from scm_lightning.trigflow import t_max_from_sigma_max

    sd = float(network_adapter(module).sigma_data)
    info: dict[str, Any] = {
        "model": "consistency" if isinstance(module, DistillationModule) else "diffusion",
        "image_shape": list(module.image_shape),
        "t_max": t_max_from_sigma_max(sigma_data=sd),
    }
    if isinstance(module, DistillationModule):
        info["t_mid"] = float(module.t_mid)
    if cfg is not None:
        info["task"] = str(cfg.task)
    return info


def export_trained_network(trainer: Any, module: Any, export_dir: str | Path) -> Path:
    """After ``pretrain``: write the EMA weights (the EMA callback's ``validate_with`` profile,
    else the raw weights) of the trained TrigFlow network as a teacher folder that
    ``teachers.loading.load_teacher(export_dir)`` loads. The online weights are restored."""
    from contextlib import nullcontext

    from scm_lightning.callbacks.ema import EMA

    emas = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
    profile = emas[0].validate_with if emas else None
    swap = emas[0].swapped(module, profile) if emas else nullcontext()
    meta = describe_module(module, None)
    meta.update(ema_profile=profile, global_step=int(trainer.global_step), task=module_task(module))
    with swap:
        return export_module(module, export_dir, **meta)


def module_task(module: Any) -> str:
    from scm_lightning.modules import DistillationModule

    return "fit" if isinstance(module, DistillationModule) else "pretrain"
