"""Fréchet distance between feature distributions (FID when the features are Inception's).

``FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2·tr (Σ₁^½ Σ₂ Σ₁^½)^½`` (Heusel et al. 2017, Eq. 6 with
the symmetric form of ``tr (Σ₁Σ₂)^½``: ``Σ₁Σ₂`` is similar to the PSD matrix
``Σ₁^½ Σ₂ Σ₁^½``, so both have the same non-negative eigenvalues).

Statistics stream in as raw sums in float64 (count, Σx, Σxxᵀ), which are merged across
DDP ranks by one ``all_reduce`` each, and can be cached on disk as ``.npz``.
Pure layer: plain ``torch.distributed``, no Lightning.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FeatureStats:
    """Streaming mean/covariance of ``D``-dimensional features, accumulated in float64.

    ``update(features (N, D))`` adds a batch; ``sync()`` sums the accumulators over all DDP
    ranks (no-op without an initialised process group); ``mean``/``cov`` read the result.
    """

    def __init__(self, num_features: int, device: torch.device | str = "cpu") -> None:
        if int(num_features) < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = int(num_features)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(self.num_features, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(
            self.num_features, self.num_features, dtype=torch.float64, device=device
        )

    def update(self, features: Tensor) -> None:
        """Add a batch of features ``(N, D)`` (any float dtype; summed in float64)."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"expected features (N, {self.num_features}), got {tuple(features.shape)}"
            )
        x = features.detach().to(device=self.sum.device, dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or inf (did sampling diverge?)")
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x

    @classmethod
    def of(cls, features: Tensor) -> FeatureStats:
        """Statistics of one feature matrix ``(N, D)`` (on its device)."""
        stats = cls(features.shape[1], device=features.device)
        stats.update(features)
        return stats

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's sums into this one (in place); returns self."""
        if other.num_features != self.num_features:
            raise ValueError(f"cannot merge D={other.num_features} into D={self.num_features}")
        self.count += other.count.to(self.count.device)
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum_outer.device)
        return self

    def sync(self) -> FeatureStats:
        """All-reduce (sum) the accumulators over the default process group; returns self.

        Every rank must call it. The accumulators must live on a device the backend
        supports (CUDA for NCCL, CPU for gloo).
        """
        if _dist_on():
            for acc in (self.count, self.sum, self.sum_outer):
                dist.all_reduce(acc, op=dist.ReduceOp.SUM)
        return self

    @property
    def n(self) -> int:
        return int(self.count.item())

    def mean(self) -> np.ndarray:
        """Mean ``(D,)`` float64."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, have {self.n}")
        return (self.sum / self.count).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance ``(D, D)`` float64: ``(Σxxᵀ − n·μμᵀ)/(n − 1)``."""
        mu = self.sum / self.count
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, have {self.n}")
        c = (self.sum_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return (0.5 * (c + c.T)).cpu().numpy()  # exact symmetry for eigh

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu``, ``sigma``, ``n`` (and the raw sums) to an ``.npz``, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            mu=self.mean(),
            sigma=self.cov(),
            n=np.int64(self.n),
            sum=self.sum.cpu().numpy(),
            sum_outer=self.sum_outer.cpu().numpy(),
        )
        os.replace(tmp, path)  # readers never see a half-written file

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FeatureStats:
        """Read statistics written by :meth:`save`, or any ``.npz`` with ``mu`` and ``sigma``.

        Files with only ``mu``/``sigma`` (e.g. pytorch-fid reference statistics) are turned
        back into sums with their ``n`` (default 50 000; any n > 1 reproduces μ and Σ).
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"feature statistics file not found: {str(path)!r}")
        with np.load(path) as data:
            if "sum" in data and "sum_outer" in data:
                n, total, outer = float(data["n"]), data["sum"], data["sum_outer"]
            elif "mu" in data and "sigma" in data:
                n = float(data["n"]) if "n" in data else 50_000.0
                mu = data["mu"].astype(np.float64)
                total = n * mu
                outer = (n - 1) * data["sigma"].astype(np.float64) + n * np.outer(mu, mu)
            else:
                raise ValueError(f"{str(path)!r} has neither sum/sum_outer nor mu/sigma arrays")
        stats = cls(total.shape[0], device=device)
        stats.count.fill_(n)
        stats.sum.copy_(torch.from_numpy(np.asarray(total, np.float64)))
        stats.sum_outer.copy_(torch.from_numpy(np.asarray(outer, np.float64)))
        return stats


@torch.no_grad()
def embed_images(images: Tensor, feature_net: nn.Module, device: torch.device | str) -> Tensor:
    """Features ``(N, D)`` of images ``(N, C, H, W)`` in data range ``[-1, 1]``.

    Images are clamped to ``[-1, 1]`` first: samplers overshoot the data range slightly, and
    every FD in the package (FID callback, ``evaluate``, end-of-fit figures) embeds this way.
    """
    return feature_net(images.to(device).float().clamp(-1.0, 1.0))


def accumulate_stats(
    image_batches: Iterable[Tensor],
    feature_net: nn.Module,
    device: torch.device | str,
    stats: FeatureStats | None = None,
) -> FeatureStats:
    """Add the features of every image batch ``(N, C, H, W)`` to ``stats`` (returned).

    ``stats`` defaults to an empty accumulator of ``feature_net.num_features`` (or of the first
    batch's feature width); no images at all then raises ValueError. Empty batches are skipped
    (a DDP rank with no share of the samples still returns zero sums to all-reduce).
    """
    for images in image_batches:
        if images.shape[0] == 0:
            continue
        feats = embed_images(images, feature_net, device)
        if stats is None:
            stats = FeatureStats(feats.shape[1], device=device)
        stats.update(feats)
    if stats is None:
        width = getattr(feature_net, "num_features", None)
        if width is None:
            raise ValueError("no images to compute feature statistics from")
        stats = FeatureStats(int(width), device=device)
    return stats


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via ``eigh`` (negative eigenvalues → 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between ``N(μ₁, Σ₁)`` and ``N(μ₂, Σ₂)`` (Heusel et al. 2017, Eq. 6).

    ``tr (Σ₁Σ₂)^½`` is the sum of square roots of the eigenvalues of the symmetric PSD
    matrix ``Σ₁^½ Σ₂ Σ₁^½``: symmetric eigensolvers (``eigh``) are backward stable and give
    real eigenvalues, unlike ``sqrtm``/``eigvals`` on the non-symmetric ``Σ₁Σ₂`` (complex
    round-off, occasional failures on singular covariances). All in float64.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {sigma2.shape}"
        )
    s1 = _psd_sqrt(0.5 * (sigma1 + sigma1.T))
    m = s1 @ (0.5 * (sigma2 + sigma2.T)) @ s1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))  # clip round-off below zero for identical distributions


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """:func:`frechet_distance` of two accumulators."""
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def stats_cache_key(data_config: dict[str, Any] | str, feature_id: str) -> str:
    """16 hex digits of SHA-256 over the data config and the feature network id."""
    text = json.dumps({"data": data_config, "features": feature_id}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _all_ranks_true(flag: bool, device: torch.device | str) -> bool:
    if not _dist_on():
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def cached_reference_stats(
    cache_dir: str | os.PathLike,
    data_config: dict[str, Any] | str,
    feature_id: str,
    compute: Callable[[], FeatureStats],
    device: torch.device | str = "cpu",
) -> tuple[FeatureStats, Path, bool]:
    """Load reference statistics from ``cache_dir/ref-<key>.npz`` or compute and save them.

    ``compute()`` runs on every rank and must return rank-local sums (it is followed by
    :meth:`FeatureStats.sync`); rank 0 writes the file. All ranks agree on whether the file
    exists before any of them computes, so a file that appears mid-way cannot split the
    ranks between loading and all-reducing. ``device`` must suit the process group's
    backend. Returns ``(stats, path, computed)``.
    """
    path = Path(cache_dir) / f"ref-{stats_cache_key(data_config, feature_id)}.npz"
    if _all_ranks_true(path.is_file(), device):
        return FeatureStats.load(path, device=device), path, False
    stats = compute().sync()
    if not _dist_on() or dist.get_rank() == 0:
        stats.save(path)
        meta = {"data": data_config, "features": feature_id, "n": stats.n}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
    if _dist_on():
        dist.barrier()  # the file exists on return, for every rank
    return stats, path, True
