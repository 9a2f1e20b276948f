"""Cost and peak memory of one sCD training step relative to one diffusion step (same net, batch).

Both steps include the optimiser update. For each network (CIFAR-sized and digits), variants
are interleaved and each is timed as the median of ``--reps`` repetitions in this one
process, so machine noise hits all alike. ``scd_compiled`` is the ``trainer.compile=true``
step: the student's JVP pass (``losses.compiled_rearranged_jvp``) and the teacher compiled
by ``torch.compile`` (Inductor), compile time excluded; its ratio is against the eager
diffusion step. Peak memory of one step (sCD default vs diffusion, with and without
gradient checkpointing) is measured in a fresh subprocess per cell: CPU, growth of the peak
RSS (VmHWM) over its value once the model and optimiser state exist, and (``*_allocated``) the
peak of live tensor bytes from the profiler's allocation events; CUDA, ``max_memory_allocated``
over ``memory_allocated`` (both figures). Where a time goal (≤ 1.8× CIFAR-sized, ≤ 2.0×
digits) is missed, the sCD step's self time by op kind (torch.profiler) is printed.

    python benchmarks/step_cost.py [--configs cifar digits] [--reps 7] [--threads 2] [--no-compile]

Last line: ``step_cost_ratio=<default path, CIFAR-sized> step_cost_ratio_compiled=<...>
step_cost_ratio_digits=<...> step_cost_ratio_digits_compiled=<...> step_mem_ratio=<sCD/
diffusion, CIFAR-sized> step_mem_ratio_allocated=<...> step_mem_ratio_checkpointing=<...>
step_mem_ratio_checkpointing_allocated=<...> graph_breaks=<n>`` (digits: ``_digits`` keys).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scm_lightning.jvp.install import install_jvp_attention
from scm_lightning.losses import (
    SCMLossConfig,
    compiled_rearranged_jvp,
    diffusion_loss,
    scm_loss,
)
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
        goal=1.8,
    ),
    # The bundled digits teacher's architecture at the default fit batch.
    "digits": dict(
        net=dict(sample_size=8, block_channels=(32, 64)), shape=(128, 1, 8, 8), goal=2.0
    ),
}


class Bench:
    """Student, teacher, optimiser and batch of one network, and its step variants."""

    def __init__(
        self,
        config: str,
        device: str = "cpu",
        jvp_dtype: torch.dtype | None = None,
        autocast: torch.dtype | None = None,
        checkpointing: bool = False,
    ) -> None:
        torch.manual_seed(0)
        cfg = CONFIGS[config]
        net = TrigFlowUNet(**cfg["net"])
        for p in net.parameters():  # a trained-looking net: the zero-init output conv is no teacher
            p.data.normal_(std=0.05)
        self.teacher = TrigFlowNative(net, sigma_data=0.5).requires_grad_(False).eval().to(device)
        self.student = Student.from_teacher(self.teacher).to(device)
        install_jvp_attention(self.student)
        if checkpointing:
            switched = 0
            for m in self.student.modules():  # as DistillationModule.enable_gradient_checkpointing
                if getattr(m, "_supports_gradient_checkpointing", False):
                    m.enable_gradient_checkpointing()
                    switched += 1
            assert switched, "the student's network has no gradient checkpointing"
        self.opt = torch.optim.RAdam(self.student.parameters(), lr=1e-4)
        self.x0 = torch.randn(cfg["shape"], device=device).clamp(-1, 1)
        self.device = device
        self.jvp_dtype = jvp_dtype
        self.autocast = autocast
        self.compiled_teacher: Callable | None = None
        self.compiled_jvp: Callable | None = None

    def init_optimizer_state(self) -> None:
        """Allocate the optimiser's state (as any step after the first has it) without moving θ."""
        for p in self.student.parameters():
            p.grad = torch.zeros_like(p)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def compile(self) -> float:
        """Build the compiled step; returns the compile time (its first call), seconds."""
        self.compiled_teacher = torch.compile(self.teacher)
        self.compiled_jvp = compiled_rearranged_jvp(self.student)
        return self.step("scd_compiled")

    def loss(self, name: str, gen: torch.Generator) -> torch.Tensor:
        s, x0 = self.student, self.x0
        if name == "diffusion":
            return diffusion_loss(s, x0, 0.5, -1.0, 1.4, logvar=s.logvar, generator=gen)
        cfg = SCMLossConfig(
            jvp_dtype=self.jvp_dtype,
            reuse_primal=name != "scd_two_pass",
            fast_jvp=name != "scd_naive",
        )
        kwargs = {}
        teacher = self.teacher
        if name == "scd_compiled":
            teacher, kwargs = self.compiled_teacher, {"student_jvp": self.compiled_jvp}
        return scm_loss(s, x0, cfg, 1.0, teacher, generator=gen, **kwargs).loss

    def step(self, name: str) -> float:
        """One training step (loss, backward, optimiser); returns its wall time in seconds."""
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        gen = torch.Generator(device=self.device).manual_seed(0)
        if self.autocast is not None:
            with torch.autocast(self.device, dtype=self.autocast):
                loss = self.loss(name, gen)
        else:
            loss = self.loss(name, gen)
        loss.backward()
        self.opt.step()
        sync()
        return time.perf_counter() - start


