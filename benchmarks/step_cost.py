"""Cost of one sCD training step relative to one diffusion training step (same net, same batch).

Both steps include the optimiser update. Variants are interleaved and each is timed as the
median of ``--reps`` repetitions in this one process, so machine noise hits all alike.

    python benchmarks/step_cost.py [--config cifar|digits] [--reps 7] [--threads 2]

Last line: ``step_cost_ratio=<sCD/diffusion> step_cost_ratio_two_pass=<...>
step_cost_ratio_naive=<...>``: the default (lean JVP rules of jvp/fast.py, the JVP's primal
reused as F_θ), the same with a separate student forward, and PyTorch's generic forward-AD
with a separate forward (the naive implementation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scm_lightning.jvp.install import install_jvp_attention
from scm_lightning.losses import SCMLossConfig, diffusion_loss, scm_loss
from scm_lightning.nets.trigflow_unet import TrigFlowUNet
from scm_lightning.student import Student
from scm_lightning.teachers.trigflow import TrigFlowNative

CONFIGS = {
    # CIFAR-10-sized: channels 64/128/128, attention at 16×16, batch 16 (field notes).
    "cifar": dict(
        net=dict(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_channels=(64, 128, 128),
            layers_per_block=1,
            attention_levels=(1,),
            attention_head_dim=64,
        ),
        shape=(16, 3, 32, 32),
    ),
    # The bundled digits teacher's architecture at the default fit batch.
    "digits": dict(net=dict(sample_size=8, block_channels=(32, 64)), shape=(128, 1, 8, 8)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cifar")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = CONFIGS[args.config]
    net = TrigFlowUNet(**cfg["net"])
    for p in net.parameters():  # a trained-looking net: the zero-init output conv is no teacher
        p.data.normal_(std=0.05)
    teacher = TrigFlowNative(net, sigma_data=0.5).requires_grad_(False).eval()
    student = Student.from_teacher(teacher)
    install_jvp_attention(student)
    opt = torch.optim.RAdam(student.parameters(), lr=1e-4)
    x0 = torch.randn(cfg["shape"]).clamp(-1, 1)
    losses = {
        "diffusion": lambda g: diffusion_loss(
            student, x0, 0.5, -1.0, 1.4, logvar=student.logvar, generator=g
        ),
        "scd": lambda g: scm_loss(student, x0, SCMLossConfig(), 1.0, teacher, generator=g).loss,
        "scd_two_pass": lambda g: (
            scm_loss(student, x0, SCMLossConfig(reuse_primal=False), 1.0, teacher, generator=g).loss
        ),
        "scd_naive": lambda g: (
            scm_loss(
                student,
                x0,
                SCMLossConfig(fast_jvp=False, reuse_primal=False),
                1.0,
                teacher,
                generator=g,
            ).loss
        ),
    }

    def step(name: str) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses[name](torch.Generator().manual_seed(0)).backward()
        opt.step()
        return time.perf_counter() - start

    for name in losses:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(args.reps):
        for name in losses:
            times[name].append(step(name))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"config={args.config} batch={tuple(cfg['shape'])} threads={args.threads} reps={args.reps}"
    )
    for name, t in med.items():
        print(f"  {name:16s} {t * 1e3:8.1f} ms  ({t / med['diffusion']:.2f}x diffusion)")
    print(
        f"step_cost_ratio={med['scd'] / med['diffusion']:.3f} "
        f"step_cost_ratio_two_pass={med['scd_two_pass'] / med['diffusion']:.3f} "
        f"step_cost_ratio_naive={med['scd_naive'] / med['diffusion']:.3f}"
    )


if __name__ == "__main__":
    main()
