"""Turning a composed config into data, teacher, module, callbacks and a Trainer, and running.

``fit(cfg)`` and ``pretrain(cfg)`` are separate from the CLI so tests call them with a
composed config. The order is: validate the config, build and check data and teacher
(agreement of channels, resolution and conditioning), then build the module and train.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from scm_lightning.checkpointing import (
    AtomicCheckpointIO,
    absolute_paths,
    check_resume_config,
    check_resume_state,
    has_own_checkpoint_io,
)
from scm_lightning.config import ConfigError, validate_config
from scm_lightning.modules import DiffusionModule, DistillationModule, VSDDistillationModule
from scm_lightning.teachers.base import TrigFlowModel

VSD_MODES = ("vsd", "scd_vsd")  # loss.mode values of VSDDistillationModule

JVP_PRECISION = {
    None: None,
    "32": torch.float32,
    "64": torch.float64,
    "bf16": torch.bfloat16,
    "16": torch.float16,
}


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """``cfg.data``; with ``data.latent`` its images seen through the VAE, standardised to the
    run's σ_d (``loss.sigma_data`` for fit, ``sigma_data`` for pretrain)."""
    latent = cfg.data.get("latent")
    if not latent:
        return instantiate({k: v for k, v in cfg.data.items() if k != "latent"})
    from scm_lightning.data.latent import LatentDataModule

    images = instantiate({k: v for k, v in cfg.data.items() if k != "latent"})
    sigma_data = cfg.loss.sigma_data if cfg.task == "fit" else cfg.sigma_data
    try:
        return LatentDataModule(images, str(latent.vae), float(sigma_data), latent.get("cache_dir"))
    except ValueError as err:  # the VAE folder or its shapes: before any work
        raise ConfigError(str(err)) from None


def build_teacher(teacher_cfg: DictConfig) -> TrigFlowModel:
    teacher = instantiate(teacher_cfg)
    if not isinstance(teacher, TrigFlowModel):
        raise ConfigError(
            f"teacher._target_={teacher_cfg.get('_target_')!r} returned {type(teacher).__name__}; "
            "expected a scm_lightning.teachers.base.TrigFlowModel (wrap a plain module in "
            "TrigFlowNative or EDMAdapter, or a schedule teacher in ScheduleAdapter)"
        )
    return teacher.requires_grad_(False).eval()


def check_model_matches_data(model: TrigFlowModel, dm: L.LightningDataModule, what: str) -> None:
    """Channels, resolution and conditioning of the network against the data, before step 0."""
    from scm_lightning.teachers.loading import check_teacher_matches_data

    try:
        check_teacher_matches_data(
            model,
            dm.channels,
            dm.resolution,
            dm.num_classes,
            getattr(dm, "text_embed_dim", None),
            getattr(dm, "null_condition", None),
        )
    except ValueError as err:
        vae = getattr(dm, "vae_path", None)
        via = (
            f" (data.latent.vae={vae!r} gives {dm.channels}×{dm.resolution}² latents)"
            if vae
            else ""
        )
        raise ConfigError(f"{what} and data disagree: {err}{via}") from None


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = (cfg.get("callbacks") or {}).items()
    # trainer.enable_progress_bar=false wins over the progress-bar callback (Lightning refuses both)
    skip = {"progress"} if not cfg.trainer.get("enable_progress_bar", True) else set()
    return [instantiate(c) for name, c in callbacks if c is not None and name not in skip]


FSDP2_STRATEGY = "fsdp2"  # trainer.strategy value that builds a ModelParallelStrategy


