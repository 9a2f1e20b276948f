"""Callbacks the scaling tests inject into real CLI runs (``+callbacks.<name>._target_=...``).

Importable in the DDP/FSDP children because the tests put ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from scm_lightning.callbacks.ema import EMA
from scm_lightning.fsdp import full_state_dict, is_sharded


class Dump(L.Callback):
    """At the end of training every rank writes ``rank<r>.pt``: its full student weights, the
    full EMA average, whether the student was sharded, the step, r and the first gradient."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.first_grad: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        if self.first_grad is None and not is_sharded(pl_module.student):
            self.first_grad = {
                n: p.grad.detach().clone()
                for n, p in pl_module.student.named_parameters()
                if p.grad is not None
            }

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        out = {
            "student": full_state_dict(pl_module.student, cpu_offload=False),
            "ema": ema.ema_state_dict(pl_module),
            "sharded": is_sharded(pl_module.student),
            "step": trainer.global_step,
            "r": float(pl_module.tangent_warmup_r),
            "first_grad": self.first_grad,
        }
        self.path.mkdir(parents=True, exist_ok=True)
        torch.save(out, self.path / f"rank{trainer.global_rank}.pt")


class SkipSharding(L.Callback):
    """The bug the FSDP test must catch: ``configure_model`` forgets ``fully_shard``."""

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        pl_module.configure_model = lambda: None


class PauseAt(L.Callback):
    """At the start of the batch after optimizer step ``step``: touch ``marker``, then hang
    (the test SIGKILLs the process there; the step-``step`` checkpoint is on disk)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = int(step), Path(marker)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(self.step))
            time.sleep(600)
