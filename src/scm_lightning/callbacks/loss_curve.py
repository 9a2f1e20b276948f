"""The training-loss curve, drawn as ``loss_curve.png`` next to ``fid_history.png`` at the end
of fit (in the logger's folder: ``<run_dir>/logs`` for CSV, ``<run_dir>/tensorboard``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor


def plot_dir(trainer: L.Trainer) -> Path:
    """Where a run's plots go: the first logger's folder, else ``default_root_dir``.

    ``trainer.log_dir`` broadcasts from rank 0, so every rank must call this.
    """
    from lightning.pytorch.loggers.logger import DummyLogger

    if trainer.loggers and not isinstance(trainer.loggers[0], DummyLogger):  # fast_dev_run
        return Path(trainer.log_dir or trainer.default_root_dir)
    return Path(trainer.default_root_dir)


def _step_loss(outputs: Any) -> Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss.detach() if isinstance(loss, Tensor) else None


class LossCurve(L.Callback):
    """Mean training loss per window of optimizer steps, plotted when fit ends.

    Lightning passes ``training_step``'s loss divided by ``accumulate_grad_batches``, so the
    sum over a step's micro-batches is the step's mean loss. Losses are summed on the device
    and read once per window (no per-step host sync). The history survives a resume.

    Args:
        every_n_steps: optimizer steps per point (default: ``trainer.log_every_n_steps``).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.history: list[dict[str, float]] = []  # {"step", "loss"}: window mean, its last step
        self._sum: Tensor | None = None
        self._steps = 0
        self._last_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # (a resumed run starts past 0)

    def _flush(self, step: int) -> None:
        if self._steps and self._sum is not None:
            self.history.append({"step": step, "loss": float(self._sum) / self._steps})
        self._sum, self._steps = None, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        loss = _step_loss(outputs)
        if loss is not None:
            self._sum = loss if self._sum is None else self._sum + loss
        step = trainer.global_step
        if step != self._last_step:  # an optimizer step completed with this micro-batch
            self._last_step = step
            self._steps += 1
            if self._steps >= (self.every_n_steps or trainer.log_every_n_steps):
                self._flush(step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer.global_step)
        out_dir = plot_dir(trainer)
        if trainer.is_global_zero and self.history:
            self.write(out_dir)

    def write(self, out_dir: Path) -> Path:
        """Write ``loss_history.json`` and ``loss_curve.png`` (loss vs optimizer step)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "loss_history.json").write_text(json.dumps(self.history, indent=1))
        points = [(h["step"], h["loss"]) for h in self.history if math.isfinite(h["loss"])]
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
        ax = fig.add_subplot()
        marker = "." if len(points) < 50 else None
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (window mean)")
        if points and min(p[1] for p in points) > 0:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out_dir / "loss_curve.png"
        fig.savefig(path)
        return path
