"""``sample``, ``evaluate`` and ``export``: the commands that use a finished run.

Overrides are ``key=value`` (values parsed by OmegaConf: ``times=[1.56,1.1]``) checked
against a per-command schema; an unknown key stops with an error naming it and the allowed
ones. ``ckpt`` is a Lightning checkpoint of ``fit``/``pretrain`` (read by
:func:`scm_lightning.checkpointing.load_checkpoint`, ``weights_only=True`` only) or, for
``sample``, an exported folder. ``export`` is :func:`export_checkpoint`.

Metrics of ``evaluate`` (all on the features of ``feature``, default the run's ``eval.feature``
with ``eval.feature_weights``): FD (Fréchet distance, :mod:`metrics.frechet`), KID and k-NN
precision/recall (torch-fidelity, through :mod:`metrics.quality`); for a class-conditional
digits model also the class accuracy of the bundled digits classifier on the samples, overall
and per class (:func:`metrics.quality.class_accuracy`; ``classifier=``). ``guidances=[1,1.5,2]``
scores a guidance-distilled student and its guided teacher once per CFG scale.

Class-conditional models sample with labels drawn per batch from the sampling RNG by
:func:`sampling.draw_class_labels` (the run's ``eval.labels``: uniform or the data's label
frequencies), as ``fit``'s final evaluation, the FID callback and the sample grids do
(``sample labels=...`` fixes them instead). A guidance-conditioned student samples at
``guidance=`` or the run's ``eval.guidance`` (s = 1 by default). ``evaluate`` scores the
teacher on each grid of ``teacher_grids`` (default: the run's ``eval.teacher_grids``) and
marks the best one per NFE.
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

from scm_lightning.config import ConfigError, feature_problem
from scm_lightning.metrics.quality import kernel_inception_distance, precision_recall
from scm_lightning.sampling import teacher_sampler_name

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
        "teacher_grids": None,  # default: the run's eval.teacher_grids (best one reported)
        "num_samples": None,
        "batch_size": None,
        "seed": None,
        "feature": None,
        "feature_weights": None,
        "t_mid": None,
        "guidance": None,
        "guidances": None,  # several CFG scales s: every row once per s (guidance= is one)
        "classifier": "auto",  # class accuracy of conditional samples: auto | digits | none
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


def _nfes(value: Any, key: str, allow_empty: bool = False) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items and allow_empty:
        return []
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


def _labels(value: Any, num: int, num_classes: int | None, text: bool = False) -> Tensor | None:
    """Labels ``(num,)`` given as one or ``num`` integers; None: drawn while sampling
    (:func:`sampling.draw_class_labels`, like every evaluation path)."""
    if text and value is not None:
        raise ConfigError(
            f"labels={value!r} given but the model is text-conditioned: it samples with the "
            "run's held-out prompts (the exported pipeline takes prompt_embeds or prompt)"
        )
    if not num_classes:
        if value is not None:
            raise ConfigError(f"labels={value!r} given but the model is unconditional")
        return None
    if value is None:
        return None
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
def make_sampler(
    module: Any, opts: dict[str, Any], nfe: int, grid: str = "edm"
) -> Callable[..., Tensor]:
    """``sampler(n, generator, labels) -> (n, C, H, W)`` for the module's (EMA) student
    (a pretrain checkpoint's model: PF-ODE on the teacher time grid ``grid``)."""
    from scm_lightning.export import network_adapter
    from scm_lightning.modules import DistillationModule

    if not isinstance(module, DistillationModule):
        for key in ("t_mid", "times", "guidance"):
            if opts.get(key) is not None:
                raise ConfigError(
                    f"{key}= applies to consistency students; this is a pretrain checkpoint"
                )
        return lambda n, g, labels: module.sample(
            n, nfe=nfe, generator=g, class_labels=labels, grid=grid
        )
    guidance = opts.get("guidance")
    accepts = bool(getattr(network_adapter(module), "accepts_guidance", False))
    if guidance is not None and not accepts:
        raise ConfigError(f"guidance={guidance} given but the student has no guidance input")
    # guidance=None: the module's eval_guidance (the run's eval.guidance, s = 1 by default)
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
    sampler: Callable[..., Tensor],
    num: int,
    batch: int,
    seed: int,
    labels: Tensor | None,
    device: torch.device,
    num_classes: int | None = None,
    class_probs: Tensor | None = None,
    prompts: Any = None,
) -> tuple[Tensor, Tensor | None]:
    """``num`` samples in chunks of ``batch`` from one generator seeded ``seed`` (CPU result)
    and their labels: ``labels``, else (conditional model) drawn per chunk from the same
    generator by :func:`sampling.draw_condition` (class labels, or for a text-conditioned
    model prompts of the run's held-out pairs, recorded as no labels), as ``fit``'s final
    evaluation does."""
    from scm_lightning.sampling import draw_condition

    gen = torch.Generator(device=device).manual_seed(int(seed))
    out, used = [], []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        if labels is not None:
            lab = labels[start : start + n].to(device)
        else:
            lab = draw_condition(n, num_classes, gen, class_probs, device, prompts)
        out.append(sampler(n, gen, lab).float().cpu())
        if isinstance(lab, Tensor):
            used.append(lab.cpu())
    return torch.cat(out), (torch.cat(used) if used else None)


