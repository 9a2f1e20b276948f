"""Data modules: batches ``(images (B, C, H, W) float32 in [-1, 1], labels (B,) int64)``.

* :class:`DigitsDataModule`: sklearn's 8×8 digits (the default; no download).
* :class:`ImageFolderDataModule`: a folder of PNG/JPEG/WebP/BMP files.
* :class:`TensorDataModule`: one ``.npz``/``.npy``/``.safetensors``/``.pt`` array (images or
  latents).
* :class:`TextPairsDataModule`: (image or latent, prompt embedding) pairs in safetensors
  shards; batches ``(images, TextCondition)``.
"""

from scm_lightning.data.base import ImageDataModule
from scm_lightning.data.digits import DigitsDataModule, load_digits_tensors
from scm_lightning.data.folder import ImageFolderDataModule, ScanReport
from scm_lightning.data.tensors import TensorDataModule
from scm_lightning.data.text_pairs import TextPairsDataModule

__all__ = [
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ScanReport",
    "TensorDataModule",
    "TextPairsDataModule",
    "load_digits_tensors",
]
