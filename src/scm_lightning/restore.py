"""Runs restored from their checkpoints: the module of a ``fit``/``pretrain`` checkpoint and
the prepared teacher of a ``pretrain prepare_from=...`` checkpoint.

Above :mod:`scm_lightning.training` (it rebuilds modules with the same builders) and below
the commands that use it (:mod:`scm_lightning.commands`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from scm_lightning.checkpointing import load_checkpoint
from scm_lightning.export import ema_swapped, resolve_profile
from scm_lightning.teachers.preparation import PreparedTrigFlow


def rebuild_module(ckpt: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(module, cfg, datamodule)`` from ``ckpt["scm_config"]``, weights loaded, eval mode."""
    from omegaconf import OmegaConf

    from scm_lightning import training
    from scm_lightning.config import register_resolvers

    register_resolvers()
    cfg = OmegaConf.create(ckpt["scm_config"])
    dm = training.build_datamodule(cfg)
    if cfg.task == "fit":
        module = training.build_distillation(cfg, dm)
    else:
        module = training.build_diffusion(cfg, dm)
    module.on_load_checkpoint(ckpt)  # a distillation module refills the teacher's keys
    module.load_state_dict(ckpt["state_dict"])
    module.run_config = ckpt["scm_config"]
    return module.eval(), cfg, dm


def load_prepared_teacher(ckpt_path: str, ema: str | None = None) -> PreparedTrigFlow:
    """The prepared teacher from a ``pretrain prepare_from=...`` checkpoint (EMA weights).

    Use as ``teacher._target_=scm_lightning.restore.load_prepared_teacher
    teacher.ckpt_path=...`` to distill it.
    """
    ckpt = load_checkpoint(ckpt_path)
    module, _, _ = rebuild_module(ckpt)
    if not isinstance(module.student, PreparedTrigFlow):
        raise ValueError(f"{ckpt_path} is not a teacher-preparation checkpoint (prepare_from)")
    profile = resolve_profile(ckpt, ema)
    with ema_swapped(module, ckpt, profile), torch.no_grad():
        prepared = copy.deepcopy(module.student)
    return prepared.requires_grad_(False).eval()
