"""``SCMPipeline``: 1-, 2- or N-step consistency sampling of an exported sCM student (diffusers).

This file is self-contained (torch, numpy and diffusers only): ``export`` copies it into the
exported folder as ``pipeline_scm.py`` and names it in ``model_index.json``
(``"_class_name": ["pipeline_scm", "SCMPipeline"]``, diffusers' custom-pipeline convention), so
a process without scm_lightning loads the folder with::

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

Folder::

    model_index.json      SCMPipeline config: components + ``adapter`` (the description below)
    pipeline_scm.py       this file
    unet/                 the raw network (``save_pretrained``); a TrigFlowUNet brings its own
                          ``trigflow_unet.py`` (custom component, same convention)
    scheduler/            SCMScheduler(prediction_type="trigflow", sigma_data=σ_d) whose config
                          also holds ``max_timesteps`` (t_max) and ``intermediate_timesteps``
                          (the 2-step t_mid)
    guidance_embedding/   only for a student with a learned CFG-scale input

``adapter`` says how the raw network becomes F in TrigFlow units (spec §2): ``kind`` is
``trigflow`` (``F = net(x_t/σ_d, t)``), ``edm`` (``F = ∓net(x_t/σ_d, ln(σ_d tan t)/4)``),
``vp``/``flow`` (SNR matching onto the net's own schedule, in float64) or ``denoiser``
(``F = (cos t·x_t − D(x_t/cos t; σ_d tan t))/(σ_d sin t)``). The in-project adapters
(``scm_lightning.teachers``) are the reference; ``tests/test_diffusers_load.py`` checks this
file's F against them for every kind. An unknown kind or format raises instead of sampling
with the wrong parameterisation.

Sampling follows spec §5 exactly as ``scm_lightning.sampling.consistency_sample``, with the
scheduler's ``step()`` doing each update: start ``x = σ_d·n`` (n unit normal, drawn first from
``generator``), then for each time τ_i ``x̂0 = cos τ_i·x − sin τ_i·σ_d·F`` and re-noise at
τ_{i+1} with fresh ``σ_d·z`` from ``generator``. Same seed, same images as ``sample``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline, SCMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

ADAPTER_FORMAT = 2
ADAPTER_KINDS = ("trigflow", "edm", "vp", "flow", "denoiser")
SCHEDULE_PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
TIME_EMBEDDING_NAMES = ("time_embedding", "time_mlp")
SIGMA_MIN_EDM, SIGMA_MAX_EDM, RHO_EDM = 0.002, 80.0, 7.0  # EDM grid (Karras et al. 2022)
EDM_SIGMA_FLOOR = 1e-20  # ln σ for σ >= this, so t = 0 stays finite (teachers/edm.py)
DEFAULT_T_MID = 1.1  # the paper's 2-step intermediate time


# --- times (spec §5) ------------------------------------------------------------------------
def validate_times(times: Sequence[float]) -> list[float]:
    """Non-empty, strictly decreasing TrigFlow times in ``(0, π/2]`` (radians)."""
    ts = [float(v) for v in times]
    if not ts:
        raise ValueError("times must contain at least one TrigFlow time, got an empty list")
    if any(not (0.0 < v <= math.pi / 2) for v in ts):
        raise ValueError(f"times must lie in (0, π/2] (radians, 0 excluded), got {ts}")
    if any(a <= b for a, b in itertools.pairwise(ts)):
        raise ValueError(f"times must be strictly decreasing, got {ts}")
    return ts


def consistency_times(nfe: int, t_max: float, t_mid: float, sigma_data: float) -> list[float]:
    """``[t_max]``, ``[t_max, t_mid]``, or for ``nfe > 2`` ``t_max, t_mid`` and the EDM
    ρ-schedule (ρ = 7) of ``nfe`` levels from ``σ_d tan t_mid`` to 0.002 without its last,
    mapped by ``t = arctan(σ/σ_d)`` (= ``scm_lightning.sampling.consistency_times``)."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if nfe == 1:
        return validate_times([t_max])
    if not 0.0 < t_mid < t_max:
        raise ValueError(f"t_mid must lie in (0, t_max={t_max:.5f}), got {t_mid}")
    sigma_mid = sigma_data * math.tan(t_mid)
    if sigma_mid <= SIGMA_MIN_EDM:
        raise ValueError(f"sigma_min={SIGMA_MIN_EDM} must be below σ_d·tan(t_mid)={sigma_mid:.4g}")
    i = torch.arange(nfe, dtype=torch.float64)
    inv = 1.0 / RHO_EDM
    sigmas = (sigma_mid**inv + i / (nfe - 1) * (SIGMA_MIN_EDM**inv - sigma_mid**inv)) ** RHO_EDM
    tail = torch.atan(sigmas[:-1] / sigma_data).tolist()  # Karras et al. Eq. 5, t = arctan(σ/σ_d)
    tail[0] = t_mid
    return validate_times([t_max, *tail])