def _label_probs(cfg: Any, dm: Any, num_classes: int | None) -> Tensor | None:
    """The run's ``eval.labels`` distribution (uniform for runs from before the key)."""
    from scm_lightning.data.base import class_label_probs

    return class_label_probs(str(cfg.eval.get("labels", "uniform")), dm, num_classes)


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
        from scm_lightning.checkpointing import load_checkpoint
        from scm_lightning.export import ema_swapped, resolve_profile
        from scm_lightning.restore import rebuild_module

        ckpt = load_checkpoint(ckpt_path)
        profile = resolve_profile(ckpt, opts["ema"], str(ckpt_path))
        module, cfg, dm = rebuild_module(ckpt, with_teacher=False)
        module.to(device)
        num_classes = module.student.num_classes
        text = module.student.text_embed_dim is not None
        labels = _labels(opts["labels"], num, num_classes, text)
        sampler = make_sampler(module, opts, nfe)
        probs = _label_probs(cfg, dm, num_classes)
        from scm_lightning.data.base import eval_prompts

        prompts = eval_prompts(dm)  # a text-conditioned run samples its held-out prompts
        with ema_swapped(module, ckpt, profile):
            images, labels = _batched(
                sampler, num, batch, seed, labels, device, num_classes, probs, prompts
            )
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
    pipe = _load_folder(folder, opts)
    pipe.to(device)
    num_classes = pipe.num_classes
    labels = _labels(opts["labels"], num, num_classes, bool(pipe.text_embed_dim))
    sampler = _folder_sampler(pipe, opts, nfe)
    prompts = None
    if pipe.text_embed_dim:  # prompts of the run's held-out pairs, as for its checkpoint
        from scm_lightning.data.base import eval_prompts
        from scm_lightning.training import build_datamodule

        prompts = eval_prompts(build_datamodule(_folder_run_config(folder)))
    images, labels = _batched(sampler, num, batch, seed, labels, device, num_classes, None, prompts)
    return (
        images,
        labels,
        {"folder": str(folder), "ema_profile": pipe.adapter_config.get("ema_profile")},
    )


