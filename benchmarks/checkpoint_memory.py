"""Peak memory of one sCD training step with and without activation checkpointing.

Without checkpointing the default step is one pass (the grad-enabled JVP's primal is F_θ, so
every block's activations are kept for the backward). With ``student.gradient_checkpointing``
the step takes two passes: a no-grad JVP (nothing kept), then a checkpointed forward that keeps
only each block's input and recomputes the block in the backward.

    python benchmarks/checkpoint_memory.py [--config cifar|digits] [--device cpu|cuda]

CPU: each setting runs in a fresh subprocess; the figure is the growth of the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` after a warm-up step and ``malloc_trim``)
over one step (teacher, JVP, forward, backward, gradients). CUDA: the
``torch.cuda.max_memory_allocated`` growth over the same step. Last line:
``ckpt_mem_ratio=<with/without> with_mib=<...> without_mib=<...> step_time_ratio=<...>``
(one timed step per setting: a rough figure).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import time

import torch

from step_cost import CONFIGS  # the same two networks and batches as the step-cost benchmark


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_heap() -> None:
    with contextlib.suppress(OSError):  # not glibc: the baseline may include freed heap
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(config: str, device: str, checkpointing: bool, threads: int) -> dict[str, float]:
    """One sCD step of a fresh student; returns the peak memory growth in MiB and the time."""
    from scm_lightning.jvp.install import install_jvp_attention
    from scm_lightning.losses import SCMLossConfig, scm_loss, uses_gradient_checkpointing
    from scm_lightning.nets.trigflow_unet import TrigFlowUNet
    from scm_lightning.student import Student
    from scm_lightning.teachers.trigflow import TrigFlowNative

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = CONFIGS[config]
    net = TrigFlowUNet(**cfg["net"])
    for p in net.parameters():  # a trained-looking net: the zero-init output conv is no teacher
        p.data.normal_(std=0.05)
    teacher = TrigFlowNative(net, sigma_data=0.5).requires_grad_(False).eval().to(device)
    student = Student.from_teacher(teacher).to(device)
    install_jvp_attention(student)
    if checkpointing:
        student.net.net.enable_gradient_checkpointing()
    assert uses_gradient_checkpointing(student) is checkpointing
    x0 = torch.randn(cfg["shape"], device=device).clamp(-1, 1)
    gen = torch.Generator(device).manual_seed(1)

    def step() -> None:
        scm_loss(student, x0, SCMLossConfig(), 1.0, teacher, generator=gen).loss.backward()

    step()  # warm-up: one-off allocations (kernels, caches) and the gradients' own storage
    student.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _release_freed_heap()
        base = _status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    seconds = time.perf_counter() - start
    return {"peak_growth_mib": (peak - base) / 2**20, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cifar")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("with", "without"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(args.config, args.device, args.worker == "with", args.threads)
        print(json.dumps(result))
        return
    results = {}
    for setting in ("without", "with"):  # a fresh process each: no allocator state carries over
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--worker", setting],
            capture_output=True,
            text=True,
            check=True,
        )
        results[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{setting} checkpointing: {results[setting]}", flush=True)
    w, wo = results["with"], results["without"]
    print(
        f"ckpt_mem_ratio={w['peak_growth_mib'] / wo['peak_growth_mib']:.3f} "
        f"with_mib={w['peak_growth_mib']:.1f} without_mib={wo['peak_growth_mib']:.1f} "
        f"step_time_ratio={w['seconds'] / wo['seconds']:.2f} "
        f"config={args.config} device={args.device}"
    )


if __name__ == "__main__":
    main()
