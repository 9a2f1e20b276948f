"""Composing and validating the Hydra configuration (the `conf/` groups).

Every range and type check happens here, before any model is built, so a bad value stops
the run with one message naming the key, the value and what was expected.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from scm_lightning import trigflow
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


def compose_config(task: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<task>.yaml`` with command-line ``overrides`` (Hydra syntax)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name=task, overrides=overrides)
    assign_run_dir(cfg)
    return cfg


def latest_run_dir(task: str, root: Path = Path("runs")) -> Path | None:
    """Most recent ``runs/<task>/<stamp>`` holding ``checkpoints/last.ckpt``."""
    candidates = sorted((root / task).glob("*/checkpoints/last.ckpt"), key=os.path.getmtime)
    return candidates[-1].parent.parent if candidates else None


def assign_run_dir(cfg: DictConfig) -> None:
    """Fix ``run_dir`` once; DDP children inherit it through ``SCM_RUN_DIR`` (set by the CLI)."""
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
            # A DDP child (LOCAL_RANK set by the launcher) reuses its parent's run dir.
            inherited = os.environ.get("SCM_RUN_DIR") if "LOCAL_RANK" in os.environ else None
            cfg.run_dir = inherited or str(
                Path("runs") / cfg.task / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            )
        if cfg.get("ckpt_path") == "last":
            cfg.ckpt_path = str(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


PRECISIONS = {
    "32-true",
    "32",
    "64-true",
    "64",
    "16-mixed",
    "bf16-mixed",
    "bf16-true",
    "16-true",
    "transformer-engine",
}


def validate_config(cfg: DictConfig) -> None:
    """Range and type checks for every value that has one (issue: reliability)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # a ??? left unset, or a bad interpolation
        raise ConfigError(str(err).splitlines()[0]) from None

    tr = cfg.trainer
    _check(str(tr.precision) in PRECISIONS, "trainer.precision", tr.precision, sorted(PRECISIONS))
    devices = tr.devices
    _check(
        devices in ("auto", -1) or (isinstance(devices, int) and devices >= 1)
        or isinstance(devices, (list, str)),
        "trainer.devices",
        devices,
        "a positive int, 'auto' or -1",
    )
    for key in ("max_steps",):
        value = tr.get(key)
        _check(value is None or value == -1 or value >= 1, f"trainer.{key}", value, ">= 1 or -1")
    _check(
        int(tr.get("accumulate_grad_batches", 1)) >= 1,
        "trainer.accumulate_grad_batches",
        tr.get("accumulate_grad_batches"),
        ">= 1",
    )
    _check(int(cfg.data.batch_size) >= 1, "data.batch_size", cfg.data.batch_size, ">= 1")
    _check(int(cfg.max_bad_steps) >= 0, "max_bad_steps", cfg.max_bad_steps, ">= 0")
    _check(float(cfg.optim.lr) > 0, "optim.lr", cfg.optim.lr, "> 0")

    if cfg.task == "fit":
        loss = cfg.loss
        _check(loss.mode in ("scd", "sct"), "loss.mode", loss.mode, "'scd' or 'sct'")
        _check(float(loss.sigma_data) > 0, "loss.sigma_data", loss.sigma_data, "> 0")
        _check(float(loss.p_std) > 0, "loss.p_std", loss.p_std, "> 0")
        _check(math.isfinite(float(loss.p_mean)), "loss.p_mean", loss.p_mean, "a finite number")
        _check(float(loss.tangent_norm_c) > 0, "loss.tangent_norm_c", loss.tangent_norm_c, "> 0 (c)")
        _check(int(loss.warmup_steps) >= 0, "loss.warmup_steps", loss.warmup_steps, ">= 0 (H)")
        _check(
            loss.prior_weighting in ("none", "inv_sigma"),
            "loss.prior_weighting",
            loss.prior_weighting,
            "'none' or 'inv_sigma'",
        )
        _check(
            loss.jvp_precision in (None, "32", "64", "bf16", "16", 32, 64, 16),
            "loss.jvp_precision",
            loss.jvp_precision,
            "null, '32', '64', 'bf16' or '16'",
        )
        t_max = trigflow.t_max_from_sigma_max(sigma_data=float(loss.sigma_data))
        _check(
            0 < float(loss.t_mid) < t_max,
            "loss.t_mid",
            loss.t_mid,
            f"0 < t_mid < t_max = {t_max:.5f} (TrigFlow time in radians)",
        )
        rng = cfg.student.guidance_scale_range
        if rng is not None:
            _check(
                len(rng) == 2 and 0 <= float(rng[0]) <= float(rng[1]),
                "student.guidance_scale_range",
                list(rng),
                "[s_min, s_max] with 0 <= s_min <= s_max",
            )
    else:
        _check(float(cfg.sigma_data) > 0, "sigma_data", cfg.sigma_data, "> 0")
        _check(float(cfg.p_std) > 0, "p_std", cfg.p_std, "> 0")

    ev = cfg.eval
    _check(int(ev.num_samples) >= 0, "eval.num_samples", ev.num_samples, ">= 0")
    for key in ("student_nfes", "teacher_nfes"):
        for n in ev.get(key, []) or []:
            _check(int(n) >= 1, f"eval.{key}", list(ev[key]), "NFEs >= 1")
