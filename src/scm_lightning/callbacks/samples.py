"""Sample grids written as PNG during and at the end of training (rank 0 only)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch

from scm_lightning.images import save_grid


@contextlib.contextmanager
def ema_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[str | None]:
    """Swap the first EMA callback's evaluation profile into the student, if there is one."""
    from scm_lightning.callbacks.ema import EMA

    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
    if ema is None:
        yield None
        return
    with ema.swapped(pl_module) as name:
        yield name


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and when fit ends) save a grid per NFE with a fixed seed.

    Files: ``<dirpath>/samples_step{step:07d}_nfe{n}.png`` and ``samples_final_nfe{n}.png``.
    A class-conditional model samples with labels drawn like every other evaluation path
    (``labels``: ``"uniform"`` or ``"data"``, :func:`sampling.draw_class_labels`) and also
    writes ``..._nfe{n}_per_class.png``: one row of ``per_class`` samples per class.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 0,
        nfes: Sequence[int] = (1, 2),
        num_samples: int = 64,
        seed: int = 1234,
        labels: str = "uniform",
        per_class: int = 8,
    ) -> None:
        if any(int(n) < 1 for n in nfes):
            raise ValueError(f"sample grid NFEs must be >= 1, got {list(nfes)}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.nfes = [int(n) for n in nfes]
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.labels = str(labels)
        self.per_class = int(per_class)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        from scm_lightning.fsdp import is_sharded

        # A sharded (FSDP2) student needs every rank in each forward: all ranks sample,
        # rank 0 writes. Otherwise only rank 0 samples.
        if not trainer.is_global_zero and not is_sharded(pl_module.student):
            return
        from scm_lightning.data.base import class_label_probs
        from scm_lightning.sampling import class_label_rows, draw_class_labels

        device = pl_module.device
        num_classes = pl_module.student.num_classes
        probs = class_label_probs(self.labels, trainer.datamodule, num_classes)
        with ema_weights(trainer, pl_module):
            for nfe in self.nfes:
                gen = torch.Generator(device=device).manual_seed(self.seed)
                labels = draw_class_labels(self.num_samples, num_classes, gen, probs, device)
                images = pl_module.sample(
                    self.num_samples, nfe=nfe, generator=gen, class_labels=labels
                )
                if trainer.is_global_zero:
                    save_grid(images, self.dirpath / f"samples_{tag}_nfe{nfe}.png")
                if not num_classes or self.per_class < 1:
                    continue
                rows = class_label_rows(num_classes, self.per_class).to(device)
                images = pl_module.sample(len(rows), nfe=nfe, generator=gen, class_labels=rows)
                if trainer.is_global_zero:
                    path = self.dirpath / f"samples_{tag}_nfe{nfe}_per_class.png"
                    save_grid(images, path, nrow=self.per_class)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._write(trainer, pl_module, f"step{step:07d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "final")