def _load_folder(folder: Path, opts: dict[str, Any]) -> Any:
    """The exported pipeline in ``folder`` (the package's classes; no code from the folder)."""
    from scm_lightning.pipeline import load_pipeline

    if opts["ema"] is not None:
        raise ConfigError(
            "ema= applies to checkpoints; an exported folder holds one set of weights"
        )
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is neither a checkpoint file nor an exported folder"
        )
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- evaluate ------------------------------------------------------------------------------
def _feature_net(opts: dict[str, Any], cfg: Any, device: torch.device) -> torch.nn.Module:
    from scm_lightning.metrics.features import INCEPTION_NO_NETWORK, build_feature_extractor

    spec: Any = opts["feature"] if opts["feature"] is not None else cfg.eval.feature
    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    weights = opts["feature_weights"]
    if weights is None and opts["feature"] is None:  # the run's own feature network
        weights = cfg.eval.get("feature_weights")
    problem = feature_problem(spec, weights)
    if problem is not None:
        raise ConfigError(f"feature_weights={weights!r} is invalid for feature={spec!r}: {problem}")
    try:
        return build_feature_extractor(spec, device=device, weights_path=weights)
    except RuntimeError as err:
        if INCEPTION_NO_NETWORK in str(err):
            raise ConfigError(
                f"feature={spec!r}: {INCEPTION_NO_NETWORK}; pass feature_weights=<local "
                "weights-inception-2015-12-05-6726825d.pth> or feature=digits"
            ) from None
        raise


def _features(net: torch.nn.Module, images: Tensor, batch: int, device: torch.device) -> Tensor:
    from scm_lightning.metrics.frechet import embed_images

    return torch.cat([embed_images(x, net, device).double().cpu() for x in images.split(batch)])


def _scores(gen: Tensor, ref: Tensor, opts: dict[str, Any], seed: int) -> dict[str, float]:
    from scm_lightning.metrics.frechet import FeatureStats, frechet_distance_from_stats

    stats = [FeatureStats.of(gen), FeatureStats.of(ref)]
    kid, kid_std = kernel_inception_distance(
        gen, ref, _int(opts, "kid_subsets", 1), _int(opts, "kid_subset_size", 2), seed
    )
    precision, recall = precision_recall(gen, ref, _int(opts, "pr_k", 1))
    fd = frechet_distance_from_stats(*stats)
    return {"fd": fd, "kid": kid, "kid_std": kid_std, "precision": precision, "recall": recall}


def _fid_history(ckpt: dict[str, Any], ckpt_path: Path | None, run_dir: Path | None) -> list[dict]:
    """FD-vs-step history: the run dir's ``fid_history.json`` files and the checkpoint's state."""
    entries: dict[tuple[int, int], dict] = {}
    for key, value in (ckpt.get("callbacks") or {}).items():
        if key.startswith("FIDCallback") and isinstance(value, dict):
            for h in value.get("history", []):
                entries[(int(h["step"]), int(h["nfe"]))] = dict(h)
    near_ckpt = ckpt_path.resolve().parent.parent if ckpt_path is not None else None
    dirs = {d for d in (run_dir, near_ckpt) if d is not None and d.is_dir()}
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


def _guidances(opts: dict[str, Any]) -> list[float | None]:
    """The CFG scales to score: ``guidances=[...]``, else ``[guidance]`` (None: the run's own)."""
    many, one = opts.get("guidances"), opts.get("guidance")
    if many is None:
        return [None if one is None else _scale(one, "guidance")]
    if one is not None:
        raise ConfigError(
            f"guidance={one!r} and guidances={many!r} both given: expected one of them"
        )
    if not isinstance(many, list) or not many:
        raise ConfigError(f"guidances={many!r} is invalid: expected a list of CFG scales >= 0")
    return [_scale(s, "guidances") for s in many]


