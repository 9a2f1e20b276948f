"""``data.latent``: any image data module seen through a VAE (latent diffusion / distillation).

The images of the wrapped module are encoded once (posterior means of a diffusers
``AutoencoderKL``) and cached on disk, keyed by the image data's ``config_key`` and the
VAE's weights; training batches are the latents standardised per channel to std σ_d
(:mod:`scm_lightning.latents`). The per-channel statistics are measured on those latents
and written into :attr:`LatentDataModule.codec`, which the LightningModule holds (its
checkpoint carries them) and every image-producing path decodes through.

Reference images for Fréchet distances stay the wrapped module's pixels: generated latents
are decoded and compared with real images, never with latents.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from scm_lightning.data.base import ArrayDataset, ImageDataModule
from scm_lightning.latents import (
    LatentCodec,
    channel_statistics,
    load_vae,
    read_vae_config,
    vae_downsampling,
    vae_fingerprint,
    vae_sample_size,
)

ENCODING = "posterior_mean"  # what a cached latent is (part of the cache key)
ENCODE_BATCH = 256


class LatentDataModule(ImageDataModule):
    """The images of ``images`` as standardised VAE latents ``(C_lat, H/f, W/f)``.

    Shapes and classes are known right after ``__init__`` (from the VAE's config, nothing is
    encoded yet), so a teacher mismatch stops the run before any work; the encoding (or the
    cache read) happens on the first :meth:`base_dataset`.

    Args:
        images: the pixel data module (its loader settings are reused; ``flip`` is refused:
            a mirrored latent is not the latent of the mirrored image).
        vae: local folder of a diffusers ``AutoencoderKL``.
        sigma_data: std every latent channel is standardised to (the run's σ_d).
        cache_dir: folder for the encoded latents (``latents-<key>.safetensors``); None: none.
    """

    def __init__(
        self,
        images: ImageDataModule,
        vae: str,
        sigma_data: float,
        cache_dir: str | None = None,
    ) -> None:
        if images.flip:
            raise ValueError(
                "data.flip=true is invalid with data.latent: expected false (a mirrored latent "
                "is not the latent of the mirrored image)"
            )
        super().__init__(
            batch_size=images.batch_size,
            seed=images.seed,
            val_size=images.val_size,
            num_workers=images.num_workers,
            flip=False,
        )
        config = read_vae_config(vae)
        h, w = vae_sample_size(config)
        factor = vae_downsampling(config)
        vae_channels = int(config.get("in_channels", 3))
        if (h, w) != (images.resolution, images.resolution) or images.channels != vae_channels:
            raise ValueError(
                f"data.latent.vae={str(vae)!r} encodes {vae_channels}×{h}×{w} images "
                f"(in_channels, sample_size of its config.json); the data gives "
                f"{images.channels}×{images.resolution}×{images.resolution}: expected a VAE "
                "for these images (or set data.resolution/data.channels to match)"
            )
        self.images = images
        self.vae_path = str(vae)
        self.cache_dir = None if cache_dir in (None, "") else str(cache_dir)
        self.codec = LatentCodec(load_vae(vae), sigma_data, vae_fingerprint(vae))
        self.channels = int(config["latent_channels"])
        self.resolution = images.resolution // factor
        self.num_classes = images.num_classes
        self._dataset: ArrayDataset | None = None

    def config_fields(self) -> dict[str, Any]:
        return {
            "images": self.images.config_key(),
            "vae": self.codec.fingerprint,
            "encoding": ENCODING,
            "sigma_data": self.codec.sigma_data,
        }

    @property
    def num_images(self) -> int:
        return self.images.num_images

    def raw_latents(self) -> tuple[Tensor, Tensor]:
        """``(posterior means (N, C, h, w) float32, labels (N,))``: from the cache or encoded."""
        path = self._cache_path()
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            stored = load_file(str(path))
            return stored["latents"], stored["labels"]
        base = self.images.base_dataset()
        chunks, labels = [], []
        for start in range(0, len(base), ENCODE_BATCH):  # type: ignore[arg-type]
            items = [base[i] for i in range(start, min(start + ENCODE_BATCH, len(base)))]  # type: ignore[arg-type]
            chunks.append(self.codec.encode_raw(torch.stack([x for x, _ in items])).cpu())
            labels.append(torch.stack([torch.as_tensor(y) for _, y in items]))
        latents = torch.cat(chunks).contiguous()
        label_tensor = torch.cat(labels).to(torch.int64).contiguous()
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({"latents": latents, "labels": label_tensor}, str(tmp))
            os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
        return latents, label_tensor

    def base_dataset(self) -> Dataset:
        """The standardised latents (encoded on first use; sets the codec's statistics)."""
        if self._dataset is None:
            raw, labels = self.raw_latents()
            mean, std = channel_statistics(raw)
            self.codec.set_statistics(mean, std)
            self._dataset = ArrayDataset(self.codec.standardise(raw).to(torch.float32), labels)
        return self._dataset

    def reference_images(self, max_count: int) -> Tensor:
        """The wrapped module's pixel images: FD compares decoded samples with real images."""
        return self.images.reference_images(max_count)

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return Path(self.cache_dir).expanduser() / f"latents-{self.config_key()}.safetensors"
