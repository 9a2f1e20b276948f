"""Shared plumbing for every data module: loaders, the fixed validation subset, x-flips.

Every data module yields batches ``(images, labels)``: ``images`` float32 ``(B, C, H, W)``
in ``[-1, 1]`` (raw values for latents loaded with ``value_range=None``), ``labels`` int64
``(B,)`` (zeros when unconditional). ``channels``, ``resolution`` and ``num_classes`` are
known right after ``__init__`` so a config can be checked against the teacher before any
work starts.
"""

from __future__ import annotations

import abc
import hashlib
import json
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from scm_lightning.sampling import LABEL_MODES

# The validation subset and the FID reference images are drawn with this fixed seed, not the
# training seed: changing the shuffling seed must not change what FID is measured against.
SUBSET_SEED = 0x5EED


class XFlipDataset(Dataset):
    """The base dataset followed by its horizontally mirrored copy (EDM's ``xflip``).

    Index ``i < N`` is item ``i``; index ``N + i`` is item ``i`` flipped along W. Putting the
    flip in the index keeps augmentation deterministic under the seeded sampler, with worker
    processes and with Lightning's DistributedSampler alike.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.n = len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.base[index % self.n]
        if index >= self.n:
            image = torch.flip(image, dims=(-1,))
        return image, label


def stable_hash(fields: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the JSON of ``fields`` (sorted keys), stable across runs."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ImageDataModule(L.LightningDataModule, abc.ABC):
    """Base class. Subclasses set ``channels``, ``resolution``, ``num_classes`` in ``__init__``
    and implement :meth:`base_dataset` (items ``(image (C, H, W) float32, label int64 ())``)
    and :meth:`config_fields`.

    Args:
        batch_size: images per training batch (incomplete last batch dropped).
        seed: seed of the training shuffle (and hence of the x-flip choice).
        val_size: size of the fixed validation subset (a subset of the training images,
            drawn with a fixed seed; for monitoring, not a held-out split). Clipped to N.
        num_workers: DataLoader worker processes; workers persist across epochs when > 0.
        flip: append horizontally flipped copies (doubles the epoch length).
    """

    channels: int
    resolution: int
    num_classes: int | None
    text_embed_dim: int | None = None  # width D of prompt embeddings (text pairs), else None
    collate_fn: Any = None  # DataLoader collate_fn (None: torch's default)

    def __init__(
        self,
        *,
        batch_size: int,
        seed: int,
        val_size: int,
        num_workers: int,
        flip: bool,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(val_size) < 1:
            raise ValueError(f"val_size must be >= 1, got {val_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.val_size = int(val_size)
        self.num_workers = int(num_workers)
        self.flip = bool(flip)

    # --- what subclasses provide -------------------------------------------------------
    @abc.abstractmethod
    def base_dataset(self) -> Dataset:
        """The unaugmented training images as a map-style dataset."""

    @abc.abstractmethod
    def config_fields(self) -> dict[str, Any]:
        """Everything that determines the images and labels (not loader settings)."""

    # --- shared behaviour ---------------------------------------------------------------
    def config_key(self) -> str:
        """Stable hash of the data config (key for cached FID reference statistics).

        Covers what determines images and labels; batch size, seed, workers, val_size and
        flip are excluded (the reference images are always unflipped, see
        :meth:`reference_images`).
        """
        return stable_hash({"class": type(self).__name__, **self.config_fields()})

    @property
    def num_images(self) -> int:
        """Number of (unaugmented) training images."""
        return len(self.base_dataset())  # type: ignore[arg-type]

    def train_dataset(self) -> Dataset:
        base = self.base_dataset()
        return XFlipDataset(base) if self.flip else base

    def _check_batch_size(self, n: int) -> None:
        if n < self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} exceeds the {n} training images of "
                f"{type(self).__name__}: with the incomplete last batch dropped an epoch "
                "would be empty; lower batch_size"
            )

    def _fixed_order(self, n: int) -> Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))

    def train_dataloader(self) -> DataLoader:
        """Shuffled by an :class:`EpochShuffleSampler`: the order is a function of
        ``(seed, epoch)`` only, split by data-parallel rank (W ranks × batch B see what one
        process sees with batch W·B), and a run resumed mid-epoch continues with the next
        batch of the same order. Drops the incomplete last (global) batch.
        """
        from scm_lightning.data.sampler import EpochShuffleSampler, resume_position

        dataset = self.train_dataset()
        self._check_batch_size(len(dataset))  # type: ignore[arg-type]
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochShuffleSampler(len(dataset), self.batch_size, self.seed, rank, world)  # type: ignore[arg-type]
        sampler.resume_from(*resume_position(trainer))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def val_indices(self) -> list[int]:
        """Indices of the fixed validation subset (independent of ``seed``), ascending."""
        n = len(self.base_dataset())  # type: ignore[arg-type]
        return sorted(self._fixed_order(n)[: min(self.val_size, n)].tolist())

    def val_dataloader(self) -> DataLoader:
        """The fixed subset of ``val_size`` unflipped training images, in a fixed order."""
        subset = Subset(self.base_dataset(), self.val_indices())
        return DataLoader(
            subset,
            batch_size=min(self.batch_size, len(subset)),
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def reference_images(self, max_count: int) -> Tensor:
        """Up to ``max_count`` unflipped training images ``(n, C, H, W)`` in ``[-1, 1]``.

        All images when ``max_count >= N``, else a subset drawn with a fixed seed (so the
        result depends only on the data config, matching :meth:`config_key`).
        """
        if int(max_count) < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        base = self.base_dataset()
        n = len(base)  # type: ignore[arg-type]
        if max_count >= n:
            indices = list(range(n))
        else:
            indices = sorted(self._fixed_order(n)[:max_count].tolist())
        return torch.stack([base[i][0] for i in indices])


class ArrayDataset(Dataset):
    """In-memory images ``(N, C, H, W)`` (any dtype, any strides) and int64 labels ``(N,)``.

    Item ``i`` is ``(images[i].float() * scale + shift, labels[i])``: storing uint8 and
    converting per item keeps memory at one byte per pixel.
    """

    def __init__(self, images: Tensor, labels: Tensor, scale: float = 1.0, shift: float = 0.0):
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.scale = float(scale)
        self.shift = float(shift)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index].to(torch.float32).contiguous()
        if self.scale != 1.0 or self.shift != 0.0:
            image = image * self.scale + self.shift
        return image, self.labels[index]


def class_label_probs(mode: str, datamodule: Any, num_classes: int | None) -> Tensor | None:
    """The label distribution evaluation samples from (:func:`sampling.draw_class_labels`).

    ``"uniform"`` -> None (uniform over classes); ``"data"`` -> the training labels'
    frequencies ``(num_classes,)`` (float64), read from ``datamodule.base_dataset()``.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"eval.labels={mode!r} is invalid: expected one of {list(LABEL_MODES)}")
    if mode == "uniform" or not num_classes:
        return None
    if datamodule is None or not hasattr(datamodule, "base_dataset"):
        raise ValueError("eval.labels='data' needs the run's data module (base_dataset())")
    dataset = datamodule.base_dataset()
    labels = getattr(dataset, "labels", None)
    if labels is None:  # a dataset without a label tensor: read the labels item by item
        labels = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])
    counts = torch.bincount(torch.as_tensor(labels).long().flatten(), minlength=num_classes)
    return counts[:num_classes].double() / counts[:num_classes].sum()


def eval_prompts(datamodule: Any) -> Any:
    """The prompts (a ``TextCondition``) evaluation samples a text-conditioned model with: the
    data module's held-out pairs (``eval_conditions()``); None for image/label data."""
    get = getattr(datamodule, "eval_conditions", None)
    return get() if callable(get) else None
