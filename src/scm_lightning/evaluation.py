"""Sample-quality figures: Fréchet distance of teacher and student samples at given NFEs.

Used at the end of ``fit``/``pretrain`` (the figures the README quotes) and by ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from scm_lightning.data.base import class_label_probs
from scm_lightning.metrics.features import build_feature_extractor
from scm_lightning.metrics.frechet import (
    FeatureStats,
    accumulate_stats,
    frechet_distance_from_stats,
)
from scm_lightning.progress import progress

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

    The teacher (for ``pretrain``: the model) is scored at each NFE on every grid of
    ``eval.teacher_grids`` (``fd_teacher_nfe2_t_mid``, ...) and reported with the best one:
    ``fd_teacher_nfe<k>`` and ``teacher_grid_nfe<k>``. A class-conditional model samples with
    labels from :func:`sampling.draw_class_labels` (``eval.labels``), a guidance-conditioned
    student at ``eval.guidance``. Prints a rich table and the machine-readable last line
    ``fd_teacher_nfe35=… fd_teacher_nfe2=… fd_student_nfe1=… fd_student_nfe2=…
    teacher_grid_nfe35=… teacher_grid_nfe2=…``.
    """
    from rich.console import Console
    from rich.table import Table

    from scm_lightning.callbacks.samples import ema_weights
    from scm_lightning.sampling import draw_class_labels, teacher_sampler_name

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
    num_classes = module.student.num_classes
    probs = class_label_probs(str(ev.get("labels", "uniform")), dm, num_classes)
    grids = [str(g) for g in ev.get("teacher_grids", ["edm"])]
    rows: list[tuple[str, str, float]] = []  # (key, sampler, FD) for the table
    headline: list[str] = []  # result keys of the last line: best FD per model and NFE

    def fd(sample: Callable[[int, torch.Generator, Tensor | None], Tensor], stage: str) -> float:
        def sampler(k: int, g: torch.Generator) -> Tensor:  # labels first, from the same RNG
            return sample(k, g, draw_class_labels(k, num_classes, g, probs, device))

        with progress(f"FD {stage}", n, trainer) as advance:  # rank 0 shows it

            def counted(k: int, g: torch.Generator) -> Tensor:
                images = sampler(k, g)
                advance(k)
                return images

            stats = sampled_stats(counted, n, bs, seed, feature_net, device)
        return frechet_distance_from_stats(stats, ref_stats)

    def best_of_grids(name: str, nfe: int, sample_on: Callable[..., Tensor]) -> None:
        for grid in grids if nfe > 1 else grids[:1]:  # 1 NFE: every grid is [t_max, 0]
            value = fd(
                lambda k, g, lab, grid=grid: sample_on(k, g, lab, grid),
                f"{name} nfe={nfe} {teacher_sampler_name(nfe, grid)}",
            )
            results[f"fd_{name}_nfe{nfe}_{grid}"] = value
            rows.append((f"{name}_nfe{nfe}", teacher_sampler_name(nfe, grid), value))
        scored = [g for g in grids if f"fd_{name}_nfe{nfe}_{g}" in results]
        best = min(scored, key=lambda grid: results[f"fd_{name}_nfe{nfe}_{grid}"])
        results[f"fd_{name}_nfe{nfe}"] = results[f"fd_{name}_nfe{nfe}_{best}"]
        results[f"{name}_grid_nfe{nfe}"] = best
        headline.append(f"fd_{name}_nfe{nfe}")

    teacher = getattr(module, "teacher", None)
    for nfe in ev.get("teacher_nfes", []) if teacher is not None else []:
        best_of_grids(
            "teacher",
            int(nfe),
            lambda k, g, lab, grid, nfe=int(nfe): module.teacher_sample(
                k, nfe=nfe, generator=g, class_labels=lab, grid=grid
            ),
        )
    with ema_weights(trainer, module) as profile:
        results["ema_profile"] = profile
        if teacher is not None:
            for nfe in ev.get("student_nfes", []):
                key = f"fd_student_nfe{nfe}"
                results[key] = fd(
                    lambda k, g, lab, nfe=int(nfe): module.sample(
                        k, nfe=nfe, generator=g, class_labels=lab
                    ),
                    f"student nfe={nfe}",
                )
                rows.append((f"student_nfe{nfe}", "consistency", results[key]))
                headline.append(key)
        else:  # pretrain: the model being trained is a teacher, scored like one
            for nfe in ev.get("teacher_nfes", []):
                best_of_grids(
                    "model",
                    int(nfe),
                    lambda k, g, lab, grid, nfe=int(nfe): module.sample(
                        k, nfe=nfe, generator=g, class_labels=lab, grid=grid
                    ),
                )

    table = Table(title=f"Fréchet distance ({results['feature']}, {n} samples; lower is better)")
    table.add_column("model @ NFE")
    table.add_column("sampler/grid")
    table.add_column("FD", justify="right")
    for key, sampler_name, value in rows:
        best = results.get(key.replace("_nfe", "_grid_nfe")) == sampler_name.split("/")[-1]
        table.add_row(key, sampler_name + (" (best)" if best else ""), f"{value:.4f}")
    console = Console()
    console.print(table)
    figures = [f"{k}={results[k]:.4f}" for k in headline]
    grid_names = [f"{k}={v}" for k, v in results.items() if "_grid_nfe" in k]
    print(" ".join(figures + grid_names), flush=True)
    return results
