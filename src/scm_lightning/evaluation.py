"""Sample-quality figures: Fréchet distance of teacher and student samples at given NFEs.

Used at the end of ``fit``/``pretrain`` (the figures the README quotes) and by ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from scm_lightning.metrics.features import build_feature_extractor
from scm_lightning.metrics.frechet import FeatureStats, frechet_distance_from_stats
from scm_lightning.progress import progress

Sampler = Callable[[int, torch.Generator], Tensor]


@torch.no_grad()
def feature_stats(
    images_in_batches: Callable[[], Any], feature_net: nn.Module, device: torch.device
) -> FeatureStats:
    """Accumulate feature mean/covariance over an iterable of ``(N, C, H, W)`` image batches."""
    stats: FeatureStats | None = None
    for images in images_in_batches():
        feats = feature_net(images.to(device).float().clamp(-1, 1)).double()
        if stats is None:
            stats = FeatureStats(feats.shape[1], device=device)
        stats.update(feats)
    if stats is None:
        raise ValueError("no images to compute feature statistics from")
    return stats


def sampled_stats(
    sampler: Sampler,
    num_samples: int,
    batch_size: int,
    seed: int,
    feature_net: nn.Module,
    device: torch.device,
) -> FeatureStats:
    """Statistics of ``num_samples`` images from ``sampler(n, generator)`` (fixed seed)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def batches() -> Any:
        done = 0
        while done < num_samples:
            n = min(batch_size, num_samples - done)
            yield sampler(n, gen)
            done += n

    return feature_stats(batches, feature_net, device)


def reference_stats(
    reference: Tensor, batch_size: int, feature_net: nn.Module, device: torch.device
) -> FeatureStats:
    return feature_stats(lambda: reference.split(batch_size), feature_net, device)


def final_quality(cfg: DictConfig, module: Any, dm: Any, trainer: Any) -> dict[str, Any]:
    """FD of the teacher (``eval.teacher_nfes``) and the EMA student (``eval.student_nfes``).

    Prints a rich table and the machine-readable last line
    ``fd_teacher_nfe35=… fd_teacher_nfe2=… fd_student_nfe1=… fd_student_nfe2=…``.
    """
    from rich.console import Console
    from rich.table import Table

    from scm_lightning.callbacks.samples import ema_weights

    ev = cfg.eval
    if int(ev.num_samples) == 0:
        return {}
    device = module.device
    feature_net = build_feature_extractor(
        OmegaConf.to_container(ev.feature) if isinstance(ev.feature, DictConfig) else ev.feature,
        device=device,
    )
    ref = dm.reference_images(int(ev.num_samples))
    ref_stats = reference_stats(ref, int(ev.batch_size), feature_net, device)
    n, bs, seed = int(ev.num_samples), int(ev.batch_size), int(ev.seed)
    results: dict[str, Any] = {
        "num_samples": n,
        "feature": str(getattr(feature_net, "feature_id", "")),
    }

    def fd(sampler: Sampler, stage: str) -> float:
        with progress(f"FD {stage}", n, trainer) as advance:  # rank 0 shows it

            def counted(k: int, g: torch.Generator) -> Tensor:
                images = sampler(k, g)
                advance(k)
                return images

            stats = sampled_stats(counted, n, bs, seed, feature_net, device)
        return frechet_distance_from_stats(stats, ref_stats)

    teacher = getattr(module, "teacher", None)
    for nfe in ev.get("teacher_nfes", []) if teacher is not None else []:
        results[f"fd_teacher_nfe{nfe}"] = fd(
            lambda k, g, nfe=nfe: module.teacher_sample(k, nfe=int(nfe), generator=g),
            f"teacher nfe={nfe}",
        )
    with ema_weights(trainer, module) as profile:
        results["ema_profile"] = profile
        nfes = ev.get("student_nfes", []) if teacher is not None else ev.get("teacher_nfes", [])
        name = "student" if teacher is not None else "model"
        for nfe in nfes:
            results[f"fd_{name}_nfe{nfe}"] = fd(
                lambda k, g, nfe=nfe: module.sample(k, nfe=int(nfe), generator=g),
                f"{name} nfe={nfe}",
            )

    table = Table(title=f"Fréchet distance ({results['feature']}, {n} samples; lower is better)")
    table.add_column("model @ NFE")
    table.add_column("FD", justify="right")
    figures = {k: v for k, v in results.items() if k.startswith("fd_")}
    for key, value in figures.items():
        table.add_row(key.removeprefix("fd_"), f"{value:.4f}")
    console = Console()
    console.print(table)
    print(" ".join(f"{k}={v:.4f}" for k, v in figures.items()), flush=True)
    return results