def _scale(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{key}={value!r} is invalid: expected CFG scales, numbers >= 0")
    return float(value)


def _classifier(opts: dict[str, Any], cfg: Any, num_classes: int | None, device: torch.device):
    """The digits classifier scoring class accuracy, or None (``classifier=auto|digits|none``:
    auto uses it for a class-conditional model of the digits data)."""
    from scm_lightning.metrics.features import load_digits_classifier

    choice = _classifier_choice(opts)
    digits = str(cfg.data.get("_target_", "")).endswith("digits.DigitsDataModule")
    if choice == "digits" and not (digits and num_classes):
        raise ConfigError(
            "classifier='digits' is invalid: class accuracy needs a class-conditional model of "
            f"the digits data (this run: data {cfg.data.get('_target_')}, "
            f"num_classes={num_classes})"
        )
    if choice == "none" or not (digits and num_classes):
        return None
    return load_digits_classifier(device=device)


def _classifier_choice(opts: dict[str, Any]) -> str:
    choice = str(opts["classifier"])
    if choice not in ("auto", "digits", "none"):
        raise ConfigError(f"classifier={choice!r} is invalid: expected auto, digits or none")
    return choice


def _predicted_classes(classifier: Any, images: Tensor, batch: int, device: torch.device):
    """The classifier's argmax ``(N,)`` on images ``(N, C, H, W)`` in ``[-1, 1]``."""
    with torch.no_grad():
        return torch.cat(
            [classifier.logits(x.to(device)).argmax(1).cpu() for x in images.split(batch)]
        )


def evaluate_command(opts: dict[str, Any]) -> dict[str, Any]:
    """Student at ``nfes`` and teacher at ``teacher_nfes``: FD/KID/precision/recall -> JSON."""
    from rich.console import Console
    from rich.table import Table

    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_swapped, resolve_profile
    from scm_lightning.restore import rebuild_module

    ckpt_path = Path(str(opts["ckpt"]))
    device = _device(opts)
    guidances = _guidances(opts)  # malformed options fail before anything is loaded
    _classifier_choice(opts)
    pipe = None  # an exported folder instead of a checkpoint
    if ckpt_path.is_dir():
        pipe = _load_folder(ckpt_path, opts)
        cfg = _folder_run_config(ckpt_path)
        ckpt: dict[str, Any] = {"global_step": pipe.adapter_config.get("global_step", 0)}
        profile = pipe.adapter_config.get("ema_profile")
        if cfg.task != "fit":
            raise ConfigError(
                f"ckpt={str(ckpt_path)!r} holds a `pretrain` diffusion model; evaluate its "
                "checkpoint (PF-ODE sampling) instead of the exported folder"
            )
    else:
        ckpt = load_checkpoint(ckpt_path)
        profile = resolve_profile(ckpt, opts["ema"], str(ckpt_path))
        cfg = OmegaConf.create(ckpt["scm_config"])
    distill = cfg.task == "fit"
    ev = cfg.eval
    student_nfes = _nfes(
        opts["nfes"] if opts["nfes"] is not None else list(ev.student_nfes), "nfes"
    )
    teacher_nfes = _nfes(
        opts["teacher_nfes"] if opts["teacher_nfes"] is not None else list(ev.teacher_nfes),
        "teacher_nfes",
        allow_empty=distill,  # teacher_nfes=[]: student rows only, the teacher is not rebuilt
    )
    if pipe is None:
        module, cfg, dm = rebuild_module(ckpt, with_teacher=distill and bool(teacher_nfes))
        module.to(device)
        num_classes = module.student.num_classes
    else:
        from scm_lightning.training import build_datamodule

        module, dm = None, build_datamodule(cfg)
        pipe.to(device)
        num_classes = pipe.num_classes
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
    classifier = _classifier(opts, cfg, num_classes, device)
    ref_images = dm.reference_images(num)
    ref = _features(feature_net, ref_images, batch, device)
    probs = _label_probs(cfg, dm, num_classes)
    from scm_lightning.data.base import eval_prompts

    prompts = eval_prompts(dm)
    grids = _teacher_grids(opts, cfg)

    rows: list[dict[str, Any]] = []

    # guidances [None]: the run's own scale (eval.guidance) for a CFG student, else none.
    takes_guidance = distill and (
        pipe.accepts_guidance if pipe is not None else module.student_takes_guidance
    )
    given = next((s for s in guidances if s is not None), None)
    if given is not None and not takes_guidance:
        key = "guidances" if opts.get("guidances") is not None else "guidance"
        raise ConfigError(
            f"{key}={opts[key]!r} given but the "
            + ("student has no guidance input" if distill else "checkpoint is a pretrain model")
            + " (guidance needs a CFG-distilled student: experiment=digits_cond_scd)"
        )
    run_guidance = float(cfg.eval.get("guidance", 1.0)) if takes_guidance else None

    def score(
        model: str, sampler_name: str, nfe: int, sampler: Callable[..., Tensor], s: float | None
    ) -> None:
        from scm_lightning.metrics.quality import class_accuracy
        from scm_lightning.progress import progress

        label = f"{model} {sampler_name} nfe={nfe}" + ("" if s is None else f" s={s:g}")
        with progress(label, num) as advance:

            def counted(n: int, g: torch.Generator, lab: Tensor | None) -> Tensor:
                images = sampler(n, g, lab)
                advance(n)
                return images

            images, labels = _batched(
                counted, num, batch, seed, None, device, num_classes, probs, prompts
            )
        row = {"model": model, "sampler": sampler_name, "nfe": nfe}
        if s is not None:
            row["guidance"] = s
        row.update(_scores(_features(feature_net, images, batch, device), ref, opts, seed))
        if classifier is not None and labels is not None:
            predicted = _predicted_classes(classifier, images, batch, device)
            row["class_accuracy"], row["per_class_accuracy"] = class_accuracy(
                predicted, labels, int(num_classes)
            )
        rows.append(row)

    decode = pipe.decode_latents if pipe is not None else None  # a latent export's teacher rows
    teacher_sample = (
        _teacher_sampler(module, cfg, device, decode) if distill and teacher_nfes else None
    )
    for guidance in guidances:
        s = run_guidance if guidance is None else guidance  # exported folders: no default
        at_s = {**opts, "guidance": s}
        if teacher_sample is not None:
            for nfe in teacher_nfes:  # the frozen teacher: EMA does not apply
                for grid in grids if nfe > 1 else grids[:1]:  # 1 NFE: every grid is [t_max, 0]
                    score(
                        "teacher",
                        teacher_sampler_name(nfe, grid),
                        nfe,
                        lambda n, g, lab, nfe=nfe, grid=grid, s=s: teacher_sample(
                            n, nfe, g, lab, grid, s
                        ),
                        s,
                    )
        if pipe is not None:
            for nfe in student_nfes:
                score("student", "consistency", nfe, _folder_sampler(pipe, at_s, nfe), s)
            continue
        with ema_swapped(module, ckpt, profile):
            for nfe in student_nfes if distill else teacher_nfes:
                if distill:
                    score("student", "consistency", nfe, make_sampler(module, at_s, nfe), s)
                    continue
                for grid in grids if nfe > 1 else grids[:1]:  # a pretrain model is a teacher
                    sampler = make_sampler(module, at_s, nfe, grid)
                    score("model", teacher_sampler_name(nfe, grid), nfe, sampler, s)
    best = _mark_best_grids(rows)

    run_dir = Path(str(cfg.run_dir)) if cfg.get("run_dir") else None
    if opts["out"] is not None:
        out = Path(str(opts["out"]))
    elif pipe is not None:
        out = ckpt_path / "eval"
    else:
        out = ckpt_path.resolve().parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    history = _fid_history(ckpt, None if pipe is not None else ckpt_path, run_dir)
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
        "best_grid": best,
        "fid_history_plot": plot,
    }
    path = out / "evaluation.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"{result['feature']}: {num} samples vs {ref.shape[0]} training images")
    with_s = any("guidance" in r for r in rows)
    with_acc = any("class_accuracy" in r for r in rows)
    columns = ["model", "sampler", "NFE", *(["s"] if with_s else [])]
    columns += ["FD ↓", "KID ↓", "precision ↑", "recall ↑", *(["class acc ↑"] if with_acc else [])]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "sampler") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            r["sampler"] + (" (best)" if r["best"] and r["sampler"] != "consistency" else ""),
            str(r["nfe"]),
            *([f"{r['guidance']:g}" if "guidance" in r else "-"] if with_s else []),
            f"{r['fd']:.4f}",
            f"{r['kid']:.5f} ± {r['kid_std']:.5f}",
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            *([f"{r['class_accuracy']:.3f}" if "class_accuracy" in r else "-"] if with_acc else []),
        )
    Console().print(table)
    print(f"wrote {path}" + (f" and {plot}" if plot else ""), flush=True)
    return result


