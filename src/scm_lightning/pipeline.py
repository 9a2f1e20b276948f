"""``SCMPipeline``: 1-, 2- or N-step consistency sampling of an exported sCM student (diffusers).

An exported folder (see :mod:`scm_lightning.export`) is a diffusers pipeline folder::

    model_index.json            SCMPipeline: unet + scheduler
    unet/                       the raw network (``save_pretrained``): TrigFlowUNet, UNet2DModel
    scheduler/                  SCMScheduler(prediction_type="trigflow", sigma_data=σ_d)
    adapter.json                how the raw network becomes F_θ in TrigFlow units (below)
    adapter.safetensors         adapter tensors, only when needed (guidance embedding, DDPM table)

``adapter.json`` holds ``kind`` (``trigflow``: ``F = net(x_t/σ_d, t)``; ``edm``:
``F = ∓net(x_t/σ_d, ln(σ_d tan t)/4)``; ``vp``/``flow``: SNR matching onto the net's own
schedule), ``sigma_data``, ``prediction_type``, ``conditioning``, the guidance input and the
default sampling times. :func:`adapter_description` and :func:`build_adapter` are inverse.

Sampling follows spec §5 exactly as :func:`scm_lightning.sampling.consistency_sample`, with the
scheduler's ``step()`` doing each update: start ``x = σ_d·n`` (n unit normal, drawn first from
``generator``), then for each time τ_i ``x̂0 = cos τ_i·x − sin τ_i·σ_d·F`` and re-noise at
τ_{i+1} with fresh ``σ_d·z`` from ``generator``. Same seed, same images as ``sample`` from the
checkpoint.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, SCMScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from scm_lightning import sampling
from scm_lightning.teachers.base import NetAdapter, TrigFlowModel
from scm_lightning.teachers.edm import EDMAdapter
from scm_lightning.teachers.guidance import attach_guidance_embedding
from scm_lightning.teachers.schedule import FlowSchedule, ScheduleAdapter, TabulatedSchedule
from scm_lightning.teachers.trigflow import TrigFlowNative
from scm_lightning.trigflow import t_max_from_sigma_max

ADAPTER_JSON = "adapter.json"
ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_FORMAT = 1
CONDITIONING = {
    "trigflow": "c_noise = t (TrigFlow time in radians)",
    "edm": "c_noise = ln(sigma_data * tan t) / 4 (EDM), input x_t / sigma_data",
    "vp": "teacher timestep from log-SNR matching on a tabulated alpha/sigma schedule",
    "flow": "teacher timestep s * num_train_timesteps, s = sigmoid(log-SNR), rectified flow",
}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def adapter_description(adapter: TrigFlowModel) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """JSON description and tensors of ``adapter`` (the TrigFlow wrapper around a raw net).

    Returns ``(description, tensors)``; ``tensors`` holds the guidance embedding
    (``guidance_embedding.*``) and a tabulated VP schedule (``schedule.*``, float64).
    """
    if not isinstance(adapter, NetAdapter):
        raise TypeError(
            f"only single-network adapters (NetAdapter) export, got {type(adapter).__name__}"
        )
    desc: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "sigma_data": float(adapter.sigma_data),
        "num_classes": adapter.num_classes,
        "net_class": type(adapter.net).__name__,
    }
    tensors: dict[str, Tensor] = {}
    if isinstance(adapter, TrigFlowNative):
        desc.update(kind="trigflow", prediction_type="trigflow")
    elif isinstance(adapter, EDMAdapter):
        desc.update(kind="edm", prediction_type=adapter.prediction_type)
    elif isinstance(adapter, ScheduleAdapter):
        desc.update(prediction_type=adapter.prediction_type, data_scale=adapter.data_scale)
        sched = adapter.schedule
        if isinstance(sched, FlowSchedule):
            desc["kind"] = "flow"
            desc["schedule"] = {
                "num_train_timesteps": sched.num_train_timesteps,
                "s_min": sched.s_min,
                "s_max": sched.s_max,
            }
        elif isinstance(sched, TabulatedSchedule):
            desc["kind"] = "vp"
            alphas = torch.exp(sched.knot_log_alpha)
            tensors["schedule.timesteps"] = sched.knot_timestep.double().cpu()
            tensors["schedule.alphas"] = alphas.double().cpu()
            tensors["schedule.sigmas"] = (alphas * torch.exp(sched.knot_lambda)).double().cpu()
        else:
            raise TypeError(f"cannot export schedule {type(sched).__name__}")
    else:
        raise TypeError(f"cannot export adapter {type(adapter).__name__}")
    desc["conditioning"] = CONDITIONING[desc["kind"]]
    if adapter.native_guidance:
        desc["guidance"] = "native"
    elif adapter.guidance_embedding is not None:
        emb = adapter.guidance_embedding
        desc["guidance"] = "embedding"
        desc["guidance_embedding"] = {
            "num_channels": emb.num_channels,
            "input_scale": emb.input_scale,
            "embed_dim": emb.linear.out_features,
        }
        for key, value in emb.state_dict().items():
            tensors[f"guidance_embedding.{key}"] = value.detach().cpu().contiguous()
    else:
        desc["guidance"] = "none"
    return desc, tensors


def build_adapter(
    net: nn.Module, desc: dict[str, Any], tensors: dict[str, Tensor] | None = None
) -> NetAdapter:
    """Wrap the raw ``net`` as described by :func:`adapter_description` (its inverse)."""
    tensors = tensors or {}
    kind, sd = desc.get("kind"), desc.get("sigma_data")
    if sd is None:
        raise ValueError(f"adapter description lacks sigma_data: {desc}")
    if kind == "trigflow":
        adapter: NetAdapter = TrigFlowNative(net, float(sd))
    elif kind == "edm":
        adapter = EDMAdapter(net, float(sd), desc.get("prediction_type", "epsilon"))
    elif kind in ("vp", "flow"):
        if kind == "flow":
            schedule: nn.Module = FlowSchedule(**desc.get("schedule", {}))
        else:
            missing = [
                k for k in ("timesteps", "alphas", "sigmas") if f"schedule.{k}" not in tensors
            ]
            if missing:
                raise ValueError(
                    f"vp adapter needs schedule tensors {missing} in {ADAPTER_TENSORS}"
                )
            schedule = TabulatedSchedule(
                tensors["schedule.timesteps"],
                tensors["schedule.alphas"],
                tensors["schedule.sigmas"],
            )
        adapter = ScheduleAdapter(
            net, float(sd), schedule, desc["prediction_type"], float(desc.get("data_scale", 1.0))
        )
    else:
        raise ValueError(f"unknown adapter kind {kind!r}; expected trigflow, edm, vp or flow")
    guidance = desc.get("guidance", "none")
    if guidance == "embedding":
        spec = desc["guidance_embedding"]
        emb = attach_guidance_embedding(adapter, spec["num_channels"], spec["embed_dim"])
        emb.input_scale = float(spec.get("input_scale", 1.0))
        state = {k.removeprefix("guidance_embedding."): v for k, v in tensors.items()}
        state = {k: v for k, v in state.items() if not k.startswith("schedule.")}
        emb.load_state_dict(state)
    elif guidance == "native" and not adapter.native_guidance:
        raise ValueError(f"adapter.json says guidance='native' but {type(net).__name__} has none")
    return adapter.eval().requires_grad_(False)


def default_description(unet: nn.Module, scheduler: SCMScheduler) -> dict[str, Any]:
    """Description used when a folder has no ``adapter.json``: a TrigFlow-native net."""
    return {
        "format": ADAPTER_FORMAT,
        "kind": "trigflow",
        "prediction_type": "trigflow",
        "sigma_data": float(scheduler.config.sigma_data),
        "conditioning": CONDITIONING["trigflow"],
        "guidance": "native" if getattr(unet, "supports_guidance_input", False) else "none",
    }


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """``(description, tensors)`` from ``folder/adapter.json`` (+ safetensors), or None."""
    folder = Path(folder)
    path = folder / ADAPTER_JSON
    if not path.is_file():
        return None
    try:
        desc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    tensors: dict[str, Tensor] = {}
    if (folder / ADAPTER_TENSORS).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / ADAPTER_TENSORS))
    return desc, tensors


def write_adapter(folder: str | Path, desc: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_JSON).write_text(json.dumps(desc, indent=2) + "\n")
    if tensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_TENSORS))


def _time_list(times: Sequence[float] | Tensor) -> list[float]:
    return [float(v) for v in (times.tolist() if isinstance(times, Tensor) else times)]


class SCMPipeline(DiffusionPipeline):
    """Consistency sampling with an sCM student (spec §5) on diffusers' ``SCMScheduler``.

    Components: ``unet`` (the raw network) and ``scheduler`` (``SCMScheduler``). The TrigFlow
    adapter (``self.adapter``) wraps ``unet`` as described by ``adapter.json``.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: nn.Module, scheduler: SCMScheduler) -> None:
        super().__init__()
        if scheduler.config.prediction_type != "trigflow":
            raise ValueError(
                "SCMPipeline needs prediction_type='trigflow', got "
                f"{scheduler.config.prediction_type!r}"
            )
        self.register_modules(unet=unet, scheduler=scheduler)
        self.set_adapter(default_description(unet, scheduler))

    # --- adapter ---------------------------------------------------------------------------
    def set_adapter(self, desc: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> None:
        """Wrap ``self.unet`` per ``desc`` (see module doc); checks σ_d against the scheduler."""
        sd = float(self.scheduler.config.sigma_data)
        if abs(float(desc.get("sigma_data", sd)) - sd) > 1e-12:
            raise ValueError(
                f"adapter sigma_data={desc['sigma_data']} differs from the scheduler's {sd}"
            )
        self.adapter_config = dict(desc)
        self.adapter = build_adapter(self.unet, desc, tensors)

    @classmethod
    def from_adapter(
        cls, adapter: NetAdapter, scheduler: SCMScheduler | None = None, **extra: Any
    ) -> SCMPipeline:
        """Pipeline around ``adapter.net`` (shared, not copied); ``extra`` -> adapter.json."""
        desc, _ = adapter_description(adapter)
        scheduler = scheduler or SCMScheduler(
            prediction_type="trigflow", sigma_data=desc["sigma_data"]
        )
        pipe = cls(unet=adapter.net, scheduler=scheduler)
        # Use the live adapter itself: rebuilding would hook a second guidance embedding
        # onto the shared network.
        pipe.adapter = adapter
        pipe.adapter_config = {**desc, **extra}
        return pipe

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, **kwargs: Any
    ) -> SCMPipeline:
        """``DiffusionPipeline.from_pretrained`` plus the folder's ``adapter.json``."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        found = (
            read_adapter(pretrained_model_name_or_path)
            if Path(pretrained_model_name_or_path).is_dir()
            else None
        )
        if found is not None:
            pipe.set_adapter(*found)
        return pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained`` plus ``adapter.json`` (+ its tensors)."""
        super().save_pretrained(save_directory, **kwargs)
        desc, tensors = adapter_description(self.adapter)
        write_adapter(save_directory, {**self.adapter_config, **desc}, tensors)

    # --- sampling --------------------------------------------------------------------------
    @property
    def sigma_data(self) -> float:
        return float(self.scheduler.config.sigma_data)

    def sampling_times(
        self,
        num_inference_steps: int,
        timesteps: Sequence[float] | Tensor | None = None,
        intermediate_timesteps: float | None = None,
        max_timesteps: float | None = None,
    ) -> list[float]:
        """Consistency times ``τ_0 > … > τ_{N−1} > 0`` (radians).

        ``timesteps``: explicit times, either the N times or diffusers' N+1 list ending in 0.
        Otherwise :func:`sampling.consistency_times` with ``t_max = max_timesteps`` (default
        ``arctan(80/σ_d)``, the paper's, not diffusers' 1.5708) and ``t_mid =
        intermediate_timesteps`` (default adapter.json's ``t_mid`` or 1.1).
        """
        if timesteps is not None:
            ts = _time_list(timesteps)
            if ts and ts[-1] == 0.0:
                ts = ts[:-1]
            return sampling.consistency_times(len(ts), times=ts)
        t_max = max_timesteps
        if t_max is None:
            t_max = self.adapter_config.get("t_max") or t_max_from_sigma_max(
                sigma_data=self.sigma_data
            )
        t_mid = intermediate_timesteps
        if t_mid is None:
            t_mid = self.adapter_config.get("t_mid", 1.1)
        return sampling.consistency_times(
            num_inference_steps, t_max=float(t_max), t_mid=float(t_mid), sigma_data=self.sigma_data
        )

    def _labels(self, class_labels: Any, batch_size: int, device: torch.device) -> Tensor | None:
        num_classes = self.adapter.num_classes
        if not num_classes:
            if class_labels is not None:
                raise ValueError("class_labels given but the model is unconditional")
            return None
        if class_labels is None:  # the `sample` command's default: 0, 1, 2, ... cycling
            return torch.arange(batch_size, device=device) % num_classes
        labels = torch.as_tensor(class_labels, device=device, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise ValueError(
                f"class_labels must be one label or {batch_size}, got {labels.numel()}"
            )
        if labels.min() < 0 or labels.max() > num_classes:
            raise ValueError(f"class_labels must lie in [0, {num_classes}], got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1,
        timesteps: Sequence[float] | Tensor | None = None,
        intermediate_timesteps: float | None = None,
        max_timesteps: float | None = None,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        class_labels: int | Sequence[int] | Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images in ``num_inference_steps`` network evaluations.

        Args:
            timesteps: explicit TrigFlow times (radians), N or N+1 with a trailing 0; then
                ``num_inference_steps`` follows from them. For N ≠ 2 this is how custom times
                reach the scheduler (``SCMScheduler`` takes ``intermediate_timesteps`` for 2 only).
            intermediate_timesteps: ``t_mid`` of the default schedule (paper: 1.1).
            max_timesteps: ``t_max`` (default ``arctan(80/σ_d)``).
            guidance_scale: CFG scale s fed to a guidance-distilled student (default 1).
            class_labels: one label or ``(B,)``; default ``arange(B) % num_classes``.
            output_type: ``"pil"``, ``"np"`` (NHWC in [0, 1]), ``"pt"`` (NCHW in [0, 1]) or
                ``"latent"`` (NCHW in data units, unclamped).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        times = self.sampling_times(
            num_inference_steps, timesteps, intermediate_timesteps, max_timesteps
        )
        if self.adapter_config.get("model") == "diffusion":
            warnings.warn(
                "this folder holds a diffusion model (a `pretrain` teacher), not a consistency "
                "model: few-step consistency sampling of it is blurry. Load it with "
                "teachers.loading.load_teacher and sample with sampling.teacher_sample.",
                stacklevel=2,
            )
        device = self._execution_device
        self.adapter.to(device)
        unet_dtype = next(self.unet.parameters()).dtype
        shape = (int(batch_size), self.unet.config.in_channels, *self._image_hw())
        labels = self._labels(class_labels, int(batch_size), device)
        guidance = None
        if self.adapter.accepts_guidance:
            s = 1.0 if guidance_scale is None else float(guidance_scale)
            guidance = torch.full((int(batch_size),), s, device=device)
        elif guidance_scale is not None:
            raise ValueError("guidance_scale given but this model has no guidance input")

        sd = self.sigma_data
        # Order of draws = sampling.consistency_sample: the prior first, then one z per re-noise.
        sample = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * sd
        self.scheduler.set_timesteps(
            len(times),
            timesteps=[*times, 0.0],
            device=device,
            max_timesteps=None,
            intermediate_timesteps=None,
        )
        x0 = sample
        for i, tau in enumerate(self.scheduler.timesteps[:-1]):
            t = tau.expand(shape[0]).to(torch.float32)
            F = self.adapter(sample.to(unet_dtype) / sd, t, labels, guidance).float()
            # SCMScheduler.step also draws noise after the last step (scaled by sin 0 = 0):
            # a throwaway generator there keeps `generator`'s stream equal to the sampler's.
            last = i == len(times) - 1
            gen = torch.Generator(device=device).manual_seed(0) if last else generator
            out = self.scheduler.step(sd * F, tau, sample, generator=gen)  # model output σ_d·F
            sample, x0 = out.prev_sample, out.pred_original_sample
        return self._postprocess(x0, output_type, return_dict)

    def _image_hw(self) -> tuple[int, int]:
        shape = self.adapter_config.get("image_shape")
        if shape:
            return int(shape[1]), int(shape[2])
        size = self.unet.config.sample_size
        if size is None:
            raise ValueError("the unet config has no sample_size and adapter.json no image_shape")
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @staticmethod
    def _postprocess(
        x0: Tensor, output_type: str, return_dict: bool
    ) -> ImagePipelineOutput | tuple:
        if output_type == "latent":
            images: Any = x0
        else:
            images = (x0.float() / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                u8 = (images * 255).round().astype(np.uint8)
                from PIL import Image

                images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in u8]
        return ImagePipelineOutput(images=images) if return_dict else (images,)


__all__ = [
    "SCMPipeline",
    "adapter_description",
    "build_adapter",
    "read_adapter",
    "write_adapter",
]
