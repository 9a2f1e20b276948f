"""The sCM objective (sCD / sCT, spec §3, Algorithm 1) and the TrigFlow diffusion loss (Eq. 4).

All losses here are pure functions of modules and tensors; the Lightning layer only calls
them. Shapes: ``x0``, ``x_t``, ``dxdt`` are ``(B, C, H, W)`` in data units; ``t`` is
``(B,)`` TrigFlow time in radians. ``model`` is a :class:`~scm_lightning.teachers.base.
TrigFlowModel`-like callable ``F = model(x_t/σ_d, t, class_labels, guidance)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scm_lightning import trigflow
from scm_lightning.jvp.compiled import compilable_jvp
from scm_lightning.jvp.fast import fast_jvp
from scm_lightning.teachers.conditioning import TextCondition
from scm_lightning.trigflow import expand_like

TrigFlowFn = Callable[..., Tensor]
StudentJVP = Callable[..., tuple[Tensor, Tensor]]  # rearranged_jvp's signature

log = logging.getLogger(__name__)

TANGENT_NORMALIZATIONS = ("norm", "clip", "none")


@dataclass(frozen=True)
class SCMLossConfig:
    """Hyperparameters of Algorithm 1 (defaults: the paper's CIFAR-10 sCD column, spec §7)."""

    sigma_data: float = 0.5
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_norm_c: float = 0.1  # c in g/(‖g‖ + c)
    spatially_invariant_norm: bool = False  # divide ‖g‖ by √D (not in the paper; off)
    prior_weighting: str = "none"  # "none" | "inv_sigma" (extra 1/(σ_d tan t); spec §3 note)
    # Ablations of §4.2's stabilisers: "norm" g/(‖g‖ + c) | "clip" g clamped elementwise to
    # [−tangent_clip, tangent_clip] (the paper's alternative) | "none" (raw g).
    tangent_normalization: str = "norm"
    tangent_clip: float = 1.0
    adaptive_weighting: bool = True  # False: w ≡ 0, the loss is ‖F_θ − F⁻ − g‖²/D
    num_intervals: int | None = None  # dsCM (spec §3b): N intervals of the EDM grid
    jvp_dtype: torch.dtype | None = None  # None: inherit run precision
    fast_jvp: bool = True  # lean conv/linear/GroupNorm forward-AD rules (jvp/fast.py)
    # One pass: the JVP's primal (with grad) is F_θ for the loss, saving the student forward.
    # Same value and gradient as two passes; used only when the JVP runs at the run precision
    # and the student has no activation checkpointing.
    reuse_primal: bool = True

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"loss.sigma_data must be > 0, got {self.sigma_data}")
        if not self.p_std > 0:
            raise ValueError(f"loss.p_std must be > 0, got {self.p_std}")
        if not self.tangent_norm_c > 0:
            raise ValueError(f"loss.tangent_norm_c (c) must be > 0, got {self.tangent_norm_c}")
        if self.prior_weighting not in ("none", "inv_sigma"):
            raise ValueError(
                f"loss.prior_weighting must be 'none' or 'inv_sigma', got {self.prior_weighting!r}"
            )
        if self.tangent_normalization not in TANGENT_NORMALIZATIONS:
            raise ValueError(
                f"loss.tangent_normalization must be one of {TANGENT_NORMALIZATIONS}, "
                f"got {self.tangent_normalization!r}"
            )
        if not self.tangent_clip > 0:
            raise ValueError(f"loss.tangent_clip must be > 0, got {self.tangent_clip}")
        if self.num_intervals is not None and not self.num_intervals >= 1:
            raise ValueError(f"loss.num_intervals must be >= 1, got {self.num_intervals}")


@dataclass
class SCMLossOutput:
    """Scalar loss plus per-step diagnostics (all detached except ``loss``)."""

    loss: Tensor
    g_norm: Tensor  # mean ‖g‖ over finite samples, before normalisation
    masked_fraction: Tensor  # fraction of samples whose g or F⁻ was non-finite
    logvar: Tensor  # mean w_φ(t)
    per_sample: Tensor  # (B,) loss terms, zero where masked


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a loss, its times and its coefficients are computed in: float32 for half
    types (fp16/bf16 autocast outputs), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def loss_precision(x: Tensor) -> Tensor:
    """``x`` in :func:`wide_dtype` (unchanged if it is float32 or float64)."""
    return x.to(wide_dtype(x.dtype))


