"""The paper's claims at CPU scale on the digits (issue 13): quality over seeds, dsCM vs sCD,
VSD, ablations of the stabilisers, and the training cost of teacher-level 2-step quality.

    python benchmarks/paper_claims.py [--only teacher,students,dscm,vsd,ablations,cost]
        [--seeds 0,1,2] [--smoke] [--out runs/paper_claims] [--threads 1] [--force]

Parts (``--only``; default all):

* ``teacher``   the bundled teacher at 1, 2, 4 and 35 NFE on each standard PF-ODE grid
                (``sampling.TEACHER_GRIDS``), reported with the best grid per NFE; the seeds
                are evaluation seeds (2024 + s): there is one teacher.
* ``students``  sCD and sCT students at 1 and 2 NFE, one run per training seed.
* ``dscm``      dsCM (``loss=dscm``) at N = 16, 64, 256, 1024 grid intervals.
* ``vsd``       ``loss=vsd`` and ``loss=scd_vsd``; an entry whose loss config does not exist
                in this checkout is skipped with the reason printed.
* ``ablations`` one change each from the default sCD run: no tangent normalisation, clipping
                instead, no warmup, no adaptive weighting, 1/σ prior weighting, bf16 JVP, and
                teacher conditioning ln(σ)/4 vs a prepared TrigFlow ``c_noise = t`` (both from
                one EDM-preconditioned digits teacher this script trains, see ``edm_teacher``).
* ``cost``      from the sCD runs' logged 2-step FID history: the training compute at which
                the student first reaches the teacher's best FD (and within 10 % of it), as a
                fraction of the bundled teacher's training compute (accounting in ``COST``).

Each fit runs in this process (``config.compose_config`` + ``training.run``) with the
settings of ``FULL`` or ``SMOKE``; students are scored by the ``evaluate`` command's own code
(FD, precision and recall, k = 3, in the digits classifier's features against the training
images, EMA weights, evaluation seed 2024). Every run leaves ``<out>/runs/<entry>/seed<s>/
summary.json``; a rerun reuses finished runs (``--force`` redoes them), so several processes
with different ``--only``/``--seeds`` can fill one ``--out`` and any later call reports all
of it. Stability comes from each run's CSV log (``trainer.log_every_n_steps=1``).

Writes ``<out>/paper_claims.md`` (tables, claims), ``<out>/results.json`` and PNG plots;
the last line is one ``key=value`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PARTS = ("teacher", "students", "dscm", "vsd", "ablations", "cost")
REPORT_ONLY = "report"  # --only report: no runs, the report of what --out holds
EVAL_SEED = 2024
PR_K = 3
SD = 0.5
DSCM_NS = (16, 64, 256, 1024)


@dataclass(frozen=True)
class Setting:
    """One CPU-scale schedule: every fit and evaluation of a study uses the same."""

    steps: int  # optimizer steps per fit
    batch: int
    warmup: int  # tangent warmup H
    fid_every: int  # FID history (2-step) every this many steps
    eval_samples: int  # generated images per FD / precision / recall (and FID history)
    edm_teacher_steps: int  # the EDM-conditioned teacher of the conditioning ablation
    edm_teacher_batch: int
    prepare_steps: int  # its preparation into TrigFlow (pretrain prepare_from=...)


# 400 steps at batch 64 (the default fit is 1000 at 128): about 2-3 min per sCD fit on one
# shared core; warmup H scaled like the default's 400/1000. 1797 = every digit, as `fit`'s
# final evaluation.
FULL = Setting(400, 64, 160, 50, 1797, 1500, 128, 300)
SMOKE = Setting(2, 8, 1, 1, 48, 3, 16, 2)

STUDENTS = {"sCD": [], "sCT": ["loss=sct"]}
DSCM = {f"dsCM N={n}": ["loss=dscm", f"loss.num_intervals={n}"] for n in DSCM_NS}
VSD = {"VSD": ["loss=vsd"], "sCD+VSD": ["loss=scd_vsd"]}
ABLATIONS = {
    "no tangent normalisation": ["loss.tangent_normalization=none"],
    "tangent clipping ±1": ["loss.tangent_normalization=clip", "loss.tangent_clip=1.0"],
    "no tangent warmup": ["loss.warmup_steps=0"],
    "no adaptive weighting": ["loss.adaptive_weighting=false"],
    "1/σ prior weighting": ["loss.prior_weighting=inv_sigma"],
    "bf16 JVP": ["loss.jvp_precision=bf16"],
}
CONDITIONING = ("EDM teacher, ln(σ)/4", "EDM teacher prepared, c_noise = t")

# Compute in forward-equivalents (FE) per training image: a diffusion (teacher) step is a
# forward and a backward, 1 + 2 = 3 FE; an sCD step is the teacher's forward (1), the
# student's JVP pass (primal + tangent, 2) and the backward (2) plus the tangent's overhead:
# the paper's "≈ 2× a teacher iteration" and docs/benchmarks.md "sCD step cost" (2.0-2.5×
# measured) give 6 FE. The bundled teacher: 2000 steps at batch 128
# (src/scm_lightning/assets/README.md; conf/experiment/digits_teacher.yaml).
COST = {"teacher_steps": 2000, "teacher_batch": 128, "teacher_fe": 3, "scd_fe": 6}


def slug(name: str) -> str:
    keep = [c if c.isalnum() else "_" for c in name.replace("=", "").replace("σ", "sigma")]
    return "_".join(filter(None, "".join(keep).split("_"))).lower()


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "–"
    if sum(map(math.isfinite, values)) == 1 and len(values) == 1:
        return f"{m:.{digits}f}"  # one seed: no spread to show
    extra = (
        f" ({len(values) - sum(map(math.isfinite, values))} non-finite)"
        if any(not math.isfinite(v) for v in values)
        else ""
    )
    return f"{m:.{digits}f} ± {s:.{digits}f}{extra}"


# --- one fit -----------------------------------------------------------------------------------
def fit_overrides(st: Setting, run_dir: Path, seed: int, extra: list[str]) -> list[str]:
    """The harness's schedule, then the entry's own overrides (later keys win)."""
    base = {
        "run_dir": str(run_dir),
        "seed": str(seed),
        "trainer.max_steps": str(st.steps),
        "data.batch_size": str(st.batch),
        "loss.warmup_steps": str(st.warmup),
        "eval": "none",
        "callbacks.samples": "null",
        "callbacks.progress": "null",
        "callbacks.loss_curve": "null",
        "trainer.enable_progress_bar": "false",
        "trainer.log_every_n_steps": "1",
        "trainer.limit_val_batches": "0",
        "callbacks.fid.every_n_steps": str(st.fid_every),
        "callbacks.fid.num_samples": str(st.eval_samples),
        "callbacks.fid.nfes": "[2]",
        "++callbacks.fid.seed": str(EVAL_SEED),
        "++callbacks.fid.num_ref_samples": str(st.eval_samples),  # the evaluation's reference
        "callbacks.checkpoint.every_n_train_steps": str(st.steps),
    }
    for item in extra:
        key, value = item.split("=", 1)
        base.pop(key.lstrip("+"), None)
        base[key] = value
    return [f"{k}={v}" for k, v in base.items()]


def compose(overrides: list[str]) -> Any:
    from scm_lightning.config import compose_config

    return compose_config("fit", overrides)


def run_fit(st: Setting, run_dir: Path, seed: int, extra: list[str]) -> dict[str, Any]:
    """Train one student in-process and evaluate it; returns its summary (also on disk)."""
    from scm_lightning.training import run

    summary_path = run_dir / "summary.json"
    cfg = compose(fit_overrides(st, run_dir, seed, extra))
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "harness.log"
    start = time.perf_counter()
    error = None
    with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            run(cfg)
        except FloatingPointError as err:  # max_bad_steps non-finite steps in a row
            error = f"diverged: {str(err).splitlines()[0]}"
        except Exception as err:
            error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            traceback.print_exc()
    train_s = time.perf_counter() - start
    summary: dict[str, Any] = {
        "seed": seed,
        "overrides": extra,
        "train_wall_s": round(train_s, 1),
        "error": error,
        "stability": stability(run_dir, st.batch),
        "fid_history": fid_history(run_dir),
    }
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if error is None and ckpt.is_file():
        summary["eval"] = evaluate_student(ckpt, st.eval_samples, run_dir / "eval")
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    summary_path.write_text(json.dumps(summary, indent=1))
    for ext in ("ckpt",):  # keep the study folder small: summaries and logs are what we read
        for path in (run_dir / "checkpoints").glob(f"*.{ext}"):
            path.unlink()
    return summary


def evaluate_student(ckpt: Path, num: int, out: Path) -> dict[str, dict[str, float]]:
    """FD, precision and recall at 1 and 2 NFE: the `evaluate` command, EMA weights."""
    from scm_lightning.commands import evaluate_command, parse_options

    opts = parse_options(
        "evaluate",
        [
            f"ckpt={ckpt}",
            "nfes=[1,2]",
            "teacher_nfes=[]",
            f"num_samples={num}",
            f"seed={EVAL_SEED}",
            f"pr_k={PR_K}",
            "kid_subsets=1",
            f"kid_subset_size={min(num, 100)}",
            f"out={out}",
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        result = evaluate_command(opts)
    return {
        f"nfe{r['nfe']}": {k: float(r[k]) for k in ("fd", "precision", "recall")}
        for r in result["results"]
    }


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def stability(run_dir: Path, batch: int) -> dict[str, float]:
    """From the run's CSV log: grad-norm spikes (> 10× the run's median grad norm), masked
    samples (Σ masked fraction × batch), skipped (non-finite) steps, the largest grad norm
    over the median."""
    rows = read_metrics(run_dir)

    def column(name: str) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name) not in (None, "")]

    grads = column("train/grad_norm")
    finite = [g for g in grads if math.isfinite(g)]
    median = statistics.median(finite) if finite else math.nan
    return {
        "steps_logged": len(grads),
        "grad_spikes": sum(g > 10 * median for g in finite) if finite else 0,
        "max_grad_over_median": max(finite) / median if finite and median > 0 else math.nan,
        "nonfinite_grads": len(grads) - len(finite),
        "masked_samples": round(sum(column("train/masked_fraction")) * batch),
        "skipped_steps": sum(v > 0 for v in column("train/skipped_steps_in_a_row")),
    }


def fid_history(run_dir: Path) -> list[dict[str, float]]:
    for path in sorted(run_dir.glob("**/fid_history.json")):
        return json.loads(path.read_text())
    return []


# --- the teacher ------------------------------------------------------------------------------
def feature_scores(gen: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """FD, precision and recall of generated vs reference features (as `evaluate` scores)."""
    from scm_lightning.metrics.frechet import FeatureStats, frechet_distance_from_stats
    from scm_lightning.metrics.quality import precision_recall

    fd = frechet_distance_from_stats(FeatureStats.of(gen), FeatureStats.of(ref))
    precision, recall = precision_recall(gen, ref, PR_K)
    return {"fd": fd, "precision": precision, "recall": recall}


def teacher_rows(teacher: Any, num: int, seed: int, nfes: tuple[int, ...]) -> dict[str, Any]:
    """``{"nfe<k>/<grid>": scores}`` of a TrigFlow teacher's PF-ODE samples."""
    from scm_lightning import sampling
    from scm_lightning.data.digits import DigitsDataModule
    from scm_lightning.metrics.features import build_feature_extractor
    from scm_lightning.metrics.frechet import embed_images

    device = torch.device("cpu")
    net = build_feature_extractor("digits", device=device)
    ref = embed_images(DigitsDataModule().reference_images(num), net, device).double()
    rows = {}
    for nfe in nfes:
        for grid in sampling.TEACHER_GRIDS if nfe > 1 else sampling.TEACHER_GRIDS[:1]:
            gen = torch.Generator().manual_seed(seed)
            feats = []
            for start in range(0, num, 600):
                noise = SD * torch.randn(min(600, num - start), 1, 8, 8, generator=gen)
                with torch.no_grad():
                    x = sampling.teacher_sample(teacher, noise, SD, nfe, grid=grid)
                feats.append(embed_images(x, net, device).double())
            rows[f"nfe{nfe}/{grid}"] = feature_scores(torch.cat(feats), ref)
    return rows


