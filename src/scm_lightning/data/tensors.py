"""Images or latents stored as one array file: ``.npz``, ``.npy``, ``.safetensors``, ``.pt``.

Arrays are ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, H, W)`` (one channel), square, of
uint8 or floating dtype. The declared ``value_range`` is checked and mapped affinely to
``[-1, 1]``; ``value_range=None`` passes the values through unchanged (latents). Nothing is
unpickled: ``np.load(allow_pickle=False)``, ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from scm_lightning.data.base import ArrayDataset, ImageDataModule

log = logging.getLogger(__name__)

SUFFIXES = (".npz", ".npy", ".safetensors", ".pt", ".pth")
LAYOUTS = ("auto", "NCHW", "NHWC")
_SHOW = 5  # how many offending indices an error or warning lists


def _load_arrays(path: Path, names: tuple[str, ...]) -> tuple[list[str], dict[str, Tensor]]:
    """Return (all array names in ``path``, {name: CPU tensor} for the ``names`` present).

    A ``.npy`` file or a bare tensor in ``.pt`` has one unnamed array, returned as
    ``"<array>"``.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {SUFFIXES}")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.keys())
                return keys, {k: torch.from_numpy(np.array(npz[k])) for k in names if k in keys}
        if suffix == ".npy":
            return ["<array>"], {"<array>": torch.from_numpy(np.load(path, allow_pickle=False))}
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                return keys, {k: f.get_tensor(k) for k in names if k in keys}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects, corrupt zip or header: name the file
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, Tensor):
        return ["<array>"], {"<array>": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(obj)}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    return sorted(tensors), {k: tensors[k] for k in names if k in tensors}


def _to_nchw(x: Tensor, layout: str, path: Path) -> tuple[Tensor, str]:
    """Return a (view) ``(N, C, H, W)`` of ``x`` and the layout used."""
    if x.ndim == 3:  # (N, H, W): one channel
        x, layout = x.unsqueeze(1), "NHW"
    elif x.ndim != 4:
        raise ValueError(
            f"{path}: images must have 3 or 4 dimensions ((N, H, W), (N, C, H, W) or "
            f"(N, H, W, C)), got shape {tuple(x.shape)}"
        )
    elif layout == "auto":
        _, a, b, c = x.shape
        if b == c and a != b:
            layout = "NCHW"
        elif a == b and c != a:
            layout = "NHWC"
        else:
            raise ValueError(
                f"{path}: cannot tell (N, C, H, W) from (N, H, W, C) for shape "
                f"{tuple(x.shape)}; pass layout='NCHW' or 'NHWC'"
            )
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    if x.shape[2] != x.shape[3]:
        raise ValueError(
            f"{path}: images must be square, got H×W = {x.shape[2]}×{x.shape[3]} "
            f"(layout {layout}, shape {tuple(x.shape)})"
        )
    return x, layout


def _resolve_range(value_range: Any, dtype: torch.dtype, path: Path) -> tuple[float, float] | None:
    if value_range is None:
        return None
    if value_range == "auto":
        if dtype == torch.uint8:
            return (0.0, 255.0)
        if dtype.is_floating_point:
            return (-1.0, 1.0)
        raise ValueError(f"{path}: dtype {dtype} needs an explicit value_range=(lo, hi)")
    if value_range == "uint8":
        return (0.0, 255.0)
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"value_range must be 'auto', 'uint8', None or (lo, hi), got {value_range!r}"
        ) from e
    if not lo < hi:
        raise ValueError(f"value_range must be (lo, hi) with lo < hi, got {value_range}")
    return (lo, hi)