def per_sample_sq_norm(x: Tensor) -> Tensor:
    """‖x‖² over all non-batch dimensions, ``(B, ...) -> (B,)``."""
    return x.flatten(1).pow(2).sum(1)


def has_active_dropout(module: nn.Module) -> bool:
    """True if a dropout layer with p > 0 would fire (training mode)."""
    return module.training and any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()
    )


def uses_gradient_checkpointing(module: nn.Module) -> bool:
    """True if any submodule has diffusers-style activation checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


@contextlib.contextmanager
def same_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run a block under a forked RNG seeded with ``seed`` (no-op when ``seed`` is None).

    The JVP pass and the gradient pass must draw the same dropout masks (spec §3, Dropout).
    """
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def rearranged_jvp(
    model: TrigFlowFn,
    x_t: Tensor,
    t: Tensor,
    dxdt: Tensor,
    sigma_data: float,
    class_labels: Tensor | None = None,
    guidance: Tensor | None = None,
    jvp_dtype: torch.dtype | None = None,
    fast: bool = True,
    with_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """FP16-safe JVP of F⁻ along the PF-ODE (spec §3, "JVP rearrangement", paper §5.1).

    Tangents ``(cos t·sin t·dxdt/σ_d, cos t·sin t)`` on primals ``(x_t/σ_d, t)`` give
    ``dF = cos t·sin t·dF⁻/dt`` directly, so no intermediate tangent carries the
    ``1/sin t`` or ``∂_t c_noise`` blow-up near the ends of [0, π/2].

    Runs under ``torch.no_grad`` (θ⁻ is a stop-gradient) unless ``with_grad``, in which case
    ``F`` carries the autograd graph (the primal is reused as F_θ) and ``dF`` still does not
    (with the lean rules; detach it otherwise). Call it on the raw module, never
    on a DDP/FSDP wrapper. Returns ``(F⁻, dF)`` with the shape of ``x_t``, in the JVP dtype.

    ``jvp_dtype``: None runs at the run precision (autocast, if on, stays on); float32/float64
    leave autocast and use inputs and weights of that dtype (a detached cast copy of the
    weights when they are stored otherwise); bfloat16/float16 run under autocast of that dtype.
    """
    wide = torch.float64 if torch.float64 in (x_t.dtype, jvp_dtype) else torch.float32
    t_jvp = t.to(wide)  # times and their coefficients stay float32+ (field notes, precision)
    cs = torch.cos(t_jvp) * torch.sin(t_jvp)  # Eq. 6 rearranged: cos t·sin t moved inside
    x_scaled = x_t / sigma_data
    tangent_x = expand_like(cs, x_t) * dxdt / sigma_data
    if jvp_dtype in (torch.float32, torch.float64):
        # A full-precision JVP inside a mixed-precision run: leave autocast for this pass.
        x_scaled, tangent_x = x_scaled.to(jvp_dtype), tangent_x.to(jvp_dtype)
        if isinstance(class_labels, TextCondition):  # prompt embeddings in the JVP's dtype too
            class_labels = class_labels.to(jvp_dtype)
        precision = torch.autocast(device_type=x_t.device.type, enabled=False)
    elif jvp_dtype is not None:
        precision = torch.autocast(device_type=x_t.device.type, dtype=jvp_dtype)
    else:
        x_scaled, tangent_x = x_scaled.to(x_t.dtype), tangent_x.to(x_t.dtype)
        precision = contextlib.nullcontext()

    weights = _weights_in(model, jvp_dtype) if jvp_dtype in (torch.float32, torch.float64) else None

    def f(x: Tensor, tt: Tensor) -> Tensor:
        if weights is not None:  # the run's weights are in another dtype: a cast copy (θ⁻)
            return torch.func.functional_call(model, weights, (x, tt, class_labels, guidance))
        return model(x, tt, class_labels, guidance)

    grad_mode = torch.enable_grad() if with_grad else torch.no_grad()
    with grad_mode, precision, fast_jvp() if fast else contextlib.nullcontext():
        F_minus, dF = torch.func.jvp(f, (x_scaled, t_jvp), (tangent_x, cs))
    return F_minus, dF


def _weights_in(model: TrigFlowFn, dtype: torch.dtype) -> dict[str, Tensor] | None:
    """Detached copies of ``model``'s floating parameters and buffers cast to ``dtype``.

    None when they already have that dtype (the usual case: fp32 weights, fp32 JVP).
    A full-precision JVP in a run whose weights are stored otherwise (``loss.jvp_precision=64``
    in an fp32 run, ``=32`` in a float64 run) computes with these; θ⁻ is a stop-gradient.
    """
    if not isinstance(model, nn.Module):
        return None
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    if all(not v.is_floating_point() or v.dtype == dtype for v in tensors.values()):
        return None
    return {
        name: v.detach().to(dtype) if v.is_floating_point() else v for name, v in tensors.items()
    }


def compiled_rearranged_jvp(student: nn.Module, **compile_kwargs: object) -> StudentJVP:
    """:func:`rearranged_jvp` of ``student`` traced and compiled by ``torch.compile``.

    Returns a drop-in for :func:`rearranged_jvp` (same arguments and results) for
    ``scm_loss(..., student_jvp=...)``. The student runs through ``torch.func.functional_call``
    with its parameters and buffers as graph inputs: calling the module itself inside a
    compiled ``torch.func.jvp`` trips an internal assert (torch 2.14). Dynamo cannot trace
    ``autograd.Function`` s with a custom ``jvp``, so inside the graph the lean rules of
    jvp/fast.py step aside for PyTorch's generic forward-AD formulas (Inductor fuses them;
    GroupNorm goes through :mod:`scm_lightning.jvp.compiled`) and ``JVPAttnProcessor``
    differentiates plain math attention (O(L²) memory per head).
    A no-grad pass of a student with active dropout (two passes: its masks must match the
    eager gradient pass, and compiled RNG differs) runs eagerly.
    """

    def functional_jvp(state: dict[str, Tensor], *args: object, **kwargs: object):
        def model(x: Tensor, t: Tensor, labels: Tensor | None, guidance: Tensor | None):
            return torch.func.functional_call(student, state, (x, t, labels, guidance))

        with compilable_jvp():
            return rearranged_jvp(model, *args, fast=False, **kwargs)  # type: ignore[arg-type]

    # fullgraph: a graph break inside torch.func.jvp would silently fall back to eager.
    compiled = torch.compile(functional_jvp, fullgraph=True, **compile_kwargs)  # type: ignore
    log.info(
        "compiled student JVP: the lean forward-AD rules (jvp/fast.py) and the JVP attention "
        "step aside inside the graph (Dynamo cannot trace autograd.Functions with a custom jvp); "
        "Inductor fuses the generic forward-AD formulas and differentiates math attention"
    )

    def student_jvp(
        model: TrigFlowFn,
        x_t: Tensor,
        t: Tensor,
        dxdt: Tensor,
        sigma_data: float,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
        jvp_dtype: torch.dtype | None = None,
        fast: bool = True,
        with_grad: bool = False,
    ) -> tuple[Tensor, Tensor]:
        if model is not student:
            raise ValueError("compiled_rearranged_jvp: called with a module it was not built for")
        args = (x_t, t, dxdt, sigma_data, class_labels, guidance, jvp_dtype)
        if not with_grad and has_active_dropout(student):
            return rearranged_jvp(student, *args, fast=fast, with_grad=with_grad)
        state = {**dict(student.named_parameters()), **dict(student.named_buffers())}
        return compiled(state, *args, with_grad=with_grad)

    return student_jvp


def scm_tangent(
    x_t: Tensor,
    t: Tensor,
    F_minus: Tensor,
    dF: Tensor,
    dxdt: Tensor,
    sigma_data: float,
    r: float,
) -> Tensor:
    """Rearranged tangent ``g = −cos²t·(σ_d F⁻ − dxdt) − r·(cos t·sin t·x_t + σ_d·dF)`` (Alg. 1).

    ``g`` already carries the prior weighting ``1/(σ_d tan t)`` (spec §3). Computed in float32
    or better. Shape of ``x_t``.
    """
    dtype = wide_dtype(x_t.dtype)
    tt = expand_like(t.to(dtype), x_t)
    cos, sin = torch.cos(tt), torch.sin(tt)
    F_minus, dF, dxdt, x_t = (a.to(dtype) for a in (F_minus, dF, dxdt, x_t))
    return -(cos**2) * (sigma_data * F_minus - dxdt) - r * (cos * sin * x_t + sigma_data * dF)


def normalize_tangent(
    g: Tensor, c: float, spatially_invariant: bool = False
) -> tuple[Tensor, Tensor]:
    """Tangent normalisation ``g/(‖g‖ + c)`` (§4.2); returns ``(g/(‖g‖ + c), ‖g‖)``."""
    norm = g.flatten(1).norm(dim=1)
    if spatially_invariant:
        norm = norm / g[0].numel() ** 0.5
    return g / (expand_like(norm, g) + c), norm


def condition_tangent(g: Tensor, cfg: SCMLossConfig) -> Tensor:
    """The tangent the loss regresses onto: normalised (default), clipped or raw (§4.2)."""
    if cfg.tangent_normalization == "norm":
        return normalize_tangent(g, cfg.tangent_norm_c, cfg.spatially_invariant_norm)[0]
    if cfg.tangent_normalization == "clip":
        return g.clamp(-cfg.tangent_clip, cfg.tangent_clip)
    return g


def adaptive_weighted_loss(
    residual_sq: Tensor, logvar: Tensor, num_elements: int, prior: Tensor | None = None
) -> Tensor:
    """Per-sample adaptive-weighting loss ``λ·(exp(w)/D·‖·‖² − w)`` (Alg. 1; EDM2 uncertainty).

    The prior weight λ (``(B,)``, e.g. ``1/σ``) scales the whole term, ``−w`` included: scaling
    only ``exp(w)/D·‖·‖²`` moves the optimum to ``exp(w) = D/(λ·‖·‖²)`` and w_φ cancels λ.
    This way the optimum stays ``exp(w) = D/‖·‖²`` and λ weights each sample's gradient.
    """
    per_sample = torch.exp(logvar) / num_elements * residual_sq - logvar
    return per_sample if prior is None else prior * per_sample


def scm_loss(
    student: nn.Module,
    x0: Tensor,
    cfg: SCMLossConfig,
    r: float,
    teacher: TrigFlowFn | None = None,
    class_labels: Tensor | None = None,
    guidance: Tensor | None = None,
    teacher_guidance: Callable[[Tensor, Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    student_jvp: StudentJVP = rearranged_jvp,
) -> SCMLossOutput:
    """One sCD (``teacher`` given) or sCT (``teacher=None``) loss evaluation (Algorithm 1).

    Args:
        student: the raw student module, ``F_θ = student(x_t/σ_d, t, labels, guidance)`` with a
            ``logvar(t)`` head (w_φ).
        x0: clean data ``(B, C, H, W)`` in data units.
        r: tangent warmup factor in [0, 1] (multiplies the second term of g only).
        teacher: ``F_teacher(x_t/σ_d, t, labels, guidance)`` for sCD; None for sCT.
        teacher_guidance: optional ``(x_t, t) -> dx_t/dt`` used instead of ``teacher`` (CFG).
        student_jvp: :func:`rearranged_jvp` or a drop-in (:func:`compiled_rearranged_jvp`).
    """
    sd = cfg.sigma_data
    batch = x0.shape[0]
    t = trigflow.sample_time(
        batch,
        cfg.p_mean,
        cfg.p_std,
        sd,
        generator=generator,
        device=x0.device,
        dtype=wide_dtype(x0.dtype),  # float64 runs: float64 times
    )  # Alg. 1 proposal
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * sd
    x_t = trigflow.add_noise(x0, z, t)

    with torch.no_grad():
        if teacher_guidance is not None:
            dxdt = teacher_guidance(x_t, t)
        elif teacher is not None:
            dxdt = sd * teacher(x_t / sd, t, class_labels, None)  # sCD: σ_d·F_teacher
        else:
            dxdt = trigflow.sct_velocity(x0, z, t)  # sCT: cos t·z − sin t·x0
        dxdt = dxdt.to(x0.dtype)

    seed = (
        int(torch.randint(0, 2**62, (1,), generator=generator, device=x0.device))
        if has_active_dropout(student)
        else None
    )
    # Activation checkpointing cannot be differentiated through inside the JVP (field notes):
    # a checkpointed student takes two passes, a no-grad JVP and a checkpointed forward.
    reuse = (
        cfg.reuse_primal
        and cfg.jvp_dtype is None
        and torch.is_grad_enabled()
        and not uses_gradient_checkpointing(student)
    )
    with same_rng(seed, x0.device):
        F_out, dF = student_jvp(
            student, x_t, t, dxdt, sd, class_labels, guidance, cfg.jvp_dtype, cfg.fast_jvp, reuse
        )
    F_minus, dF = F_out.detach(), dF.detach()
    g = scm_tangent(x_t, t, F_minus, dF, dxdt, sd, r)
    if reuse:
        F_theta = F_out  # F_θ and F⁻ are one forward: equal values, grad through F_θ only
    else:
        with same_rng(seed, x0.device):
            F_theta = student(x_t / sd, t, class_labels, guidance)
    return weighted_consistency_loss(student, F_theta, F_minus, g, t, cfg)


def weighted_consistency_loss(
    student: nn.Module, F_theta: Tensor, F_minus: Tensor, g: Tensor, t: Tensor, cfg: SCMLossConfig
) -> SCMLossOutput:
    """The loss of Alg. 1 from a raw tangent ``g``: condition it, mask non-finite samples, then
    ``λ·(exp(w)/D·‖F_θ − F⁻ − g‖² − w)``; shared by sCD/sCT and dsCM (spec §3, §3b).

    ``F_theta`` carries the gradient; ``F_minus`` and ``g`` are stop-gradient; shapes
    ``(B, C, H, W)``; ``t`` ``(B,)`` radians.
    """
    sd, batch = cfg.sigma_data, F_theta.shape[0]
    g_raw_norm = g.flatten(1).norm(dim=1)
    g = condition_tangent(g, cfg)

    # Non-finite teacher velocity, F⁻ or tangent for a sample: drop it from this step (spec §3).
    finite = torch.isfinite(g).flatten(1).all(1) & torch.isfinite(F_minus).flatten(1).all(1)
    g = torch.where(expand_like(finite, g), g, torch.zeros_like(g))
    F_minus = torch.where(expand_like(finite, F_minus), F_minus, torch.zeros_like(F_minus))

    if cfg.adaptive_weighting:
        logvar = loss_precision(student.logvar(t))
    else:  # ablation: w ≡ 0, the head is never called
        logvar = torch.zeros(batch, device=F_theta.device)
    target = (F_minus.to(g.dtype) + g).detach()
    # where() (not a product) so a masked sample's inf/nan cannot leak into the gradient.
    diff = torch.where(expand_like(finite, g), F_theta.to(g.dtype) - target, 0.0)
    residual_sq = per_sample_sq_norm(diff)
    prior = 1.0 / (sd * torch.tan(t.to(g.dtype))) if cfg.prior_weighting == "inv_sigma" else None
    per_sample = adaptive_weighted_loss(residual_sq, logvar, F_theta[0].numel(), prior)
    per_sample = torch.where(finite, per_sample, torch.zeros_like(per_sample))
    count = finite.sum()
    loss = per_sample.sum() / count.clamp(min=1)
    with torch.no_grad():
        g_norm = (g_raw_norm * finite).sum() / count.clamp(min=1)
    return SCMLossOutput(
        loss=loss,
        g_norm=g_norm,
        masked_fraction=1.0 - count.float() / batch,
        logvar=logvar.detach().mean(),
        per_sample=per_sample.detach(),
    )


def dscm_tangent(
    x_t: Tensor,
    t: Tensor,
    t_prev: Tensor,
    F_minus: Tensor,
    F_minus_prev: Tensor,
    dxdt: Tensor,
    sigma_data: float,
    r: float,
) -> Tensor:
    """dsCM's finite-difference tangent ``g = cos t·Δ`` (App. E, spec §3b).

    ``Δ = −cos t'·(σ_d F⁻ − dxdt) − r·sin t'·(x_t + σ_d·[cos(t−t')·F⁻ − F⁻']/sin(t−t'))``,
    the difference quotient ``(f⁻(x_t,t) − f⁻(x_{t'},t'))/sin(t−t')`` split like Eq. 6.
    ``F_minus = F⁻(x_t/σ_d, t)``, ``F_minus_prev = F⁻(x_{t'}/σ_d, t')`` with ``x_{t'}`` the
    teacher's DDIM step, ``dxdt = σ_d·F_teacher(x_t/σ_d, t)`` (data units); ``t > t_prev``
    ``(B,)`` radians. Tends to :func:`scm_tangent` as t' → t. Float32 or better.
    """
    dtype = wide_dtype(x_t.dtype)
    t64, tp64 = t.to(torch.float64), t_prev.to(torch.float64)
    # Coefficients in float64: t − t' is tiny on fine grids (N = 1024 near σ_min).
    cos_t, cos_tp, sin_tp = (
        expand_like(c.to(dtype), x_t) for c in (t64.cos(), tp64.cos(), tp64.sin())
    )
    cos_d, sin_d = (expand_like(c.to(dtype), x_t) for c in ((t64 - tp64).cos(), (t64 - tp64).sin()))
    F_minus, F_minus_prev, dxdt, x_t = (a.to(dtype) for a in (F_minus, F_minus_prev, dxdt, x_t))
    difference = sigma_data * (cos_d * F_minus - F_minus_prev) / sin_d
    delta = -cos_tp * (sigma_data * F_minus - dxdt) - r * sin_tp * (x_t + difference)
    return cos_t * delta


def dscm_loss(
    student: nn.Module,
    x0: Tensor,
    cfg: SCMLossConfig,
    r: float,
    teacher: TrigFlowFn,
    class_labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SCMLossOutput:
    """One discrete-time sCM (dsCM) loss evaluation, spec §3b (App. E).

    ``t = t_i`` with i drawn from the proposal discretised onto the ``cfg.num_intervals``
    grid, ``x_{t'}`` one teacher DDIM step to ``t' = t_{i−1}``, the finite-difference tangent
    (:func:`dscm_tangent`), then the normalisation and adaptive weighting of sCD. ``x0``
    ``(B, C, H, W)`` data units; ``r`` tangent warmup factor.
    """
    if cfg.num_intervals is None:
        raise ValueError("dsCM needs loss.num_intervals (the number N of grid intervals)")
    sd, batch = cfg.sigma_data, x0.shape[0]
    grid = trigflow.dscm_time_grid(cfg.num_intervals, sd).to(x0.device)
    draw = trigflow.sample_time(
        batch, cfg.p_mean, cfg.p_std, sd, generator=generator, device=x0.device, dtype=torch.float64
    )  # Alg. 1 proposal, then onto the grid
    i = trigflow.sample_grid_index(draw, grid)
    t64, t_prev64 = grid[i], grid[i - 1]
    t, t_prev = t64.to(wide_dtype(x0.dtype)), t_prev64.to(wide_dtype(x0.dtype))
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * sd
    x_t = trigflow.add_noise(x0, z, t64).to(x0.dtype)

    with torch.no_grad():
        F_teacher = teacher(x_t / sd, t, class_labels, None)
        dxdt = (sd * F_teacher).to(x0.dtype)
        x_prev = trigflow.ddim_step(x_t, t64, t_prev64, F_teacher, sd).to(x0.dtype)

    seed = (
        int(torch.randint(0, 2**62, (1,), generator=generator, device=x0.device))
        if has_active_dropout(student)
        else None
    )
    with same_rng(seed, x0.device):  # F_θ (with grad; F⁻ is its value) and F⁻' share masks
        F_theta = student(x_t / sd, t, class_labels, None)
    with torch.no_grad(), same_rng(seed, x0.device):
        F_minus_prev = student(x_prev / sd, t_prev, class_labels, None)
    F_minus = F_theta.detach()
    g = dscm_tangent(x_t, t64, t_prev64, F_minus, F_minus_prev, dxdt, sd, r)
    return weighted_consistency_loss(student, F_theta, F_minus, g, t, cfg)


def diffusion_loss(
    model: nn.Module,
    x0: Tensor,
    sigma_data: float,
    p_mean: float,
    p_std: float,
    class_labels: Tensor | None = None,
    logvar: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TrigFlow diffusion loss ``E[w(t)·‖σ_d F(x_t/σ_d, t) − v_t‖²]`` (Eq. 4), adaptively weighted.

    The residual is measured in TrigFlow units, ``‖F − v_t/σ_d‖²``; with ``logvar`` (w_φ) the
    per-sample loss is ``exp(w)/D·‖·‖² − w``, otherwise the plain mean squared error.
    """
    batch = x0.shape[0]
    t = trigflow.sample_time(
        batch,
        p_mean,
        p_std,
        sigma_data,
        generator=generator,
        device=x0.device,
        dtype=wide_dtype(x0.dtype),  # float64 runs: float64 times
    )
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * sigma_data
    x_t = trigflow.add_noise(x0, z, t)
    v_t = trigflow.velocity_target(x0, z, t)
    F = model(x_t / sigma_data, t, class_labels, None)
    residual_sq = per_sample_sq_norm(loss_precision(F) - loss_precision(v_t) / sigma_data)
    if logvar is None:
        return residual_sq.mean() / x0[0].numel()
    w = loss_precision(logvar(t))
    return adaptive_weighted_loss(residual_sq, w, x0[0].numel()).mean()


# --- Adaptive VSD and sCD + VSD (spec §3c; paper §5.2, App. C) -----------------------------


@dataclass(frozen=True)
class VSDLossConfig:
    """Hyperparameters of the adaptive VSD generator loss and the fake-score loss (spec §3c).

    The time proposal ``log(σ_d tan t) ~ N(p_mean, p_std²)`` is the paper's N(0.4, 2.0²); the
    spec is silent on the fake score's proposal, so its §1 diffusion loss draws t from the same.
    The generator is the 1-step student at ``t_max = arctan(sigma_max/σ_d)`` (spec §5).
    """

    sigma_data: float = 0.5
    p_mean: float = 0.4
    p_std: float = 2.0
    sigma_max: float = 80.0

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"loss.sigma_data must be > 0, got {self.sigma_data}")
        if not self.p_std > 0:
            raise ValueError(f"loss.vsd_p_std must be > 0, got {self.p_std}")
        if not self.sigma_max > 0:
            raise ValueError(f"loss.vsd_sigma_max must be > 0, got {self.sigma_max}")

    @property
    def t_max(self) -> float:
        return trigflow.t_max_from_sigma_max(self.sigma_max, self.sigma_data)


@dataclass
class VSDLossOutput:
    """The generator loss plus diagnostics (all detached except ``loss``)."""

    loss: Tensor
    samples: Tensor  # g_θ(z') (B, C, H, W), detached: the fake score's training data
    score_gap: Tensor  # mean ‖F_teacher − F_φ‖²/D over finite samples (the VSD residual)
    masked_fraction: Tensor  # fraction of samples whose F_teacher − F_φ was non-finite
    logvar: Tensor  # mean w_ψ(t)
    per_sample: Tensor  # (B,) loss terms, zero where masked


def one_step_generate(
    student: TrigFlowFn,
    prior: Tensor,
    t_max: float,
    sigma_data: float,
    class_labels: Tensor | None = None,
) -> Tensor:
    """The 1-step generator ``g_θ(z') = f_θ(z', t_max)`` (spec §3c, Eq. 5), with autograd.

    ``prior`` is ``z' ~ N(0, σ_d² I)`` ``(B, C, H, W)`` in data units; returns ``(B, C, H, W)``
    in data units: ``cos t_max·z' − sin t_max·σ_d·F_θ(z'/σ_d, t_max)``.
    """
    dtype = wide_dtype(prior.dtype)  # times stay float32 or better
    t = torch.full((prior.shape[0],), t_max, device=prior.device, dtype=dtype)
    F = student(prior / sigma_data, t, class_labels, None)
    return trigflow.consistency_function(prior, t, F, sigma_data).to(prior.dtype)


def vsd_generator_loss(
    student: TrigFlowFn,
    teacher: TrigFlowFn,
    fake_score: TrigFlowFn,
    logvar: Callable[[Tensor], Tensor],
    prior: Tensor,
    cfg: VSDLossConfig,
    class_labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> VSDLossOutput:
    """Adaptive VSD generator loss (spec §3c), one Monte-Carlo sample per generated image:

    ``L = E[exp(w_ψ(t))/D·‖g_θ(z') − g_θ⁻(z') + F_teacher(x_t/σ_d,t) − F_φ(x_t/σ_d,t)‖² − w_ψ(t)]``

    with ``x_t = cos t·g_θ⁻(z') + sin t·z``, ``z ~ N(0, σ_d² I)``, ``log(σ_d tan t) ~
    N(p_mean, p_std²)``. ``F_teacher`` and ``F_φ`` are evaluated without gradient (the frozen
    teacher; φ trains on its own loss), so θ enters only through ``g_θ``; ``w_ψ`` is ``logvar``.

    Gradient direction. The residual's value is ``Δ = F_teacher − F_φ`` (``g_θ − g_θ⁻ = 0``), so
    ``∇_θ L = 2·exp(w)/D·Δᵀ ∂g_θ/∂θ`` and a descent step moves ``g_θ`` along ``−Δ``. In TrigFlow
    units the denoiser is ``D(x_t) = cos t·x_t − sin t·σ_d·F`` and the score of ``p_t`` is
    ``∇log p_t(x_t) = (cos t·D − x_t)/(σ_d² sin²t) = −(sin t·x_t + cos t·σ_d·F)/(σ_d² sin t)``.
    Hence ``s_teacher − s_φ = −cos t/(σ_d sin t)·Δ``: ``−Δ`` is a positive multiple of the
    teacher's score minus the fake score, the VSD direction that lowers
    ``KL(p_θ,t ‖ p_teacher,t)`` (``∂x_t/∂g = cos t > 0``). Equivalently ``D_teacher − D_φ =
    −sin t·σ_d·Δ``: the sample moves toward the teacher's denoised estimate. ``g`` is in data
    units and F in TrigFlow units as the spec writes it; ``exp(w_ψ)`` absorbs any scale.

    Args:
        student: ``F_θ`` (the raw student module, with grad).
        teacher, fake_score: ``F(x_t/σ_d, t, labels, guidance)`` modules of the same shape.
        logvar: ``w_ψ(t)``, ``(B,) -> (B,)``.
        prior: ``z' ~ N(0, σ_d² I)`` ``(B, C, H, W)``.
    """
    sd = cfg.sigma_data
    wide = wide_dtype(prior.dtype)  # t, Δ and the loss: float32 or better
    samples = one_step_generate(student, prior, cfg.t_max, sd, class_labels)
    batch = prior.shape[0]
    t = trigflow.sample_time(
        batch, cfg.p_mean, cfg.p_std, sd, generator=generator, device=prior.device, dtype=wide
    )  # log(σ_d tan t) ~ N(0.4, 2.0²) (§3c)
    z = torch.randn(prior.shape, generator=generator, device=prior.device, dtype=prior.dtype) * sd
    with torch.no_grad():
        x_t = trigflow.add_noise(samples.detach(), z, t)
        score_gap = teacher(x_t / sd, t, class_labels, None).to(wide) - fake_score(
            x_t / sd, t, class_labels, None
        ).to(wide)  # Δ = F_teacher − F_φ
    finite = torch.isfinite(score_gap).flatten(1).all(1)
    score_gap = torch.where(expand_like(finite, score_gap), score_gap, 0.0)
    # g_θ − g_θ⁻ + Δ: the value is Δ, the gradient flows through g_θ only (§3c).
    residual = samples.to(wide) - (samples.detach().to(wide) - score_gap)
    residual = torch.where(expand_like(finite, residual), residual, 0.0)
    w = logvar(t).to(wide)
    num_elements = prior[0].numel()
    per_sample = adaptive_weighted_loss(per_sample_sq_norm(residual), w, num_elements)
    per_sample = torch.where(finite, per_sample, torch.zeros_like(per_sample))
    count = finite.sum()
    loss = per_sample.sum() / count.clamp(min=1)
    with torch.no_grad():
        gap = (per_sample_sq_norm(score_gap) / num_elements * finite).sum() / count.clamp(min=1)
    return VSDLossOutput(
        loss=loss,
        samples=samples.detach(),
        score_gap=gap,
        masked_fraction=1.0 - count.float() / batch,
        logvar=w.detach().mean(),
        per_sample=per_sample.detach(),
    )


def fake_score_loss(
    fake_score: nn.Module,
    samples: Tensor,
    cfg: VSDLossConfig,
    class_labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The fake score's §1 diffusion loss on the generator's samples, ``x0 = sg(g_θ(z'))``.

    ``E‖σ_d F_φ(x_t/σ_d, t) − v_t‖²`` (Eq. 4, unweighted; measured as :func:`diffusion_loss`
    does, in TrigFlow units per element, a constant factor ``1/(σ_d² D)``). The samples are
    detached, so the gradient reaches φ only.
    """
    return diffusion_loss(
        fake_score,
        samples.detach(),
        cfg.sigma_data,
        cfg.p_mean,
        cfg.p_std,
        class_labels=class_labels,
        generator=generator,
    )