def run_teacher(st: Setting, out: Path, seed: int, force: bool) -> dict[str, Any]:
    from scm_lightning.config import compose_config
    from scm_lightning.training import build_teacher

    path = out / "runs" / "teacher" / f"seed{seed}" / "summary.json"
    if path.is_file() and not force:
        return json.loads(path.read_text())
    start = time.perf_counter()
    teacher = build_teacher(compose_config("fit", ["run_dir=unused"]).teacher)
    rows = teacher_rows(teacher, st.eval_samples, EVAL_SEED + seed, (1, 2, 4, 35))
    summary = {"seed": seed, "eval_seed": EVAL_SEED + seed, "rows": rows}
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    return summary


# --- the EDM-conditioned teacher of the conditioning ablation -------------------------------
def edm_teacher(st: Setting, out: Path, force: bool) -> tuple[Path, Path, dict[str, Any]]:
    """A digits teacher with EDM's ``c_noise = ln(σ)/4`` and its TrigFlow preparation.

    A diffusers ``UNet2DModel`` (16/32 channels, positional embedding of c_noise) trained by
    the TrigFlow diffusion loss (Eq. 4) through ``EDMAdapter`` (so it is an EDM F-prediction
    network, saved with an ``EDMEulerScheduler`` config) for ``edm_teacher_steps`` at
    ``edm_teacher_batch`` (Adam 1e-3, P_mean −0.8, P_std 1.6, seed 0); then ``pretrain
    prepare_from=<it>`` (rewired to ``c_noise = t``, fine-tuned ``prepare_steps``). The
    bundled teacher cannot serve: it is TrigFlow-native, and wrapping it in a ln(σ)/4 → t
    map would be the same function of t (the JVP identical up to rounding), not the
    conditioning the paper ablates.
    """
    from diffusers import EDMEulerScheduler

    from scm_lightning.config import compose_config
    from scm_lightning.data.digits import DigitsDataModule
    from scm_lightning.losses import diffusion_loss
    from scm_lightning.teachers.edm import EDMAdapter
    from scm_lightning.teachers.loading import load_teacher
    from scm_lightning.training import run
    from teacher_preparation import digits_unet2d  # the same network as that benchmark's

    root = out / "runs" / "edm_teacher"
    folder, prepared = root / "edm", root / "prepared"
    info_path = root / "summary.json"
    if info_path.is_file() and not force:
        return folder, prepared, json.loads(info_path.read_text())
    start = time.perf_counter()
    torch.manual_seed(0)
    net = digits_unet2d()
    model = EDMAdapter(net, SD, "epsilon")
    data = DigitsDataModule().reference_images(10_000)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(st.edm_teacher_steps):
        x0 = data[torch.randint(0, data.shape[0], (st.edm_teacher_batch,), generator=gen)]
        loss = diffusion_loss(model, x0, SD, -0.8, 1.6, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().save_pretrained(folder / "unet")
    EDMEulerScheduler(sigma_data=SD, prediction_type="epsilon").save_config(folder / "scheduler")
    teacher_s = time.perf_counter() - start
    cfg = compose_config(
        "pretrain",
        [
            f"prepare_from={{_target_:scm_lightning.teachers.loading.load_teacher,"
            f"path:'{folder}'}}",
            f"trainer.max_steps={st.prepare_steps}",
            f"trainer.val_check_interval={st.prepare_steps}",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            "eval=none",
            "callbacks.fid=null",
            "callbacks.samples=null",
            "callbacks.progress=null",
            f"callbacks.checkpoint.every_n_train_steps={st.prepare_steps}",
            f"run_dir={root / 'prepare_run'}",
            f"export_dir={prepared}",
        ],
    )
    with open(root / "prepare.log", "w") as fh, contextlib.redirect_stdout(fh):
        run(cfg)
    rows = {
        name: teacher_rows(load_teacher(path), st.eval_samples, EVAL_SEED, (35,))["nfe35/edm"]
        for name, path in (("edm", folder), ("prepared", prepared))
    }
    info = {
        "teacher_train_s": round(teacher_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "nfe35_edm_grid": rows,
    }
    info_path.write_text(json.dumps(info, indent=1))
    return folder, prepared, info


# --- entries -----------------------------------------------------------------------------------
def missing_loss(overrides: list[str]) -> str | None:
    """Why an entry cannot run in this checkout (its loss config group option is absent)."""
    for item in overrides:
        if item.startswith("loss=") and "." not in item.split("=", 1)[0]:
            try:
                compose([item, "run_dir=unused"])
            except Exception as err:
                return f"{item}: {str(err).splitlines()[0]}"
    return None


def run_entries(
    entries: dict[str, list[str]], st: Setting, out: Path, seeds: list[int], force: bool
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, overrides in entries.items():
        reason = missing_loss(overrides)
        if reason is not None:
            print(f"  skip {name}: {reason}", flush=True)
            results[name] = {"skipped": reason}
            continue
        runs = []
        for seed in seeds:
            run_dir = out / "runs" / slug(name) / f"seed{seed}"
            summary_path = run_dir / "summary.json"
            if summary_path.is_file() and not force:
                runs.append(json.loads(summary_path.read_text()))
                continue
            owner = running_elsewhere(run_dir)
            if owner is not None:
                print(f"  {name} seed {seed}: being run by process {owner}, left to it")
                continue
            print(f"  {name} seed {seed} ...", flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = run_dir / "running.pid"
            lock.write_text(str(os.getpid()))
            try:
                summary = run_fit(st, run_dir, seed, overrides)
            finally:
                lock.unlink(missing_ok=True)
            runs.append(summary)
            fd2 = summary.get("eval", {}).get("nfe2", {}).get("fd", math.nan)
            print(f"    {summary['wall_s']:.0f} s, 2-step FD {fd2:.2f} {summary['error'] or ''}")
        results[name] = {"runs": runs}
    return results


def running_elsewhere(run_dir: Path) -> int | None:
    """The id of another live process of this script running this run, if any."""
    lock = run_dir / "running.pid"
    try:
        pid = int(lock.read_text())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def collect(out: Path, entries: dict[str, list[str]], seeds: list[int]) -> dict[str, Any]:
    """The finished runs of ``entries`` on disk (any process may have made them)."""
    found: dict[str, Any] = {}
    for name in entries:
        runs = []
        for seed in seeds:
            path = out / "runs" / slug(name) / f"seed{seed}" / "summary.json"
            if path.is_file():
                runs.append(json.loads(path.read_text()))
        if runs:
            found[name] = {"runs": runs}
    return found


def metric(runs: list[dict[str, Any]], nfe: int, key: str) -> list[float]:
    return [r.get("eval", {}).get(f"nfe{nfe}", {}).get(key, math.nan) for r in runs]


# --- report ------------------------------------------------------------------------------------
def teacher_table(teacher_runs: list[dict[str, Any]]) -> tuple[list[str], dict[int, Any]]:
    lines = [
        "| teacher NFE | best grid | FD | precision | recall | other grids (FD) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    best: dict[int, Any] = {}
    for nfe in (1, 2, 4, 35):
        keys = sorted({k for r in teacher_runs for k in r["rows"] if k.startswith(f"nfe{nfe}/")})
        if not keys:
            continue
        by_key = {k: [r["rows"][k] for r in teacher_runs if k in r["rows"]] for k in keys}
        k_best = min(keys, key=lambda k: mean_std([v["fd"] for v in by_key[k]])[0])
        vals = by_key[k_best]
        best[nfe] = {m: [v[m] for v in vals] for m in ("fd", "precision", "recall")}
        others = ", ".join(
            f"{k.split('/')[1]} {mean_std([v['fd'] for v in by_key[k]])[0]:.2f}"
            for k in keys
            if k != k_best
        )
        lines.append(
            f"| {nfe} | {k_best.split('/')[1]} | {fmt(best[nfe]['fd'])} | "
            f"{fmt(best[nfe]['precision'], 3)} | {fmt(best[nfe]['recall'], 3)} | {others or '–'} |"
        )
    return lines, best


def table_head(*columns: str) -> list[str]:
    """A markdown table's header and separator lines."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def skipped_row(name: str, reason: str, columns: int) -> str:
    return f"| {name} | – | skipped: {reason} |" + " |" * (columns - 3)


def student_table(results: dict[str, Any]) -> list[str]:
    columns = ("student", "seeds", "1-step FD", "1-step precision", "1-step recall")
    columns += ("2-step FD", "2-step precision", "2-step recall", "train wall s")
    lines = table_head(*columns)
    for name, res in results.items():
        if "skipped" in res:
            lines.append(skipped_row(name, res["skipped"], len(columns)))
            continue
        runs = res["runs"]
        cells = [
            fmt(metric(runs, nfe, key), 2 if key == "fd" else 3)
            for nfe in (1, 2)
            for key in ("fd", "precision", "recall")
        ]
        wall = statistics.fmean(r["train_wall_s"] for r in runs)
        errors = [r["error"] for r in runs if r["error"]]
        note = f" ({len(errors)} failed: {errors[0]})" if errors else ""
        lines.append(f"| {name}{note} | {len(runs)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    return lines


def ablation_table(results: dict[str, Any]) -> list[str]:
    columns = ("run", "seeds", "2-step FD", "1-step FD", "grad-norm spikes (>10× median)")
    columns += ("max/median grad norm", "masked samples", "skipped steps", "diverged")
    lines = table_head(*columns)
    for name, res in results.items():
        if "skipped" in res:
            lines.append(skipped_row(name, res["skipped"], len(columns)))
            continue
        runs = res["runs"]
        st = [r["stability"] for r in runs]
        diverged = sum(bool(r["error"]) or not math.isfinite(metric([r], 2, "fd")[0]) for r in runs)
        lines.append(
            f"| {name} | {len(runs)} | {fmt(metric(runs, 2, 'fd'))} | {fmt(metric(runs, 1, 'fd'))}"
            f" | {fmt([float(s['grad_spikes']) for s in st], 1)}"
            f" | {fmt([s['max_grad_over_median'] for s in st], 1)}"
            f" | {fmt([float(s['masked_samples']) for s in st], 1)}"
            f" | {fmt([float(s['skipped_steps']) for s in st], 1)} | {diverged}/{len(runs)} |"
        )
    return lines


def cost_of(runs: list[dict[str, Any]], target: float, batch: int) -> list[dict[str, Any]]:
    """Per run: the first logged step whose 2-step FD ≤ target, and its compute fraction."""
    teacher_fe = COST["teacher_steps"] * COST["teacher_batch"] * COST["teacher_fe"]
    rows = []
    for r in runs:
        hist = sorted((h["step"], h["fd"]) for h in r.get("fid_history", []) if h["nfe"] == 2)
        step = next((s for s, fd in hist if fd <= target), None)
        last = hist[-1] if hist else (None, math.nan)
        frac = None if step is None else step * batch * COST["scd_fe"] / teacher_fe
        bound = None if not hist else last[0] * batch * COST["scd_fe"] / teacher_fe
        rows.append(
            {"seed": r["seed"], "step": step, "fraction": frac, "last": last, "bound": bound}
        )
    return rows


def plots(out: Path, data: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    students, teacher_best = data["students"], data["teacher_best"]
    scd = students.get("sCD", {}).get("runs")
    dscm = {
        n: students[f"dsCM N={n}"]["runs"]
        for n in DSCM_NS
        if "runs" in students.get(f"dsCM N={n}", {})
    }
    if dscm:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for nfe, color in ((1, "tab:blue"), (2, "tab:orange")):
            ns = sorted(dscm)
            ms = [mean_std(metric(dscm[n], nfe, "fd")) for n in ns]
            ax.errorbar(ns, [m for m, _ in ms], [s for _, s in ms], marker="o", color=color,
                        capsize=3, label=f"dsCM {nfe}-step")  # fmt: skip
            if scd:
                m, s = mean_std(metric(scd, nfe, "fd"))
                ax.axhspan(m - s, m + s, color=color, alpha=0.2)
                ax.axhline(m, color=color, ls="--", label=f"sCD (continuous) {nfe}-step")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("grid intervals N")
        ax.set_ylabel("FD (digits features)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "dscm_vs_n.png", dpi=120)
        plt.close(fig)
        made.append("dscm_vs_n.png")
    points = {f"teacher {k} NFE": v for k, v in teacher_best.items()}
    for name, res in students.items():
        for nfe in (1, 2):
            if "runs" in res:
                runs = res["runs"]
                points[f"{name} {nfe}-step"] = {
                    m: metric(runs, nfe, m) for m in ("precision", "recall")
                }
    if points:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for label, v in points.items():
            (px, sx), (py, sy) = mean_std(v["recall"]), mean_std(v["precision"])
            if math.isnan(px):
                continue
            ax.errorbar(px, py, sy, sx, fmt="s" if "teacher" in label else "o", capsize=2)
            ax.annotate(label, (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        fig.tight_layout()
        fig.savefig(out / "precision_recall.png", dpi=120)
        plt.close(fig)
        made.append("precision_recall.png")
    if scd and data.get("teacher_best_fd") is not None:
        teacher_fe = COST["teacher_steps"] * COST["teacher_batch"] * COST["teacher_fe"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in scd:
            hist = sorted((h["step"], h["fd"]) for h in r.get("fid_history", []) if h["nfe"] == 2)
            if hist:
                xs = [s * data["batch"] * COST["scd_fe"] / teacher_fe * 100 for s, _ in hist]
                ax.plot(
                    xs, [fd for _, fd in hist], marker=".", label=f"sCD 2-step, seed {r['seed']}"
                )
        best = data["teacher_best_fd"]
        ax.axhline(best, color="k", ls="--", label="teacher's best FD")
        ax.axhline(1.1 * best, color="gray", ls=":", label="+10 %")
        ax.set_xlabel("training compute, % of the teacher's")
        ax.set_ylabel("2-step FD")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "cost.png", dpi=120)
        plt.close(fig)
        made.append("cost.png")
    abl = {k: v for k, v in data["ablations"].items() if "runs" in v}
    if abl:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(abl)
        ms = [mean_std(metric(abl[n]["runs"], 2, "fd")) for n in names]
        ax.bar(range(len(names)), [m for m, _ in ms], yerr=[s for _, s in ms], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("2-step FD")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out / "ablations.png", dpi=120)
        plt.close(fig)
        made.append("ablations.png")
    return made


def report(out: Path, st: Setting, seeds: list[int], skipped: dict[str, str], wall: float) -> str:
    teacher_runs = [
        json.loads(p.read_text())
        for s in seeds
        if (p := out / "runs" / "teacher" / f"seed{s}" / "summary.json").is_file()
    ]
    students = collect(out, {**STUDENTS, **DSCM, **VSD}, seeds)
    for name, reason in skipped.items():
        students.setdefault(name, {"skipped": reason})
    for name, overrides in VSD.items():  # absent here: say why (its loss config is missing)
        reason = None if name in students else missing_loss(overrides)
        if reason is not None:
            students[name] = {"skipped": reason}
    ablations: dict[str, Any] = {}
    if "runs" in students.get("sCD", {}):
        ablations["default (sCD)"] = students["sCD"]
    ablations.update(collect(out, {**ABLATIONS, **{key: [] for key in CONDITIONING}}, seeds))
    for name, reason in skipped.items():
        if name in ABLATIONS or name in CONDITIONING:
            ablations.setdefault(name, {"skipped": reason})

    md = [
        "## Paper claims at CPU scale (issue 13)",
        "",
        f"Schedule: {st.steps} steps at batch {st.batch}, tangent warmup H = {st.warmup}, "
        f"lr 5e-5 (the default fit's), EMA power σ_rel 0.05; scores at evaluation seed "
        f"{EVAL_SEED} on {st.eval_samples} samples against the training digits (digits "
        f"classifier features; precision/recall k = {PR_K}); training seeds {seeds}.",
        "",
        "### Teacher (best standard grid per NFE; spread over evaluation seeds)",
        "",
    ]
    t_lines, teacher_best = teacher_table(teacher_runs)
    md += t_lines if teacher_runs else ["(not run)"]
    md += ["", "### Students (mean ± std over training seeds)", ""]
    md += student_table(students) if students else ["(not run)"]
    md += ["", "### Ablations (one change each from the default sCD run)", ""]
    md += ablation_table(ablations) if ablations else ["(not run)"]
    edm_info = out / "runs" / "edm_teacher" / "summary.json"
    if edm_info.is_file():
        info = json.loads(edm_info.read_text())
        rows = info["nfe35_edm_grid"]
        md += [
            "",
            f"Conditioning teachers (35 NFE, EDM grid, seed {EVAL_SEED}): EDM-conditioned "
            f"UNet2DModel FD {rows['edm']['fd']:.2f}, its TrigFlow preparation FD "
            f"{rows['prepared']['fd']:.2f} ({info['wall_s']:.0f} s to train and prepare).",
        ]

    best_fd = None
    if teacher_best:
        nfe_best = min(teacher_best, key=lambda k: mean_std(teacher_best[k]["fd"])[0])
        best_fd = mean_std(teacher_best[nfe_best]["fd"])[0]
    claims: dict[str, str] = {}
    figures: dict[str, Any] = {}
    scd = students.get("sCD", {}).get("runs")
    if scd and best_fd is not None:
        fd2 = mean_std(metric(scd, 2, "fd"))[0]
        figures["scd_nfe2_fd"], figures["teacher_best_fd"] = fd2, best_fd
        figures["scd_nfe2_over_teacher"] = fd2 / best_fd
        claims["2-step sCD within 10 % of the teacher's best FD"] = (
            f"{'held' if fd2 <= 1.1 * best_fd else 'did not hold'}: {fd2:.2f} vs {best_fd:.2f} "
            f"({100 * (fd2 / best_fd - 1):+.0f} %)"
        )
    dscm_done = {
        n: students[f"dsCM N={n}"]["runs"]
        for n in DSCM_NS
        if "runs" in students.get(f"dsCM N={n}", {})
    }
    if scd and dscm_done:
        # "Beaten" needs the gap to exceed the two runs' combined seed spread; with one seed
        # (no spread) the means decide.
        verdicts = []
        for nfe in (1, 2):
            ours, our_sd = mean_std(metric(scd, nfe, "fd"))
            worse, level = [], []
            for n, runs in dscm_done.items():
                theirs, their_sd = mean_std(metric(runs, nfe, "fd"))
                if theirs <= ours:
                    worse.append(n)
                elif theirs - ours <= math.hypot(our_sd, their_sd):
                    level.append(n)
            verdicts.append((nfe, ours, worse, level))
        held = all(not w for _, _, w, _ in verdicts)
        figures["continuous_beats_dscm"] = held
        detail = "; ".join(
            f"{nfe}-step sCD {ours:.2f}"
            + (f", not beaten by N = {w}" if w else "")
            + (f", ahead of N = {lv} by less than the seeds' spread" if lv else "")
            for nfe, ours, w, lv in verdicts
        )
        verdict = "did not hold" if not held else "held"
        if held and any(lv for *_, lv in verdicts):
            verdict = "held in the means, not beyond the seeds' spread at every N"
        claims[f"continuous beats every N (tested N = {sorted(dscm_done)})"] = (
            f"{verdict}: {detail}"
        )
    vsd = students.get("VSD", {}).get("runs")
    if scd and vsd and teacher_best:
        t_nfe = min(teacher_best, key=lambda k: mean_std(teacher_best[k]["fd"])[0])
        tp, tr = (mean_std(teacher_best[t_nfe][m])[0] for m in ("precision", "recall"))
        sp, sr = (mean_std(metric(scd, 1, m))[0] for m in ("precision", "recall"))
        vp, vr = (mean_std(metric(vsd, 1, m))[0] for m in ("precision", "recall"))
        held = vp >= sp and vr < sr and abs(sp - tp) <= 0.05 and abs(sr - tr) <= 0.05
        figures["vsd_tradeoff"] = held
        claims["VSD trades recall for precision; sCD keeps both near the teacher's (1 step)"] = (
            f"{'held' if held else 'did not hold'}: precision/recall teacher {tp:.3f}/{tr:.3f}, "
            f"sCD {sp:.3f}/{sr:.3f}, VSD {vp:.3f}/{vr:.3f} (near = within 0.05)"
        )
    elif "VSD" in skipped:
        claims["VSD trades recall for precision"] = f"not tested: {skipped['VSD']}"
    cost_lines = []
    if scd and best_fd is not None:
        for label, target in (("the teacher's best FD", best_fd), ("within 10 %", 1.1 * best_fd)):
            rows = cost_of(scd, target, st.batch)
            fracs = [r["fraction"] for r in rows if r["fraction"] is not None]
            per_seed = ", ".join(
                f"seed {r['seed']}: "
                + (
                    f"step {r['step']} = {100 * r['fraction']:.1f} %"
                    if r["step"] is not None
                    else f"not reached by step {r['last'][0]} (FD {r['last'][1]:.2f}; "
                    f"> {100 * (r['bound'] or 0):.3g} %)"
                )
                for r in rows
            )
            cost_lines.append(f"- 2-step FD ≤ {label} ({target:.2f}): {per_seed}")
            if label == "the teacher's best FD":
                figures["cost_fraction"] = (
                    max(fracs) if len(fracs) == len(rows) and fracs else math.nan
                )
                claims["teacher-level 2-step quality with < 20 % of the teacher's compute"] = (
                    "held" if len(fracs) == len(rows) and max(fracs) < 0.2 else "did not hold"
                ) + f" ({per_seed})"
    md += ["", "### Cost (sCD 2-step FID history against the teacher's best FD)", ""]
    md += (
        [
            f"Accounting in forward-equivalents per image: teacher step {COST['teacher_fe']} "
            f"(forward + backward), sCD step {COST['scd_fe']} (teacher forward, JVP, backward; "
            f'≈ 2× a teacher step as measured in "sCD step cost"); the bundled teacher: '
            f"{COST['teacher_steps']} steps × batch {COST['teacher_batch']}.",
            "",
            *cost_lines,
        ]
        if cost_lines
        else ["(needs the teacher and sCD runs)"]
    )
    md += ["", "### Claims", ""]
    md += [f"- {k}: {v}" for k, v in claims.items()] or ["(nothing to test yet)"]
    data = {
        "students": students,
        "teacher_best": teacher_best,
        "teacher_best_fd": best_fd,
        "ablations": ablations,
        "batch": st.batch,
    }
    made = plots(out, data)
    md += ["", "Plots: " + ", ".join(made) if made else "Plots: none (no finished runs)"]
    (out / "paper_claims.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {"setting": asdict(st), "seeds": seeds, **data, "claims": claims}, indent=1, default=str
        )
    )
    print("\n".join(md), flush=True)
    held = sum(v.startswith("held") for v in claims.values())
    figures["claims_held"] = f"{held}/{len(claims)}"
    figures["wall_s"] = round(wall)
    return " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={str(v).lower()}"
        for k, v in figures.items()
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma list of {PARTS}, or '{REPORT_ONLY}' (no runs: report what --out holds)",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--smoke", action="store_true", help="tiny setting (CI)")
    parser.add_argument("--out", type=Path, default=Path("runs/paper_claims"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="redo finished runs")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - {*PARTS, REPORT_ONLY})
    if unknown:
        parser.error(f"--only: unknown part(s) {unknown}; choose from {[*PARTS, REPORT_ONLY]}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    st = SMOKE if args.smoke else FULL
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    skipped: dict[str, str] = {}
    print(f"paper_claims: parts {parts}, seeds {seeds}, setting {asdict(st)}, out {out}")

    if "teacher" in parts:  # the first seed now (the students compare against it), the rest last
        print("teacher", flush=True)
        run_teacher(st, out, seeds[0], args.force)
    # What to train: the selected parts' entries (the cost part reads the sCD runs; the
    # ablations compare against them). Seed-major, so a study cut short has every entry at
    # its first seeds rather than some entries at all seeds and others at none.
    entries: dict[str, list[str]] = {}
    if "students" in parts or "cost" in parts or "ablations" in parts:
        entries["sCD"] = STUDENTS["sCD"]
    if "students" in parts:
        entries.update(STUDENTS)
    if "dscm" in parts:
        entries.update(DSCM)
    if "vsd" in parts:
        entries.update(VSD)
    if "ablations" in parts:
        entries.update(ABLATIONS)
        try:
            folder, prepared, _ = edm_teacher(st, out, args.force)
            entries[CONDITIONING[0]] = [f"teacher.path={folder}"]
            entries[CONDITIONING[1]] = [f"teacher.path={prepared}"]
        except Exception as err:  # reported, not fatal: the other ablations stand
            traceback.print_exc()
            for name in CONDITIONING:
                skipped[name] = f"EDM teacher failed: {type(err).__name__}: {err}"
    if "cost" in parts and not (out / "runs" / "teacher").is_dir():
        run_teacher(st, out, seeds[0], args.force)  # the teacher's best FD
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        res = run_entries(entries, st, out, [seed], args.force)
        skipped.update({k: v["skipped"] for k, v in res.items() if "skipped" in v})
    if "teacher" in parts:
        for seed in seeds[1:]:
            run_teacher(st, out, seed, args.force)
    print(report(out, st, seeds, skipped, time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    sys.exit(main())
