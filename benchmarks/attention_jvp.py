"""Time and peak memory of attention + JVP: ours (spec §6) vs torch.func.jvp through math.

Each (variant, length) runs in a fresh subprocess; CPU peak memory is the growth of the
process's peak RSS (``VmHWM``, reset once the inputs exist; ``ru_maxrss`` would start at the
parent's peak, as it survives ``execve``), so both
variants are charged exactly for what the attention JVP allocates. On CUDA the script also
times the Triton kernel, with ``torch.cuda.max_memory_allocated``.

    python benchmarks/attention_jvp.py [--lengths 256 1024 4096 16384] [--batch 1 --heads 2]
        [--threads 1] [--max-math-length 4096]

"fused_fwd" is the plain fused SDPA forward (no tangent) at the same length: the tangent
needs about one more forward's work, so ours/fused_fwd (the floor ratio) is ≈ 2 at best.
Last line: ``mem_ratio_4096=<ours/math> time_ratio_4096=<ours/math> floor_ratio_<L>=<ours/
fused forward> ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HEAD_DIM = 64
VARIANTS = ("math", "ours", "fused_fwd")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def rss_peak_reset() -> int:
    """Reset the peak-RSS mark (Linux clear_refs) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def rss_peak() -> int:
    return _status_bytes("VmHWM")


def _child(variant: str, length: int, batch: int, heads: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from scm_lightning.jvp import jvp_attention

    def math_attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v

    fn = {"ours": jvp_attention, "math": math_attention, "fused_fwd": None}[variant]
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, length, HEAD_DIM)
    primals = tuple(torch.randn(shape, generator=gen, device=device) for _ in range(3))
    tangents = tuple(torch.randn(shape, generator=gen, device=device) for _ in range(3))
    cuda = device == "cuda"

    def run(p: tuple = primals, t: tuple = tangents) -> None:
        with torch.no_grad():
            if fn is None:  # the floor's unit: plain fused attention forward, no tangent
                torch.nn.functional.scaled_dot_product_attention(*p)
            else:
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
        base = rss_peak_reset()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 4 or (time.perf_counter() - start < 2.0 and len(times) < 30):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_peak()) - base
    # First call excluded (warm-up); min of the rest: the machine is shared.
    return {"time_s": min(times[1:]), "peak_bytes": max(peak, 0), "reps": len(times) - 1}


def _spawn(variant: str, length: int, args: argparse.Namespace, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, str(length), device]
    cmd += ["--batch", str(args.batch), "--heads", str(args.heads), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    # Math attention at 16384 holds several 1 GiB score matrices per (batch, head) and takes
    # minutes on 2 cores: by default it runs up to 4096 only (ours and the floor run at all).
    ap.add_argument("--max-math-length", type=int, default=4096)
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
    cols = f"{'dev':5}{'L':>6}{'variant':>10}{'time ms':>11}{'peak MiB':>11}"
    print(cols + f"{'mem ratio':>11}{'time ratio':>12}{'floor ratio':>12}")
    ratios: dict[tuple[str, int], tuple[float, float, float]] = {}
    for device in devices:
        for length in args.lengths:
            variants = ("fused_fwd", "ours") if length > args.max_math_length else VARIANTS
            res = {v: _spawn(v, length, args, device) for v in variants}
            o, m = res["ours"], res.get("math")
            mem_r = o["peak_bytes"] / max(m["peak_bytes"], 1) if m else float("nan")
            time_r = o["time_s"] / m["time_s"] if m else float("nan")
            floor_r = o["time_s"] / res["fused_fwd"]["time_s"]
            ratios[(device, length)] = (mem_r, time_r, floor_r)
            for v in variants:
                r = res[v]
                extra = f"{mem_r:>11.4f}{time_r:>12.3f}{floor_r:>12.2f}" if v == "ours" else ""
                print(
                    f"{device:5}{length:>6}{v:>10}{r['time_s'] * 1e3:>11.1f}"
                    f"{r['peak_bytes'] / 2**20:>11.1f}{extra}"
                )
            if m is None:
                print(f"{device:5}{length:>6}{'math':>10}  skipped (> --max-math-length)")
    key = ("cpu", 4096) if ("cpu", 4096) in ratios else next(iter(ratios))
    mem_r, time_r, _ = ratios[key]
    floors = " ".join(f"floor_ratio_{n}={r[2]:.2f}" for (d, n), r in ratios.items() if d == "cpu")
    print(f"mem_ratio_4096={mem_r:.4f} time_ratio_4096={time_r:.3f} {floors}")


if __name__ == "__main__":
    main()
