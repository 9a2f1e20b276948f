"""Sampling throughput: the 1- and 2-step student against the 35-NFE teacher (Heun).

Same network (the bundled digits teacher, and the CIFAR-sized TrigFlowUNet of
benchmarks/step_cost.py), same batch; the student is ``Student.from_teacher`` (the same
architecture and cost per evaluation as any trained student). Variants are interleaved and
timed as the median of ``--reps`` repetitions in one process.

    python benchmarks/sampling.py [--reps 5] [--threads 2] [--batch 256]

Last line: ``sampling_speedup_nfe1=<images/s of the 1-step student / teacher's>
sampling_speedup_nfe2=<...>`` (digits network), then the CIFAR-sized figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scm_lightning import sampling
from scm_lightning.nets.trigflow_unet import TrigFlowUNet
from scm_lightning.student import Student
from scm_lightning.teachers.loading import load_teacher
from scm_lightning.teachers.trigflow import TrigFlowNative


def networks() -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    from scm_lightning.assets import asset_path

    digits = load_teacher(asset_path("digits_teacher"))
    torch.manual_seed(0)
    cifar = TrigFlowUNet(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_channels=(64, 128, 128),
        layers_per_block=1,
        attention_levels=(1,),
        attention_head_dim=64,
    )
    for p in cifar.parameters():
        p.data.normal_(std=0.05)
    return {
        "digits": (digits, (1, 8, 8)),
        "cifar": (TrigFlowNative(cifar, sigma_data=0.5), (3, 32, 32)),
    }


def measure(teacher: torch.nn.Module, shape: tuple[int, ...], batch: int, reps: int) -> dict:
    """Median seconds per batch: 1- and 2-step student, 35-NFE Heun teacher (interleaved)."""
    student = Student.from_teacher(teacher).eval()
    sd = teacher.sigma_data
    noise = sd * torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    runs = {
        "student_nfe1": (
            sampling.consistency_sample,
            student,
            noise,
            sampling.consistency_times(1, sigma_data=sd),
            sd,
        ),
        "student_nfe2": (
            sampling.consistency_sample,
            student,
            noise,
            sampling.consistency_times(2, sigma_data=sd),
            sd,
        ),
        "teacher_nfe35": (sampling.teacher_sample, teacher, noise, sd, 35),
    }
    for fn, *fn_args in runs.values():  # warm-up
        fn(*fn_args)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for k, (fn, *fn_args) in runs.items():
            t0 = time.perf_counter()
            fn(*fn_args)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="digits batch (CIFAR-sized: /8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict[str, float] = {}
    for name, (teacher, shape) in networks().items():
        batch = args.batch if name == "digits" else max(args.batch // 8, 1)
        med = measure(teacher.requires_grad_(False).eval(), shape, batch, args.reps)
        print(f"{name}: batch {batch}, {args.threads} threads, median of {args.reps}")
        for k, t in med.items():
            print(f"  {k:14s} {t * 1e3:9.1f} ms  {batch / t:10.0f} images/s")
        suffix = "" if name == "digits" else f"_{name}"
        for nfe in (1, 2):
            figures[f"sampling_speedup_nfe{nfe}{suffix}"] = (
                med["teacher_nfe35"] / med[f"student_nfe{nfe}"]
            )
    print(" ".join(f"{k}={v:.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