def _folder_run_config(folder: Path) -> Any:
    """The run config an exported folder carries (for its data and eval settings)."""
    from scm_lightning.export import RUN_CONFIG

    path = folder / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(
            f"ckpt={str(folder)!r}: the folder has no {RUN_CONFIG} (written by `export` since "
            "it records the run); export the checkpoint again or evaluate the checkpoint"
        )
    return OmegaConf.create(json.loads(path.read_text()))


def _folder_sampler(pipe: Any, opts: dict[str, Any], nfe: int) -> Callable[..., Tensor]:
    """``sampler(n, generator, labels)`` of an exported pipeline, as `sample` draws (images:
    a latent model's samples are decoded by its vae)."""

    from scm_lightning.teachers.conditioning import TextCondition

    def sampler(n: int, g: torch.Generator, lab: Any) -> Tensor:
        cond: dict[str, Any] = {"class_labels": lab}
        if isinstance(lab, TextCondition):
            cond = {
                "prompt_embeds": lab.prompt_embeds,
                "pooled_prompt_embeds": lab.pooled_prompt_embeds,
                "prompt_attention_mask": lab.attention_mask,
            }
        samples = pipe(
            n,
            nfe,
            timesteps=opts.get("times"),
            intermediate_timesteps=opts["t_mid"],
            generator=g,
            guidance_scale=opts["guidance"],
            output_type="latent",
            **cond,
        ).images
        return pipe.decode_latents(samples)

    return sampler