class TensorDataModule(ImageDataModule):
    """Images or latents from one array file, loaded into memory in ``__init__``.

    Args:
        path: ``.npz`` / ``.npy`` / ``.safetensors`` / ``.pt`` file.
        batch_size, seed, val_size, num_workers, flip: see :class:`ImageDataModule`.
        key: name of the image array (a ``.npy`` file or a bare tensor in ``.pt`` has none).
        labels_key: name of the int label array ``(N,)``.
        conditional: ``None`` uses labels if ``labels_key`` exists (logged), ``True``
            requires them, ``False`` ignores them (labels zeros, ``num_classes`` None).
        num_classes: defaults to ``max(label) + 1``.
        value_range: ``"auto"`` (uint8 → ``(0, 255)``, float → ``(-1, 1)``), ``"uint8"``,
            ``(lo, hi)`` (checked, then mapped to ``[-1, 1]``) or ``None`` (no check, no
            mapping: latents).
        layout: ``"auto"``, ``"NCHW"`` or ``"NHWC"``.
        on_nonfinite: ``"error"`` or ``"skip"`` (drop samples with NaN/inf, with a warning).
        range_tolerance: slack on the range check, as a fraction of ``hi − lo`` (float data).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int = 128,
        seed: int = 0,
        val_size: int = 256,
        num_workers: int = 0,
        flip: bool = False,
        key: str = "images",
        labels_key: str = "labels",
        conditional: bool | None = None,
        num_classes: int | None = None,
        value_range: Any = "auto",
        layout: str = "auto",
        on_nonfinite: str = "error",
        range_tolerance: float = 1e-5,
    ) -> None:
        super().__init__(
            batch_size=batch_size, seed=seed, val_size=val_size, num_workers=num_workers, flip=flip
        )
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if on_nonfinite not in ("error", "skip"):
            raise ValueError(f"on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"tensor data file not found: {self.path}")
        if not self.path.is_file():
            raise ValueError(f"tensor data path is not a file: {self.path}")
        available, arrays = _load_arrays(self.path, (key, labels_key))
        image_key = "<array>" if "<array>" in arrays else key
        if image_key not in arrays:
            raise ValueError(f"{self.path}: no array named {key!r}; available: {available}")
        raw = arrays[image_key]
        if raw.dtype == torch.bool or raw.is_complex():
            raise ValueError(f"{self.path}: unsupported image dtype {raw.dtype}")
        images, self.layout = _to_nchw(raw, layout, self.path)
        n = images.shape[0]
        if n == 0:
            raise ValueError(f"{self.path}: array {image_key!r} holds no images (N = 0)")

        labels, self.conditional = self._load_labels(arrays, available, labels_key, conditional, n)
        keep = self._finite_rows(images, on_nonfinite)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        bounds = _resolve_range(value_range, images.dtype, self.path)
        scale, shift = 1.0, 0.0
        if bounds is not None:
            self._check_range(images, bounds, range_tolerance)
            scale = 2.0 / (bounds[1] - bounds[0])  # affine map [lo, hi] -> [-1, 1]
            shift = -1.0 - bounds[0] * scale

        self.channels = int(images.shape[1])
        self.resolution = int(images.shape[2])
        self.num_classes = None
        if self.conditional:
            top = int(labels.max())
            if num_classes is not None and int(num_classes) <= top:
                raise ValueError(
                    f"{self.path}: num_classes={num_classes} but labels go up to {top}"
                )
            self.num_classes = int(num_classes) if num_classes is not None else top + 1
        self.key, self.labels_key = image_key, labels_key
        self.value_range, self.on_nonfinite = bounds, on_nonfinite
        self.dtype, self.num_dropped = str(raw.dtype), 0 if keep is None else n - len(keep)
        self._dataset = ArrayDataset(images, labels, scale, shift)
        self._check_batch_size(len(self.train_dataset()))  # type: ignore[arg-type]

    def _load_labels(
        self,
        arrays: dict[str, Tensor],
        available: list[str],
        labels_key: str,
        conditional: bool | None,
        n: int,
    ) -> tuple[Tensor, bool]:
        if conditional is False or (conditional is None and labels_key not in arrays):
            if conditional is None:
                log.info("%s: no %r array, loading unconditionally", self.path, labels_key)
            return torch.zeros(n, dtype=torch.int64), False
        if labels_key not in arrays:
            raise ValueError(
                f"{self.path}: conditional=True but no labels array {labels_key!r}; "
                f"available: {available}"
            )
        labels = arrays[labels_key]
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(
                f"{self.path}: labels {labels_key!r} must have shape ({n},) to match the "
                f"images, got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"{self.path}: labels must be integers, got dtype {labels.dtype}")
        if int(labels.min()) < 0:
            first = int(torch.nonzero(labels < 0)[0])
            raise ValueError(
                f"{self.path}: labels must be >= 0; label[{first}] = {int(labels[first])}"
            )
        return labels.to(torch.int64), True

    def _finite_rows(self, images: Tensor, on_nonfinite: str) -> Tensor | None:
        """Indices of samples without NaN/inf (None when all are finite)."""
        if not images.dtype.is_floating_point:
            return None
        finite = torch.isfinite(images)
        if bool(finite.all()):
            return None
        bad_rows = torch.nonzero(~finite.flatten(1).all(dim=1)).flatten()
        count, first = int((~finite).sum()), bad_rows[:_SHOW].tolist()
        what = (
            f"{count} non-finite values in {len(bad_rows)} samples (first sample indices {first})"
        )
        if on_nonfinite == "error":
            raise ValueError(f"{self.path}: {what}; fix the data or pass on_nonfinite='skip'")
        keep = torch.nonzero(finite.flatten(1).all(dim=1)).flatten()
        if len(keep) == 0:
            raise ValueError(f"{self.path}: every sample has non-finite values ({what})")
        log.warning("%s: skipping %d samples: %s", self.path, len(bad_rows), what)
        return keep

    def _check_range(self, images: Tensor, bounds: tuple[float, float], tolerance: float) -> None:
        lo, hi = bounds
        slack = tolerance * (hi - lo) if images.dtype.is_floating_point else 0.0
        outside = (images < lo - slack) | (images > hi + slack)
        if bool(outside.any()):
            rows = torch.nonzero(outside.flatten(1).any(dim=1)).flatten()
            raise ValueError(
                f"{self.path}: {int(outside.sum())} values in {len(rows)} samples lie outside "
                f"the declared value_range [{lo:g}, {hi:g}] (observed min {float(images.min()):g}, "
                f"max {float(images.max()):g}; first sample indices {rows[:_SHOW].tolist()}); "
                "declare the right value_range, or value_range=None for latents"
            )

    def base_dataset(self) -> Dataset:
        return self._dataset

    def config_fields(self) -> dict[str, Any]:
        stat = self.path.stat()
        return {
            "path": str(self.path.resolve()),
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "key": self.key,
            "labels_key": self.labels_key if self.conditional else None,
            "num_classes": self.num_classes,
            "value_range": self.value_range,
            "layout": self.layout,
            "on_nonfinite": self.on_nonfinite,
            "shape": list(self._dataset.images.shape),
        }
