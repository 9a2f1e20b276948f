"""FID during training: sample with the EMA student at each NFE, compare to the training data.

Every ``every_n_steps`` optimizer steps (and once more when fit ends) the callback draws
``num_samples`` images per NFE with ``pl_module.sample`` (EMA weights swapped in when an
:class:`~scm_lightning.callbacks.ema.EMA` callback is present), embeds them with the feature
network and logs the Fréchet distance to the cached statistics of the training images as
``fid/nfe<k>``, once per measurement at its step (monitorable by ``ModelCheckpoint``). Under
DDP every rank draws its share with its own seed and the feature sums are all-reduced, so
every rank holds the same value.

The feature network lives on this callback, never on the LightningModule, so it never
lands in checkpoints. Samples use the same seeds at every evaluation, so the curve's
step-to-step changes reflect the weights, not the noise.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from scm_lightning.callbacks.ema import EMA
from scm_lightning.callbacks.loss_curve import plot_dir
from scm_lightning.data.base import class_label_probs, eval_prompts
from scm_lightning.metrics.features import build_feature_extractor
from scm_lightning.metrics.frechet import (
    FeatureStats,
    accumulate_stats,
    cached_reference_stats,
    frechet_distance_from_stats,
)
from scm_lightning.progress import progress
from scm_lightning.sampling import draw_condition


def _images(item: Any) -> Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


class FIDCallback(Callback):
    """Periodic Fréchet distance of 1-/few-step samples against the training data.

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this.
        nfes: numbers of sampling steps to score; each logs ``fid/nfe<k>``.
        num_samples: generated images per NFE (over all ranks).
        feature: feature network spec for :func:`build_feature_extractor` (``"digits"``,
            ``"inception"``, ``"dinov2"``, ``{"name": "inception", "weights_path": ...}``, a
            dotted path).
        feature_weights: local weights file of the named feature network (``eval.feature_weights``).
        ref_cache_dir: folder of cached reference statistics (``ref-<hash>.npz``).
        t_mid: intermediate TrigFlow time of 2-step sampling (radians; paper: 1.1).
        ema_profile: EMA profile to sample with (default: the EMA callback's ``validate_with``).
        batch_size: images per sampling / feature batch on each rank.
        ref_batch_size: images per feature batch for the reference statistics (default:
            ``batch_size``; no sampling happens there, so it can be larger).
        num_ref_samples: training images in the reference statistics (at most all of them).
        ref_stats_path: precomputed ``FeatureStats.save`` file used instead of the data.
        seed: base seed of the sampling noise (rank r adds r).
        num_classes: class count of the drawn labels; ``"auto"`` takes the datamodule's
            ``num_classes`` (``None`` there means unconditional).
        labels: how labels are drawn (:func:`data.base.class_label_probs`): ``"uniform"``
            over classes or ``"data"`` (the training labels' frequencies).
        at_fit_end: evaluate once more at the end of fit unless the last step was scored.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        nfes: Sequence[int] = (1, 2),
        num_samples: int = 10_000,
        feature: str | dict[str, Any] = "digits",
        feature_weights: str | None = None,
        ref_cache_dir: str = "fid_refs",
        t_mid: float = 1.1,
        ema_profile: str | None = None,
        batch_size: int = 500,
        ref_batch_size: int | None = None,
        num_ref_samples: int = 50_000,
        ref_stats_path: str | None = None,
        seed: int = 0,
        num_classes: int | str | None = "auto",
        labels: str = "uniform",
        at_fit_end: bool = True,
    ) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if not nfes or any(int(n) < 1 for n in nfes):
            raise ValueError(f"nfes must be positive step counts, got {nfes}")
        if int(num_samples) < 2 or int(batch_size) < 1:
            raise ValueError(
                f"need num_samples >= 2 and batch_size >= 1, got {num_samples}, {batch_size}"
            )
        self.every_n_steps = int(every_n_steps)
        self.nfes = tuple(int(n) for n in nfes)
        self.num_samples = int(num_samples)
        self.feature = feature
        self.feature_weights = feature_weights
        self.ref_cache_dir = ref_cache_dir
        self.t_mid = float(t_mid)
        self.ema_profile = ema_profile
        self.batch_size = int(batch_size)
        self.ref_batch_size = int(ref_batch_size or batch_size)
        self.num_ref_samples = int(num_ref_samples)
        self.ref_stats_path = ref_stats_path
        self.seed = int(seed)
        self.num_classes = num_classes
        self.labels = str(labels)
        self.at_fit_end = bool(at_fit_end)
        self.history: list[dict[str, float]] = []  # {"step", "nfe", "fd"}
        self.last_eval_step = -1
        self.ref_computed = 0  # how many times reference stats were computed (not loaded)
        self._net: nn.Module | None = None  # never a child of the LightningModule
        self._ref: FeatureStats | None = None

    # --- state (history survives resume; the feature net never enters a checkpoint) --------
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_eval_step": self.last_eval_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.last_eval_step = int(state_dict.get("last_eval_step", -1))

    # --- pieces ----------------------------------------------------------------------------
    def feature_net(self, device: torch.device) -> nn.Module:
        if self._net is None:
            self._net = build_feature_extractor(self.feature, device, self.feature_weights)
        return self._net.to(device)

    def reference_stats(self, trainer: L.Trainer, device: torch.device) -> FeatureStats:
        """Statistics of the training images: loaded from the cache, or computed once."""
        if self._ref is not None:
            return self._ref
        net = self.feature_net(device)
        if self.ref_stats_path is not None:
            self._ref = FeatureStats.load(self.ref_stats_path, device=device)
            return self._ref
        rank, world = trainer.global_rank, trainer.world_size
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "config_key") and hasattr(dm, "reference_images"):
            count = min(self.num_ref_samples, int(dm.num_images))
            data_config: dict[str, Any] = {"datamodule": dm.config_key(), "count": count}

            def images_of_rank() -> Tensor:
                return dm.reference_images(count)[rank::world]

        else:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            if dataset is None:
                raise ValueError(
                    "FIDCallback needs a datamodule with reference_images() or a train "
                    "DataLoader with a .dataset; or pass ref_stats_path"
                )
            count = min(self.num_ref_samples, len(dataset))
            head = torch.stack([_images(dataset[i]) for i in range(min(8, count))])
            digest = hashlib.sha256(head.float().cpu().numpy().tobytes()).hexdigest()[:16]
            data_config = {"dataset": type(dataset).__qualname__, "count": count, "head": digest}

            def images_of_rank() -> Tensor:
                return torch.stack([_images(dataset[i]) for i in range(rank, count, world)])

        def compute() -> FeatureStats:
            batches = images_of_rank().split(self.ref_batch_size)
            return accumulate_stats(batches, net, device, FeatureStats(net.num_features, device))

        self._ref, _, computed = cached_reference_stats(
            self.ref_cache_dir, data_config, net.feature_id, compute, device=device
        )
        self.ref_computed += int(computed)
        return self._ref

    def _classes(self, trainer: L.Trainer) -> int | None:
        if self.num_classes == "auto":
            return getattr(trainer.datamodule, "num_classes", None)
        return None if self.num_classes is None else int(self.num_classes)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[int, float]:
        """Fréchet distance per NFE of samples from the (EMA) student; every rank must call it."""
        device = pl_module.device
        ref = self.reference_stats(trainer, device)
        net = self.feature_net(device)
        rank, world = trainer.global_rank, trainer.world_size
        # Equal sample counts on every rank (FSDP needs the same number of forwards everywhere);
        # the surplus of the last ranks is drawn and discarded.
        per_rank = math.ceil(self.num_samples / world)
        keep = max(0, min(per_rank, self.num_samples - rank * per_rank))
        num_classes = self._classes(trainer)
        probs = class_label_probs(self.labels, trainer.datamodule, num_classes)
        prompts = eval_prompts(trainer.datamodule)  # text pairs: held-out prompts
        emas = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
        swap = emas[0].swapped(pl_module, self.ema_profile) if emas else nullcontext()
        was_training = pl_module.training
        pl_module.eval()
        results: dict[int, float] = {}
        try:
            stage = f"FID nfe={','.join(map(str, self.nfes))} (step {trainer.global_step})"
            with swap, progress(stage, per_rank * len(self.nfes), trainer, "fid") as advance:
                for nfe in self.nfes:
                    gen = torch.Generator(device=device).manual_seed(self.seed + rank)
                    stats = FeatureStats(net.num_features, device=device)
                    for start in range(0, per_rank, self.batch_size):
                        n = min(self.batch_size, per_rank - start)
                        labels = draw_condition(n, num_classes, gen, probs, device, prompts)
                        x = pl_module.sample(
                            n, nfe, generator=gen, t_mid=self.t_mid, class_labels=labels
                        )
                        k = max(0, min(n, keep - start))
                        accumulate_stats([x[:k]], net, device, stats)  # k = 0: nothing added
                        advance(n)
                    results[nfe] = frechet_distance_from_stats(stats.sync(), ref)
        finally:
            pl_module.train(was_training)
        step = trainer.global_step
        self.history.extend({"step": step, "nfe": nfe, "fd": fd} for nfe, fd in results.items())
        self.last_eval_step = step
        return results

    # --- hooks -----------------------------------------------------------------------------
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self.last_eval_step:
            return
        self._log(trainer, self.evaluate(trainer, pl_module))

    def _log(self, trainer: L.Trainer, results: dict[int, float]) -> None:
        """Each measurement reaches the loggers once, at its step (``pl_module.log`` would have
        Lightning re-log the value at every later logging step); ``callback_metrics`` keeps it
        monitorable by ``ModelCheckpoint``. Values are identical on all ranks."""
        metrics = {f"fid/nfe{nfe}": fd for nfe, fd in results.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self.last_eval_step:
            self._log(trainer, self.evaluate(trainer, pl_module))
        out_dir = plot_dir(trainer)  # a collective: every rank calls it
        if trainer.is_global_zero and self.history:
            self.write_history(out_dir)

    def write_history(self, out_dir: Path) -> Path:
        """Write ``fid_history.json`` and a plot ``fid_history.png`` (FD vs step per NFE)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fid_history.json").write_text(json.dumps(self.history, indent=1))
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
        ax = fig.add_subplot()
        for nfe in sorted({h["nfe"] for h in self.history}):
            pts = sorted((h["step"], h["fd"]) for h in self.history if h["nfe"] == nfe)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{nfe} step")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"FD ({getattr(self._net, 'feature_id', self.feature)})")
        if min(h["fd"] for h in self.history) > 0:
            ax.set_yscale("log")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out_dir / "fid_history.png"
        fig.savefig(path)
        return path
