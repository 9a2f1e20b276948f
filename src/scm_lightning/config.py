"""Composing and validating the Hydra configuration (the `conf/` groups).

Every range and type check happens here, before any model is built, so a bad value stops
the run with one message naming the key, the value and what was expected. What is checked,
and what each message means, is listed in ``docs/validation.md``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from scm_lightning.assets import asset_path


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the key."""


def conf_dir() -> Path:
    """The config directory: shipped inside the wheel, or the repo's top-level `conf/`."""
    packaged = Path(__file__).parent / "conf"
    if packaged.is_dir():
        return packaged
    repo = Path(__file__).resolve().parents[2] / "conf"
    if repo.is_dir():
        return repo
    raise FileNotFoundError(f"no Hydra config directory at {packaged} or {repo}")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(asset_path(name)))


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def composition_error(err: Exception) -> ConfigError:
    """Hydra's composition errors as one line: unknown group option / key, bad override syntax."""
    text = str(err)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if missing:
        group, name = missing.groups()
        options = _group_options(group) or re.findall(r"^\t(\S+)$", text, re.M)
        return ConfigError(f"unknown {group} {name!r}: expected one of {options} (conf/{group}/)")
    bad_key = re.search(r"Could not override '([^']+)'", text)
    cause = re.search(r"full_key: (\S+)", str(err.__cause__ or ""))
    if bad_key and cause and cause.group(1).startswith(bad_key.group(1) + "."):
        # The key exists; its dict value is merged into the existing dict, which may not gain
        # keys (Hydra's own message then wrongly suggests the key is missing).
        key, new_key = bad_key.group(1), cause.group(1)
        value = text.split(f"+{key}=", 1)[1].splitlines()[0] if f"+{key}=" in text else "{...}"
        return ConfigError(
            f"cannot add {new_key!r} by setting {key!r} to a dict: Hydra merges a dict value "
            f"into the existing {key}; add the entry with +{new_key}=..., or replace the "
            f"whole dict with ~{key} '+{key}={value}'"
        )
    if bad_key:
        key = bad_key.group(1)
        hint = re.search(r"use (\+\S+)", text)
        add = f"; to add a new key on purpose use {hint.group(1)}" if hint else ""
        return ConfigError(f"unknown config key {key!r}: no such key in the composed config{add}")
    if "Could not append to config" in text:
        return ConfigError(f"{first} (the key exists: drop the leading '+')")
    if type(err).__name__ == "OverrideParseException":
        return ConfigError(
            f"cannot parse the overrides: {first} (Hydra override syntax: key=value)"
        )
    return ConfigError(first)


