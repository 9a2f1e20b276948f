"""Load a frozen teacher (a :class:`TrigFlowModel`) from a local diffusers folder, offline.

Layouts accepted by :func:`load_teacher`:

* a pipeline folder: ``<path>/unet/`` (or ``transformer/``) with ``config.json`` + weights, and
  ``<path>/scheduler/scheduler_config.json``;
* a model folder ``<path>/config.json`` + weights, with the scheduler config given explicitly
  (``scheduler_config=``), inside the folder (``scheduler_config.json``) or in a sibling
  ``../scheduler/`` folder.

The adapter follows from the scheduler class: EDM schedulers -> :class:`EDMAdapter` (reads
``sigma_data`` and ``prediction_type``), DDPM-family schedulers with ``alphas_cumprod`` ->
:class:`ScheduleAdapter` on the VP table, flow-matching schedulers -> :class:`ScheduleAdapter`
on :class:`FlowSchedule`, ``SCMScheduler`` / a ``TrigFlowUNet`` -> :class:`TrigFlowNative`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from scm_lightning.teachers.base import TrigFlowModel
from scm_lightning.teachers.edm import EDMAdapter
from scm_lightning.teachers.schedule import (
    PREDICTION_TYPES,
    FlowSchedule,
    ScheduleAdapter,
    TabulatedSchedule,
)
from scm_lightning.teachers.trigflow import TrigFlowNative

KINDS = ("auto", "edm", "vp", "flow", "trigflow")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SCHEDULERS = (
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchLCMScheduler",
)
TRIGFLOW_SCHEDULERS = ("SCMScheduler",)
TRIGFLOW_MODELS = ("TrigFlowUNet",)
MODEL_SUBFOLDERS = ("unet", "transformer")
SCHEDULER_CONFIG = "scheduler_config.json"
DEFAULT_SIGMA_DATA = 0.5  # spec §1 default for VP/flow teachers (data in [-1, 1] or rescaled)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _find_folders(path: Path, scheduler_config: str | Path | None) -> tuple[Path, Path | None]:
    """(model folder, scheduler config file or None) for the layouts in the module doc."""
    if path.is_file():  # e.g. an EDM .pkl snapshot: unpickling one could run arbitrary code
        raise ValueError(
            f"teacher path {path} is a file; supported: a diffusers pipeline folder (unet/ or "
            "transformer/ + scheduler/) or model folder (config.json) with .safetensors weights "
            "(pickled .bin weights only with allow_pickle=True); pickled network files such as "
            "EDM .pkl snapshots are not loaded: convert them to a diffusers folder"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"teacher directory {path} does not exist (or is not a directory)")
    if (path / "config.json").is_file():
        model_dir = path
        candidates = [path / SCHEDULER_CONFIG, path.parent / "scheduler" / SCHEDULER_CONFIG]
    else:
        subs = [path / s for s in MODEL_SUBFOLDERS if (path / s / "config.json").is_file()]
        if not subs:
            raise FileNotFoundError(
                f"{path} holds neither a model (config.json) nor a pipeline with "
                f"{' or '.join(s + '/config.json' for s in MODEL_SUBFOLDERS)}"
            )
        model_dir = subs[0]
        candidates = [path / "scheduler" / SCHEDULER_CONFIG]
    if scheduler_config is not None:
        explicit = Path(scheduler_config)
        explicit = explicit / SCHEDULER_CONFIG if explicit.is_dir() else explicit
        if not explicit.is_file():
            raise FileNotFoundError(f"scheduler config {explicit} does not exist")
        return model_dir, explicit
    return model_dir, next((c for c in candidates if c.is_file()), None)


def model_class(class_name: str | None, model_dir: Path) -> type:
    """The network class named in ``model_dir/config.json``: ours (TrigFlowUNet) or diffusers'."""
    if class_name is None:
        raise ValueError(f"{model_dir / 'config.json'} has no _class_name")
    if class_name in TRIGFLOW_MODELS:
        from scm_lightning.nets.trigflow_unet import TrigFlowUNet

        return TrigFlowUNet
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(
            f"model class {class_name!r} in {model_dir / 'config.json'} is neither a diffusers "
            f"model nor one of {TRIGFLOW_MODELS}"
        )
    return cls


def _check_safetensors(model_dir: Path, allow_pickle: bool) -> None:
    has_safe = any(model_dir.glob("*.safetensors")) or any(
        model_dir.glob("*.safetensors.index.json")
    )
    if not has_safe and not allow_pickle:
        raise ValueError(
            f"{model_dir} has no .safetensors weights; loading pickled (.bin) weights can run "
            "arbitrary code: pass allow_pickle=True only for a trusted teacher"
        )
    if not has_safe:
        warnings.warn(
            f"loading pickled (.bin) teacher weights from {model_dir} (allow_pickle=True): "
            "unpickling can run arbitrary code; only do this for a trusted teacher",
            stacklevel=3,
        )


def _scheduler(config: dict[str, Any], path: Path):
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown scheduler class {name!r} in {path}")
    return cls.from_config(config)  # fills in the class defaults the file omits


