"""Checkpoints that survive a crash, load without unpickling code, and resume only what fits.

* :class:`AtomicCheckpointIO`: Lightning ``CheckpointIO`` writing ``<dir>/.<name>.tmp-<pid>-*``,
  fsync, then ``os.replace`` onto the target (and an fsync of the directory). A process killed
  mid-write leaves the previous checkpoint intact; loads use ``torch.load(weights_only=True)``.
  Remote fsspec paths (``s3://``, ``gs://``, ``memory://``, ...) are written by Lightning's
  own ``_atomic_save`` (an fsspec transaction) and read through fsspec. Lightning's writer is
  not used for local paths: its local transaction writes the temporary file to the system
  temp folder, so the final move across file systems is a copy that a crash can tear, and
  nothing is fsynced.
* :func:`load_checkpoint_file`: that safe load with one-line errors for non-checkpoints;
  :func:`load_checkpoint` adds the checks that it is a ``fit``/``pretrain`` run's checkpoint.
  Every command and the resume check read checkpoints through these two.
* :func:`check_resume_config` / :func:`check_resume_state`: before training, refuse a
  checkpoint from another task, loss mode, teacher, data shape or student (config keys and
  ``state_dict`` shapes).
* :func:`last_good_checkpoint`: newest checkpoint written by this run's ModelCheckpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import fsspec
import torch
from lightning.fabric.utilities.cloud_io import _atomic_save, get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from scm_lightning.config import ConfigError

TMP_MARK = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>-*`` leftovers of writers that died (their pid is gone)."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}{TMP_MARK}*"):
        match = re.search(re.escape(TMP_MARK) + r"(\d+)-", tmp.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def is_remote(path: str | os.PathLike) -> bool:
    """A URL of a non-local fsspec file system (``s3://``, ``gs://``, ``memory://``, ...)."""
    return fsspec.utils.get_protocol(str(path)) not in ("file", "local")


def atomic_save(
    obj: Any, path: str | os.PathLike, save: Callable[[Any, Any], None] | None = None
) -> None:
    """``save(obj, file)`` (default ``torch.save``) into a temporary file next to ``path``,
    fsync, ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write. A remote
    fsspec path goes to Lightning's ``_atomic_save`` (``torch.save`` in an fsspec transaction).
    """
    if is_remote(path):
        if save is not None:
            raise ValueError(f"a custom save function writes local files only, not {path!r}")
        _atomic_save(obj, str(path))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    # os.open (not mkstemp) so the file gets the usual 0o666 & ~umask permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            (save or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def load_checkpoint_file(
    path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; anything else (pickled objects, a text file,
    a truncated zip) raises a one-line ValueError naming the file. Never unpickles code.

    ``path`` is a local path or an fsspec URL (``mmap`` applies to local files only).
    """
    remote = is_remote(path)
    fs = get_filesystem(path) if remote else None
    if not (fs.exists(str(path)) if remote else Path(path).exists()):
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if fs.isdir(str(path)) if remote else Path(path).is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a directory, expected a .ckpt file")
    try:
        if remote:
            with fs.open(str(path), "rb") as f:
                obj = torch.load(f, map_location=map_location, weights_only=True)
        else:
            obj = torch.load(Path(path), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if unsafe is None:  # not a pickle of tensors at all (a text file, random bytes)
            lines = [s.strip() for s in str(err).splitlines() if s.strip()]
            detail = next((s for s in lines if s.startswith("Unsupported")), None)
            first = (detail or (lines or [type(err).__name__])[0])[:160]
            raise ValueError(
                f"checkpoint {str(path)!r} is not a readable PyTorch checkpoint (truncated or not "
                f"a checkpoint at all: {first})"
            ) from None
        raise ValueError(
            f"checkpoint {str(path)!r} holds pickled objects ({unsafe.group(1)}) that "
            "torch.load(weights_only=True) refuses; arbitrary pickles are never loaded"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ... on junk
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(
            f"checkpoint {str(path)!r} is not a readable PyTorch checkpoint (truncated or not a "
            f"checkpoint at all: {first})"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a dict")
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict of an scm_lightning ``fit``/``pretrain`` run, on the CPU.

    Read by :func:`load_checkpoint_file` (same errors); then ValueError unless it holds a
    ``state_dict`` and the run's ``scm_config``.
    """
    ckpt = load_checkpoint_file(path)
    where = f"checkpoint {str(path)!r}"
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{where} is not a Lightning checkpoint (no 'state_dict')")
    if not isinstance(ckpt.get("scm_config"), dict):
        raise ValueError(f"{where} was not written by scm_lightning fit/pretrain (no 'scm_config')")
    if ckpt["scm_config"].get("task") not in ("fit", "pretrain"):
        raise ValueError(f"{where}: unknown task {ckpt['scm_config'].get('task')!r}")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with crash-safe writes and ``weights_only=True`` loads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("checkpoints are loaded with weights_only=True only")
        return load_checkpoint_file(path, map_location=map_location)


def has_own_checkpoint_io(strategy: Any) -> bool:
    """FSDP / ModelParallel / DeepSpeed strategies write distributed checkpoints themselves."""
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if isinstance(strategy, Mapping):
        name = str(strategy.get("_target_", ""))
    return any(
        k in str(name).lower() for k in ("fsdp", "modelparallel", "model_parallel", "deepspeed")
    )


# --- run config ---------------------------------------------------------------------------
PATH_KEYS = ("path", "root", "ckpt_path", "scheduler_config", "pretrained_model_name_or_path")


def absolute_paths(tree: Any) -> Any:
    """``tree`` with every existing relative path under a :data:`PATH_KEYS` key made absolute,
    so a checkpoint's config still finds its teacher and data from another working directory.
    Remote (``scheme://``) and non-existent values (e.g. hub ids) stay as given."""
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            if (
                key in PATH_KEYS
                and isinstance(value, str)
                and value
                and "://" not in value
                and not os.path.isabs(value)
                and os.path.exists(value)
            ):
                out[key] = os.path.abspath(value)
            else:
                out[key] = absolute_paths(value)
        return out
    if isinstance(tree, list):
        return [absolute_paths(v) for v in tree]
    return tree


# --- resume -------------------------------------------------------------------------------

# Config keys whose change makes a checkpoint a different experiment (path -> why).
RESUME_KEYS = {
    "fit": ("loss.mode", "teacher", "data._target_", "data.channels", "data.resolution",
            "data.conditional", "student.guidance_embedding", "student.logvar_channels"),
    "pretrain": ("net", "prepare_from", "sigma_data", "data._target_", "data.channels",
                 "data.resolution", "data.conditional"),
}  # fmt: skip


def _select(tree: Mapping[str, Any] | None, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return _normalise(node)


def _normalise(value: Any) -> Any:
    """Plain containers; ``path``-like strings compared as resolved absolute paths."""
    if isinstance(value, Mapping):
        return {
            k: (os.path.realpath(v) if k in PATH_KEYS and isinstance(v, str) else _normalise(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _first_difference(old: Any, new: Any, key: str) -> tuple[str, Any, Any] | None:
    """``(dotted key, old, new)`` of the first differing leaf, or None when equal."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for k in sorted(set(old) | set(new), key=str):
            diff = _first_difference(old.get(k), new.get(k), f"{key}.{k}")
            if diff is not None:
                return diff
        return None
    return None if old == new else (key, old, new)


def check_resume_config(cfg: Any, ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """Load ``ckpt_path`` (weights_only, memory-mapped) and refuse it when it was written by
    another task or a run whose loss mode, teacher, data or student differ from ``cfg``.

    Returns the checkpoint for :func:`check_resume_state`. Raises ConfigError / ValueError.
    """
    from omegaconf import OmegaConf

    ckpt = load_checkpoint_file(ckpt_path, mmap=True)
    where = f"ckpt_path={str(ckpt_path)!r}"
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"{where} is not a Lightning checkpoint (no 'state_dict')")
    saved = ckpt.get("scm_config")
    if not isinstance(saved, dict):
        raise ConfigError(
            f"{where} was not written by scm_lightning fit/pretrain (no 'scm_config')"
        )
    current = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    task = current.get("task")
    if saved.get("task") != task:
        hint = (
            " (to distill a pretrained network, export it with export_dir=... or `export` and "
            "pass teacher.path=<folder>)"
            if task == "fit"
            else ""
        )
        raise ConfigError(
            f"{where} is a {saved.get('task')!r} checkpoint; cannot resume it with `{task}`{hint}"
        )
    for key in RESUME_KEYS.get(task, ()):
        diff = _first_difference(_select(saved, key), _select(current, key), key)
        if diff is not None:
            at, old, new = diff
            raise ConfigError(
                f"{where} comes from a different experiment: {at} was {old!r} in that run, "
                f"now {new!r}; start a new run (drop ckpt_path) or restore {at}"
            )
    ckpt["_scm_where"] = where  # for check_resume_state's messages
    return ckpt


def check_resume_state(ckpt: Mapping[str, Any], module: torch.nn.Module) -> None:
    """The module's trainable state (teacher excluded) must match the checkpoint key by key,
    shape by shape; the image shape too when the checkpoint records it."""
    where = ckpt.get("_scm_where", "the checkpoint")
    shape = ckpt.get("scm_image_shape")
    own_shape = getattr(module, "image_shape", None)
    if shape is not None and own_shape is not None and tuple(shape) != tuple(own_shape):
        raise ConfigError(
            f"{where} was trained on images of shape {tuple(shape)} (C, H, W); the data now "
            f"gives {tuple(own_shape)}"
        )
    saved = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("teacher.")}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith("teacher.")}
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    wrong = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in saved
        and hasattr(saved[k], "shape")
        and tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    if missing or extra or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} weights missing from it (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected weights (e.g. {extra[0]})")
        raise ConfigError(
            f"{where} does not fit this student: {'; '.join(parts)}; it comes from a different "
            "experiment or student configuration"
        )


# --- divergence -----------------------------------------------------------------------------


def last_good_checkpoint(trainer: Any) -> str | None:
    """Newest existing checkpoint this run's ModelCheckpoint callbacks wrote (else the one the
    run resumed from); None when there is none."""
    if trainer is None:
        return None
    found: list[str] = []
    for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
        for attr in ("_last_checkpoint_saved", "last_model_path", "best_model_path"):
            path = getattr(cb, attr, None)
            if path and Path(path).exists():
                found.append(str(path))
    if found:
        return max(found, key=lambda p: os.path.getmtime(p))
    resumed = getattr(trainer, "ckpt_path", None)
    return str(resumed) if resumed and Path(resumed).exists() else None


def divergence_message(bad_steps: int, limit: int, step: int, trainer: Any) -> str:
    """The FloatingPointError text when ``limit`` steps in a row were non-finite."""
    last = last_good_checkpoint(trainer)
    where = (
        f"the last good checkpoint is {last} (intact; resume with ckpt_path={last} after "
        "fixing the cause, e.g. a lower optim.lr)"
        if last
        else "no checkpoint was written before this point"
    )
    return (
        f"{bad_steps} consecutive steps had a non-finite loss or gradient, or every sample was "
        f"masked (limit max_bad_steps={limit}); stopped at global step {step}; {where}"
    )
