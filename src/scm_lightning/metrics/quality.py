"""Sample-set metrics beyond FD: KID and k-NN precision/recall on feature vectors (pure).

Features are ``(N, D)`` tensors from a feature network (``metrics.features``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD² (Gretton et al. 2012, Eq. 3) with the KID kernel ``(xᵀy/d + 1)³``."""
    x, y = x.double(), y.double()
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kernel_inception_distance(
    gen: Tensor, ref: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski 2018): mean, std of :func:`mmd2_unbiased` over random subsets."""
    m = min(int(subset_size), gen.shape[0], ref.shape[0])
    if m < 2:
        raise ValueError(
            f"KID needs at least 2 samples per set, got {gen.shape[0]} and {ref.shape[0]}"
        )
    rng = np.random.default_rng(seed)
    vals = [
        mmd2_unbiased(
            gen[torch.from_numpy(rng.choice(gen.shape[0], m, replace=False))],
            ref[torch.from_numpy(rng.choice(ref.shape[0], m, replace=False))],
        )
        for _ in range(int(subsets))
    ]
    return float(np.mean(vals)), float(np.std(vals))


def _kth_radius(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance of each row of ``x`` to its k-th nearest other row."""
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def _covered(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 2048) -> Tensor:
    """Per point: inside some ball ``‖p − c‖ ≤ r_c``?"""
    return torch.cat(
        [(torch.cdist(p, centres) <= radii[None]).any(dim=1) for p in points.split(chunk)]
    )


def precision_recall(gen: Tensor, ref: Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019) of features ``gen`` vs ``ref``.

    Precision: fraction of generated points inside the k-NN ball of some real point; recall:
    fraction of real points inside the k-NN ball of some generated point.
    """
    if min(gen.shape[0], ref.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    gen, ref = gen.double(), ref.double()
    precision = _covered(gen, ref, _kth_radius(ref, k)).double().mean()
    recall = _covered(ref, gen, _kth_radius(gen, k)).double().mean()
    return float(precision), float(recall)
