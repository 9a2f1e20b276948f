"""Feature networks for Fréchet distances: the bundled digits classifier, Inception-v3, DINOv2.

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
DINOV2_HUB_REPO = "facebookresearch_dinov2_main"  # torch.hub's folder for the DINOv2 code
DINOV2_DEFAULT = "dinov2-vit-s-14"  # torch-fidelity's name of ViT-S/14 (384-d features)


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


def dinov2_repo_dir() -> Path:
    """Where torch.hub keeps the DINOv2 code (``$TORCH_HOME/hub/facebookresearch_dinov2_main``;
    torch-fidelity's own online use of DINOv2 puts it there)."""
    return Path(torch.hub.get_dir()) / DINOV2_HUB_REPO


def dinov2_problem(
    weights_path: str | os.PathLike | None, repo_dir: str | Path | None
) -> str | None:
    """Why :class:`DinoV2Features` cannot be built offline from these inputs, or None."""
    if weights_path is None:
        return (
            "DINOv2 features need a local checkpoint, e.g. dinov2_vits14_pretrain.pth "
            "(no download at run time)"
        )
    if not Path(weights_path).is_file():
        return f"DINOv2 weights not found at {str(weights_path)!r}"
    repo = Path(repo_dir) if repo_dir is not None else dinov2_repo_dir()
    if not (repo / "hubconf.py").is_file():
        return (
            f"the DINOv2 model code is not at {str(repo)!r} (a copy of "
            "github.com/facebookresearch/dinov2 with its hubconf.py; set TORCH_HOME or repo_dir)"
        )
    return None


class DinoV2Features(nn.Module):
    """DINOv2 ViT features (``(N, embed_dim)``, CLS token) through torch-fidelity's extractor.

    torch-fidelity's ``FeatureExtractorDinoV2`` does the preprocessing (images quantised to
    uint8 like saved PNGs, TF1-compatible bilinear resize to 224 px, ImageNet normalisation);
    its constructor only downloads, so the network is built here from local files: the model
    code from ``repo_dir`` (``torch.hub.load(..., source="local", pretrained=False)``) and the
    weights from ``weights_path`` (``torch.load(weights_only=True)`` or ``.safetensors``).

    Args:
        weights_path: Meta's checkpoint for ``model`` (e.g. ``dinov2_vits14_pretrain.pth``).
        model: torch-fidelity name: ``dinov2-vit-s-14`` | ``-b-14`` | ``-l-14`` | ``-g-14``.
        repo_dir: local DINOv2 code (default :func:`dinov2_repo_dir`).
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        model: str = DINOV2_DEFAULT,
        repo_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_base import FeatureExtractorBase
        from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA, FeatureExtractorDinoV2

        if model not in MODEL_METADATA:
            raise ValueError(
                f"unknown DINOv2 model {model!r}; expected one of {list(MODEL_METADATA)}"
            )
        problem = dinov2_problem(weights_path, repo_dir)
        if problem is not None:
            raise FileNotFoundError(problem)
        repo = str(repo_dir if repo_dir is not None else dinov2_repo_dir())
        net = torch.hub.load(repo, MODEL_METADATA[model], source="local", pretrained=False)
        if str(weights_path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(weights_path))
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)

        class LocalDinoV2(FeatureExtractorDinoV2):
            """torch-fidelity's extractor (its forward) around a network built offline."""

            def __init__(self, name: str, network: nn.Module) -> None:
                FeatureExtractorBase.__init__(self, name, ["dinov2"])
                self.feature_extractor_internal_dtype = torch.float32
                self.model = network

        self.net = LocalDinoV2(model, net.float())
        self.num_features = int(net.embed_dim)
        self.feature_id = f"{model}-{_file_sha(weights_path)}"

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(N, embed_dim)`` float32 of images ``(N, 1 or 3, H, W)`` in ``[-1, 1]``."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"DINOv2 expects (N, 1|3, H, W) images, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x_u8 = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return self.net(x_u8)[0].float()


def _import_dotted(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"feature extractor {path!r} is not a dotted path 'package.module.Name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import feature extractor {path!r}: {err}") from err


def build_feature_extractor(
    spec: str | Mapping[str, Any] | nn.Module,
    device: torch.device | str = "cpu",
    weights_path: str | os.PathLike | None = None,
) -> nn.Module:
    """Build a frozen, eval-mode feature extractor from a spec.

    ``spec`` is ``"digits"``, ``"inception"``, ``"dinov2"``, a dotted path to a callable
    returning a module, a dict ``{"name": "digits" | "inception" | "dinov2", **kwargs}`` (e.g.
    ``weights_path``), a dict ``{"_target_": "pkg.mod.Callable", **kwargs}``, or an
    ``nn.Module`` (used as is). ``weights_path`` (``eval.feature_weights``) is the weights file
    of a named network (the digits classifier's ``path``, else ``weights_path``). A module
    without ``feature_id`` gets its class's qualified name.
    """
    if weights_path is not None and not isinstance(spec, nn.Module):
        name = spec if isinstance(spec, str) else spec.get("name", spec.get("_target_"))
        extra = dict(spec) if isinstance(spec, Mapping) else {"name": name}
        extra["path" if name == "digits" else "weights_path"] = str(weights_path)
        spec = extra
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
        elif name == "dinov2":
            net = DinoV2Features(**kwargs)
        else:
            net = _import_dotted(name)(**kwargs)
            if not isinstance(net, nn.Module):
                raise ValueError(f"feature extractor {name!r} returned {type(net)}, not a Module")
    if not hasattr(net, "feature_id"):
        net.feature_id = f"{type(net).__module__}.{type(net).__qualname__}"
    return net.requires_grad_(False).eval().to(device)
