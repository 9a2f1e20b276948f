"""Tangent warmup (spec §3): ``r = min(1, step/H)`` scales the second term of g only."""

from __future__ import annotations

from typing import Any

import lightning as L


def tangent_warmup_factor(step: int, warmup_steps: int) -> float:
    """``r = min(1, step/H)``; ``H = 0`` disables warmup (r = 1 from the first step)."""
    if warmup_steps < 0:
        raise ValueError(f"tangent warmup H must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return 1.0
    return min(1.0, step / warmup_steps)


class TangentWarmup(L.Callback):
    """Sets ``pl_module.tangent_warmup_r`` from the trainer's global step before every batch.

    Derived from ``trainer.global_step`` alone, so it is exact across a resume.
    """

    def __init__(self, warmup_steps: int = 10_000) -> None:
        tangent_warmup_factor(0, warmup_steps)  # validates H
        self.warmup_steps = int(warmup_steps)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pl_module.tangent_warmup_r = tangent_warmup_factor(trainer.global_step, self.warmup_steps)
