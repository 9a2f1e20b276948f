"""Sample-set metrics beyond FD: KID and k-NN precision/recall, computed by torch-fidelity,
and the class accuracy of class-conditional samples.

Features are ``(N, D)`` tensors from a feature network (``metrics.features``). These wrappers
only fit the arguments (subset size at most the sample counts, one-line errors for too few
samples) and return plain floats; the estimators are torch-fidelity's own.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)
from torch_fidelity.metric_prc import (
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)


def kernel_inception_distance(
    gen: Tensor, ref: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, Eq. 3 with the kernel ``(xᵀy/d + 1)³``): mean and std of the
    unbiased MMD² over ``subsets`` random pairs of subsets of ``min(subset_size, N_gen, N_ref)``
    features each (torch-fidelity ``kid_features_to_metric``, seeded by ``seed``)."""
    m = min(int(subset_size), gen.shape[0], ref.shape[0])
    if m < 2:
        raise ValueError(
            f"KID needs at least 2 samples per set, got {gen.shape[0]} and {ref.shape[0]}"
        )
    out = kid_features_to_metric(
        gen.detach().double().cpu(),
        ref.detach().double().cpu(),
        kid_subsets=int(subsets),
        kid_subset_size=m,
        rng_seed=int(seed),
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def precision_recall(gen: Tensor, ref: Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019) of features ``gen`` vs ``ref``.

    Precision: fraction of generated points inside the k-NN ball of some real point; recall:
    fraction of real points inside the k-NN ball of some generated point (torch-fidelity
    ``prc_features_to_metric``, distances in float64).
    """
    if min(gen.shape[0], ref.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    out = prc_features_to_metric(
        gen.detach().to(torch.float64).cpu(),
        ref.detach().to(torch.float64).cpu(),
        prc_neighborhood=int(k),
        prc_batch_size=10_000,
        save_cpu_ram=True,  # distances block by block, never the full N×N matrices at once
        verbose=False,
    )
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def class_accuracy(
    predicted: Tensor, labels: Tensor, num_classes: int
) -> tuple[float, list[float]]:
    """Does a class-conditional model draw the class it was asked for?

    ``predicted`` ``(N,)``: a classifier's argmax on the samples (e.g. the bundled
    :class:`~scm_lightning.metrics.features.DigitsClassifier`'s ``logits``); ``labels`` ``(N,)``:
    the classes the samples were drawn for, in ``[0, num_classes)``. Returns the overall
    fraction correct and the per-class fractions ``[acc_0, …, acc_{K−1}]`` (NaN for a class
    that was never asked for).
    """
    predicted, labels = predicted.long().flatten().cpu(), labels.long().flatten().cpu()
    if predicted.shape != labels.shape or predicted.numel() == 0:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)} must be "
            "non-empty and of the same length"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}"
        )
    correct = (predicted == labels).double()
    asked = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)
    per_class = torch.where(asked > 0, hits / asked.clamp(min=1), torch.nan)
    return float(correct.mean()), [float(a) for a in per_class]
