"""A folder of PNG/JPEG/WebP/BMP images, decoded lazily with PIL.

``__init__`` lists the files (so a missing root, an empty folder or a misplaced image
fails at once) and :meth:`ImageFolderDataModule.scan` opens every file (header, size and
PIL's ``verify()``; optionally a full decode) so corrupt files surface before the first
training step. ``setup()`` runs the scan if the CLI has not already.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from scm_lightning.data.base import ImageDataModule, stable_hash

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_SHOW = 5  # how many offending paths a message lists


def list_images(directory: Path, recursive: bool) -> list[Path]:
    """Image files under ``directory`` (extension match is case-insensitive), sorted.

    Hidden files and folders (name starting with ``.``, e.g. macOS ``._x.png`` resource
    forks, ``.ipynb_checkpoints``) are skipped; symlinked folders are not followed.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [] if not recursive else [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in EXTENSIONS
        )
    return sorted(found)


def load_image(path: Path, channels: int, resolution: int, center_crop: bool, resample: str):
    """Decode ``path`` to float32 ``(channels, resolution, resolution)`` in ``[-1, 1]``.

    EXIF orientation is applied; alpha is dropped. With ``center_crop`` the shorter side
    is resized to ``resolution`` and the centre cropped; without, the (square) image is
    resized directly.
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit: convert("L") would clip
            wide = np.asarray(im, dtype=np.float64) / 257.0  # 65535 -> 255
            im = Image.fromarray(wide.round().clip(0, 255).astype(np.uint8), mode="L")
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # PIL warns when converting palette+transparency to RGB
        im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    if center_crop and w != h:
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        im = im.resize(size, RESAMPLE[resample])
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    elif im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), RESAMPLE[resample])
    array = np.asarray(im, dtype=np.uint8).reshape(resolution, resolution, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class FolderDataset(Dataset):
    """Map-style dataset over a list of image paths; decodes on access."""

    def __init__(self, paths: list[Path], labels: list[int], **load_kwargs: Any) -> None:
        self.paths, self.labels, self.load_kwargs = paths, labels, load_kwargs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path = self.paths[index]
        try:
            image = load_image(path, **self.load_kwargs)
        except Exception as e:
            raise OSError(
                f"cannot decode {path}: {type(e).__name__}: {e} (scan(check='full') finds "
                "such files before training)"
            ) from e
        return image, torch.tensor(self.labels[index], dtype=torch.int64)


@dataclass
class ScanReport:
    """What :meth:`ImageFolderDataModule.scan` found."""

    num_files: int
    num_ok: int
    bad: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)
    sizes: Counter = field(default_factory=Counter)  # (w, h) -> count, readable files
    seconds: float = 0.0


class ImageFolderDataModule(ImageDataModule):
    """Images from a folder tree.

    Args:
        root: the folder.
        resolution: output size (square).
        channels: 3 (RGB) or 1 (grayscale, PIL mode ``L``).
        batch_size, seed, val_size, num_workers, flip: see :class:`ImageDataModule`.
        recursive: include subfolders (always true within class folders).
        class_subfolders: each top-level subfolder is a class (sorted names → labels
            0..K−1, ``num_classes = K``); images directly in ``root`` are an error.
        on_bad_file: ``"error"`` stops at the first unreadable file, naming it;
            ``"skip"`` drops unreadable files with a warning (count and first paths).
        center_crop: resize the shorter side and crop the centre; if False every image must
            already be square (checked by the scan) and is resized.
        on_mixed_sizes: ``"resize"`` accepts any sizes; ``"error"`` requires all images to
            share one size (reports each size with example paths).
        check: ``"header"`` (open, size, ``verify()``: fast, but a truncated JPEG body
            passes) or ``"full"`` (also decode every image).
        resample: PIL filter for resizing (``bicubic``, ``lanczos``, ``bilinear``, ``box``,
            ``nearest``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        channels: int = 3,
        batch_size: int = 128,
        seed: int = 0,
        val_size: int = 256,
        num_workers: int = 0,
        flip: bool = False,
        recursive: bool = True,
        class_subfolders: bool = False,
        on_bad_file: str = "error",
        center_crop: bool = True,
        on_mixed_sizes: str = "resize",
        check: str = "header",
        resample: str = "bicubic",
    ) -> None:
        super().__init__(
            batch_size=batch_size, seed=seed, val_size=val_size, num_workers=num_workers, flip=flip
        )
        for name, value, allowed in (
            ("channels", channels, (1, 3)),
            ("on_bad_file", on_bad_file, ("error", "skip")),
            ("on_mixed_sizes", on_mixed_sizes, ("resize", "error")),
            ("check", check, ("header", "full")),
            ("resample", resample, tuple(RESAMPLE)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if int(resolution) < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.root = Path(root).expanduser()
        self.resolution, self.channels = int(resolution), int(channels)
        self.recursive, self.class_subfolders = bool(recursive), bool(class_subfolders)
        self.on_bad_file, self.center_crop = on_bad_file, bool(center_crop)
        self.on_mixed_sizes, self.check, self.resample = on_mixed_sizes, check, resample
        self.paths, self.labels, self.class_names = self._list()
        self.num_classes = len(self.class_names) if self.class_subfolders else None
        self._all_paths = list(self.paths)  # as listed, before any skipping (config_key)
        self.report: ScanReport | None = None
        self._files_hash: str | None = None

    def _list(self) -> tuple[list[Path], list[int], list[str]]:
        if not self.root.exists():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder root is not a directory: {self.root}")
        looked_for = "/".join(e.lstrip(".") for e in EXTENSIONS)
        if not self.class_subfolders:
            paths = list_images(self.root, self.recursive)
            if not paths:
                where = "or its subfolders " if self.recursive else ""
                raise ValueError(
                    f"no images found in {self.root} {where}(looked for {looked_for}, "
                    "case-insensitive, hidden files skipped)"
                )
            return paths, [0] * len(paths), []
        top = list_images(self.root, recursive=False)
        if top:
            shown = ", ".join(str(p) for p in top[:_SHOW])
            raise ValueError(
                f"class_subfolders=True but {len(top)} images lie directly in {self.root} "
                f"(e.g. {shown}); move them into a class folder or set class_subfolders=False"
            )
        classes = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not classes:
            raise ValueError(f"class_subfolders=True but {self.root} has no subfolders")
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = list_images(self.root / name, recursive=True)
            if not found:
                raise ValueError(
                    f"class folder {self.root / name} contains no images (looked for {looked_for})"
                )
            paths += found
            labels += [label] * len(found)
        return paths, labels, classes

    def _check_file(self, path: Path) -> tuple[int, int]:
        """Open ``path`` per ``check`` and return its (w, h); raises on a bad file."""
        with Image.open(path) as im:
            size = im.size
            im.verify()  # reads the whole stream and checks it (PNG CRCs); no decode
        if self.check == "full":
            with Image.open(path) as im:
                im.load()
        return size

    def scan(self) -> ScanReport:
        """Open every listed file; raise on the first bad one or skip bad ones (warning).

        Also enforces ``on_mixed_sizes`` and (without ``center_crop``) square images, and
        that at least ``batch_size`` images remain. The report is kept in ``self.report``;
        a second call returns it without rescanning.
        """
        if self.report is not None:
            return self.report
        start = time.perf_counter()
        report = ScanReport(num_files=len(self.paths), num_ok=0)
        paths, labels, examples = [], [], {}
        for path, label in zip(self.paths, self.labels, strict=True):
            try:
                size = self._check_file(path)
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
                if self.on_bad_file == "error":
                    raise ValueError(
                        f"unreadable image {path}: {reason} (on_bad_file='skip' drops such "
                        "files with a warning)"
                    ) from e
                report.bad.append((path, reason))
                continue
            report.sizes[size] += 1
            examples.setdefault(size, path)
            paths.append(path)
            labels.append(label)
        report.num_ok, report.seconds = len(paths), time.perf_counter() - start
        if report.bad:
            shown = "; ".join(f"{p} ({r})" for p, r in report.bad[:_SHOW])
            log.warning(
                "%s: skipped %d unreadable of %d image files, e.g. %s",
                self.root,
                len(report.bad),
                report.num_files,
                shown,
            )
        if not paths:
            raise ValueError(f"all {report.num_files} image files in {self.root} are unreadable")
        if self.on_mixed_sizes == "error" and len(report.sizes) > 1:
            found = ", ".join(
                f"{w}x{h}: {n} (e.g. {examples[(w, h)]})"
                for (w, h), n in report.sizes.most_common()
            )
            raise ValueError(
                f"images in {self.root} have mixed sizes ({found}); on_mixed_sizes='error' "
                "requires one size (use 'resize' to resize and center-crop them)"
            )
        if not self.center_crop:
            non_square = [(s, examples[s]) for s in report.sizes if s[0] != s[1]]
            if non_square:
                shown = ", ".join(f"{w}x{h} (e.g. {p})" for (w, h), p in non_square[:_SHOW])
                raise ValueError(f"center_crop=False needs square images; {self.root} has {shown}")
        self.paths, self.labels, self.report = paths, labels, report
        log.info(
            "%s: %d images ok (%d sizes) in %.2fs",
            self.root,
            report.num_ok,
            len(report.sizes),
            report.seconds,
        )
        self._check_batch_size(len(self.train_dataset()))  # type: ignore[arg-type]
        return report

    def setup(self, stage: str | None = None) -> None:
        self.scan()

    def base_dataset(self) -> Dataset:
        self.scan()  # listing alone does not prove the files decode
        return FolderDataset(
            self.paths,
            self.labels,
            channels=self.channels,
            resolution=self.resolution,
            center_crop=self.center_crop,
            resample=self.resample,
        )

    def config_fields(self) -> dict[str, Any]:
        if self._files_hash is None:  # relative paths and byte sizes of the listed files
            files = [(str(p.relative_to(self.root)), p.stat().st_size) for p in self._all_paths]
            self._files_hash = stable_hash({"files": files})
        return {
            "root": str(self.root.resolve()),
            "files": self._files_hash,
            "num_files": len(self._all_paths),
            "resolution": self.resolution,
            "channels": self.channels,
            "center_crop": self.center_crop,
            "resample": self.resample,
            "class_names": self.class_names,
            "on_bad_file": self.on_bad_file,
        }
