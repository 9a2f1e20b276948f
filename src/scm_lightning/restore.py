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
from scm_lightning.teachers.base import TrigFlowModel
from scm_lightning.teachers.trigflow import TrigFlowNative


class TeacherNotLoaded(TrigFlowModel):
    """Stands in for the frozen teacher of a student-only rebuild; calling it is an error."""

    def __init__(self, like: TrigFlowModel) -> None:
        super().__init__(like.sigma_data)
        self._in_channels = like.in_channels

    @property
    def in_channels(self) -> int:
        return self._in_channels

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "the teacher was not rebuilt (student-only rebuild for sample/export/evaluate); "
            "rebuild_module(ckpt, with_teacher=True) loads it from the run's teacher config"
        )


def rebuild_module(ckpt: dict[str, Any], with_teacher: bool = True) -> tuple[Any, Any, Any]:
    """``(module, cfg, datamodule)`` from ``ckpt["scm_config"]``, weights loaded, eval mode.

    ``with_teacher=False``: a distillation checkpoint that records its student
    (``STUDENT_RECORD``: net class, diffusers config, adapter) is rebuilt from that alone, so
    the teacher's folder may be gone; ``module.teacher`` is then a :class:`TeacherNotLoaded`.
    Older checkpoints (or nets without a diffusers config) rebuild the teacher as before.
    """
    from omegaconf import OmegaConf

    from scm_lightning import training
    from scm_lightning.config import register_resolvers
    from scm_lightning.modules import STUDENT_RECORD

    register_resolvers()
    cfg = OmegaConf.create(ckpt["scm_config"])
    dm = training.build_datamodule(cfg)
    record = ckpt.get(STUDENT_RECORD)
    if cfg.task == "fit" and not with_teacher and isinstance(record, dict):
        from scm_lightning.teachers.description import build_network

        shape = build_network(record, guidance_embedding=False).requires_grad_(False).eval()
        module = training.build_distillation(cfg, dm, teacher=shape)
        module.load_state_dict(ckpt["state_dict"])  # the teacher keys refill from `shape`
        module.teacher = TeacherNotLoaded(shape)
    else:
        if cfg.task == "fit":
            module = training.build_distillation(cfg, dm)
        else:
            module = training.build_diffusion(cfg, dm)
        module.on_load_checkpoint(ckpt)  # a distillation module refills the teacher's keys
        module.load_state_dict(ckpt["state_dict"])
    module.run_config = ckpt["scm_config"]
    return module.eval(), cfg, dm


def load_prepared_teacher(ckpt_path: str, ema: str | None = None) -> TrigFlowNative:
    """The prepared teacher from a ``pretrain prepare_from=...`` checkpoint (EMA weights).

    Use as ``teacher._target_=scm_lightning.restore.load_prepared_teacher
    teacher.ckpt_path=...`` to distill it (or distill the folder ``export_dir`` wrote, which
    ``teacher=diffusers teacher.path=...`` loads as a TrigFlow teacher).
    """
    ckpt = load_checkpoint(ckpt_path)
    if not (ckpt.get("scm_config") or {}).get("prepare_from"):
        raise ValueError(f"{ckpt_path} is not a teacher-preparation checkpoint (prepare_from)")
    module, _, _ = rebuild_module(ckpt)
    profile = resolve_profile(ckpt, ema)
    with ema_swapped(module, ckpt, profile), torch.no_grad():
        prepared = copy.deepcopy(module.student)
    return prepared.requires_grad_(False).eval()
