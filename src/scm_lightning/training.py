"""Turning a composed config into data, teacher, module, callbacks and a Trainer, and running.

``fit(cfg)`` and ``pretrain(cfg)`` are separate from the CLI so tests call them with a
composed config. The order is: validate the config, build and check data and teacher
(agreement of channels, resolution and conditioning), then build the module and train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from scm_lightning.config import ConfigError, validate_config
from scm_lightning.modules import DiffusionModule, DistillationModule
from scm_lightning.teachers.base import TrigFlowModel

JVP_PRECISION = {None: None, "32": torch.float32, "64": torch.float64, "bf16": torch.bfloat16, "16": torch.float16}


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    return instantiate(cfg.data)


def build_teacher(teacher_cfg: DictConfig) -> TrigFlowModel:
    teacher = instantiate(teacher_cfg)
    if not isinstance(teacher, TrigFlowModel):
        raise ConfigError(
            f"teacher._target_={teacher_cfg.get('_target_')!r} returned {type(teacher).__name__}; "
            "expected a scm_lightning.teachers.base.TrigFlowModel"
        )
    return teacher.requires_grad_(False).eval()


def check_model_matches_data(model: TrigFlowModel, dm: L.LightningDataModule, what: str) -> None:
    """Channels, resolution and conditioning of the network against the data, before step 0."""
    from scm_lightning.teachers.loading import check_teacher_matches_data

    try:
        check_teacher_matches_data(model, dm.channels, dm.resolution, dm.num_classes)
    except ValueError as err:
        raise ConfigError(f"{what} and data disagree: {err}") from None


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback]) -> L.Trainer:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def image_shape(dm: L.LightningDataModule) -> tuple[int, int, int]:
    return (int(dm.channels), int(dm.resolution), int(dm.resolution))


def build_distillation(cfg: DictConfig, dm: L.LightningDataModule) -> DistillationModule:
    teacher = build_teacher(cfg.teacher)
    check_model_matches_data(teacher, dm, "teacher")
    loss = cfg.loss
    return DistillationModule(
        teacher=teacher,
        image_shape=image_shape(dm),
        optimizer=instantiate(cfg.optim, _convert_="all"),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        loss={
            "sigma_data": loss.sigma_data,
            "p_mean": loss.p_mean,
            "p_std": loss.p_std,
            "tangent_norm_c": loss.tangent_norm_c,
            "spatially_invariant_norm": loss.spatially_invariant_norm,
            "prior_weighting": loss.prior_weighting,
            "jvp_dtype": JVP_PRECISION[None if loss.jvp_precision is None else str(loss.jvp_precision)],
            "fast_jvp": loss.fast_jvp,
        },
        mode=loss.mode,
        student_guidance_embedding=cfg.student.guidance_embedding,
        guidance_scale_range=cfg.student.guidance_scale_range,
        uncond_label=cfg.student.uncond_label,
        logvar_channels=cfg.student.logvar_channels,
        jvp_attention=cfg.student.jvp_attention,
        t_mid=loss.t_mid,
        seed=cfg.seed,
        max_bad_steps=cfg.max_bad_steps,
    )


def build_diffusion(cfg: DictConfig, dm: L.LightningDataModule) -> DiffusionModule:
    if cfg.get("prepare_from"):
        from scm_lightning.teachers.preparation import prepare_trigflow_model

        model = prepare_trigflow_model(build_teacher(cfg.prepare_from))
    else:
        from scm_lightning.teachers.trigflow import TrigFlowNative

        model = TrigFlowNative(instantiate(cfg.net, _convert_="all"), sigma_data=cfg.sigma_data)
    check_model_matches_data(model, dm, "net")
    return DiffusionModule(
        model=model,
        image_shape=image_shape(dm),
        optimizer=instantiate(cfg.optim, _convert_="all"),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        p_mean=cfg.p_mean,
        p_std=cfg.p_std,
        label_dropout=cfg.label_dropout,
        seed=cfg.seed,
        max_bad_steps=cfg.max_bad_steps,
    )


def save_resolved_config(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build and train for ``cfg.task`` in {fit, pretrain}; returns final figures."""
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    module = build_distillation(cfg, dm) if cfg.task == "fit" else build_diffusion(cfg, dm)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = build_callbacks(cfg)
    trainer = build_trainer(cfg, callbacks)
    if trainer.is_global_zero:
        save_resolved_config(cfg)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    results: dict[str, Any] = {}
    if trainer.is_global_zero:
        from scm_lightning.evaluation import final_quality

        results = final_quality(cfg, module, dm, trainer)
        (Path(cfg.run_dir) / "results.json").write_text(json.dumps(results, indent=2))
        if cfg.task == "pretrain" and cfg.get("export_dir"):
            from scm_lightning.export import export_trained_network

            export_trained_network(trainer, module, cfg.export_dir)
    return results
