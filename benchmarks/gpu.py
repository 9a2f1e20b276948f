"""The GPU checks in one process (< 5 min on one GPU): JVP attention and the sCD step cost.

1. Attention output + tangent (q, k, v all carry tangents), B=1, H=8, head dim 64, bf16
   inputs: the Triton kernel (``jvp_attention`` on CUDA) vs ``torch.func.jvp`` through math
   attention, and the plain fused SDPA forward (no tangent, the floor's unit), at 1024, 4096
   and 16384 tokens: time (median of CUDA-synchronised calls) and ``max_memory_allocated``
   growth. Math attention at 16384 needs several 16384² score matrices per head; an
   out-of-memory there is reported, not fatal.
2. The CIFAR-sized network's sCD step / diffusion step (benchmarks/step_cost.py), bf16
   autocast with the JVP in fp32 (``loss.jvp_precision=32``), eager and compiled.

    python benchmarks/gpu.py

Without CUDA it prints that there is nothing to run and exits 0. Last line, key=value:
``attn_time_ratio_<L>=<triton/math> attn_mem_ratio_<L>=<...> attn_floor_ratio_<L>=<triton/
fused forward> ... step_cost_ratio_bf16=<eager> step_cost_ratio_bf16_compiled=<...>``.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch

LENGTHS = (1024, 4096, 16384)


def _time_and_peak(fn, reps: int = 10) -> tuple[float, int]:
    fn()  # warm-up (Triton autotune / compile)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def attention(figures: dict[str, float]) -> None:
    import torch.nn.functional as F

    from scm_lightning.jvp import jvp_attention

    def math_attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v

    print(f"{'L':>6}{'variant':>10}{'time ms':>10}{'peak MiB':>10}")
    for length in LENGTHS:
        gen = torch.Generator(device="cuda").manual_seed(0)
        shape = (1, 8, length, 64)
        p = tuple(
            torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3)
        )
        t = tuple(torch.randn_like(x) for x in p)
        res = {}
        variants = {
            "fused_fwd": functools.partial(F.scaled_dot_product_attention, *p),
            "triton": functools.partial(torch.func.jvp, jvp_attention, p, t),
            "math": functools.partial(torch.func.jvp, math_attention, p, t),
        }
        for name, fn in variants.items():
            try:
                with torch.no_grad():
                    res[name] = _time_and_peak(fn)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{length:>6}{name:>10}  out of memory")
                continue
            print(f"{length:>6}{name:>10}{res[name][0] * 1e3:>10.2f}{res[name][1] / 2**20:>10.1f}")
        if "math" in res:
            figures[f"attn_time_ratio_{length}"] = res["triton"][0] / res["math"][0]
            figures[f"attn_mem_ratio_{length}"] = res["triton"][1] / max(res["math"][1], 1)
        figures[f"attn_floor_ratio_{length}"] = res["triton"][0] / res["fused_fwd"][0]


def step_cost(figures: dict[str, float]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step_cost import Bench, graph_breaks, time_variants

    bench = Bench("cifar", "cuda", jvp_dtype=torch.float32, autocast=torch.bfloat16)
    compile_s = bench.compile()
    med = time_variants(bench, ["diffusion", "scd", "scd_compiled"], reps=20)
    print(f"CIFAR-sized step, bf16-mixed, fp32 JVP (compile {compile_s:.1f} s):")
    for name, t in med.items():
        print(f"  {name:14s} {t * 1e3:8.2f} ms  ({t / med['diffusion']:.2f}x diffusion)")
    figures["step_cost_ratio_bf16"] = med["scd"] / med["diffusion"]
    figures["step_cost_ratio_bf16_compiled"] = med["scd_compiled"] / med["diffusion"]
    figures["graph_breaks"] = graph_breaks()


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: benchmarks/gpu.py has nothing to run here (it needs one GPU)")
        return 0
    start = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    figures: dict[str, float] = {}
    attention(figures)
    step_cost(figures)
    figures["wall_s"] = time.perf_counter() - start
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
