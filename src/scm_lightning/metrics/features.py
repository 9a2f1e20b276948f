"""Feature networks for Fréchet distances: the bundled digits classifier and Inception-v3.

Every extractor is an ``nn.Module`` whose ``forward`` takes images ``(N, C, H, W)`` float in
data range ``[-1, 1]`` and returns features ``(N, D)``, and which carries two attributes:
``num_features`` (D) and ``feature_id`` (a string naming the network *and its weights*; it
keys cached reference statistics, so different weights never share a cache entry).

Pure layer: no Lightning, no Hydra.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

DIGITS_WEIGHTS = "digits_classifier.safetensors"  # in the scm_lightning.assets package
INCEPTION_NO_NETWORK = "Inception requested without weights and without network"


class DigitsClassifier(nn.Module):
    """Small conv net for 1×8×8 digits in ``[-1, 1]``; ``features`` are its 64-d penultimate layer.

    Larger inputs (the digits data module can upsample) are area-resized to 8×8 first, so
    one network scores every digits resolution.
    """

    def __init__(self, num_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.num_features = num_features
        self.feature_id = "digits_classifier"  # load_digits_classifier appends the weights hash
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 8×8 -> 4×4
            nn.Conv2d(32, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 4×4 -> 2×2
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, num_features),
            nn.SiLU(),  # SiLU, not ReLU: no dead units, so no degenerate feature dimensions
        )
        self.head = nn.Linear(num_features, num_classes)

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"DigitsClassifier expects (N, 1, H, W) images, got {tuple(x.shape)}")
        if x.shape[-2:] != (8, 8):
            x = nn.functional.adaptive_avg_pool2d(x, (8, 8))
        return x.to(self.head.weight.dtype)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(N, num_features)`` of images ``(N, 1, H, W)`` in ``[-1, 1]``."""
        return self.body(self._prepare(x))

    def forward(self, x: Tensor) -> Tensor:
        """Feature-extractor interface: same as :meth:`features`."""
        return self.features(x)

    def logits(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` (used when training the classifier)."""
        return self.head(self.features(x))


def _file_sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def load_digits_classifier(
    path: str | os.PathLike | None = None, device: torch.device | str = "cpu"
) -> DigitsClassifier:
    """Load the bundled digits classifier (frozen, eval mode).

    ``path`` defaults to ``scm_lightning/assets/digits_classifier.safetensors`` read through
    ``importlib.resources`` (works from a wheel); see ``assets/README.md`` for how it is made.
    """
    from safetensors.torch import load as load_bytes

    if path is None:
        data = resources.files("scm_lightning.assets").joinpath(DIGITS_WEIGHTS).read_bytes()
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"digits classifier weights not found at {path!r}")
        data = Path(path).read_bytes()
    state = load_bytes(data)
    num_features = state["head.weight"].shape[1]
    net = DigitsClassifier(num_features=num_features, num_classes=state["head.weight"].shape[0])
    net.load_state_dict(state)
    net.feature_id = f"digits_classifier-{hashlib.sha256(data).hexdigest()[:12]}"
    return net.requires_grad_(False).eval().to(device)


class InceptionFeatures(nn.Module):
    """FID Inception-v3 pool3 features (2048-d) via torchmetrics/torch-fidelity.

    Images in ``[-1, 1]`` are quantised to uint8 like saved PNGs (``round((x+1)·127.5)``),
    grayscale is repeated to RGB, and resizing to 299 px uses torch-fidelity's TF1-compatible
    bilinear resize (``antialias=False``), which is what published FIDs use.

    Args:
        weights_path: local torch-fidelity weights file
            (``weights-inception-2015-12-05-6726825d.pth``); ``None`` downloads it (or takes it
            from the torch hub cache).
    """

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights not found at {str(weights_path)!r}")
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=None if weights_path is None else str(weights_path),
                antialias=False,
            )
        except OSError as err:  # URLError, socket errors and DNS failures are all OSErrors
            raise RuntimeError(
                f"{INCEPTION_NO_NETWORK}: pass weights_path=<local "
                f"weights-inception-2015-12-05-6726825d.pth> ({err})"
            ) from err
        tag = "download" if weights_path is None else _file_sha(weights_path)
        self.feature_id = f"inception-v3-compat-2048-{tag}"

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(N, 2048)`` float32 of images ``(N, 1 or 3, H, W)`` in ``[-1, 1]``."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception expects (N, 1|3, H, W) images, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x_u8 = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return self.net(x_u8).float()


def _import_dotted(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"feature extractor {path!r} is not a dotted path 'package.module.Name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import feature extractor {path!r}: {err}") from err


def build_feature_extractor(
    spec: str | Mapping[str, Any] | nn.Module, device: torch.device | str = "cpu"
) -> nn.Module:
    """Build a frozen, eval-mode feature extractor from a spec.

    ``spec`` is ``"digits"``, ``"inception"``, a dotted path to a callable returning a module,
    a dict ``{"name": "digits" | "inception", **kwargs}`` (e.g. ``weights_path``), a dict
    ``{"_target_": "pkg.mod.Callable", **kwargs}``, or an ``nn.Module`` (used as is). A
    module without ``feature_id`` gets its class's qualified name.
    """
    if isinstance(spec, nn.Module):
        net = spec
    else:
        kwargs: dict[str, Any] = {}
        if isinstance(spec, Mapping):  # dicts and OmegaConf DictConfigs
            kwargs = dict(spec)
            if "_target_" in kwargs:
                name = kwargs.pop("_target_")
            elif "name" in kwargs:
                name = kwargs.pop("name")
            else:
                raise ValueError(f"feature spec dict needs 'name' or '_target_', got {spec}")
        elif isinstance(spec, str):
            name = spec
        else:
            raise ValueError(f"unsupported feature spec {spec!r}")
        if name == "digits":
            net = load_digits_classifier(**kwargs)
        elif name == "inception":
            net = InceptionFeatures(**kwargs)
        else:
            net = _import_dotted(name)(**kwargs)
            if not isinstance(net, nn.Module):
                raise ValueError(f"feature extractor {name!r} returned {type(net)}, not a Module")
    if not hasattr(net, "feature_id"):
        net.feature_id = f"{type(net).__module__}.{type(net).__qualname__}"
    return net.requires_grad_(False).eval().to(device)