def num_processes(trainer_cfg: DictConfig) -> int:
    """Processes of a run: ``devices`` (int, list of ids, or auto/-1: all GPUs) × ``num_nodes``."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        per_node = len(devices)
    elif str(trainer_cfg.get("accelerator", "auto")) != "cpu" and torch.cuda.is_available():
        per_node = torch.cuda.device_count()
    else:
        per_node = 1
    return per_node * int(trainer_cfg.get("num_nodes", 1))


def build_strategy(trainer_cfg: DictConfig) -> Any:
    """``trainer.strategy``: Lightning's own names pass through; ``fsdp2`` builds FSDP2.

    FSDP2 is Lightning's ``ModelParallelStrategy`` with every process on the data-parallel
    axis (``tensor_parallel_size=1``); the sharding itself is ``configure_model``.
    """
    strategy = trainer_cfg.get("strategy", "auto")
    if strategy != FSDP2_STRATEGY:
        return instantiate(strategy) if OmegaConf.is_dict(strategy) else strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    fsdp = trainer_cfg.get("fsdp") or {}
    return ModelParallelStrategy(
        data_parallel_size=num_processes(trainer_cfg),
        tensor_parallel_size=1,
        save_distributed_checkpoint=bool(fsdp.get("save_distributed_checkpoint", True)),
    )


def apply_fsdp_settings(module: L.LightningModule, trainer_cfg: DictConfig) -> None:
    """Copy ``trainer.fsdp`` (shard_teacher, min_block_params, reshard_after_forward) over."""
    fsdp = trainer_cfg.get("fsdp") or {}
    module.shard_teacher = bool(fsdp.get("shard_teacher", False))
    module.fsdp_min_block_params = int(fsdp.get("min_block_params", 1))
    module.fsdp_reshard_after_forward = bool(fsdp.get("reshard_after_forward", True))


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback]) -> L.Trainer:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("fsdp", None)  # ours, not Trainer arguments
    kwargs.pop("compile", None)
    kwargs.pop("strategy", None)
    strategy = build_strategy(cfg.trainer)
    # Crash-safe checkpoint writes (temp file + fsync + rename); FSDP/ModelParallel strategies
    # write distributed checkpoints with their own IO.
    plugins = [] if has_own_checkpoint_io(strategy) else [AtomicCheckpointIO()]
    return instantiate(
        OmegaConf.create(kwargs),
        strategy=strategy,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=plugins or None,
    )


def image_shape(dm: L.LightningDataModule) -> tuple[int, int, int]:
    return (int(dm.channels), int(dm.resolution), int(dm.resolution))


def build_distillation(
    cfg: DictConfig, dm: L.LightningDataModule, teacher: TrigFlowModel | None = None
) -> DistillationModule:
    """The sCD/sCT module; ``teacher`` (default: built from ``cfg.teacher``) also shapes the
    student, so a student-only rebuild passes one of the student's architecture."""
    teacher = build_teacher(cfg.teacher) if teacher is None else teacher
    check_model_matches_data(teacher, dm, "teacher")
    loss = cfg.loss
    module_class, extra = DistillationModule, {"mode": loss.mode}
    if loss.mode in VSD_MODES:  # adaptive VSD / sCD + VSD (spec §3c): a fake score, 2 optimisers
        module_class = VSDDistillationModule
        extra |= {
            "vsd_loss": {
                "sigma_data": loss.sigma_data,
                "p_mean": loss.vsd_p_mean,
                "p_std": loss.vsd_p_std,
                "sigma_max": loss.vsd_sigma_max,
            },
            "vsd_weight": loss.vsd_weight,
            "fake_score_lr": loss.fake_score_lr,
        }
    module = module_class(
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
            "jvp_dtype": JVP_PRECISION[
                None if loss.jvp_precision is None else str(loss.jvp_precision)
            ],
            "fast_jvp": loss.fast_jvp,
            # Ablation switches and dsCM's grid (absent in configs saved before them).
            "tangent_normalization": loss.get("tangent_normalization", "norm"),
            "tangent_clip": loss.get("tangent_clip", 1.0),
            "adaptive_weighting": loss.get("adaptive_weighting", True),
            "num_intervals": loss.get("num_intervals"),
        },
        student_guidance_embedding=cfg.student.guidance_embedding,
        guidance_scale_range=cfg.student.guidance_scale_range,
        uncond_label=cfg.student.uncond_label,
        logvar_channels=cfg.student.logvar_channels,
        jvp_attention=cfg.student.jvp_attention,
        eval_guidance=float(cfg.eval.get("guidance", 1.0)),
        student_dropout=cfg.student.get("dropout", 0.0),  # absent in checkpoints made before it
        t_mid=loss.t_mid,
        seed=cfg.seed,
        max_bad_steps=cfg.max_bad_steps,
        uncond_condition=getattr(dm, "null_condition", None),
        **extra,
    )
    module.latent_codec = getattr(dm, "codec", None)  # samples decode through it (data.latent)
    return module


