"""The default data set: scikit-learn's handwritten digits (ships with sklearn, no download).

1797 grayscale 8×8 images with integer pixels 0..16 and labels 0..9. Pixels are mapped
affinely to ``[-1, 1]`` (``x = p/8 − 1``) and optionally upsampled to a larger resolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from scm_lightning.data.base import ArrayDataset, ImageDataModule

DIGITS_RESOLUTION = 8  # native size of sklearn's digits
DIGITS_MAX_PIXEL = 16.0  # pixels are integers 0..16
UPSAMPLE_MODES = ("bilinear", "nearest")


def load_digits_tensors(
    resolution: int = DIGITS_RESOLUTION, upsample: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images (1797, 1, R, R) float32 in [-1, 1], labels (1797,) int64)``.

    ``resolution`` must be a positive multiple of 8. Upsampling is by an integer factor:
    ``"nearest"`` repeats each pixel in a block (the digits stay blocky and keep exactly
    17 grey levels); ``"bilinear"`` (``align_corners=False``) interpolates between pixel
    centres, giving smooth edges. Both keep values in ``[-1, 1]`` (convex combinations).
    """
    from sklearn.datasets import load_digits  # local: sklearn is slow to import

    if int(resolution) < 1 or int(resolution) % DIGITS_RESOLUTION != 0:
        raise ValueError(
            f"resolution must be a positive multiple of {DIGITS_RESOLUTION} for the digits "
            f"data, got {resolution}"
        )
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    bunch = load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float64)  # (1797, 8, 8), 0..16
    images = (pixels / (DIGITS_MAX_PIXEL / 2) - 1.0).unsqueeze(1)  # [-1, 1]
    if resolution != DIGITS_RESOLUTION:
        kwargs = {"align_corners": False} if upsample == "bilinear" else {}
        images = F.interpolate(images, size=(resolution, resolution), mode=upsample, **kwargs)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images.to(torch.float32).contiguous(), labels


class DigitsDataModule(ImageDataModule):
    """sklearn digits: 1 channel, ``resolution`` px, 10 classes (or unconditional).

    Args:
        batch_size: images per training batch (at most 1797, or 3594 with ``flip``).
        seed: training shuffle seed.
        val_size: images in the fixed validation subset.
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest).
        resolution: 8 (native) or a multiple of 8 reached by ``upsample``.
        flip: add mirrored copies (off by default: mirrored digits are not digits).
        conditional: labels are the digits and ``num_classes = 10``; if False labels are
            zeros and ``num_classes = None``.
        upsample: ``"bilinear"`` or ``"nearest"``, used when ``resolution > 8``.
    """

    def __init__(
        self,
        batch_size: int = 128,
        seed: int = 0,
        val_size: int = 256,
        num_workers: int = 0,
        resolution: int = 8,
        flip: bool = False,
        conditional: bool = True,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            seed=seed,
            val_size=val_size,
            num_workers=num_workers,
            flip=flip,
        )
        images, labels = load_digits_tensors(resolution, upsample)
        self.channels = 1
        self.resolution = int(resolution)
        self.conditional = bool(conditional)
        self.num_classes = 10 if self.conditional else None
        self.upsample = upsample
        if not self.conditional:
            labels = torch.zeros_like(labels)
        self._dataset = ArrayDataset(images, labels)
        self._check_batch_size(len(self.train_dataset()))  # type: ignore[arg-type]

    def base_dataset(self) -> Dataset:
        return self._dataset

    def config_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "source": "sklearn.datasets.load_digits",
            "n": len(self._dataset),
            "resolution": self.resolution,
            "conditional": self.conditional,
        }
        if self.resolution != DIGITS_RESOLUTION:
            fields["upsample"] = self.upsample
        return fields
