"""Time and peak memory of attention + JVP: ours (spec §6) vs torch.func.jvp through math.

Each (variant, length) runs in a fresh subprocess; CPU peak memory is the growth of the
process's peak RSS (``resource.getrusage``) over its value once the inputs exist, so both
variants are charged exactly for what the attention JVP allocates. On CUDA the script also
times the Triton kernel, with ``torch.cuda.max_memory_allocated``.

    python benchmarks/attention_jvp.py [--lengths 256 1024 4096] [--batch 1 --heads 2] [--threads 1]

Last line: ``mem_ratio_4096=<ours/math> time_ratio_4096=<ours/math>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HEAD_DIM = 64


def _child(variant: str, length: int, batch: int, heads: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from scm_lightning.jvp import jvp_attention

    def math_attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v

    fn = {"ours": jvp_attention, "math": math_attention}[variant]
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, length, HEAD_DIM)
    primals = tuple(torch.randn(shape, generator=gen, device=device) for _ in range(3))
    tangents = tuple(torch.randn(shape, generator=gen, device=device) for _ in range(3))
    cuda = device == "cuda"

    def run(p: tuple = primals, t: tuple = tangents) -> None:
        with torch.no_grad():
            torch.func.jvp(fn, p, t)
        if cuda:
            torch.cuda.synchronize()

    # Warm up on a tiny problem first: library init (thread pools, BLAS buffers, functorch)
    # then sits below the baseline and is not charged to either variant.
    run(*(tuple(x[..., :64, :] for x in xs) for xs in (primals, tangents)))

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 4 or (time.perf_counter() - start < 2.0 and len(times) < 30):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # First call excluded (warm-up); min of the rest: the machine is shared.
    return {"time_s": min(times[1:]), "peak_bytes": max(peak, 0), "reps": len(times) - 1}


def _spawn(variant: str, length: int, args: argparse.Namespace, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, str(length), device]
    cmd += ["--batch", str(args.batch), "--heads", str(args.heads), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    # One thread by default: on a shared 2-core machine, OpenMP barriers waiting for a
    # descheduled second thread dominate small ops and drown the comparison in noise.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "LENGTH", "DEVICE"))
    args = ap.parse_args()
    if args.child:
        variant, length, device = args.child
        print(
            json.dumps(_child(variant, int(length), args.batch, args.heads, device, args.threads))
        )
        return

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"attention JVP, B={args.batch} H={args.heads} D={HEAD_DIM} fp32, "
        f"torch {torch.__version__}, {args.threads} of {os.cpu_count()} CPU threads"
    )
    cols = f"{'dev':5}{'L':>6}{'variant':>9}{'time ms':>11}{'peak MiB':>11}"
    print(cols + f"{'mem ratio':>11}{'time ratio':>12}")
    ratios: dict[tuple[str, int], tuple[float, float]] = {}
    for device in devices:
        for length in args.lengths:
            res = {v: _spawn(v, length, args, device) for v in ("math", "ours")}
            m, o = res["math"], res["ours"]
            mem_r = o["peak_bytes"] / max(m["peak_bytes"], 1)
            time_r = o["time_s"] / m["time_s"]
            ratios[(device, length)] = (mem_r, time_r)
            for v in ("math", "ours"):
                r = res[v]
                extra = f"{mem_r:>11.4f}{time_r:>12.3f}" if v == "ours" else ""
                print(
                    f"{device:5}{length:>6}{v:>9}{r['time_s'] * 1e3:>11.1f}"
                    f"{r['peak_bytes'] / 2**20:>11.1f}{extra}"
                )
    key = ("cpu", 4096) if ("cpu", 4096) in ratios else next(iter(ratios))
    mem_r, time_r = ratios[key]
    print(f"mem_ratio_4096={mem_r:.4f} time_ratio_4096={time_r:.3f}")


if __name__ == "__main__":
    main()