def _infer_kind(sched_name: str | None, scheduler, model_class: str, cfg_path: Path | None) -> str:
    if model_class in TRIGFLOW_MODELS or sched_name in TRIGFLOW_SCHEDULERS:
        return "trigflow"
    if scheduler is None:
        raise FileNotFoundError(
            f"no scheduler config found for the teacher ({cfg_path or 'none given'}); expected "
            f"<pipeline>/scheduler/{SCHEDULER_CONFIG}, <model>/{SCHEDULER_CONFIG}, a sibling "
            f"../scheduler/ folder, or scheduler_config=<file>"
        )
    if sched_name in EDM_SCHEDULERS:
        return "edm"
    pred = scheduler.config.get("prediction_type")
    if (
        sched_name in FLOW_SCHEDULERS
        or scheduler.config.get("use_flow_sigmas")
        or pred == "flow_prediction"
    ):
        return "flow"
    if hasattr(scheduler, "alphas_cumprod"):
        if scheduler.config.get("timestep_type") == "continuous":
            raise ValueError(
                f"{sched_name} with timestep_type='continuous' in {cfg_path} is not supported"
            )
        return "vp"
    raise ValueError(
        f"unknown scheduler class {sched_name!r} in {cfg_path}; supported: EDM "
        f"{EDM_SCHEDULERS}, flow {FLOW_SCHEDULERS}, trigflow {TRIGFLOW_SCHEDULERS}, or any "
        "DDPM-family scheduler with alphas_cumprod"
    )


def freeze(model: TrigFlowModel) -> TrigFlowModel:
    """Teacher mode: eval, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(
    path: str | Path,
    *,
    sigma_data: float | None = None,
    kind: str = "auto",
    prediction_type: str | None = None,
    allow_pickle: bool = False,
    scheduler_config: str | Path | None = None,
    data_scale: float = 1.0,
    torch_dtype: torch.dtype | None = None,
) -> TrigFlowModel:
    """Load a frozen TrigFlow teacher from a local diffusers folder (layouts: module doc).

    Args:
        path: pipeline folder or model folder.
        sigma_data: our TrigFlow σ_d. EDM: defaults to the scheduler's ``sigma_data`` and must
            equal it. TrigFlow: the scheduler's or model config's ``sigma_data``. VP/flow: 0.5.
        kind: ``auto`` (from the scheduler class), ``edm``, ``vp``, ``flow`` or ``trigflow``.
        prediction_type: overrides the scheduler's (``epsilon``/``v_prediction``/``sample``/
            ``flow``; diffusers' ``flow_prediction`` means ``flow``).
        allow_pickle: allow ``.bin`` (pickle) weights; by default only safetensors load.
        scheduler_config: explicit scheduler config file or folder.
        data_scale: VP/flow only: teacher data = ``data_scale``·our data.
        torch_dtype: dtype to load the weights in.
    Returns the adapter in eval mode with ``requires_grad`` False everywhere.
    """
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"unknown teacher kind {kind!r}; expected one of {KINDS}")
    model_dir, sched_path = _find_folders(path, scheduler_config)
    model_config = _read_json(model_dir / "config.json")
    class_name = model_config.get("_class_name")
    sched_cfg = _read_json(sched_path) if sched_path is not None else None
    scheduler = _scheduler(sched_cfg, sched_path) if sched_cfg is not None else None
    sched_name = sched_cfg.get("_class_name") if sched_cfg is not None else None
    if kind == "auto":
        kind = _infer_kind(sched_name, scheduler, class_name, sched_path)
    elif kind != "trigflow" and scheduler is None:
        _infer_kind(None, None, "", sched_path)  # raises the missing-scheduler error

    cls = model_class(class_name, model_dir)
    _check_safetensors(model_dir, allow_pickle)
    # low_cpu_mem_usage needs `accelerate` (not a dependency): load plainly, without its warning
    kwargs: dict[str, Any] = {"local_files_only": True, "low_cpu_mem_usage": False}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    net = cls.from_pretrained(model_dir, **kwargs)

    sched_pred = scheduler.config.get("prediction_type") if scheduler is not None else None
    pred = prediction_type if prediction_type is not None else sched_pred
    if pred == "flow_prediction":
        pred = "flow"

    exported = _exported_description(path)
    if exported is not None:  # an scm_lightning export: its own adapter, whatever the scheduler
        from scm_lightning.teachers.description import build_adapter

        if exported.get("guidance") == "embedding":
            raise ValueError(f"{path} holds a guidance-distilled student; it is no teacher")
        if sigma_data is not None and abs(sigma_data - float(exported["sigma_data"])) > 1e-12:
            raise ValueError(
                f"sigma_data={sigma_data} differs from the export's {exported['sigma_data']}"
            )
        return freeze(build_adapter(net, exported))
    if kind == "trigflow":
        sd = sigma_data
        for source in (sched_cfg or {}, model_config):
            sd = sd if sd is not None else source.get("sigma_data")
        if sd is None:
            raise ValueError(
                f"no sigma_data in {sched_path} or {model_dir / 'config.json'}; pass sigma_data="
            )
        model: TrigFlowModel = TrigFlowNative(net, sd)
    elif kind == "edm":
        teacher_sd = float(scheduler.config["sigma_data"])
        if sigma_data is not None and abs(sigma_data - teacher_sd) > 1e-12:
            raise ValueError(
                f"sigma_data={sigma_data} differs from the EDM teacher's sigma_data={teacher_sd} "
                f"({sched_path}); rescale the data to std {teacher_sd} instead"
            )
        model = EDMAdapter(net, teacher_sd, pred or "epsilon")
    else:
        sd = DEFAULT_SIGMA_DATA if sigma_data is None else sigma_data
        if kind == "flow":
            # The net's timestep is s·num_train_timesteps·timestep_scale, as SanaPipeline feeds
            # it (Sana's config key; 1 for other nets).
            timestep_scale = float(model_config.get("timestep_scale", 1.0))
            schedule = FlowSchedule(
                scheduler.config.get("num_train_timesteps", 1000) * timestep_scale
            )
            pred = "flow" if pred in (None, "epsilon") and prediction_type is None else pred
        else:
            if not hasattr(scheduler, "alphas_cumprod"):
                raise ValueError(f"{sched_name} in {sched_path} has no alphas_cumprod (kind='vp')")
            schedule = TabulatedSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
        if pred not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {pred!r} for {path}; expected one of {PREDICTION_TYPES}"
            )
        model = ScheduleAdapter(net, sd, schedule, pred, data_scale=data_scale)
    return freeze(model)


def _exported_description(path: Path) -> dict[str, Any] | None:
    """The adapter description in an exported pipeline folder's ``model_index.json``."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    adapter = _read_json(index).get("adapter")
    return adapter if isinstance(adapter, dict) else None


