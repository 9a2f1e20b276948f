"""``ModelCheckpoint`` whose ``last.ckpt`` always holds the step the run ended at."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalStepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` plus a ``last.ckpt`` of the final step.

    Lightning writes ``last.ckpt`` at train end only if it never wrote one, so a run whose
    ``max_steps`` is not a multiple of ``every_n_train_steps`` (800 steps, every 500) ended with
    ``last.ckpt`` at step 500: `export ckpt=last` then silently exported an older model.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # _last_global_step_saved / _save_last_checkpoint: Lightning's own bookkeeping (2.6),
        # the same calls its on_train_end makes; tests/test_checkpointing.py pins the behaviour.
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