def _teacher_sampler(
    module: Any, cfg: Any, device: torch.device, decode: Callable[[Tensor], Tensor] | None = None
) -> Callable[..., Tensor]:
    """``sample(n, nfe, generator, labels, grid, guidance)``: the run's teacher on the PF-ODE
    (rebuilt from its config when ``module`` is None, i.e. for an exported folder, whose
    ``decode`` turns a latent teacher's samples into images)."""
    if module is not None:
        return lambda n, nfe, g, lab, grid, guidance: module.teacher_sample(
            n, nfe=nfe, generator=g, class_labels=lab, grid=grid, guidance=guidance
        )
    from scm_lightning import sampling
    from scm_lightning.teachers.guidance import GuidedTeacher
    from scm_lightning.training import build_datamodule, build_teacher, image_shape

    teacher = build_teacher(cfg.teacher).to(device)
    dm = build_datamodule(cfg)
    shape = image_shape(dm)
    # CFG's unconditional branch: the null prompt of text pairs, else the null class
    null = getattr(dm, "null_condition", None) if teacher.text_embed_dim else None
    sd = teacher.sigma_data
    default_guidance = float(cfg.eval.get("guidance", 1.0))

    def sample(n, nfe, g, lab, grid, guidance):  # as DistillationModule.teacher_sample
        model: Any = teacher
        s = default_guidance if guidance is None else float(guidance)
        if cfg.student.get("guidance_scale_range") is not None and s != 1.0:
            model = GuidedTeacher(
                teacher, s, null if null is not None else int(cfg.student.uncond_label)
            )
        noise = sd * torch.randn((n, *shape), generator=g, device=device)  # = module.noise
        samples = sampling.teacher_sample(
            model, noise, sd, nfe, lab, grid=grid, t_mid=float(cfg.loss.t_mid)
        )
        return samples if decode is None else decode(samples)

    return sample


