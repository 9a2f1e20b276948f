"""FD of a fit run's teacher at each NFE on each standard PF-ODE time grid.

The same figures `fit`'s final evaluation computes (``eval.*``: feature, sample count, batch
size, seed; ``loss.t_mid`` for the through-t_mid grid), for more NFEs:

    python benchmarks/teacher_grids.py [--nfes 1 2 3 4 35] [fit overrides, e.g. teacher=...]

One line per (NFE, grid): ``nfe=2 ddim/t_mid FD=153.26``; last line: the best grid per NFE,
``best nfe1=ddim/edm:983.84 nfe2=ddim/t_mid:153.26 ...``.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfes", type=int, nargs="+", default=[1, 2, 3, 4, 35])
    parser.add_argument("--threads", type=int, default=1)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)

    from scm_lightning.config import compose_config
    from scm_lightning.evaluation import reference_stats, sampled_stats
    from scm_lightning.metrics.features import build_feature_extractor
    from scm_lightning.metrics.frechet import frechet_distance_from_stats
    from scm_lightning.sampling import TEACHER_GRIDS, teacher_sample, teacher_sampler_name
    from scm_lightning.training import build_datamodule, build_teacher, image_shape

    cfg = compose_config("fit", [*overrides, "run_dir=unused"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    teacher = build_teacher(cfg.teacher)
    if dm.num_classes:
        raise SystemExit("a class-conditional teacher: use `evaluate` (it draws labels)")
    ev, device = cfg.eval, torch.device("cpu")
    n, bs, seed = int(ev.num_samples), int(ev.batch_size), int(ev.seed)
    net = build_feature_extractor(ev.feature, device=device)
    ref = reference_stats(dm.reference_images(n), bs, net, device)
    sd, shape = teacher.sigma_data, image_shape(dm)
    best: dict[int, tuple[str, float]] = {}
    for nfe in args.nfes:
        for grid in TEACHER_GRIDS:
            start = time.perf_counter()

            def sampler(k: int, g: torch.Generator, nfe: int = nfe, grid: str = grid):
                noise = sd * torch.randn((k, *shape), generator=g)
                return teacher_sample(teacher, noise, sd, nfe, grid=grid, t_mid=cfg.loss.t_mid)

            fd = frechet_distance_from_stats(sampled_stats(sampler, n, bs, seed, net, device), ref)
            name = teacher_sampler_name(nfe, grid)
            print(f"nfe={nfe} {name} FD={fd:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
            if nfe not in best or fd < best[nfe][1]:
                best[nfe] = (name, fd)
    print("best " + " ".join(f"nfe{k}={g}:{fd:.2f}" for k, (g, fd) in best.items()), flush=True)


if __name__ == "__main__":
    main()