# --- the adapter: raw network -> F in TrigFlow units (spec §2) -------------------------------
def _unwrap(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(getattr(out, "sample", None), Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"expected a tensor, a tuple or an object with .sample, got {type(out)!r}")


def _schedule_lookup(schedule: dict[str, Any], lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(timestep, α, σ)`` at log-SNR ``λ = log(σ/α)`` (float64): tabulated knots, linear in λ
    between them (vp), or rectified flow ``s = sigmoid(λ)`` (flow)."""
    if "knot_lambda" in schedule:
        knots = torch.tensor(schedule["knot_lambda"], dtype=torch.float64, device=lam.device)
        steps = torch.tensor(schedule["knot_timestep"], dtype=torch.float64, device=lam.device)
        log_a = torch.tensor(schedule["knot_log_alpha"], dtype=torch.float64, device=lam.device)
        lam = lam.clamp(knots[0], knots[-1])
        idx = torch.searchsorted(knots, lam.contiguous()).clamp(1, len(knots) - 1)
        w = (lam - knots[idx - 1]) / (knots[idx] - knots[idx - 1])
        alpha = torch.exp(torch.lerp(log_a[idx - 1], log_a[idx], w))
        return torch.lerp(steps[idx - 1], steps[idx], w), alpha, alpha * torch.exp(lam)
    s_min, s_max = float(schedule["s_min"]), float(schedule["s_max"])
    s = torch.sigmoid(lam.clamp(math.log(s_min / (1 - s_min)), math.log(s_max / (1 - s_max))))
    return s * float(schedule["num_train_timesteps"]), 1 - s, s


def _x0_from_prediction(pred, x_s, alpha, sigma, prediction_type: str) -> Tensor:
    """x0 from a prediction at ``x_s = α x0 + σ ε`` (v = α ε − σ x0; flow u = ε − x0)."""
    if prediction_type == "epsilon":
        return (x_s - sigma * pred) / alpha
    if prediction_type == "v_prediction":
        return (alpha * x_s - sigma * pred) / (alpha**2 + sigma**2)
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow":
        return (x_s - sigma * pred) / (alpha + sigma)
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; expected {SCHEDULE_PREDICTIONS}"
    )


def check_adapter(adapter: dict[str, Any] | None) -> dict[str, Any]:
    """The description, or ValueError when this file cannot honour it (never a silent guess)."""
    if not isinstance(adapter, dict):
        raise ValueError(
            "SCMPipeline needs its adapter description (model_index.json 'adapter'); without it "
            "the network's parameterisation is unknown. Re-export the checkpoint with scm_lightning"
        )
    if int(adapter.get("format", 0)) > ADAPTER_FORMAT:
        raise ValueError(
            f"adapter format {adapter.get('format')} is newer than this pipeline_scm.py "
            f"(format {ADAPTER_FORMAT}); load it with the pipeline_scm.py of its folder"
        )
    if adapter.get("kind") not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {adapter.get('kind')!r}; expected {ADAPTER_KINDS}")
    if not float(adapter.get("sigma_data", 0)) > 0:
        raise ValueError(f"adapter sigma_data must be > 0, got {adapter.get('sigma_data')}")
    return adapter


def trigflow_F(
    net: nn.Module,
    adapter: dict[str, Any],
    x_scaled: Tensor,
    t: Tensor,
    class_labels: Tensor | None = None,
    guidance: Tensor | None = None,
) -> Tensor:
    """``F(x_t/σ_d, t)`` of the raw ``net`` as ``adapter`` describes (module doc); ``t`` (B,)
    radians. ``guidance`` goes to a net with a native guidance input only (an embedding is
    added by a hook, see :class:`SCMGuidanceEmbedding`)."""
    kind, sd = adapter["kind"], float(adapter["sigma_data"])
    dtype = x_scaled.dtype
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kwargs: dict[str, Any] = {}
    if class_labels is not None:
        kwargs["class_labels"] = class_labels
    if adapter.get("guidance") == "native":
        kwargs["guidance"] = guidance

    def call(sample: Tensor, timestep: Tensor) -> Tensor:
        out = _unwrap(net(sample, timestep, **kwargs))
        return out[:, : sample.shape[1]] if out.shape[1] == 2 * sample.shape[1] else out

    t64 = t.to(torch.float64)
    shape = (-1,) + (1,) * (x_scaled.ndim - 1)
    if kind == "trigflow":  # c_noise = t (spec §1)
        return call(x_scaled, t.to(t_dtype))
    if kind == "edm":  # F_trig = ∓F_EDM(x_t/σ_d, ln(σ_d tan t)/4) (spec §2)
        sigma = (sd * torch.tan(t64.clamp(0.0, math.pi / 2))).clamp_min(EDM_SIGMA_FLOOR)
        sign = -1.0 if adapter.get("prediction_type", "epsilon") == "epsilon" else 1.0
        return sign * call(x_scaled, (0.25 * torch.log(sigma)).to(t_dtype))
    x_t = sd * x_scaled.to(torch.float64)
    if kind == "denoiser":  # F = (cos t·x_t − D(x_t/cos t; σ_d tan t))/(σ_d sin t) (spec §2)
        lo = math.atan(float(adapter["sigma_min"]) / sd)
        hi = math.atan(float(adapter["sigma_max"]) / sd)
        t64 = t64.clamp(lo, hi)
        cos_t, sin_t = torch.cos(t64).reshape(shape), torch.sin(t64).reshape(shape)
        denoised = call((x_t / cos_t).to(dtype), (sd * torch.tan(t64)).to(t_dtype))
        return ((cos_t * x_t - denoised.to(torch.float64)) / (sd * sin_t)).to(dtype)
    # vp / flow: SNR matching σ(s)/α(s) = c·σ_d·tan t, x_s = α·c·x_t/cos t (spec §2)
    c = float(adapter.get("data_scale", 1.0))
    t64 = t64.clamp(*adapter["t_range"])
    lam = math.log(c * sd) + torch.log(torch.tan(t64))
    timestep, alpha, sigma = _schedule_lookup(adapter["schedule"], lam)
    alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
    cos_t, sin_t = torch.cos(t64).reshape(shape), torch.sin(t64).reshape(shape)
    x_s = alpha * c * x_t / cos_t
    pred = call(x_s.to(dtype), timestep.to(t_dtype)).to(torch.float64)
    x0 = _x0_from_prediction(pred, x_s, alpha, sigma, adapter["prediction_type"]) / c
    return ((cos_t * x_t - x0) / sin_t / sd).to(dtype)  # σ_d·F = (cos t·x_t − x̂0)/sin t


class SCMGuidanceEmbedding(ModelMixin, ConfigMixin):
    """A student's learned CFG-scale input: ``Linear(posemb(input_scale·s))`` added to the
    net's time embedding (spec §2; ``scm_lightning.teachers.guidance.GuidanceEmbedding``)."""

    @register_to_config
    def __init__(self, embed_dim: int, num_channels: int = 128, input_scale: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(num_channels, embed_dim)

    def forward(self, s: Tensor) -> Tensor:
        dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
        half = self.config.num_channels // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=s.device, dtype=dtype) / half
        )
        args = (s * self.config.input_scale).to(dtype)[:, None] * freqs[None, :]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        return self.linear(feats.to(self.linear.weight.dtype))

    def attach(self, net: nn.Module, scale: Tensor) -> Any:
        """Add ``self(scale)`` to ``net``'s time embedding until the returned handle is removed."""
        emb = next((getattr(net, n) for n in TIME_EMBEDDING_NAMES if hasattr(net, n)), None)
        if not isinstance(emb, nn.Module):
            raise ValueError(f"{type(net).__name__} has no time embedding for the guidance input")
        return emb.register_forward_hook(lambda m, i, out: out + self(scale).to(out.dtype))


class SCMPipeline(DiffusionPipeline):
    """Consistency sampling with an sCM student (spec §5) on diffusers' ``SCMScheduler``.

    Components: ``unet`` (the raw network), ``scheduler`` (``SCMScheduler``) and, for a
    guidance-distilled student, ``guidance_embedding``. ``adapter`` (a JSON dict in
    ``model_index.json``, module doc) says how ``unet`` gives F.
    """

    model_cpu_offload_seq = "unet"
    _optional_components: ClassVar[list[str]] = ["guidance_embedding"]

    def __init__(
        self,
        unet: nn.Module,
        scheduler: SCMScheduler,
        guidance_embedding: nn.Module | None = None,
        adapter: dict | None = None,
    ) -> None:
        super().__init__()
        if scheduler.config.prediction_type != "trigflow":
            raise ValueError(
                "SCMPipeline needs prediction_type='trigflow', got "
                f"{scheduler.config.prediction_type!r}"
            )
        adapter = check_adapter(adapter)
        sd = float(scheduler.config.sigma_data)
        if abs(float(adapter["sigma_data"]) - sd) > 1e-12:
            raise ValueError(
                f"adapter sigma_data={adapter['sigma_data']} differs from the scheduler's {sd}"
            )
        if (adapter.get("guidance") == "embedding") != (guidance_embedding is not None):
            raise ValueError(
                f"adapter guidance={adapter.get('guidance')!r} but the guidance_embedding "
                f"component is {'missing' if guidance_embedding is None else 'present'}"
            )
        self.register_modules(unet=unet, scheduler=scheduler, guidance_embedding=guidance_embedding)
        self.register_to_config(adapter=dict(adapter))

    @property
    def adapter_config(self) -> dict[str, Any]:
        return dict(self.config.adapter)

    @property
    def sigma_data(self) -> float:
        return float(self.scheduler.config.sigma_data)

    @property
    def num_classes(self) -> int | None:
        return self.adapter_config.get("num_classes") or None

    @property
    def accepts_guidance(self) -> bool:
        return self.adapter_config.get("guidance", "none") in ("native", "embedding")

    def model_F(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """F in TrigFlow units (``x_scaled = x_t/σ_d`` (B, C, H, W), ``t`` (B,) radians)."""
        adapter = self.adapter_config
        if self.guidance_embedding is None:
            return trigflow_F(self.unet, adapter, x_scaled, t, class_labels, guidance)
        if guidance is None:
            raise ValueError("this student has a guidance input: pass guidance (B,) scales")
        handle = self.guidance_embedding.attach(self.unet, guidance)
        try:
            return trigflow_F(self.unet, adapter, x_scaled, t, class_labels, None)
        finally:
            handle.remove()

    def sampling_times(
        self,
        num_inference_steps: int,
        timesteps: Sequence[float] | Tensor | None = None,
        intermediate_timesteps: float | None = None,
        max_timesteps: float | None = None,
    ) -> list[float]:
        """Consistency times ``τ_0 > … > τ_{N−1} > 0`` (radians).

        ``timesteps``: explicit times, the N times or diffusers' N+1 list ending in 0. Otherwise
        :func:`consistency_times` with ``t_max = max_timesteps`` and ``t_mid =
        intermediate_timesteps``, by default the scheduler config's (the run's ``t_max =
        arctan(80/σ_d)``, not diffusers' 1.5708, and its ``t_mid``).
        """
        if timesteps is not None:
            ts = [
                float(v)
                for v in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)
            ]
            return validate_times(ts[:-1] if ts and ts[-1] == 0.0 else ts)
        config = self.scheduler.config
        t_max = max_timesteps if max_timesteps is not None else config.get("max_timesteps")
        t_max = math.atan(SIGMA_MAX_EDM / self.sigma_data) if t_max is None else t_max
        t_mid = intermediate_timesteps
        t_mid = config.get("intermediate_timesteps") if t_mid is None else t_mid
        t_mid = DEFAULT_T_MID if t_mid is None else t_mid
        return consistency_times(num_inference_steps, float(t_max), float(t_mid), self.sigma_data)

    def _labels(self, class_labels: Any, batch_size: int, device: torch.device) -> Tensor | None:
        num_classes = self.num_classes
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
                ``num_inference_steps`` follows from them.
            intermediate_timesteps: ``t_mid`` (default: the scheduler config's, else 1.1).
            max_timesteps: ``t_max`` (default: the scheduler config's, else arctan(80/σ_d)).
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
                "model: few-step consistency sampling of it is blurry.",
                stacklevel=2,
            )
        device = self._execution_device
        unet_dtype = next(self.unet.parameters()).dtype
        shape = (int(batch_size), self.unet.config.in_channels, *self._image_hw())
        labels = self._labels(class_labels, int(batch_size), device)
        guidance = None
        if self.accepts_guidance:
            s = 1.0 if guidance_scale is None else float(guidance_scale)
            guidance = torch.full((int(batch_size),), s, device=device)
        elif guidance_scale is not None:
            raise ValueError("guidance_scale given but this model has no guidance input")

        sd = self.sigma_data
        # Order of draws = consistency_sample: the prior first, then one z per re-noise.
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
            F = self.model_F(sample.to(unet_dtype) / sd, t, labels, guidance).float()
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
            raise ValueError("the unet config has no sample_size and the adapter no image_shape")
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
