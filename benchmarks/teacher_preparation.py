"""Teacher preparation on a DDPM teacher: sample quality kept, time derivative tamed.

1. Trains a small DDPM (ε-prediction, 1000-step linear schedule) diffusers ``UNet2DModel`` on
   the digits (8×8) and saves it as a diffusers folder (``unet/`` + ``scheduler/``).
2. Prepares it with the real CLI: ``pretrain prepare_from={_target_: ...load_teacher, path:
   <folder>}`` (c_noise = t through the net's positional embedding, embedding refit, then
   TrigFlow diffusion fine-tuning), exporting the EMA network.
3. Fréchet distance (digits classifier features, ``eval.num_samples`` samples, ``eval.seed``)
   at 35 NFE (Heun, 18 steps, spec §5) of the original teacher, of the rewired network before
   fine-tuning, and of the prepared teacher.
4. ``‖∂F/∂t‖`` (RMS over pixels and a batch of noisy digits ``x_t``, x fixed) by float64
   central differences at several t up to t_max = arctan(80/σ_d), for the same three models.

    python benchmarks/teacher_preparation.py [--teacher-steps 3000] [--prepare-steps 600]
        [--threads 1]

Last line: ``fd_teacher_nfe35=… fd_rewired_nfe35=… fd_prepared_nfe35=…
dFdt_teacher_tmax=… dFdt_prepared_tmax=…``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from scm_lightning import sampling, trigflow
from scm_lightning.config import compose_config
from scm_lightning.data.digits import DigitsDataModule
from scm_lightning.evaluation import reference_stats, sampled_stats
from scm_lightning.metrics.features import build_feature_extractor
from scm_lightning.metrics.frechet import frechet_distance_from_stats
from scm_lightning.teachers.loading import load_teacher
from scm_lightning.teachers.preparation import prepare_trigflow_model

SD = 0.5
TIMES = (0.5, 1.0, 1.4, 1.5, 1.55, trigflow.t_max_from_sigma_max(sigma_data=SD))


def digits_unet2d() -> UNet2DModel:
    """The stock diffusers teacher network of these benchmarks: 1×8×8, channels 16/32, no
    attention (initialised from torch's global RNG)."""
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def train_ddpm_teacher(folder: Path, steps: int, seed: int) -> None:
    """ε-prediction DDPM on the digits in [-1, 1], Adam 1e-3, batch 128."""
    torch.manual_seed(seed)
    net = digits_unet2d()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    data = DigitsDataModule().reference_images(10_000)
    alphas_cumprod = scheduler.alphas_cumprod
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x0 = data[torch.randint(0, data.shape[0], (128,), generator=gen)]
        idx = torch.randint(0, 1000, (128,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[idx].view(-1, 1, 1, 1)
        x_s = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (net(x_s, idx).sample - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(
                f"  ddpm step {step}: loss {loss.item():.4f} ({time.perf_counter():.0f} s)",
                flush=True,
            )
    net.eval().save_pretrained(folder / "unet")
    scheduler.save_config(folder / "scheduler")


def prepare_with_cli(teacher: Path, out: Path, steps: int) -> float:
    """``pretrain prepare_from=...`` through the real CLI; returns its fd_model_nfe35."""
    cmd = [
        sys.executable,
        "-m",
        "scm_lightning",
        "pretrain",
        f"prepare_from={{_target_:scm_lightning.teachers.loading.load_teacher,path:'{teacher}'}}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.enable_progress_bar=false",
        "eval.teacher_nfes=[35]",
        "callbacks.fid=null",  # the FD figures come from the final evaluation and below
        f"run_dir={out / 'run'}",
        f"export_dir={out / 'prepared'}",
    ]
    print("  $ python -m scm_lightning " + " ".join(cmd[3:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    last = res.stdout.strip().splitlines()[-1]
    return float(dict(kv.split("=") for kv in last.split())["fd_model_nfe35"])


def dF_dt_rms(model, x_t: torch.Tensor, t: float, h: float = 1e-4) -> float:
    """RMS of ∂F/∂t at fixed x_t/σ_d, float64 central differences (time features are float32
    inside diffusers, so h is not taken smaller)."""
    b = x_t.shape[0]
    tp = torch.full((b,), t + h, dtype=torch.float64)
    tm = torch.full((b,), t - h, dtype=torch.float64)
    with torch.no_grad():
        d = (model(x_t / SD, tp) - model(x_t / SD, tm)) / (2 * h)
    return float(d.pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--prepare-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="teacher_preparation_"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    print(f"1. DDPM teacher, {args.teacher_steps} steps", flush=True)
    train_ddpm_teacher(out / "ddpm", args.teacher_steps, args.seed)
    print(f"2. preparation, {args.prepare_steps} fine-tuning steps", flush=True)
    fd_cli = prepare_with_cli(out / "ddpm", out, args.prepare_steps)

    teacher = load_teacher(out / "ddpm")  # ScheduleAdapter (VP, ε)
    rewired = prepare_trigflow_model(teacher).eval().requires_grad_(False)
    prepared = load_teacher(out / "prepared")  # TrigFlowNative, EMA weights
    models = {"teacher": teacher, "rewired": rewired, "prepared": prepared}

    ev = compose_config("pretrain", []).eval
    n, bs, seed = int(ev.num_samples), int(ev.batch_size), int(ev.seed)
    device = torch.device("cpu")
    feature_net = build_feature_extractor(str(ev.feature), device=device)
    ref = reference_stats(DigitsDataModule().reference_images(n), bs, feature_net, device)
    fd = {}
    for name, model in models.items():

        def sampler(k: int, g: torch.Generator, model=model) -> torch.Tensor:
            noise = SD * torch.randn(k, 1, 8, 8, generator=g)
            with torch.no_grad():
                return sampling.teacher_sample(model, noise, SD, 35)

        fd[name] = frechet_distance_from_stats(
            sampled_stats(sampler, n, bs, seed, feature_net, device), ref
        )

    gen = torch.Generator().manual_seed(1)
    x0 = DigitsDataModule().reference_images(64).double()
    z = SD * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    deriv: dict[str, list[float]] = {name: [] for name in models}
    for t in TIMES:
        x_t = math.cos(t) * x0 + math.sin(t) * z
        for name, model in models.items():
            deriv[name].append(dF_dt_rms(model.double(), x_t, t))

    print(f"\nFD at 35 NFE (digits features, {n} samples; lower is better)")
    print("| model | FD |\n| --- | --- |")
    for name in models:
        print(f"| {name} | {fd[name]:.2f} |")
    print(f"(the CLI's own final evaluation of the prepared EMA network: {fd_cli:.2f})")
    print("\n‖∂F/∂t‖ (RMS, float64 central differences, h = 1e-4)")
    print("| t | " + " | ".join(models) + " |\n|" + " --- |" * (len(models) + 1))
    for i, t in enumerate(TIMES):
        print(f"| {t:.4f} | " + " | ".join(f"{deriv[m][i]:.3g}" for m in models) + " |")
    print(f"\nwall time {time.perf_counter() - start:.0f} s, {args.threads} threads, out={out}")
    print(
        f"fd_teacher_nfe35={fd['teacher']:.4f} fd_rewired_nfe35={fd['rewired']:.4f} "
        f"fd_prepared_nfe35={fd['prepared']:.4f} dFdt_teacher_tmax={deriv['teacher'][-1]:.4g} "
        f"dFdt_prepared_tmax={deriv['prepared'][-1]:.4g}"
    )


if __name__ == "__main__":
    main()
