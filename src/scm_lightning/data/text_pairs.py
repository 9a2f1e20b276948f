"""(image or latent, prompt embedding) pairs from a folder of safetensors shards.

Folder layout (the one format every text-conditioned path reads)::

    <path>/*.safetensors   shards (sorted by name, ``null.safetensors`` excluded), each with
        images                (N, C, H, W) float, in [-1, 1] (or latents: ``latents=True``)
        prompt_embeds         (N, L, D) the text encoder's hidden states
        pooled_prompt_embeds  (N, P) optional
        attention_mask        (N, L) optional (1 token, 0 padding)
    <path>/null.safetensors  the same embedding keys for 1 row: the empty/negative prompt's
                             embedding (CFG's unconditional pass, label dropout)

Batches are ``(images (B, C, H, W) float32, TextCondition of B prompts)``; the condition
travels in the ``class_labels`` slot. ``val_size`` pairs (a fixed subset, independent of the
training seed) are held out of training: validation runs on them and evaluation draws its
prompts from them (:meth:`TextPairsDataModule.eval_conditions`); FD reference statistics come
from the training images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from scm_lightning.data.base import ImageDataModule
from scm_lightning.teachers.conditioning import TextCondition, concat_conditions

NULL_FILE = "null.safetensors"
IMAGE_KEY = "images"
EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "attention_mask")


def read_shard(path: Path, need_images: bool = True) -> dict[str, Tensor]:
    """The tensors of one shard, checked for the keys and shapes of the module doc."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # corrupt header, not safetensors: name the file
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    keys = ((IMAGE_KEY,) if need_images else ()) + ("prompt_embeds",)
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing {missing}; holds {sorted(tensors)}")
    embeds = tensors["prompt_embeds"]
    if embeds.ndim != 3 or not embeds.dtype.is_floating_point:
        raise ValueError(
            f"{path}: prompt_embeds must be float (N, L, D), got {tuple(embeds.shape)}"
        )
    n, length = embeds.shape[:2]
    expected = {
        IMAGE_KEY: "(N, C, H, W)",
        "pooled_prompt_embeds": "(N, P)",
        "attention_mask": f"({n}, {length})",
    }
    for key, want in expected.items():
        value = tensors.get(key)
        if value is None or (key == IMAGE_KEY and not need_images):
            continue
        ok = value.shape[0] == n and value.ndim == {IMAGE_KEY: 4}.get(key, 2)
        if key == "attention_mask":
            ok = tuple(value.shape) == (n, length)
        if not ok:
            raise ValueError(f"{path}: {key} must be {want} with N={n}, got {tuple(value.shape)}")
    return tensors


def condition_of(tensors: dict[str, Tensor]) -> TextCondition:
    """The :class:`TextCondition` of a shard's embedding keys (float32 embeddings)."""
    pooled = tensors.get("pooled_prompt_embeds")
    return TextCondition(
        tensors["prompt_embeds"].float(),
        None if pooled is None else pooled.float(),
        tensors.get("attention_mask"),
    )


class TextPairDataset(Dataset):
    """Rows ``index`` of images ``(N, C, H, W)`` and their condition; item ``i`` is
    ``(image (C, H, W) float32, TextCondition of 1 row)``."""

    def __init__(self, images: Tensor, conditions: TextCondition) -> None:
        if images.shape[0] != len(conditions):
            raise ValueError(f"{images.shape[0]} images but {len(conditions)} conditions")
        self.images, self.conditions = images, conditions

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, TextCondition]:
        return self.images[index].to(torch.float32), self.conditions[int(index)]


def collate_text_pairs(items: list[tuple[Tensor, TextCondition]]) -> tuple[Tensor, TextCondition]:
    """``(images (B, C, H, W), TextCondition of B rows)`` from dataset items."""
    images = torch.stack([image for image, _ in items])
    return images, concat_conditions([cond for _, cond in items])