def time_variants(bench: Bench, names: list[str], reps: int) -> dict[str, float]:
    """Median step time per variant, variants interleaved (one warm-up each)."""
    for name in names:
        bench.step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            times[name].append(bench.step(name))
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile_by_op(bench: Bench, name: str, top: int = 12) -> str:
    """Self CPU time of one step by op kind (what bounds it)."""
    from torch.profiler import ProfilerActivity, profile

    bench.step(name)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bench.step(name)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_peak_reset() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux) and return it in bytes.

    ``getrusage``'s ru_maxrss survives ``execve`` (a child spawned by a large parent starts at
    the parent's size), so the per-process ``VmHWM`` is read instead, reset via clear_refs.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def rss_peak() -> int:
    return _status_kib("VmHWM") * 1024


def allocated_peak(bench: Bench, variant: str) -> int | None:
    """Peak growth of live CPU tensor bytes over one step, from the profiler's allocation
    events: the CPU analogue of CUDA's ``max_memory_allocated``. Peak RSS also counts what
    the C allocator keeps after a free (fragmentation, arenas), so it runs higher."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bench.step(variant)
    results = getattr(prof.profiler, "kineto_results", None)  # no public timeline on CPU
    if results is None:
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _memory_child(config: str, variant: str, checkpointing: bool, threads: int) -> dict:
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench = Bench(config, device, checkpointing=checkpointing)
    bench.init_optimizer_state()
    # Library init (thread pools, functorch, allocator) on a 1-sample batch, below the baseline.
    full = bench.x0
    bench.x0 = full[:1]
    bench.step(variant)
    bench.x0 = full
    bench.init_optimizer_state()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_peak_reset()
    bench.step(variant)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_peak()) - base
    allocated = max(peak, 0) if device == "cuda" else allocated_peak(bench, variant)
    return {"peak_bytes": max(peak, 0), "allocated_peak_bytes": allocated, "device": device}


def peak_memory(config: str, variant: str, checkpointing: bool, threads: int) -> dict:
    """``{"peak_bytes": RSS (CPU) / allocated (CUDA) growth, "allocated_peak_bytes": ...}``."""
    cmd = [sys.executable, __file__, "--memory-child", config, variant, str(int(checkpointing))]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", choices=sorted(CONFIGS), default=["cifar", "digits"]
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    parser.add_argument("--memory-child", nargs=3, metavar=("CONFIG", "VARIANT", "CKPT"))
    args = parser.parse_args()
    if args.memory_child:
        config, variant, ckpt = args.memory_child
        print(json.dumps(_memory_child(config, variant, ckpt == "1", args.threads)))
        return
    torch.set_num_threads(args.threads)
    figures: dict[str, float] = {}
    for config in args.configs:
        bench = Bench(config)
        names = ["diffusion", "scd", "scd_two_pass", "scd_naive"]
        compile_s = None
        if not args.no_compile:
            compile_s = bench.compile()
            names.append("scd_compiled")
        med = time_variants(bench, names, args.reps)
        print(
            f"config={config} batch={CONFIGS[config]['shape']} threads={args.threads} "
            f"reps={args.reps}" + (f" compile_s={compile_s:.1f}" if compile_s else "")
        )
        for name, t in med.items():
            print(f"  {name:16s} {t * 1e3:8.1f} ms  ({t / med['diffusion']:.2f}x diffusion)")
        suffix = "" if config == "cifar" else f"_{config}"
        figures[f"step_cost_ratio{suffix}"] = med["scd"] / med["diffusion"]
        if "scd_compiled" in med:
            figures[f"step_cost_ratio{suffix}_compiled"] = med["scd_compiled"] / med["diffusion"]
        best = min(v for k, v in med.items() if k.startswith("scd"))
        if best / med["diffusion"] > CONFIGS[config]["goal"]:
            fastest = min((v, k) for k, v in med.items() if k.startswith("scd"))[1]
            print(f"  goal {CONFIGS[config]['goal']}x missed; {fastest} step by op kind:")
            print(profile_by_op(bench, fastest))
        for ckpt in (False, True):
            try:
                mem = {v: peak_memory(config, v, ckpt, args.threads) for v in ("diffusion", "scd")}
            except subprocess.CalledProcessError as err:
                print(f"  memory, checkpointing={ckpt}: failed: {err.stderr.strip()[-300:]}")
                continue
            key = f"step_mem_ratio{suffix}" + ("_checkpointing" if ckpt else "")
            for field, label, name in (
                ("peak_bytes", "peak RSS" if mem["scd"]["device"] == "cpu" else "peak", key),
                ("allocated_peak_bytes", "peak allocated", key + "_allocated"),
            ):
                if mem["scd"][field] is None:
                    continue
                diff, scd = mem["diffusion"][field], mem["scd"][field]
                ratio = scd / max(diff, 1)
                print(
                    f"  {label}, checkpointing={ckpt}: diffusion {diff / 2**20:.1f} MiB, "
                    f"sCD {scd / 2**20:.1f} MiB ({ratio:.2f}x)"
                )
                figures[name] = ratio
    if not args.no_compile:
        figures["graph_breaks"] = graph_breaks()
    order = ["step_cost_ratio", "step_cost_ratio_compiled", "step_cost_ratio_digits"]
    order += ["step_cost_ratio_digits_compiled", "step_mem_ratio", "step_mem_ratio_allocated"]
    order += ["step_mem_ratio_checkpointing", "step_mem_ratio_checkpointing_allocated"]
    keys = [k for k in order if k in figures] + [k for k in figures if k not in order]
    print(
        " ".join(
            f"{k}={figures[k]:.3f}" if k != "graph_breaks" else f"{k}={figures[k]}" for k in keys
        )
    )


if __name__ == "__main__":
    main()
