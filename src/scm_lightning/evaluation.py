"""Sample-quality figures: Fréchet distance of teacher and student samples at given NFEs.

Used at the end of ``fit``/``pretrain`` (the figures the README quotes) and by ``evaluate``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
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
    stats_cache_key,
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


def module_fingerprint(module: nn.Module) -> str:
    """16 hex digits of SHA-256 over a module's class and every tensor of its state dict."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, value in sorted(module.state_dict().items()):
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def cached_sample_stats(
    cache_dir: str | None, key: dict[str, Any], feature_id: str, compute: Callable[[], Any]
) -> tuple[FeatureStats, bool]:
    """``compute()``'s statistics, or the ones a run with the same ``key`` saved before.

    The frozen teacher's rows of the final evaluation depend only on its weights (in ``key``
    through :func:`module_fingerprint`), the sampler settings and the seed, never on the
    student: every ``fit`` of the same teacher would recompute the same figures (for the
    default digits run ~40 % of its evaluation time). Returns ``(stats, loaded)``.
    """
    if not cache_dir:
        return compute(), False
    path = Path(cache_dir) / f"samples-{stats_cache_key(key, feature_id)}.npz"
    if path.is_file():
        return FeatureStats.load(path), True
    stats = compute()
    stats.save(path)
    path.with_suffix(".json").write_text(json.dumps({**key, "features": feature_id}, indent=2))
    return stats, False


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
    from scm_lightning.data.base import eval_prompts
    from scm_lightning.sampling import draw_condition, teacher_sampler_name

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
    prompts = eval_prompts(dm)  # a text-conditioned run: the held-out pairs' prompts
    grids = [str(g) for g in ev.get("teacher_grids", ["edm"])]
    rows: list[tuple[str, str, float]] = []  # (key, sampler, FD) for the table
    headline: list[str] = []  # result keys of the last line: best FD per model and NFE

    def fd(
        sample: Callable[[int, torch.Generator, Tensor | None], Tensor],
        stage: str,
        cache_key: dict[str, Any] | None = None,
    ) -> float:
        def sampler(k: int, g: torch.Generator) -> Tensor:  # labels first, from the same RNG
            return sample(k, g, draw_condition(k, num_classes, g, probs, device, prompts))

        def compute() -> FeatureStats:
            with progress(f"FD {stage}", n, trainer) as advance:  # rank 0 shows it

                def counted(k: int, g: torch.Generator) -> Tensor:
                    images = sampler(k, g)
                    advance(k)
                    return images

                return sampled_stats(counted, n, bs, seed, feature_net, device)

        if cache_key is None:
            return frechet_distance_from_stats(compute(), ref_stats)
        stats, loaded = cached_sample_stats(cache_dir, cache_key, results["feature"], compute)
        if loaded:
            with progress(f"FD {stage} (cached)", n, trainer) as advance:
                advance(n)
        return frechet_distance_from_stats(stats, ref_stats)

    def best_of_grids(
        name: str, nfe: int, sample_on: Callable[..., Tensor], cached: bool = False
    ) -> None:
        for grid in grids if nfe > 1 else grids[:1]:  # 1 NFE: every grid is [t_max, 0]
            value = fd(
                lambda k, g, lab, grid=grid: sample_on(k, g, lab, grid),
                f"{name} nfe={nfe} {teacher_sampler_name(nfe, grid)}",
                {**teacher_key, "nfe": nfe, "grid": grid} if cached else None,
            )
            results[f"fd_{name}_nfe{nfe}_{grid}"] = value
            rows.append((f"{name}_nfe{nfe}", teacher_sampler_name(nfe, grid), value))
        scored = [g for g in grids if f"fd_{name}_nfe{nfe}_{g}" in results]
        best = min(scored, key=lambda grid: results[f"fd_{name}_nfe{nfe}_{grid}"])
        results[f"fd_{name}_nfe{nfe}"] = results[f"fd_{name}_nfe{nfe}_{best}"]
        results[f"{name}_grid_nfe{nfe}"] = best
        headline.append(f"fd_{name}_nfe{nfe}")

    teacher = getattr(module, "teacher", None)
    cache_dir = ev.get("cache_dir") if not _distributed() else None
    teacher_nfes = ev.get("teacher_nfes", []) if teacher is not None else []
    teacher_key: dict[str, Any] = {}
    if teacher_nfes and cache_dir:
        teacher_key = {  # everything the teacher's samples depend on (module.teacher_sample)
            "teacher": module_fingerprint(teacher),
            "shape": list(module.image_shape),
            "t_mid": module.t_mid,
            "guidance": [module.guidance_scale_range, module.uncond_label, module.eval_guidance],
            "labels": [num_classes, None if probs is None else probs.tolist()],
            "num_samples": n,
            "batch_size": bs,
            "seed": seed,
            "torch": torch.__version__,
        }
        codec = getattr(module, "latent_codec", None)
        if codec is not None:  # decoded images: the VAE and the latent statistics count too
            teacher_key["latent"] = [codec.fingerprint, codec.statistics()]
    if teacher_key and prompts is not None:  # text: held-out and null prompts from the data
        teacher_key["prompts"] = dm.config_key()
    for nfe in teacher_nfes:
        best_of_grids(
            "teacher",
            int(nfe),
            lambda k, g, lab, grid, nfe=int(nfe): module.teacher_sample(
                k, nfe=nfe, generator=g, class_labels=lab, grid=grid
            ),
            cached=bool(cache_dir),
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


def _distributed() -> bool:
    # Ranks would race on the cache file; the teacher rows are recomputed there.
    return torch.distributed.is_available() and torch.distributed.is_initialized()
