"""Latent space of a diffusers ``AutoencoderKL``, standardised per channel to std σ_d.

The usual latent-diffusion convention scales every latent channel by one factor
(``vae.config.scaling_factor``). sCM instead measures, on the training data, the mean ``μ_c``
and standard deviation ``s_c`` of each latent channel and trains on

    z = σ_d · (ℓ − μ_c) / s_c          (ℓ = the encoder's posterior mean)

so every channel has mean 0 and std σ_d, the scale TrigFlow's σ_d assumes (sCM, Sec. 5 /
App. G: "latents normalised by per-channel mean and std"). Samples ``z`` are mapped back by
``ℓ = μ_c + s_c · z / σ_d`` and decoded, ``vae.decode(ℓ)``, to images in ``[-1, 1]``.

The formula lives here once; ``pipeline_scm.SCMPipeline.decode_latents`` repeats it in the
self-contained export file (a test keeps the two equal). Pure layer: torch and diffusers only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

VAE_CONFIG = "config.json"
VAE_CLASS = "AutoencoderKL"
VAE_FORMAT = "a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)"


def read_vae_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a VAE folder; ValueError (naming ``data.latent.vae``) otherwise."""
    folder = Path(str(path)).expanduser()
    config = folder / VAE_CONFIG
    if not folder.is_dir() or not config.is_file():
        what = "does not exist" if not folder.exists() else f"has no {VAE_CONFIG}"
        raise ValueError(f"data.latent.vae={str(path)!r} {what}: expected {VAE_FORMAT}")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"data.latent.vae={str(path)!r}: {config} is not JSON ({err})") from None
    if cfg.get("_class_name") != VAE_CLASS:
        raise ValueError(
            f"data.latent.vae={str(path)!r} holds a {cfg.get('_class_name')!r}: "
            f"expected {VAE_FORMAT}"
        )
    return cfg


def vae_downsampling(config: dict[str, Any]) -> int:
    """Spatial factor image → latent: 2 per encoder block after the first (diffusers' Encoder)."""
    return 2 ** (len(config.get("block_out_channels", (64,))) - 1)


def vae_sample_size(config: dict[str, Any]) -> tuple[int, int]:
    size = config.get("sample_size", 32)
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def vae_fingerprint(path: str | Path) -> str:
    """16 hex digits of SHA-256 over the folder's config and weight files (cache key part)."""
    folder = Path(str(path)).expanduser()
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and (file.name == VAE_CONFIG or file.suffix == ".safetensors"):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def load_vae(path: str | Path) -> nn.Module:
    """``AutoencoderKL.from_pretrained(path)`` (safetensors only), frozen, eval mode, float32."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(
        str(Path(str(path)).expanduser()),
        use_safetensors=True,
        low_cpu_mem_usage=False,
        torch_dtype=torch.float32,
    )
    return vae.requires_grad_(False).eval()


def channel_statistics(latents: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of ``latents (N, C, h, w)``, float64 ``(C,)``."""
    x = latents.to(torch.float64).transpose(0, 1).reshape(latents.shape[1], -1)
    return x.mean(dim=1), x.std(dim=1, unbiased=False)


def standardise(raw: Tensor, mean: Tensor, std: Tensor, sigma_data: float) -> Tensor:
    """``z = σ_d (ℓ − μ_c)/s_c`` per channel (module doc), computed in float64."""
    shape = (1, -1) + (1,) * (raw.ndim - 2)
    mu, s = mean.to(raw.device, torch.float64).view(shape), std.to(raw.device, torch.float64)
    return (sigma_data * (raw.to(torch.float64) - mu) / s.view(shape)).to(raw.dtype)


def unstandardise(z: Tensor, mean: Tensor, std: Tensor, sigma_data: float) -> Tensor:
    """``ℓ = μ_c + s_c · z/σ_d``, the inverse of :func:`standardise`, computed in float64."""
    shape = (1, -1) + (1,) * (z.ndim - 2)
    mu, s = mean.to(z.device, torch.float64).view(shape), std.to(z.device, torch.float64)
    return (mu + s.view(shape) * z.to(torch.float64) / sigma_data).to(z.dtype)


class LatentCodec(nn.Module):
    """A frozen VAE plus the per-channel statistics of the run's data (module doc).

    The statistics are buffers (``latent_mean``, ``latent_std``, float64 ``(C,)``): attached to
    a LightningModule they travel in its checkpoints. The VAE is held outside the module tree
    (never trained, never in a checkpoint or an optimiser; rebuilt from its folder) and moved
    to the samples' device when decoding.

    Args:
        vae: a diffusers ``AutoencoderKL`` (``encode(x).latent_dist``, ``decode(ℓ).sample``).
        sigma_data: σ_d the standardised latents get (TrigFlow's data std).
        fingerprint: identifies the VAE's weights (cache keys).
    """

    def __init__(self, vae: nn.Module, sigma_data: float, fingerprint: str = "") -> None:
        super().__init__()
        self.__dict__["vae"] = vae  # not a submodule (see class doc)
        self.sigma_data = float(sigma_data)
        self.fingerprint = str(fingerprint)
        channels = int(vae.config.latent_channels)
        self.register_buffer(
            "latent_mean", torch.full((channels,), float("nan"), dtype=torch.float64)
        )
        self.register_buffer(
            "latent_std", torch.full((channels,), float("nan"), dtype=torch.float64)
        )

    @property
    def channels(self) -> int:
        return int(self.latent_mean.numel())

    @property
    def has_statistics(self) -> bool:
        return bool(torch.isfinite(self.latent_mean).all() and (self.latent_std > 0).all())

    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        if mean.shape != (self.channels,) or std.shape != (self.channels,):
            raise ValueError(
                f"latent statistics must have shape ({self.channels},), got "
                f"{tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if not bool((std > 0).all()):
            raise ValueError(f"a latent channel has zero std: {std.tolist()}")
        self.latent_mean.copy_(mean.to(torch.float64))
        self.latent_std.copy_(std.to(torch.float64))

    def statistics(self) -> dict[str, list[float]]:
        """``{"mean": [μ_c], "std": [s_c]}`` as plain floats (the export's registered config)."""
        return {"mean": self.latent_mean.tolist(), "std": self.latent_std.tolist()}

    def _vae_on(self, device: torch.device) -> nn.Module:
        vae = self.__dict__["vae"]
        if next(vae.parameters()).device != device:
            vae.to(device)
        return vae

    @torch.no_grad()
    def encode_raw(self, images: Tensor) -> Tensor:
        """Posterior means ``ℓ (N, C, h, w)`` of images ``(N, C_img, H, W)`` in ``[-1, 1]``."""
        vae = self._vae_on(images.device)
        return vae.encode(images.to(torch.float32)).latent_dist.mean

    def standardise(self, raw: Tensor) -> Tensor:
        self._require_statistics()
        return standardise(raw, self.latent_mean, self.latent_std, self.sigma_data)

    def unstandardise(self, z: Tensor) -> Tensor:
        self._require_statistics()
        return unstandardise(z, self.latent_mean, self.latent_std, self.sigma_data)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images ``(N, C_img, H, W)`` (≈ ``[-1, 1]``, unclamped) of standardised latents ``z``."""
        vae = self._vae_on(z.device)
        raw = self.unstandardise(z).to(torch.float32)
        return vae.decode(raw).sample.to(z.dtype)

    def _require_statistics(self) -> None:
        if not self.has_statistics:
            raise RuntimeError(
                "the latent statistics are not set: they are measured when the latent data is "
                "first encoded, or loaded with the run's checkpoint"
            )