def compose_config(task: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<task>.yaml`` with command-line ``overrides`` (Hydra syntax).

    Raises :class:`ConfigError` naming an unknown group option, key or a malformed override.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            cfg = compose(config_name=task, overrides=overrides)
        except (HydraException, ValueError) as err:  # Hydra raises plain ValueErrors too
            raise composition_error(err) from None
    assign_run_dir(cfg)
    return cfg


def latest_run_dir(task: str, root: Path = Path("runs")) -> Path | None:
    """Most recent ``runs/<task>/<stamp>`` holding ``checkpoints/last.ckpt``."""
    candidates = sorted((root / task).glob("*/checkpoints/last.ckpt"), key=os.path.getmtime)
    return candidates[-1].parent.parent.absolute() if candidates else None


def assign_run_dir(cfg: DictConfig, default: str | None = None) -> None:
    """Fix ``run_dir`` once: as given; else the latest run (``ckpt_path=last``); else ``default``
    (the CLI passes ``hydra.run.dir``) or ``runs/<task>/<timestamp>``."""
    with open_dict(cfg):
        if cfg.get("ckpt_path") == "last" and cfg.run_dir is None:
            found = latest_run_dir(cfg.task)
            if found is None:
                raise ConfigError(
                    f"ckpt_path=last: no runs/{cfg.task}/*/checkpoints/last.ckpt to resume from "
                    "(pass run_dir=<dir> or ckpt_path=<file>)"
                )
            cfg.run_dir = str(found)
        if cfg.run_dir is None:
            cfg.run_dir = default or str(
                Path("runs") / cfg.task / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            )
        if cfg.get("ckpt_path") == "last":
            cfg.ckpt_path = str(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")


# --- small typed checks -----------------------------------------------------------------


def _fail(key: str, value: Any, expected: str) -> None:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        _fail(key, value, expected)


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as err:  # a ??? left unset, or an interpolation that cannot resolve
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if type(err).__name__ == "MissingMandatoryValue":
            raise ConfigError(f"{key} is required but not set (???): pass {key}=...") from None
        raise ConfigError(f"{key}: {reason}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(cfg: DictConfig, key: str, lo: int | None = None, extra: Iterable[Any] = ()) -> None:
    """``key`` must be an int >= ``lo`` (or one of ``extra``, e.g. -1 / None)."""
    v = _get(cfg, key)
    extra = tuple(extra)
    if any(v is e or (v == e and type(v) is type(e)) for e in extra):
        return
    alts = "".join(f" or {e!r}" for e in extra)
    _check(_is_int(v) and (lo is None or v >= lo), key, v, f"an integer >= {lo}{alts}")


def _num(
    cfg: DictConfig,
    key: str,
    lo: float | None = None,
    strict: bool = False,
    hi: float | None = None,
    hi_strict: bool = False,
    none_ok: bool = False,
) -> None:
    """``key`` must be a finite number in the range given by ``lo``/``hi``."""
    v = _get(cfg, key)
    if v is None and none_ok:
        return
    lo_txt = "" if lo is None else f"{'>' if strict else '>='} {lo:g}"
    hi_txt = "" if hi is None else f"{'<' if hi_strict else '<='} {hi:g}"
    expected = "a finite number " + " and ".join(t for t in (lo_txt, hi_txt) if t)
    expected = expected.strip() + (" or null" if none_ok else "")
    ok = _is_number(v)
    if ok and lo is not None:
        ok = v > lo if strict else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_strict else v <= hi
    _check(ok, key, v, expected)


def _choice(cfg: DictConfig, key: str, allowed: Iterable[Any]) -> None:
    v = _get(cfg, key)
    allowed = list(allowed)
    _check(v in allowed, key, v, f"one of {allowed}")


def _bool(cfg: DictConfig, key: str) -> None:
    v = _get(cfg, key)
    _check(isinstance(v, bool), key, v, "true or false")


def _nfes(cfg: DictConfig, key: str) -> None:
    v = _get(cfg, key)
    if v is None:
        return
    items = list(v) if isinstance(v, ListConfig) else None
    _check(
        items is not None and all(_is_int(n) and n >= 1 for n in items),
        key,
        v,
        "a list of NFEs, integers >= 1",
    )


def _known_keys(cfg: DictConfig, group: str, known: set[str]) -> None:
    """Groups read field by field (not passed to a constructor) reject unknown keys (typos)."""
    node = cfg.get(group)
    if node is None:
        return
    unknown = sorted(set(node.keys()) - known)
    if unknown:
        raise ConfigError(f"unknown key {group}.{unknown[0]}: {group} accepts {sorted(known)}")


PRECISIONS = {
    "32-true",
    "32",
    "64-true",
    "64",
    "16-mixed",
    "16",
    "bf16-mixed",
    "bf16",
    "bf16-true",
    "16-true",
    "transformer-engine",
    "transformer-engine-float16",
}
# trainer.compile: true = "inductor"; "eager"/"aot_eager" trace without code generation (tests).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu", "xla")
LOSS_KEYS = {
    "mode", "sigma_data", "p_mean", "p_std", "tangent_norm_c", "spatially_invariant_norm",
    "prior_weighting", "warmup_steps", "t_mid", "jvp_precision", "fast_jvp",
    *("vsd_p_mean", "vsd_p_std", "vsd_sigma_max", "vsd_weight", "fake_score_lr"),  # loss/vsd
    "tangent_normalization", "tangent_clip", "adaptive_weighting", "num_intervals",
}  # fmt: skip
VSD_MODES = ("vsd", "scd_vsd")  # adaptive VSD, sCD + VSD (spec §3c): two alternating optimisers
STUDENT_KEYS = {
    "guidance_embedding", "guidance_scale_range", "uncond_label", "logvar_channels",
    "jvp_attention", "gradient_checkpointing", "dropout",
}  # fmt: skip
TEACHER_FORMATS = (
    "a diffusers folder (pipeline with unet/ or transformer/ and scheduler/, or a model "
    "folder with config.json) holding .safetensors weights"
)
# = teachers.schedule.PREDICTION_TYPES (a test keeps them equal); importing the teachers
# package here would pull in diffusers and triple the time a bad input takes to report.
TEACHER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin")


def _check_devices(devices: Any) -> None:
    if isinstance(devices, str) and re.fullmatch(r"\s*-?\d+\s*", devices):
        devices = int(devices)  # Lightning reads "2" as a count, "0," / "0,1" as device ids
    if _is_int(devices):
        ok = devices >= 1 or devices == -1
    elif isinstance(devices, str):
        ok = devices.strip() == "auto" or bool(
            re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*,?\s*", devices)
        )
    elif isinstance(devices, ListConfig):
        ok = len(devices) > 0 and all(_is_int(d) and d >= 0 for d in devices)
    else:
        ok = False
    _check(
        ok,
        "trainer.devices",
        devices,
        "a count >= 1, -1 or 'auto' (all), or a non-empty list of device ids",
    )


def _validate_trainer(cfg: DictConfig) -> None:
    tr = "trainer"
    precision = _get(cfg, f"{tr}.precision")
    _check(
        str(precision) in PRECISIONS, f"{tr}.precision", precision, f"one of {sorted(PRECISIONS)}"
    )
    _check_devices(_get(cfg, f"{tr}.devices"))
    accelerator = _get(cfg, f"{tr}.accelerator")
    _check(
        not isinstance(accelerator, str) or accelerator in ACCELERATORS,
        f"{tr}.accelerator",
        accelerator,
        f"one of {list(ACCELERATORS)}",
    )
    # Lightning would silently train in bf16-mixed instead (its accelerator connector).
    _check(
        not (accelerator == "cpu" and str(precision) in ("16-mixed", "16")),
        f"{tr}.precision",
        precision,
        "bf16-mixed or 32-true on the CPU: fp16 autocast training is not supported there "
        "(Lightning would silently switch to bf16-mixed)",
    )
    if "compile" in cfg.trainer:
        backend = _get(cfg, f"{tr}.compile")
        _check(
            isinstance(backend, bool) or backend in COMPILE_BACKENDS,
            f"{tr}.compile",
            backend,
            f"true, false or a torch.compile backend, one of {list(COMPILE_BACKENDS)}",
        )
        _check(
            not cfg.trainer.compile or cfg.task == "fit",
            f"{tr}.compile",
            cfg.trainer.compile,
            "false for pretrain (trainer.compile compiles the sCD/sCT step of `fit`)",
        )
        _check(
            not cfg.trainer.compile or cfg.trainer.get("strategy") != "fsdp2",
            f"{tr}.compile",
            cfg.trainer.compile,
            "false with trainer=fsdp (the compiled JVP is not tested on sharded students)",
        )
    _int(cfg, f"{tr}.num_nodes", 1)
    _int(cfg, f"{tr}.max_steps", 1, extra=(-1, None))
    _int(cfg, f"{tr}.max_epochs", 1, extra=(-1, None))
    _int(cfg, f"{tr}.accumulate_grad_batches", 1)
    _int(cfg, f"{tr}.log_every_n_steps", 1)
    _num(cfg, f"{tr}.gradient_clip_val", 0, none_ok=True)
    vci = _get(cfg, f"{tr}.val_check_interval")
    _check(
        vci is None or (_is_int(vci) and vci >= 1) or (isinstance(vci, float) and 0 < vci <= 1),
        f"{tr}.val_check_interval",
        vci,
        "an integer >= 1 (steps), a fraction in (0, 1] of an epoch, or null",
    )
    lvb = _get(cfg, f"{tr}.limit_val_batches")
    _check(
        lvb is None or (_is_int(lvb) and lvb >= 0) or (isinstance(lvb, float) and 0 <= lvb <= 1),
        f"{tr}.limit_val_batches",
        lvb,
        "an integer >= 0 or a fraction in [0, 1]",
    )


def _validate_optim(cfg: DictConfig) -> None:
    _num(cfg, "optim.lr", 0, strict=True)
    if cfg.optim.get("eps") is not None:
        _num(cfg, "optim.eps", 0, strict=True)
    if cfg.optim.get("weight_decay") is not None:
        _num(cfg, "optim.weight_decay", 0)
    betas = cfg.optim.get("betas")
    if betas is not None:
        _check(
            isinstance(betas, ListConfig)
            and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas),
            "optim.betas",
            betas,
            "[beta1, beta2], each in [0, 1)",
        )


def _validate_loss(cfg: DictConfig) -> None:
    from scm_lightning import trigflow

    _known_keys(cfg, "loss", LOSS_KEYS)
    _choice(cfg, "loss.mode", ("scd", "sct", "dscm", *VSD_MODES))
    _num(cfg, "loss.sigma_data", 0, strict=True)
    _num(cfg, "loss.p_mean")
    _num(cfg, "loss.p_std", 0, strict=True)
    _num(cfg, "loss.tangent_norm_c", 0, strict=True)
    _int(cfg, "loss.warmup_steps", 0)
    _bool(cfg, "loss.spatially_invariant_norm")
    _bool(cfg, "loss.fast_jvp")
    _choice(cfg, "loss.prior_weighting", ("none", "inv_sigma"))
    _choice(cfg, "loss.jvp_precision", (None, "32", "64", "bf16", "16", 32, 64, 16))
    # Ablation switches (absent in configs saved before them: the defaults apply).
    if "tangent_normalization" in cfg.loss:
        _choice(cfg, "loss.tangent_normalization", ("norm", "clip", "none"))
    if "tangent_clip" in cfg.loss:
        _num(cfg, "loss.tangent_clip", 0, strict=True)
    if "adaptive_weighting" in cfg.loss:
        _bool(cfg, "loss.adaptive_weighting")
    if _get(cfg, "loss.mode") == "dscm":
        _int(cfg, "loss.num_intervals", 1)
        _check(
            _get(cfg, "loss.jvp_precision") is None,
            "loss.jvp_precision",
            _get(cfg, "loss.jvp_precision"),
            "null with loss.mode='dscm': dsCM takes a finite difference, no JVP",
        )
    else:
        _check(
            cfg.loss.get("num_intervals") is None,
            "loss.num_intervals",
            cfg.loss.get("num_intervals"),
            f"null with loss.mode={_get(cfg, 'loss.mode')!r}: grid intervals are dsCM's "
            "(loss=dscm)",
        )
    t_max = trigflow.t_max_from_sigma_max(sigma_data=float(cfg.loss.sigma_data))
    t_mid = _get(cfg, "loss.t_mid")
    _check(
        _is_number(t_mid) and 0 < t_mid < t_max,
        "loss.t_mid",
        t_mid,
        f"0 < t_mid < t_max = {t_max:.5f} (TrigFlow time in radians)",
    )


def _validate_vsd(cfg: DictConfig) -> None:
    """loss=vsd / scd_vsd: its keys, and the trainer features its alternating θ/φ updates
    (Lightning manual optimisation, one process) do not support."""
    mode = _get(cfg, "loss.mode")
    if mode not in VSD_MODES:
        return
    _num(cfg, "loss.vsd_p_mean")
    _num(cfg, "loss.vsd_p_std", 0, strict=True)
    _num(cfg, "loss.vsd_sigma_max", 0, strict=True)
    _num(cfg, "loss.vsd_weight", 0)
    _num(cfg, "loss.fake_score_lr", 0, strict=True, none_ok=True)
    why = f"with loss.mode={mode!r}"
    compiled = cfg.trainer.get("compile", False)
    _check(not compiled, "trainer.compile", compiled, f"false {why} (not wired for VSD)")
    strategy = _get(cfg, "trainer.strategy")
    _check(
        strategy in ("auto", "single_device"),
        "trainer.strategy",
        strategy,
        f"auto (one process) {why}: the alternating student/fake-score updates are not wired "
        "for DDP/FSDP",
    )
    devices = _get(cfg, "trainer.devices")
    one = devices in (1, "1") or (isinstance(devices, ListConfig) and len(devices) == 1)
    _check(one, "trainer.devices", devices, f"1 (one process) {why}")
    _check(
        _get(cfg, "trainer.num_nodes") == 1, "trainer.num_nodes", cfg.trainer.num_nodes, f"1 {why}"
    )
    accumulate = _get(cfg, "trainer.accumulate_grad_batches")
    _check(
        accumulate == 1,
        "trainer.accumulate_grad_batches",
        accumulate,
        f"1 {why} (manual optimisation steps every batch)",
    )
    clip = _get(cfg, "trainer.gradient_clip_val")
    _check(
        clip is None or clip == 0,
        "trainer.gradient_clip_val",
        clip,
        f"null {why} (Lightning clips only under automatic optimisation)",
    )
    rng = _get(cfg, "student.guidance_scale_range")
    _check(rng is None, "student.guidance_scale_range", rng, f"null {why} (no CFG for VSD)")


def _validate_fit_precision(cfg: DictConfig) -> None:
    """``trainer.precision`` × ``loss.jvp_precision`` combinations the sCM step cannot honour."""
    precision, jvp = str(_get(cfg, "trainer.precision")), _get(cfg, "loss.jvp_precision")
    _check(
        precision not in ("bf16-true", "16-true"),
        "trainer.precision",
        precision,
        "32-true, 64-true, bf16-mixed or 16-mixed for fit: *-true half precision stores every "
        "weight, the time embedding's included, in half precision, but the sCM time embedding "
        "and tangent need float32 or better (spec §3, JVP precision)",
    )
    _check(
        not precision.startswith("transformer-engine"),
        "trainer.precision",
        precision,
        "32-true, 64-true, bf16-mixed or 16-mixed for fit: Transformer Engine layers have no "
        "forward-mode AD rule, which the sCM JVP needs",
    )
    _check(
        not (precision in ("64-true", "64") and str(jvp) in ("bf16", "16")),
        "loss.jvp_precision",
        jvp,
        "null, 32 or 64 with trainer.precision=64-true: autocast leaves float64 weights "
        "alone, so a bf16/16 JVP would silently run in float64",
    )
    compiled = cfg.trainer.get("compile", False)
    _check(
        jvp is None or not compiled,
        "loss.jvp_precision",
        jvp,
        f"null with trainer.compile={compiled}: the compiled JVP runs in the run's precision "
        "(a separate JVP precision casts the weights outside the compiled graph)",
    )


def _validate_student(cfg: DictConfig) -> None:
    _known_keys(cfg, "student", STUDENT_KEYS)
    _bool(cfg, "student.guidance_embedding")
    _int(cfg, "student.logvar_channels", 2)
    _int(cfg, "student.uncond_label", 0, extra=(None,))
    _num(cfg, "student.dropout", 0, hi=1, hi_strict=True)
    rng = _get(cfg, "student.guidance_scale_range")
    if rng is not None:
        _check(
            isinstance(rng, ListConfig)
            and len(rng) == 2
            and all(_is_number(s) for s in rng)
            and 0 <= rng[0] <= rng[1],
            "student.guidance_scale_range",
            rng,
            "[s_min, s_max] with 0 <= s_min <= s_max, or null",
        )


def _validate_guidance(cfg: DictConfig) -> None:
    """CFG distillation needs all of: a scale range, a student guidance input, the teacher's
    null label and a teacher (sCD). Any one without the others would crash mid-run."""
    rng = _get(cfg, "student.guidance_scale_range")
    embedding = _get(cfg, "student.guidance_embedding")
    if rng is None:
        _check(
            not embedding,
            "student.guidance_embedding",
            embedding,
            "false without student.guidance_scale_range (the scales s to train the input on; "
            "e.g. 'student.guidance_scale_range=[1,2]')",
        )
        s = _get(cfg, "eval.guidance")  # would be ignored: no guided teacher, no guidance input
        _check(
            s is None or (not isinstance(s, bool) and s == 1),
            "eval.guidance",
            s,
            "1 unless the student is CFG-distilled (student.guidance_scale_range; "
            "experiment=digits_cond_scd)",
        )
        return
    _check(
        bool(embedding),
        "student.guidance_scale_range",
        rng,
        "null unless the student has a guidance input (set student.guidance_embedding=true)",
    )
    text = _text_pairs(cfg)  # the null prompt's embedding comes with the data
    _check(
        _get(cfg, "student.uncond_label") is not None or text,
        "student.guidance_scale_range",
        rng,
        "null unless student.uncond_label names the teacher's null class (CFG's "
        "unconditional branch; e.g. num_classes) or data=text_pairs brings the null prompt",
    )
    _check(
        _get(cfg, "student.uncond_label") is None or not text,
        "student.uncond_label",
        _get(cfg, "student.uncond_label"),
        "null with data=text_pairs (CFG's unconditional branch is the null prompt's embedding "
        "in null.safetensors)",
    )
    _check(
        _get(cfg, "loss.mode") == "scd",
        "student.guidance_scale_range",
        rng,
        f"null with loss.mode={_get(cfg, 'loss.mode')!r}: CFG distillation needs a teacher's "
        "guided velocity (loss.mode=scd)",
    )


def _validate_eval(cfg: DictConfig) -> None:
    from scm_lightning.sampling import LABEL_MODES, TEACHER_GRIDS

    ev = cfg.eval
    if "guidance" in ev:
        _num(cfg, "eval.guidance", 0)
    if "labels" in ev:
        _choice(cfg, "eval.labels", LABEL_MODES)
    if "teacher_grids" in ev:
        grids = _get(cfg, "eval.teacher_grids")
        _check(
            isinstance(grids, ListConfig) and len(grids) > 0 and set(grids) <= set(TEACHER_GRIDS),
            "eval.teacher_grids",
            grids,
            f"a non-empty list of {list(TEACHER_GRIDS)}",
        )


def _validate_teacher(cfg: DictConfig) -> None:
    teacher = cfg.get("teacher")
    if teacher is None:
        return
    target = _get(cfg, "teacher._target_")
    if not str(target).endswith("load_teacher"):
        return  # a custom factory validates its own arguments
    if "prediction_type" in teacher:
        allowed = [None, *TEACHER_PREDICTION_TYPES, "flow_prediction"]
        _choice(cfg, "teacher.prediction_type", allowed)
    if "kind" in teacher:
        _choice(cfg, "teacher.kind", ("auto", "edm", "vp", "flow", "trigflow"))
    if teacher.get("sigma_data") is not None:
        _num(cfg, "teacher.sigma_data", 0, strict=True)
    path = _get(cfg, "teacher.path")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise ConfigError(f"teacher.path={str(path)!r} does not exist: expected {TEACHER_FORMATS}")
    if p.is_file():
        pickled = p.suffix.lower() in PICKLE_SUFFIXES
        why = (
            "a pickled network file is not loaded (unpickling can run arbitrary code, and EDM "
            ".pkl snapshots are not supported); convert it to a diffusers folder"
            if pickled
            else "a single file is not a teacher"
        )
        raise ConfigError(
            f"teacher.path={str(path)!r} is a file: {why}. Supported: {TEACHER_FORMATS}; "
            "pickled .bin weights inside such a folder load only with teacher.allow_pickle=true"
        )


def _text_pairs(cfg: DictConfig) -> bool:
    """Whether the data are (image, prompt embedding) pairs (``data=text_pairs``)."""
    return str((cfg.get("data") or {}).get("_target_", "")).endswith("TextPairsDataModule")


def _validate_text_latents(cfg: DictConfig) -> None:
    """Latent text pairs have no decoder here: FD, FID and sample grids would see latents."""
    if not (_text_pairs(cfg) and cfg.data.get("latents", False)):
        return
    callbacks = cfg.get("callbacks") or {}
    for name in ("fid", "samples"):
        if callbacks.get(name) is not None:
            raise ConfigError(
                f"callbacks.{name} is set with data.latents=true: expected callbacks.{name}=null "
                "(latents are not images: no feature network or grid sees them undecoded)"
            )
    _check(
        int(_get(cfg, "eval.num_samples")) == 0,
        "eval.num_samples",
        _get(cfg, "eval.num_samples"),
        "0 with data.latents=true (use eval=none; latents are not fed to a feature network)",
    )


def _validate_data(cfg: DictConfig) -> None:
    data = cfg.data
    _int(cfg, "data.batch_size", 1)
    for key, lo in (("num_workers", 0), ("val_size", 1), ("resolution", 1)):
        if key in data:
            _int(cfg, f"data.{key}", lo)
    if "channels" in data:
        _choice(cfg, "data.channels", (1, 3))
    if "root" in data:  # an image folder
        root = Path(str(_get(cfg, "data.root"))).expanduser()
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise ConfigError(f"data.root={str(root)!r} {what}: expected a folder of images")
    if data.get("latent") is not None:
        _validate_latent(cfg)
    if _text_pairs(cfg):  # a folder of shards
        path = Path(str(_get(cfg, "data.path"))).expanduser()
        if not (path.is_dir() and any(path.glob("*.safetensors"))):
            what = "has no .safetensors shards" if path.is_dir() else "is not a folder"
            raise ConfigError(
                f"data.path={str(path)!r} {what}: expected a folder of (image, prompt "
                "embedding) .safetensors shards and null.safetensors"
            )
    elif "path" in data:  # an array file
        path = Path(str(_get(cfg, "data.path"))).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(
                f"data.path={str(path)!r} {what}: expected a .npz/.npy/.safetensors/.pt file"
            )


LATENT_KEYS = {"vae", "cache_dir"}


def _validate_latent(cfg: DictConfig) -> None:
    """``data.latent``: a mapping with ``vae`` (an AutoencoderKL folder) and ``cache_dir``."""
    latent = _get(cfg, "data.latent")
    _check(
        isinstance(latent, DictConfig) and "vae" in latent,
        "data.latent",
        latent,
        "null or {vae: <diffusers AutoencoderKL folder>, cache_dir: <folder or null>}",
    )
    unknown = sorted(set(latent.keys()) - LATENT_KEYS)
    if unknown:
        raise ConfigError(f"unknown key data.latent.{unknown[0]}: it accepts {sorted(LATENT_KEYS)}")
    vae = Path(str(_get(cfg, "data.latent.vae"))).expanduser()
    if not (vae / "config.json").is_file():
        what = "does not exist" if not vae.exists() else "has no config.json"
        raise ConfigError(
            f"data.latent.vae={str(vae)!r} {what}: expected a diffusers AutoencoderKL folder "
            "(config.json + diffusion_pytorch_model.safetensors)"
        )
    flip = cfg.data.get("flip", False)
    _check(
        not flip,
        "data.flip",
        flip,
        "false with data.latent (a mirrored latent is not the latent of the mirrored image)",
    )


def _validate_ckpt_path(cfg: DictConfig) -> None:
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        return
    p = Path(str(ckpt)).expanduser()
    if not p.exists():
        raise ConfigError(
            f"ckpt_path={str(ckpt)!r} does not exist: expected a .ckpt file to resume"
        )
    if p.is_dir() and not (p / ".metadata").is_file():  # FSDP2 distributed checkpoints are dirs
        raise ConfigError(f"ckpt_path={str(ckpt)!r} is a directory: expected a .ckpt file")


def feature_problem(spec: Any, weights: Any) -> str | None:
    """Why the FD feature network ``spec`` (``eval.feature``) with ``weights``
    (``eval.feature_weights``) cannot be built offline, or None; checked before any work."""
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec)
    name, repo_dir = spec, None
    if isinstance(spec, dict):
        name, repo_dir = spec.get("name"), spec.get("repo_dir")
        weights = weights if weights is not None else spec.get("weights_path", spec.get("path"))
    if name == "dinov2":
        from scm_lightning.metrics.features import dinov2_problem

        return dinov2_problem(weights, repo_dir)
    if weights is not None and not Path(str(weights)).expanduser().is_file():
        return f"{str(weights)!r} does not exist: expected a local weights file"
    return None


def _validate_features(cfg: DictConfig) -> None:
    """``eval.feature`` / ``eval.feature_weights`` and any callback's own ``feature``."""
    places = [("eval", cfg.eval)] + [
        (f"callbacks.{name}", cb)
        for name, cb in (cfg.get("callbacks") or {}).items()
        if cb is not None and "feature" in cb
    ]
    for prefix, node in places:
        weights = _get(cfg, f"{prefix}.feature_weights") if "feature_weights" in node else None
        feature = _get(cfg, f"{prefix}.feature")
        problem = feature_problem(feature, weights)
        if problem is None:
            continue
        if weights is not None and Path(str(weights)).expanduser().is_file():  # the code is missing
            feature = OmegaConf.to_container(feature) if OmegaConf.is_config(feature) else feature
            raise ConfigError(f"{prefix}.feature={feature!r} is invalid: {problem}")
        raise ConfigError(f"{prefix}.feature_weights={weights!r} is invalid: {problem}")


def validate_config(cfg: DictConfig) -> None:
    """Range and type checks for every value that has one; raises :class:`ConfigError`.

    Range checks run first (each resolves only its own key), then the whole config is
    resolved so an unset ``???`` or a broken interpolation elsewhere is reported too.
    """
    _check(_get(cfg, "task") in ("fit", "pretrain"), "task", cfg.get("task"), "'fit' or 'pretrain'")
    _int(cfg, "seed", 0)
    _int(cfg, "max_bad_steps", 0)
    _validate_trainer(cfg)
    _validate_optim(cfg)
    _validate_data(cfg)
    if cfg.task == "fit":
        _validate_loss(cfg)
        _validate_vsd(cfg)
        _validate_fit_precision(cfg)
        _validate_student(cfg)
        _validate_guidance(cfg)
        _validate_teacher(cfg)
    else:
        _num(cfg, "sigma_data", 0, strict=True)
        _num(cfg, "p_mean")
        _num(cfg, "p_std", 0, strict=True)
        _num(cfg, "label_dropout", 0, hi=1, hi_strict=True)

    ev = cfg.eval
    _int(cfg, "eval.num_samples", 0)
    _int(cfg, "eval.batch_size", 1)
    for key in ("student_nfes", "teacher_nfes"):
        if key in ev:
            _nfes(cfg, f"eval.{key}")
    _validate_eval(cfg)
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is None:
            continue
        if "nfes" in cb:
            _nfes(cfg, f"callbacks.{name}.nfes")
        for key in ("every_n_steps", "every_n_train_steps", "num_samples"):
            if key in cb and cb[key] is not None:
                _int(cfg, f"callbacks.{name}.{key}", 0)
    _validate_text_latents(cfg)
    _validate_features(cfg)
    _validate_ckpt_path(cfg)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # a ??? left unset, or a bad interpolation
        text = str(err).strip()
        key = re.search(r"full_key: (\S+)", text)
        first = text.splitlines()[0] if text else type(err).__name__
        if type(err).__name__ == "MissingMandatoryValue" and key:
            raise ConfigError(
                f"{key.group(1)} is required but not set (???): pass {key.group(1)}=..."
            ) from None
        raise ConfigError(f"{first}" + (f" [config key: {key.group(1)}]" if key else "")) from None