class TextPairsDataModule(ImageDataModule):
    """(image or latent, prompt embedding) pairs from a folder of shards (module doc).

    Args:
        path: the folder.
        batch_size, seed, num_workers, flip: see :class:`ImageDataModule`.
        val_size: pairs held out of training (validation and evaluation prompts); must leave
            at least one batch for training.
        latents: the ``images`` are latents: no range check (else they must lie in [-1, 1]).
    """

    collate_fn = staticmethod(collate_text_pairs)

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int = 64,
        seed: int = 0,
        val_size: int = 64,
        num_workers: int = 0,
        flip: bool = False,
        latents: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size, seed=seed, val_size=val_size, num_workers=num_workers, flip=flip
        )
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"text pairs folder not found: {self.path}")
        self.shards = sorted(p for p in self.path.glob("*.safetensors") if p.name != NULL_FILE)
        if not self.shards:
            raise ValueError(f"{self.path}: no *.safetensors shards (besides {NULL_FILE})")
        if not (self.path / NULL_FILE).is_file():
            raise ValueError(
                f"{self.path}: no {NULL_FILE} (the empty/negative prompt's embedding, 1 row)"
            )
        shards = [read_shard(p) for p in self.shards]
        fields = {k for k in EMBED_KEYS if k in shards[0]}
        for p, s in zip(self.shards, shards, strict=True):
            if {k for k in EMBED_KEYS if k in s} != fields:
                raise ValueError(f"{p}: holds other embedding keys than {self.shards[0].name}")
        images = torch.cat([s[IMAGE_KEY] for s in shards])
        conditions = concat_conditions([condition_of(s) for s in shards])
        null = read_shard(self.path / NULL_FILE, need_images=False)
        self.null_condition = condition_of({k: null[k] for k in fields if k in null})
        self._check(images, conditions, latents)
        self.latents = bool(latents)
        self.channels = int(images.shape[1])
        self.resolution = int(images.shape[2])
        self.num_classes = None
        self.text_embed_dim = int(conditions.prompt_embeds.shape[-1])
        n = images.shape[0]
        if self.val_size >= n:
            raise ValueError(
                f"val_size={self.val_size} holds out all {n} pairs of {self.path}; "
                "lower data.val_size"
            )
        held = self._fixed_order(n)[: self.val_size].sort().values
        train = torch.ones(n, dtype=torch.bool)
        train[held] = False
        rows = torch.nonzero(train).flatten()
        self._train = TextPairDataset(images[rows], conditions[rows])
        self._held_out = TextPairDataset(images[held], conditions[held])
        self._check_batch_size(len(self.train_dataset()))  # type: ignore[arg-type]

    def _check(self, images: Tensor, conditions: TextCondition, latents: bool) -> None:
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"{self.path}: images must be square, got {tuple(images.shape)}")
        if not images.dtype.is_floating_point or not bool(torch.isfinite(images).all()):
            raise ValueError(f"{self.path}: images must be finite floats, got {images.dtype}")
        if not latents and (images.min() < -1 - 1e-5 or images.max() > 1 + 1e-5):
            raise ValueError(
                f"{self.path}: images lie in [{float(images.min()):g}, {float(images.max()):g}], "
                "expected [-1, 1]; pass data.latents=true for latents"
            )
        null = self.null_condition
        if len(null) != 1:
            raise ValueError(f"{self.path / NULL_FILE}: needs 1 row, got {len(null)}")
        for name in ("prompt_embeds", "pooled_prompt_embeds", "attention_mask"):
            ours, theirs = getattr(conditions, name), getattr(null, name)
            if ours is None:
                continue
            if theirs is None or theirs.shape[1:] != ours.shape[1:]:
                got = None if theirs is None else tuple(theirs.shape)
                want = (1, *ours.shape[1:])
                raise ValueError(
                    f"{self.path / NULL_FILE}: {name} must be {want} like the shards', got {got}"
                )

    def base_dataset(self) -> Dataset:
        return self._train

    def eval_conditions(self) -> TextCondition:
        """The held-out pairs' prompts, which evaluation samples with."""
        return self._held_out.conditions

    def val_dataloader(self) -> DataLoader:
        """The held-out pairs, in a fixed order."""
        return DataLoader(
            self._held_out,
            batch_size=min(self.batch_size, len(self._held_out)),
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_text_pairs,
        )

    def config_fields(self) -> dict[str, Any]:
        files = [*self.shards, self.path / NULL_FILE]
        return {
            "path": str(self.path.resolve()),
            "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
            "val_size": self.val_size,  # the held-out rows leave the reference images
            "latents": self.latents,
        }