def build_diffusion(cfg: DictConfig, dm: L.LightningDataModule) -> DiffusionModule:
    if cfg.get("prepare_from"):
        from scm_lightning.teachers.preparation import prepare_trigflow_model

        model = prepare_trigflow_model(build_teacher(cfg.prepare_from))
    else:
        from scm_lightning.teachers.trigflow import TrigFlowNative

        model = TrigFlowNative(instantiate(cfg.net, _convert_="all"), sigma_data=cfg.sigma_data)
    check_model_matches_data(model, dm, "net")
    module = DiffusionModule(
        model=model,
        image_shape=image_shape(dm),
        optimizer=instantiate(cfg.optim, _convert_="all"),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        p_mean=cfg.p_mean,
        p_std=cfg.p_std,
        label_dropout=cfg.label_dropout,
        seed=cfg.seed,
        max_bad_steps=cfg.max_bad_steps,
        uncond_condition=getattr(dm, "null_condition", None),
    )
    module.latent_codec = getattr(dm, "codec", None)
    return module


class TrainingStarted(L.Callback):
    """Records whether the first training batch began (errors after it are crashes)."""

    started = False

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.started = True


def save_resolved_config(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def run(cfg: DictConfig, on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """Validate, build and train for ``cfg.task`` in {fit, pretrain}; returns final figures.

    ``on_ready`` is called once every pre-flight check passed, just before training (the CLI
    prints the config there, so a rejected input prints nothing but its error line).
    """
    validate_config(cfg)
    if cfg.trainer.get("strategy") == FSDP2_STRATEGY and cfg.get("export_dir"):
        raise ConfigError(
            "export_dir with trainer=fsdp: export after training from the checkpoint instead "
            "(docs/scaling.md: consolidate the distributed checkpoint, then `export`)"
        )
    ckpt_path = cfg.get("ckpt_path")
    # A resume is checked against the run it continues before anything is built or written.
    resume = None
    if ckpt_path and Path(ckpt_path).is_file():  # (FSDP2 distributed checkpoints are folders)
        resume = check_resume_config(cfg, ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")  # e.g. an image folder's scan: an unreadable file fails here, not mid-run
    module = build_distillation(cfg, dm) if cfg.task == "fit" else build_diffusion(cfg, dm)
    module.run_config = absolute_paths(OmegaConf.to_container(cfg, resolve=True))
    if resume is not None:
        check_resume_state(resume, module)
        del resume
    apply_fsdp_settings(module, cfg.trainer)
    compile_backend = cfg.trainer.get("compile", False)
    if compile_backend:  # fit only: validation refuses it for pretrain
        module.compile_step("inductor" if compile_backend is True else str(compile_backend))
    if (cfg.get("student") or {}).get("gradient_checkpointing", False):
        module.enable_gradient_checkpointing()
    callbacks = build_callbacks(cfg)
    trainer = build_trainer(cfg, callbacks)
    if trainer.is_global_zero:
        save_resolved_config(cfg)
    if on_ready is not None:
        on_ready()
    for logger in trainer.loggers:  # the resolved config as hyperparameters (hparams.yaml, ...)
        logger.log_hyperparams(module.run_config)
    phase = TrainingStarted()
    trainer.callbacks.append(phase)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except Exception as err:
        if phase.started and not isinstance(err, ConfigError):
            # Past the first step a ValueError is a crash, not a bad input (cli.is_bad_input).
            with contextlib.suppress(AttributeError):
                err.bad_input = False  # type: ignore[attr-defined]
        raise
    results: dict[str, Any] = {}
    # A sharded (FSDP2) student needs every rank in each forward: all ranks evaluate (same
    # seeds, same figures) and rank 0 alone prints and writes. Otherwise rank 0 alone runs it.
    from scm_lightning.fsdp import is_sharded

    if trainer.is_global_zero or is_sharded(module.student):
        from scm_lightning.evaluation import final_quality

        rank0 = trainer.is_global_zero
        with contextlib.nullcontext() if rank0 else redirect_stdout(io.StringIO()):
            results = final_quality(cfg, module, dm, trainer)
    if trainer.is_global_zero:
        (Path(cfg.run_dir) / "results.json").write_text(json.dumps(results, indent=2))
        if cfg.task == "pretrain" and cfg.get("export_dir"):
            from scm_lightning.export import export_trained_network

            export_trained_network(trainer, module, cfg.export_dir)
    return results