def _teacher_grids(opts: dict[str, Any], cfg: Any) -> list[str]:
    """``teacher_grids`` option, else the run's ``eval.teacher_grids`` (all for older runs)."""
    from scm_lightning.sampling import TEACHER_GRIDS

    value = opts["teacher_grids"]
    if value is None:
        value = list(cfg.eval.get("teacher_grids", TEACHER_GRIDS))
    items = value if isinstance(value, list) else [value]
    if not items or any(g not in TEACHER_GRIDS for g in items):
        raise ConfigError(
            f"teacher_grids={value!r} is invalid: expected a non-empty list of "
            f"{list(TEACHER_GRIDS)}"
        )
    return [str(g) for g in items]


def _mark_best_grids(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Flag the lowest-FD grid of each PF-ODE (teacher/model) NFE: ``row["best"]``, and return
    ``{"teacher_nfe2": {"sampler": "ddim/t_mid", "fd": ...}, ...}``."""
    best: dict[str, dict[str, Any]] = {}

    def key_of(row: dict[str, Any]) -> str:  # one best grid per CFG scale: ..._nfe2_s1.5
        s = row.get("guidance")
        return f"{row['model']}_nfe{row['nfe']}" + ("" if s is None else f"_s{s:g}")

    for row in rows:
        if row["sampler"] == "consistency":
            continue
        key = key_of(row)
        if key not in best or row["fd"] < best[key]["fd"]:
            best[key] = {"sampler": row["sampler"], "fd": row["fd"]}
    for row in rows:
        key = key_of(row)
        row["best"] = key in best and best[key]["sampler"] == row["sampler"]
    return best


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    ema: str | None = None,
    posthoc_std: float | None = None,
    snapshots: str | Path | None = None,
) -> Path:
    """``export`` command: checkpoint (+ EMA profile, or a post-hoc EMA) -> diffusers folder.

    With ``posthoc_std`` the student weights are EDM2's post-hoc reconstruction of the power
    EMA with that σ_rel from the run's snapshots (``snapshots``, default
    ``<run>/logs/ema_snapshots``; written when ``callbacks.ema.snapshot_every_n_steps`` is set).
    """
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import describe_module, ema_swapped, export_module, resolve_profile
    from scm_lightning.restore import rebuild_module

    ckpt = load_checkpoint(ckpt_path)
    module, cfg, _ = rebuild_module(ckpt, with_teacher=False)
    meta = describe_module(module, cfg)
    meta.update(global_step=int(ckpt.get("global_step", 0)))
    if posthoc_std is not None:
        from scm_lightning.callbacks.ema import reconstruct_posthoc_ema

        if not 0 < float(posthoc_std) < 0.3:
            raise ValueError(f"posthoc_std={posthoc_std} is invalid: expected 0 < σ_rel < 0.3")
        folder = Path(snapshots or Path(ckpt_path).parent.parent / "logs" / "ema_snapshots")
        state = reconstruct_posthoc_ema(folder, float(posthoc_std), meta["global_step"] or None)
        module.student.load_state_dict(state)
        meta.update(ema_profile=f"posthoc_{float(posthoc_std)}")
        return export_module(module, out, **meta)
    profile = resolve_profile(ckpt, ema, str(ckpt_path))
    meta.update(ema_profile=profile)
    with ema_swapped(module, ckpt, profile):
        return export_module(module, out, **meta)


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
        out = export_checkpoint(
            str(opts["ckpt"]), str(opts["out"]), opts["ema"], opts["posthoc_std"], opts["snapshots"]
        )
        print(f"exported to {out}", flush=True)
    return 0
