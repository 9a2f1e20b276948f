"""``sample``, ``evaluate`` and ``export``: the commands that use a finished run.

Overrides are ``key=value`` (values parsed by OmegaConf: ``times=[1.56,1.1]``) checked
against a per-command schema; an unknown key stops with an error naming it and the allowed
ones. ``ckpt`` is a Lightning checkpoint of ``fit``/``pretrain`` (read with
``weights_only=True`` only) or, for ``sample``, an exported folder.

Metrics of ``evaluate`` (all on the features of ``feature``, default the run's ``eval.feature``):
FD (Fréchet distance, :mod:`metrics.frechet`), KID (Bińkowski et al. 2018: unbiased MMD² with
the cubic kernel ``k(x, y) = (xᵀy/d + 1)³``, mean ± std over random subsets) and k-NN
precision/recall (Kynkäänniemi et al. 2019, k = 3).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from scm_lightning.config import ConfigError
from scm_lightning.metrics.quality import kernel_inception_distance, precision_recall

REQUIRED = "???"
COMMON = {"ckpt": REQUIRED, "ema": None, "device": "auto"}
SCHEMAS: dict[str, dict[str, Any]] = {
    "sample": {
        **COMMON,
        "out": REQUIRED,
        "nfe": None,  # default: len(times), else 1
        "num": 64,
        "seed": 0,
        "batch_size": 256,
        "t_mid": None,
        "times": None,
        "guidance": None,
        "labels": None,
        "nrow": None,
    },
    "evaluate": {
        **COMMON,
        "out": None,  # default: <run dir>/eval
        "nfes": None,  # default: the run's eval.student_nfes
        "teacher_nfes": None,  # default: the run's eval.teacher_nfes
        "num_samples": None,
        "batch_size": None,
        "seed": None,
        "feature": None,
        "feature_weights": None,
        "t_mid": None,
        "guidance": None,
        "kid_subsets": 100,
        "kid_subset_size": 1000,
        "pr_k": 3,
    },
    "export": {**COMMON, "out": REQUIRED, "posthoc_std": None, "snapshots": None},
}


# --- options -------------------------------------------------------------------------------
def parse_options(task: str, overrides: list[str]) -> dict[str, Any]:
    """``key=value`` overrides -> options dict; unknown or missing keys raise ConfigError."""
    schema = SCHEMAS[task]
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if "=" not in item or not key:
            raise ConfigError(f"{task}: expected key=value, got {item!r}; keys: {sorted(schema)}")
        if key not in schema:
            raise ConfigError(f"{task}: unknown key {key!r}; allowed keys: {sorted(schema)}")
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    except Exception as err:
        raise ConfigError(f"{task}: cannot parse overrides {overrides}: {err}") from None
    opts = {**schema, **given}
    missing = [k for k, v in opts.items() if v == REQUIRED]
    if missing:
        raise ConfigError(f"{task}: missing required {', '.join(k + '=...' for k in missing)}")
    return opts


def _int(opts: dict[str, Any], key: str, minimum: int) -> int:
    value = opts[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} is invalid: expected an integer >= {minimum}")
    return value


def _nfes(value: Any, key: str) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in items):
        raise ConfigError(f"{key}={value!r} is invalid: expected NFEs, integers >= 1")
    return [int(n) for n in items]


def _device(opts: dict[str, Any]) -> torch.device:
    name = str(opts["device"])
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device={name!r} is invalid: expected auto, cpu, cuda or cuda:N"
        ) from None


def _labels(value: Any, num: int, num_classes: int | None) -> Tensor | None:
    """Labels ``(num,)``: given (one or ``num``), else ``arange(num) % num_classes``."""
    if not num_classes:
        if value is not None:
            raise ConfigError(f"labels={value!r} given but the model is unconditional")
        return None
    if value is None:
        return torch.arange(num) % num_classes
    items = value if isinstance(value, list) else [value]
    if any(
        isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= num_classes for v in items
    ):
        raise ConfigError(f"labels={value!r} is invalid: expected integers in [0, {num_classes}]")
    if len(items) not in (1, num):
        raise ConfigError(f"labels has {len(items)} entries; expected 1 or num={num}")
    labels = torch.tensor(items, dtype=torch.long)
    return labels.expand(num).clone() if len(items) == 1 else labels


# --- sampling ------------------------------------------------------------------------------
def make_sampler(module: Any, opts: dict[str, Any], nfe: int) -> Callable[..., Tensor]:
    """``sampler(n, generator, labels) -> (n, C, H, W)`` for the module's (EMA) student."""
    from scm_lightning.export import network_adapter
    from scm_lightning.modules import DistillationModule

    if not isinstance(module, DistillationModule):
        for key in ("t_mid", "times", "guidance"):
            if opts.get(key) is not None:
                raise ConfigError(
                    f"{key}= applies to consistency students; this is a pretrain checkpoint"
                )
        return lambda n, g, labels: module.sample(n, nfe=nfe, generator=g, class_labels=labels)
    guidance = opts.get("guidance")
    accepts = bool(getattr(network_adapter(module), "accepts_guidance", False))
    if guidance is not None and not accepts:
        raise ConfigError(f"guidance={guidance} given but the student has no guidance input")
    if accepts and guidance is None:
        guidance = 1.0  # s = 1: no guidance
    times = opts.get("times")
    t_mid = opts.get("t_mid")

    def sampler(n: int, g: torch.Generator, labels: Tensor | None) -> Tensor:
        return module.sample(
            n,
            nfe=nfe,
            generator=g,
            t_mid=t_mid,
            class_labels=labels,
            guidance=guidance,
            times=times,
        )

    return sampler


