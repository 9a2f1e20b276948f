"""Bundled weights (see README.md in this folder for how each one was produced)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSETS = {
    "digits_teacher": "digits_teacher",  # diffusers folder: TrigFlowUNet + scheduler config
    "digits_cond_teacher": "digits_cond_teacher",  # the same, 10 classes + the CFG null class
    "digits_classifier": "digits_classifier.safetensors",
    "digits_vae": "digits_vae",  # AutoencoderKL: 1×32×32 digits <-> 4×8×8 latents
    "digits_latent_teacher": "digits_latent_teacher",  # TrigFlowUNet on those latents (+ vae/)
}


def asset_path(name: str) -> Path:
    """Path of a bundled asset by name; clear error if unknown or missing from the install."""
    if name not in ASSETS:
        raise KeyError(f"unknown bundled asset {name!r}; expected one of {sorted(ASSETS)}")
    path = Path(str(resources.files(__package__) / ASSETS[name]))
    if not path.exists():
        raise FileNotFoundError(
            f"bundled asset {name!r} is missing at {path}; see scm_lightning/assets/README.md"
        )
    return path
