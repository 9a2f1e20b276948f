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


def log_grid(trainer: L.Trainer, key: str, path: Path) -> None:
    """A saved grid to every logger that takes images, at the current step: TensorBoard's
    ``add_image``, or a logger's own ``log_image`` (Weights & Biases, ...). CSV keeps the file."""
    import numpy as np
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.loggers.logger import DummyLogger
    from PIL import Image

    with Image.open(path) as img:
        grid = img.copy()
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            array = np.asarray(grid)
            formats = "HW" if array.ndim == 2 else "HWC"
            logger.experiment.add_image(key, array, global_step=step, dataformats=formats)
        elif not isinstance(logger, DummyLogger) and callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=[grid], step=step)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and when fit ends) save a grid per NFE with a fixed seed.

    Files: ``<dirpath>/samples_step{step:07d}_nfe{n}.png`` and ``samples_final_nfe{n}.png``;
    each also goes to the loggers as image ``samples/nfe{n}`` (:func:`log_grid`).
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
        from scm_lightning.data.base import class_label_probs, eval_prompts
        from scm_lightning.sampling import class_label_rows, draw_condition

        device = pl_module.device
        num_classes = pl_module.student.num_classes
        probs = class_label_probs(self.labels, trainer.datamodule, num_classes)
        prompts = eval_prompts(trainer.datamodule)
        with ema_weights(trainer, pl_module):
            for nfe in self.nfes:
                gen = torch.Generator(device=device).manual_seed(self.seed)
                labels = draw_condition(self.num_samples, num_classes, gen, probs, device, prompts)
                images = pl_module.sample(
                    self.num_samples, nfe=nfe, generator=gen, class_labels=labels
                )
                if trainer.is_global_zero:
                    path = save_grid(images, self.dirpath / f"samples_{tag}_nfe{nfe}.png")
                    log_grid(trainer, f"samples/nfe{nfe}", path)
                if not num_classes or self.per_class < 1:
                    continue
                rows = class_label_rows(num_classes, self.per_class).to(device)
                images = pl_module.sample(len(rows), nfe=nfe, generator=gen, class_labels=rows)
                if trainer.is_global_zero:
                    path = self.dirpath / f"samples_{tag}_nfe{nfe}_per_class.png"
                    path = save_grid(images, path, nrow=self.per_class)
                    log_grid(trainer, f"samples/nfe{nfe}_per_class", path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._write(trainer, pl_module, f"step{step:07d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "final")
