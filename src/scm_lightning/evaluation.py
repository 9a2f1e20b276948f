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
from scm_lightning.metrics.frechet import (
    FeatureStats,
    accumulate_stats,
    frechet_distance_from_stats,
)

Sampler = Callable[[int, torch.Generator], Tensor]


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

    return accumulate_stats(batches(), feature_net, device)


def reference_stats(
    reference: Tensor, batch_size: int, feature_net: nn.Module, device: torch.device
) -> FeatureStats:
    """Statistics of the reference images ``(N, C, H, W)``, ``batch_size`` at a time."""
    return accumulate_stats(reference.split(batch_size), feature_net, device)


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
        weights_path=ev.get("feature_weights"),
    )
    ref = dm.reference_images(int(ev.num_samples))
    ref_stats = reference_stats(ref, int(ev.batch_size), feature_net, device)
    n, bs, seed = int(ev.num_samples), int(ev.batch_size), int(ev.seed)
    results: dict[str, Any] = {
        "num_samples": n,
        "feature": str(getattr(feature_net, "feature_id", "")),
    }

    def fd(sampler: Sampler) -> float:
        return frechet_distance_from_stats(
            sampled_stats(sampler, n, bs, seed, feature_net, device), ref_stats
        )

    teacher = getattr(module, "teacher", None)
    for nfe in ev.get("teacher_nfes", []) if teacher is not None else []:
        results[f"fd_teacher_nfe{nfe}"] = fd(
            lambda k, g, nfe=nfe: module.teacher_sample(k, nfe=int(nfe), generator=g)
        )
    with ema_weights(trainer, module) as profile:
        results["ema_profile"] = profile
        nfes = ev.get("student_nfes", []) if teacher is not None else ev.get("teacher_nfes", [])
        name = "student" if teacher is not None else "model"
        for nfe in nfes:
            results[f"fd_{name}_nfe{nfe}"] = fd(
                lambda k, g, nfe=nfe: module.sample(k, nfe=int(nfe), generator=g)
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