def _hw(value: int | tuple[int, ...] | list[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    return (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)


def check_teacher_matches_data(
    model: TrigFlowModel,
    channels: int,
    resolution: int | tuple[int, int],
    num_classes: int | None,
    text_embed_dim: int | None = None,
    condition: Any = None,
) -> None:
    """Raise ValueError when the teacher cannot take the data: channels, sample size
    (when the model states one), or conditioning (``num_classes`` None/0 = unconditional; a
    conditional teacher may have one extra null class for CFG; ``text_embed_dim``: the width
    D of the data's prompt embeddings, which must equal the teacher's; ``condition``: one
    TextCondition of the data, whose fields (mask, pooled) the teacher must take)."""
    if model.in_channels != channels:
        raise ValueError(f"teacher expects {model.in_channels} input channels, data has {channels}")
    size = _hw(model.sample_size)
    if size is not None and size != _hw(resolution):
        raise ValueError(
            f"teacher sample_size is {model.sample_size}, data resolution {resolution}"
        )
    _check_text(model, text_embed_dim, condition)
    model_classes = model.num_classes or 0
    data_classes = num_classes or 0
    if bool(model_classes) != bool(data_classes):
        raise ValueError(
            f"teacher is {'class-conditional' if model_classes else 'unconditional'} "
            f"(num_classes={model.num_classes}) but the data has num_classes={num_classes}"
        )
    if data_classes and model_classes not in (data_classes, data_classes + 1):
        raise ValueError(
            f"teacher has {model_classes} class embeddings, data {data_classes} classes "
            f"(expected {data_classes} or {data_classes + 1} with a null class)"
        )


UNSUPPORTED_ADDED_CONDITIONS = ("text_time", "text_image", "image", "image_hint")


def _check_text(model: TrigFlowModel, text_embed_dim: int | None, condition: Any) -> None:
    """A text-conditioned teacher needs prompt embeddings of its width, and nothing else does."""
    from scm_lightning.teachers.conditioning import text_net_kwargs

    width = getattr(model, "text_embed_dim", None)
    if width is None and text_embed_dim is not None:
        raise ValueError(
            f"the data has prompt embeddings (width {text_embed_dim}) but the teacher is not "
            "text-conditioned (no cross-attention)"
        )
    if width is None:
        return
    if text_embed_dim is None:
        raise ValueError(
            f"teacher is text-conditioned (prompt embeddings of width {width}) but the data "
            "has no prompt embeddings (use data=text_pairs)"
        )
    if int(text_embed_dim) != int(width):
        raise ValueError(
            f"prompt_embeds have width {text_embed_dim}, the teacher's cross-attention takes "
            f"{width} (its cross_attention_dim)"
        )
    net = getattr(model, "net", None)
    added = getattr(getattr(net, "config", None), "addition_embed_type", None)
    if added in UNSUPPORTED_ADDED_CONDITIONS:
        raise ValueError(
            f"the teacher's addition_embed_type={added!r} needs added conditions (time_ids, "
            "images) that text pairs do not carry; supported: None or 'text'"
        )
    if net is not None and condition is not None:
        text_net_kwargs(net, condition)  # a mask or pooled embedding the net has no input for