def _batched(
    sampler: Callable[..., Tensor], num: int, batch: int, seed: int, labels, device
) -> Tensor:
    """``num`` samples in chunks of ``batch`` from one generator seeded ``seed`` (CPU result)."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        lab = None if labels is None else labels[start : start + n].to(device)
        out.append(sampler(n, gen, lab).float().cpu())
    return torch.cat(out)


def _check_times(opts: dict[str, Any]) -> int:
    times = opts.get("times")
    if opts["nfe"] is not None:
        nfe = _int(opts, "nfe", 1)
    else:
        nfe = len(times) if isinstance(times, list) else 1
    if times is not None:
        if not isinstance(times, list) or len(times) != nfe:
            raise ConfigError(f"times={times!r} is invalid: expected a list of nfe={nfe} times")
        from scm_lightning.sampling import validate_times

        try:
            validate_times(times)
        except ValueError as err:
            raise ConfigError(f"times={times!r} is invalid: {err}") from None
    return nfe


def sample_command(opts: dict[str, Any]) -> dict[str, Path]:
    """PNG grid + ``.npz`` (uint8 NHWC ``samples``, int64 ``labels``, -1 when unconditional)."""
    from scm_lightning.images import save_grid, to_uint8

    nfe = _check_times(opts)
    num, batch = _int(opts, "num", 1), _int(opts, "batch_size", 1)
    seed, device = int(opts["seed"]), _device(opts)
    ckpt_path = Path(str(opts["ckpt"]))
    if ckpt_path.is_dir():
        images, labels, info = _sample_folder(ckpt_path, opts, nfe, num, batch, seed, device)
    else:
        from scm_lightning.export import (
            ema_swapped,
            load_checkpoint,
            rebuild_module,
            resolve_profile,
        )

        ckpt = load_checkpoint(ckpt_path)
        profile = resolve_profile(ckpt, opts["ema"], str(ckpt_path))
        module, _, _ = rebuild_module(ckpt)
        module.to(device)
        labels = _labels(opts["labels"], num, module.student.num_classes)
        sampler = make_sampler(module, opts, nfe)
        with ema_swapped(module, ckpt, profile):
            images = _batched(sampler, num, batch, seed, labels, device)
        info = {"ema_profile": profile, "global_step": int(ckpt.get("global_step", 0))}
    out = Path(str(opts["out"]))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"samples_nfe{nfe}_seed{seed}"
    png = save_grid(images, out / f"{stem}.png", nrow=opts["nrow"])
    npz = out / f"{stem}.npz"
    lab = np.full(num, -1, np.int64) if labels is None else labels.numpy().astype(np.int64)
    np.savez(npz, samples=to_uint8(images), labels=lab)
    print(f"wrote {png} and {npz} ({num} samples, nfe={nfe}, {json.dumps(info)})", flush=True)
    return {"png": png, "npz": npz}


def _sample_folder(folder: Path, opts, nfe, num, batch, seed, device):
    from scm_lightning.pipeline import SCMPipeline

    if opts["ema"] is not None:
        raise ConfigError(
            "ema= applies to checkpoints; an exported folder holds one set of weights"
        )
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is neither a checkpoint file nor an exported folder"
        )
    pipe = SCMPipeline.from_pretrained(folder, low_cpu_mem_usage=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    labels = _labels(opts["labels"], num, pipe.adapter.num_classes)
    times = opts["times"]

    def sampler(n: int, g: torch.Generator, lab: Tensor | None) -> Tensor:
        return pipe(
            n,
            nfe,
            timesteps=times,
            intermediate_timesteps=opts["t_mid"],
            generator=g,
            guidance_scale=opts["guidance"],
            class_labels=lab,
            output_type="latent",
        ).images

    images = _batched(sampler, num, batch, seed, labels, device)
    return (
        images,
        labels,
        {"folder": str(folder), "ema_profile": pipe.adapter_config.get("ema_profile")},
    )


# --- evaluate ------------------------------------------------------------------------------
def _feature_net(opts: dict[str, Any], cfg: Any, device: torch.device) -> torch.nn.Module:
    from scm_lightning.metrics.features import INCEPTION_NO_NETWORK, build_feature_extractor

    spec: Any = opts["feature"] if opts["feature"] is not None else cfg.eval.feature
    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    if opts["feature_weights"] is not None:
        name = spec.get("name", spec.get("_target_")) if isinstance(spec, dict) else spec
        key = "path" if name == "digits" else "weights_path"  # load_digits_classifier(path=)
        spec = {"name": name, key: str(opts["feature_weights"])}
    try:
        return build_feature_extractor(spec, device=device)
    except RuntimeError as err:
        if INCEPTION_NO_NETWORK in str(err):
            raise ConfigError(
                f"feature={spec!r}: {INCEPTION_NO_NETWORK}; pass feature_weights=<local "
                "weights-inception-2015-12-05-6726825d.pth> or feature=digits"
            ) from None
        raise


@torch.no_grad()
def _features(net: torch.nn.Module, images: Tensor, batch: int, device: torch.device) -> Tensor:
    return torch.cat(
        [net(x.to(device).float().clamp(-1, 1)).double().cpu() for x in images.split(batch)]
    )


def _scores(gen: Tensor, ref: Tensor, opts: dict[str, Any], seed: int) -> dict[str, float]:
    from scm_lightning.metrics.frechet import FeatureStats, frechet_distance_from_stats

    stats = []
    for feats in (gen, ref):
        s = FeatureStats(feats.shape[1])
        s.update(feats)
        stats.append(s)
    kid, kid_std = kernel_inception_distance(
        gen, ref, _int(opts, "kid_subsets", 1), _int(opts, "kid_subset_size", 2), seed
    )
    precision, recall = precision_recall(gen, ref, _int(opts, "pr_k", 1))
    fd = frechet_distance_from_stats(*stats)
    return {"fd": fd, "kid": kid, "kid_std": kid_std, "precision": precision, "recall": recall}


def _fid_history(ckpt: dict[str, Any], ckpt_path: Path, run_dir: Path | None) -> list[dict]:
    """FD-vs-step history: the run dir's ``fid_history.json`` files and the checkpoint's state."""
    entries: dict[tuple[int, int], dict] = {}
    for key, value in (ckpt.get("callbacks") or {}).items():
        if key.startswith("FIDCallback") and isinstance(value, dict):
            for h in value.get("history", []):
                entries[(int(h["step"]), int(h["nfe"]))] = dict(h)
    dirs = {d for d in (run_dir, ckpt_path.resolve().parent.parent) if d is not None and d.is_dir()}
    for d in dirs:
        for path in sorted(d.glob("**/fid_history.json")):
            if "eval" in path.relative_to(d).parts[:1]:
                continue  # our own output
            try:
                for h in json.loads(path.read_text()):
                    entries[(int(h["step"]), int(h["nfe"]))] = dict(h)
            except (ValueError, KeyError, TypeError):
                continue
    return [entries[k] for k in sorted(entries)]


def evaluate_command(opts: dict[str, Any]) -> dict[str, Any]:
    """Student at ``nfes`` and teacher at ``teacher_nfes``: FD/KID/precision/recall -> JSON."""
    from rich.console import Console
    from rich.table import Table

    from scm_lightning.export import ema_swapped, load_checkpoint, rebuild_module, resolve_profile
    from scm_lightning.modules import DistillationModule

    ckpt_path = Path(str(opts["ckpt"]))
    ckpt = load_checkpoint(ckpt_path)
    profile = resolve_profile(ckpt, opts["ema"], str(ckpt_path))
    device = _device(opts)
    module, cfg, dm = rebuild_module(ckpt)
    ev = cfg.eval
    student_nfes = _nfes(
        opts["nfes"] if opts["nfes"] is not None else list(ev.student_nfes), "nfes"
    )
    teacher_nfes = _nfes(
        opts["teacher_nfes"] if opts["teacher_nfes"] is not None else list(ev.teacher_nfes),
        "teacher_nfes",
    )
    for key, default in (
        ("num_samples", ev.num_samples),
        ("batch_size", ev.batch_size),
        ("seed", ev.seed),
    ):
        opts[key] = int(default) if opts[key] is None else opts[key]
    num, batch, seed = (
        _int(opts, "num_samples", 4),
        _int(opts, "batch_size", 1),
        _int(opts, "seed", 0),
    )
    feature_net = _feature_net(opts, cfg, device)
    module.to(device)
    ref_images = dm.reference_images(num)
    ref = _features(feature_net, ref_images, batch, device)
    labels = _labels(None, num, module.student.num_classes)

    rows: list[dict[str, Any]] = []

    def score(model: str, sampler_name: str, nfe: int, sampler: Callable[..., Tensor]) -> None:
        from scm_lightning.progress import progress

        with progress(f"{model} {sampler_name} nfe={nfe}", num) as advance:

            def counted(n: int, g: torch.Generator, lab: Tensor | None) -> Tensor:
                images = sampler(n, g, lab)
                advance(n)
                return images

            images = _batched(counted, num, batch, seed, labels, device)
        rows.append(
            {
                "model": model,
                "sampler": sampler_name,
                "nfe": nfe,
                **_scores(_features(feature_net, images, batch, device), ref, opts, seed),
            }
        )

    distill = isinstance(module, DistillationModule)
    if distill:
        for nfe in teacher_nfes:  # the frozen teacher: EMA does not apply
            score(
                "teacher",
                _pf_ode_name(nfe),
                nfe,
                lambda n, g, lab, nfe=nfe: module.teacher_sample(
                    n, nfe=nfe, generator=g, class_labels=lab
                ),
            )
    with ema_swapped(module, ckpt, profile):
        for nfe in student_nfes if distill else teacher_nfes:
            name = "consistency" if distill else _pf_ode_name(nfe)
            score("student" if distill else "model", name, nfe, make_sampler(module, opts, nfe))

    run_dir = Path(str(cfg.run_dir)) if cfg.get("run_dir") else None
    out = (
        Path(str(opts["out"]))
        if opts["out"] is not None
        else ckpt_path.resolve().parent.parent / "eval"
    )
    out.mkdir(parents=True, exist_ok=True)
    history = _fid_history(ckpt, ckpt_path, run_dir)
    plot = None
    if history:
        from scm_lightning.callbacks.fid import FIDCallback

        cb = FIDCallback(feature=getattr(feature_net, "feature_id", "features"))
        cb.history = history
        plot = str(cb.write_history(out))
    result = {
        "checkpoint": str(ckpt_path),
        "global_step": int(ckpt.get("global_step", 0)),
        "task": str(cfg.task),
        "ema_profile": profile,
        "feature": str(getattr(feature_net, "feature_id", "")),
        "num_samples": num,
        "reference_images": int(ref.shape[0]),
        "seed": seed,
        "pr_k": opts["pr_k"],
        "kid_subsets": opts["kid_subsets"],
        "results": rows,
        "fid_history_plot": plot,
    }
    path = out / "evaluation.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"{result['feature']}: {num} samples vs {ref.shape[0]} training images")
    for col in ("model", "sampler", "NFE", "FD ↓", "KID ↓", "precision ↑", "recall ↑"):
        table.add_column(col, justify="left" if col in ("model", "sampler") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            r["sampler"],
            str(r["nfe"]),
            f"{r['fd']:.4f}",
            f"{r['kid']:.5f} ± {r['kid_std']:.5f}",
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
        )
    Console().print(table)
    print(f"wrote {path}" + (f" and {plot}" if plot else ""), flush=True)
    return result


def _pf_ode_name(nfe: int) -> str:
    # sampling.teacher_sample: Heun for odd NFE ((nfe + 1)/2 steps), first-order DDIM for even.
    return "heun" if nfe % 2 == 1 else "ddim"


def main(task: str, overrides: list[str], print_cfg: bool = False) -> int:
    """Entry point from ``cli``: parse, run, return the exit code (errors are raised)."""
    if task not in SCHEMAS:
        raise ConfigError(f"unknown tool {task!r}; expected one of {sorted(SCHEMAS)}")
    opts = parse_options(task, overrides)
    if print_cfg:
        print(OmegaConf.to_yaml(OmegaConf.create(opts)))
        return 0
    if task == "sample":
        sample_command(opts)
    elif task == "evaluate":
        evaluate_command(opts)
    else:
        from scm_lightning.export import export_checkpoint

        out = export_checkpoint(
            str(opts["ckpt"]), str(opts["out"]), opts["ema"], opts["posthoc_std"], opts["snapshots"]
        )
        print(f"exported to {out}", flush=True)
    return 0
