"""LightningModules: sCD/sCT distillation and TrigFlow diffusion training (thin glue).

The math lives in :mod:`scm_lightning.losses`, :mod:`scm_lightning.trigflow` and
:mod:`scm_lightning.sampling`; these classes own the modules, the optimiser, logging and
checkpoint contents.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from scm_lightning import sampling
from scm_lightning.losses import (
    SCMLossConfig,
    SCMLossOutput,
    StudentJVP,
    VSDLossConfig,
    compiled_rearranged_jvp,
    diffusion_loss,
    dscm_loss,
    fake_score_loss,
    rearranged_jvp,
    scm_loss,
    vsd_generator_loss,
)
from scm_lightning.nets.weighting import LogVarHead
from scm_lightning.student import Student
from scm_lightning.teachers.base import TrigFlowModel
from scm_lightning.teachers.conditioning import Condition, TextCondition, where_condition

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]

TEACHER_PREFIX = "teacher."
STUDENT_RECORD = "scm_student"  # checkpoint key: teachers.description.describe_network


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """An RNG keyed by (seed, global step, rank): a step's noise never depends on history.

    This is what makes an interrupted-and-resumed run bit-identical to an uninterrupted one.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 1009 + rank)
    return gen


def nonfinite_grad_count(module: nn.Module) -> int:
    """Number of parameters whose gradient holds an inf or nan."""
    return sum(
        int(not torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None
    )


class _TrigFlowModule(L.LightningModule):
    """Shared plumbing: optimiser from a factory, image shape, sampling, step RNG, fault skip."""

    def __init__(
        self,
        image_shape: Sequence[int],
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None,
        seed: int,
        max_bad_steps: int,
    ) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.seed = int(seed)
        self.max_bad_steps = int(max_bad_steps)
        self.bad_steps_in_a_row = 0
        self.last_step_skipped = False
        self.unusable_batch: Tensor | None = None  # set by training_step: every sample masked
        # The resolved run config (a plain dict) travels in every checkpoint so that
        # `sample`, `evaluate`, `export` and a resume can rebuild the module from it alone.
        self.run_config: dict[str, Any] | None = None
        # data.latent: the VAE and per-channel latent statistics (latents.LatentCodec); its
        # statistics buffers travel in checkpoints. None: the model works on pixels.
        self.latent_codec: nn.Module | None = None

    def decode(self, samples: Tensor) -> Tensor:
        """Samples -> images: the one hook every image-producing path (sample grids, FID, the
        final evaluation, ``sample``/``evaluate``) goes through via :meth:`sample`. Latents
        are decoded by the VAE; pixel samples pass unchanged."""
        return samples if self.latent_codec is None else self.latent_codec.decode(samples)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["scm_config"] = self.run_config
        checkpoint["scm_image_shape"] = list(self.image_shape)  # checked on resume

    # The trainable part (student or diffusion model) lives in `self.student` for both modules
    # so that EMA, FID, export and sampling treat them alike.
    student: nn.Module
    # FSDP2 settings (trainer=fsdp; set by training.py from `trainer.fsdp`): shard the frozen
    # teacher too (saves memory) or keep a full replica on every rank (no per-step gathers).
    shard_teacher: bool = False
    fsdp_min_block_params: int = 1
    fsdp_reshard_after_forward: bool = True

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy``: ``fully_shard`` the student's blocks,
        its separately called ``logvar`` head and the student root on the data-parallel mesh.

        A no-op under every other strategy. Without it, ModelParallelStrategy would train
        unsynchronised replicas (see :mod:`scm_lightning.fsdp`).
        """
        from lightning.pytorch.strategies import ModelParallelStrategy

        trainer = self._trainer
        if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
            return
        from scm_lightning.fsdp import shard_model

        mesh = self.device_mesh["data_parallel"]
        kwargs = {
            "min_params": self.fsdp_min_block_params,
            "reshard_after_forward": self.fsdp_reshard_after_forward,
        }
        extra = [getattr(self.student, "logvar", None), getattr(self, "logvar", None)]
        shard_model(self.student, mesh, extra_units=extra, **kwargs)
        teacher = getattr(self, "teacher", None)
        if self.shard_teacher and isinstance(teacher, nn.Module):
            shard_model(teacher, mesh, **kwargs)

    def enable_gradient_checkpointing(self) -> int:
        """Activation checkpointing of the student's blocks for the gradient pass.

        Applies to every submodule that supports it (diffusers-style
        ``enable_gradient_checkpointing``). ``scm_loss`` then takes two passes (no-grad JVP,
        checkpointed forward) instead of reusing the JVP's primal. Returns how many modules
        were switched; 0 raises ValueError.
        """
        count = 0
        for m in self.student.modules():
            if getattr(m, "_supports_gradient_checkpointing", False) and hasattr(
                m, "enable_gradient_checkpointing"
            ):
                m.enable_gradient_checkpointing()
                count += 1
        if count == 0:
            raise ValueError(
                "student.gradient_checkpointing=true but the student's network "
                f"({type(self.student).__name__}) has no enable_gradient_checkpointing()"
            )
        return count

    def configure_optimizers(self) -> Any:
        # Everything trainable: the student (with its w_φ head) or the diffusion model and its
        # w_φ; the frozen teacher has requires_grad off.
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def step_rng(self, device: torch.device, batch_idx: int = 0) -> torch.Generator:
        """The noise RNG of this micro-batch, keyed by (seed, optimizer step, slot).

        ``slot = micro·W + rank`` with ``micro`` the micro-batch inside gradient accumulation:
        every micro-batch of a step draws fresh noise, and a run with W ranks × A micro-batches
        draws exactly what one process with W·A micro-batches draws (``EpochShuffleSampler``
        hands it the same images), whatever the number of devices.
        """
        trainer = self._trainer
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        world = int(trainer.world_size) if trainer is not None else 1
        slot = (batch_idx % accumulate) * world + self.global_rank
        return step_generator(self.seed, self.global_step, slot, device)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        from scm_lightning.fsdp import full_norm

        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # Sharded (FSDP2) gradients: each norm is all-reduced, so every rank takes the same
        # skip decision below.
        grad_norm = torch.linalg.vector_norm(
            torch.stack([full_norm(torch.linalg.vector_norm(g.float())) for g in grads])
            if grads
            else torch.zeros(1, device=self.device)
        )
        self.log("train/grad_norm", grad_norm, on_step=True, prog_bar=False)
        # A non-finite gradient must not reach the weights (or the EMA): drop it, count it.
        # So must a batch whose every sample was masked: its gradient is zero, but Adam's
        # momentum would still move the weights.
        bad = ~torch.isfinite(grad_norm)
        if self.unusable_batch is not None:
            bad = bad | self.unusable_batch.to(bad.device)
            self.unusable_batch = None
        skipped = bool(bad)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # one decision for all ranks
            skipped = bool(trainer.strategy.reduce_boolean_decision(skipped, all=False))
        self.last_step_skipped = skipped
        if self.last_step_skipped:
            optimizer.zero_grad(set_to_none=True)
            self.bad_steps_in_a_row += 1
        else:
            self.bad_steps_in_a_row = 0
        self.log("train/skipped_steps_in_a_row", float(self.bad_steps_in_a_row), on_step=True)
        if self.max_bad_steps and self.bad_steps_in_a_row >= self.max_bad_steps:
            from scm_lightning.checkpointing import divergence_message

            raise FloatingPointError(
                divergence_message(
                    self.bad_steps_in_a_row, self.max_bad_steps, self.global_step, trainer
                )
            )

    @contextlib.contextmanager
    def student_in_eval(self) -> Iterator[None]:
        """Sample with the student in eval mode and put its previous mode back afterwards."""
        was_training = self.student.training
        self.student.eval()
        try:
            yield
        finally:
            self.student.train(was_training)

    @torch.no_grad()
    def noise(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Prior sample ``σ_d·n`` of shape ``(N, *image_shape)`` (spec §5).

        In the module's dtype: float64 under ``trainer.precision=64-true``, whose plugin sets
        the default dtype only around the training and validation steps, not for sampling.
        """
        sd = self.student.sigma_data
        return sd * torch.randn(
            (num_samples, *self.image_shape),
            generator=generator,
            device=self.device,
            dtype=self.dtype,
        )


class DistillationModule(_TrigFlowModule):
    """sCD (teacher velocity) or sCT (data velocity) consistency training, spec §3.

    Args:
        teacher: frozen TrigFlow teacher (not saved in checkpoints; rebuilt from its source).
        image_shape: ``(C, H, W)`` of one sample.
        loss: :class:`SCMLossConfig` fields.
        mode: ``"scd"``, ``"sct"`` or ``"dscm"`` (discrete-time, spec §3b; ``loss.num_intervals``).
        student_guidance_embedding: give the student a zero-initialised CFG-scale input.
        guidance_scale_range: ``(s_min, s_max)`` for CFG distillation (``s ~ U``), or None.
        uncond_label: the teacher's null class (the unconditional branch of CFG).
        uncond_condition: a text-conditioned teacher's null prompt (a 1-row TextCondition:
            the empty/negative prompt's embedding), CFG's unconditional branch.
        logvar_channels: width of w_φ(t)'s positional features.
        eval_guidance: the scale s a guidance-conditioned student samples with when a caller
            gives none (FID, sample grids, final evaluation; ``eval.guidance``, default 1).
        student_dropout: rate of every dropout layer of the student (the teacher's is ignored).
    """

    def __init__(
        self,
        teacher: TrigFlowModel,
        image_shape: Sequence[int],
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        loss: dict[str, Any] | SCMLossConfig | None = None,
        mode: str = "scd",
        student_guidance_embedding: bool = False,
        guidance_scale_range: Sequence[float] | None = None,
        uncond_label: int | None = None,
        logvar_channels: int = 128,
        t_mid: float = 1.1,
        seed: int = 0,
        max_bad_steps: int = 20,
        jvp_attention: bool = True,
        eval_guidance: float = 1.0,
        student_dropout: float = 0.0,
        uncond_condition: TextCondition | None = None,
    ) -> None:
        super().__init__(image_shape, optimizer, lr_scheduler, seed, max_bad_steps)
        if mode not in ("scd", "sct", "dscm"):
            raise ValueError(f"mode must be 'scd', 'sct' or 'dscm', got {mode!r}")
        self.mode = mode
        self.loss_cfg = loss if isinstance(loss, SCMLossConfig) else SCMLossConfig(**(loss or {}))
        if abs(self.loss_cfg.sigma_data - teacher.sigma_data) > 1e-12:
            raise ValueError(
                f"loss.sigma_data={self.loss_cfg.sigma_data} disagrees with the teacher's "
                f"sigma_data={teacher.sigma_data}"
            )
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = Student.from_teacher(
            teacher,
            guidance_embedding=student_guidance_embedding,
            logvar_channels=logvar_channels,
            dropout=student_dropout,
        )
        if not self.loss_cfg.adaptive_weighting:  # w ≡ 0: the head is frozen, never optimised
            self.student.logvar.requires_grad_(False)  # (and DDP sees no unused parameter)
        if jvp_attention:
            # Flash-style attention with an O(L) forward-mode rule for the student's JVP pass;
            # same architecture and weights, fused SDPA when no tangent is present (jvp/).
            from scm_lightning.jvp.install import install_jvp_attention

            install_jvp_attention(self.student)
        self.guidance_scale_range = tuple(guidance_scale_range) if guidance_scale_range else None
        self.uncond_label = uncond_label
        self.uncond_condition = uncond_condition
        if self.guidance_scale_range is not None and teacher.text_embed_dim is not None:
            if uncond_condition is None:
                raise ValueError(
                    f"CFG distillation (guidance_scale_range={list(self.guidance_scale_range)}) "
                    "of a text-conditioned teacher needs the null prompt's embedding "
                    "(data=text_pairs: null.safetensors)"
                )
        elif self.guidance_scale_range is not None:
            classes = teacher.num_classes
            if not classes or uncond_label is None or not 0 <= uncond_label <= classes:
                raise ValueError(
                    f"CFG distillation (guidance_scale_range={list(self.guidance_scale_range)}) "
                    f"needs a class-conditional teacher and its null label: got uncond_label="
                    f"{uncond_label} for a teacher with num_classes={classes} (expected "
                    "0 <= uncond_label <= num_classes)"
                )
        self.eval_guidance = float(eval_guidance)
        self.t_mid = float(t_mid)
        self.tangent_warmup_r = 1.0  # set each step by the TangentWarmup callback
        self.student_jvp: StudentJVP = rearranged_jvp  # compile_step() swaps in a compiled one
        self._register_teacher_state_hooks()

    @property
    def null_condition(self) -> int | TextCondition | None:
        """CFG's unconditional branch: the null prompt (text teachers) or the null class."""
        return self.uncond_condition if self.teacher.text_embed_dim else self.uncond_label

    def compile_step(self, backend: str = "inductor") -> None:
        """``trainer.compile``: torch.compile the student's JVP pass and the teacher's forward.

        The student module itself stays uncompiled (sampling, EMA, export and checkpoints see
        the same module and state-dict keys); the teacher is compiled in place.
        """
        self.student_jvp = compiled_rearranged_jvp(self.student, backend=backend)
        self.teacher.compile(backend=backend)

    # -- the frozen teacher never trains and never lands in a checkpoint ------------------
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teacher.eval()
        return self

    def _register_teacher_state_hooks(self) -> None:
        """Keep the teacher out of ``state_dict()`` itself and refill it on load.

        Every strategy then sees a teacher-free module state: Lightning's FSDP2 resume loads a
        distributed checkpoint into exactly the keys ``state_dict()`` lists, so stripping the
        teacher only in ``on_save_checkpoint`` would leave it "missing" there.
        """

        def drop(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
            for key in [k for k in state if k.startswith(prefix + TEACHER_PREFIX)]:
                del state[key]

        def refill(state: dict[str, Any], prefix: str, *args: Any) -> None:
            for key, value in self.teacher.state_dict().items():
                state.setdefault(prefix + TEACHER_PREFIX + key, value)

        self.register_state_dict_post_hook(drop)
        self._register_load_state_dict_pre_hook(refill)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        # The student's architecture and adapter, so `sample`/`export` rebuild it without the
        # teacher (absent for nets without a diffusers config: those rebuild the teacher).
        from scm_lightning.teachers.description import describe_network

        record = describe_network(self.student.net)
        if record is not None:
            checkpoint[STUDENT_RECORD] = record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.teacher.state_dict().items():
            state.setdefault(TEACHER_PREFIX + key, value)

    # -- training -----------------------------------------------------------------------
    def _guidance(self, batch_size: int, generator: torch.Generator) -> Tensor | None:
        if self.guidance_scale_range is None:
            return None
        lo, hi = self.guidance_scale_range
        u = torch.rand(batch_size, generator=generator, device=self.device)
        return lo + (hi - lo) * u  # s ~ U[s_min, s_max] per sample (App. G.2)

    def _guided_teacher_velocity(
        self, class_labels: Tensor | None, guidance: Tensor | None
    ) -> Callable[[Tensor, Tensor], Tensor] | None:
        """sCD with CFG: the teacher's guided velocity at the drawn scales, else None."""
        if self.mode != "scd" or guidance is None:
            return None
        from scm_lightning.teachers.guidance import guided_velocity

        def teacher_velocity(x_t: Tensor, t: Tensor) -> Tensor:
            null = self.null_condition
            return guided_velocity(self.teacher, x_t, t, class_labels, guidance, null)

        return teacher_velocity

    def _loss(
        self,
        x0: Tensor,
        r: float,
        class_labels: Tensor | None,
        guidance: Tensor | None,
        teacher_velocity: Callable[[Tensor, Tensor], Tensor] | None,
        gen: torch.Generator,
    ) -> SCMLossOutput:
        """This module's objective: dsCM (spec §3b) or sCD/sCT (Algorithm 1)."""
        if self.mode == "dscm":
            return dscm_loss(self.student, x0, self.loss_cfg, r, self.teacher, class_labels, gen)
        return scm_loss(
            self.student,
            x0,
            self.loss_cfg,
            r=r,
            teacher=self.teacher if self.mode == "scd" else None,
            class_labels=class_labels,
            guidance=guidance,
            teacher_guidance=teacher_velocity,
            generator=gen,
            student_jvp=self.student_jvp,
        )

    @property
    def student_takes_guidance(self) -> bool:
        """Whether the student's network has a CFG-scale input (it then needs an s per call)."""
        return bool(getattr(self.student.net, "accepts_guidance", False))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        gen = self.step_rng(x0.device, batch_idx)
        class_labels = labels if self.student.conditional else None
        guidance = self._guidance(x0.shape[0], gen)
        teacher_velocity = self._guided_teacher_velocity(class_labels, guidance)
        out = self._loss(x0, self.tangent_warmup_r, class_labels, guidance, teacher_velocity, gen)
        self.log_dict(
            {
                "train/loss": out.loss.detach(),
                "train/g_norm": out.g_norm,
                "train/r": float(self.tangent_warmup_r),
                "train/masked_fraction": out.masked_fraction,
                "train/logvar": out.logvar,
            },
            on_step=True,
            prog_bar=False,
        )
        self.log("loss", out.loss.detach(), prog_bar=True, logger=False)
        all_masked = out.masked_fraction >= 1  # tensor: no device sync here
        prev = self.unusable_batch  # OR over accumulated micro-batches
        self.unusable_batch = all_masked if prev is None else prev | all_masked
        return out.loss  # a non-finite loss gives non-finite grads: on_before_optimizer_step skips

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, labels = batch
        gen = step_generator(self.seed, batch_idx, self.global_rank, x0.device)
        class_labels = labels if self.student.conditional else None
        guidance = self._guidance(x0.shape[0], gen)  # s drawn as in training
        with torch.no_grad():
            teacher_velocity = self._guided_teacher_velocity(class_labels, guidance)
            out = self._loss(x0, 1.0, class_labels, guidance, teacher_velocity, gen)
        self.log("val/loss", out.loss, sync_dist=True, prog_bar=True)

    # -- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        nfe: int = 1,
        generator: torch.Generator | None = None,
        t_mid: float | None = None,
        class_labels: Tensor | None = None,
        guidance: float | None = None,
        times: Sequence[float] | None = None,
    ) -> Tensor:
        """Consistency samples ``(N, C, H, W)`` in data units from the student's current weights
        (decoded to images for a latent model, :meth:`decode`).

        A guidance-conditioned student samples at ``guidance`` (s), by default
        ``eval_guidance``; ``class_labels`` ``(N,)`` for a class-conditional one.
        """
        sd = self.student.sigma_data
        if times is None:
            t_mid = self.t_mid if t_mid is None else t_mid
            times = sampling.consistency_times(nfe, t_mid=t_mid, sigma_data=sd)
        if guidance is None and self.student_takes_guidance:
            guidance = self.eval_guidance
        g = None
        if guidance is not None:
            g = torch.full((num_samples,), float(guidance), device=self.device)
        with self.student_in_eval():
            return self.decode(
                sampling.consistency_sample(
                    self.student,
                    self.noise(num_samples, generator),
                    times,
                    sd,
                    class_labels=class_labels,
                    guidance=g,
                    generator=generator,
                )
            )

    @torch.no_grad()
    def teacher_sample(
        self,
        num_samples: int,
        nfe: int = 35,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
        grid: str = "edm",
        guidance: float | None = None,
    ) -> Tensor:
        """Teacher PF-ODE samples: Heun when ``nfe`` is odd (2·steps − 1), else Euler/DDIM,
        on the time grid ``grid`` (:data:`sampling.TEACHER_GRIDS`).

        After CFG distillation the reference is the teacher guided at the scale the student
        is evaluated at (``guidance``, default ``eval_guidance``); s = 1 is the plain
        conditional teacher.
        """
        teacher: Any = self.teacher
        if self.guidance_scale_range is not None:
            s = self.eval_guidance if guidance is None else float(guidance)
            if s != 1.0:
                from scm_lightning.teachers.guidance import GuidedTeacher

                teacher = GuidedTeacher(self.teacher, s, self.null_condition)
        return self.decode(
            sampling.teacher_sample(
                teacher,
                self.noise(num_samples, generator),
                self.teacher.sigma_data,
                nfe,
                class_labels,
                grid=grid,
                t_mid=self.t_mid,
            )
        )


class DiffusionModule(_TrigFlowModule):
    """TrigFlow diffusion training (Eq. 4) with adaptive weighting: `pretrain` and teacher prep.

    ``model`` is trained in place and exposed as ``self.student`` (so EMA/FID/export work
    unchanged); its adaptive-weighting head is ``self.logvar``.
    """

    def __init__(
        self,
        model: TrigFlowModel,
        image_shape: Sequence[int],
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        p_mean: float = -0.8,
        p_std: float = 1.6,
        logvar_channels: int = 128,
        label_dropout: float = 0.0,
        seed: int = 0,
        max_bad_steps: int = 20,
        uncond_condition: TextCondition | None = None,
    ) -> None:
        super().__init__(image_shape, optimizer, lr_scheduler, seed, max_bad_steps)
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.student = model
        self.logvar = LogVarHead(logvar_channels)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.label_dropout = float(label_dropout)
        self.uncond_condition = uncond_condition  # text: the null prompt label dropout uses
        if label_dropout > 0 and model.text_embed_dim is not None and uncond_condition is None:
            raise ValueError("label_dropout on prompt embeddings needs the null prompt's embedding")

    def _labels(self, labels: Condition, generator: torch.Generator) -> Condition | None:
        if isinstance(labels, TextCondition):
            if self.label_dropout == 0:
                return labels
            keep = torch.rand(len(labels), generator=generator, device=labels.device)
            return where_condition(keep >= self.label_dropout, labels, self.uncond_condition)
        num_classes = self.student.num_classes
        if not num_classes:
            return None
        if self.label_dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device)
            labels = torch.where(drop < self.label_dropout, num_classes, labels)  # null class
        return labels

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        gen = self.step_rng(x0.device, batch_idx)
        loss = diffusion_loss(
            self.student,
            x0,
            self.student.sigma_data,
            self.p_mean,
            self.p_std,
            class_labels=self._labels(labels, gen),
            logvar=self.logvar,
            generator=gen,
        )
        self.log("train/loss", loss.detach(), on_step=True)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, labels = batch
        gen = step_generator(self.seed, batch_idx, self.global_rank, x0.device)
        loss = diffusion_loss(
            self.student,
            x0,
            self.student.sigma_data,
            self.p_mean,
            self.p_std,
            class_labels=labels if self.student.conditional else None,
            generator=gen,
        )
        self.log("val/mse", loss, sync_dist=True, prog_bar=True)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        nfe: int = 35,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
        grid: str = "edm",
        t_mid: float | None = None,
        **_: Any,
    ) -> Tensor:
        """PF-ODE samples of the model being trained (Heun for odd ``nfe``, else DDIM) on the
        time grid ``grid`` (:data:`sampling.TEACHER_GRIDS`; ``t_mid`` radians, default 1.1)."""
        with self.student_in_eval():
            return self.decode(
                sampling.teacher_sample(
                    self.student,
                    self.noise(num_samples, generator),
                    self.student.sigma_data,
                    nfe,
                    class_labels,
                    grid=grid,
                    t_mid=1.1 if t_mid is None else float(t_mid),
                )
            )


def inverse_sqrt_lr(t_ref: int) -> Callable[[int], float]:
    """EDM2 learning-rate decay ``1/√(max(step/t_ref, 1))`` (spec §7, ImageNet columns)."""
    if t_ref <= 0:
        raise ValueError(f"t_ref must be > 0, got {t_ref}")
    return lambda step: 1.0 / math.sqrt(max(step / t_ref, 1.0))


class VSDDistillationModule(DistillationModule):
    """Adaptive VSD (``mode="vsd"``) or sCD + VSD (``mode="scd_vsd"``), spec §3c.

    The generator is the 1-step student ``g_θ(z') = f_θ(z', t_max)``; a fake-score network
    ``F_φ`` (``self.fake_score``, a trainable copy of the teacher's TrigFlowModel) learns the
    generator's distribution by the §1 diffusion loss on its detached samples. Each training
    batch takes two updates with Lightning manual optimisation: θ (the student, its sCD head
    w_φ and the VSD head w_ψ = ``self.vsd_logvar``) on ``L_sCD + λ_VSD·L_VSD`` (``L_VSD`` alone
    for ``vsd``), then φ on the fake-score loss. Only the θ update counts as a trainer step,
    so ``max_steps``, the step RNG, tangent warmup, EMA and checkpoint intervals mean what
    they mean for sCD. The fake score, w_ψ and both optimisers' states are in the checkpoint;
    the frozen teacher is not.

    Args (beyond :class:`DistillationModule`'s):
        vsd_loss: :class:`VSDLossConfig` fields.
        vsd_weight: λ_VSD, the weight of the VSD term in sCD + VSD (spec: 1).
        fake_score_lr: the fake score's learning rate (None: the student's, spec §3c).
    """

    def __init__(
        self,
        teacher: TrigFlowModel,
        image_shape: Sequence[int],
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        mode: str = "vsd",
        vsd_loss: dict[str, Any] | VSDLossConfig | None = None,
        vsd_weight: float = 1.0,
        fake_score_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in ("vsd", "scd_vsd"):
            raise ValueError(f"mode must be 'vsd' or 'scd_vsd', got {mode!r}")
        if kwargs.get("guidance_scale_range") is not None:
            raise ValueError("VSD distillation does not support CFG (guidance_scale_range)")
        super().__init__(teacher, image_shape, optimizer, lr_scheduler, mode="scd", **kwargs)
        self.mode = mode
        self.automatic_optimization = False  # θ and φ alternate (two optimisers)
        cfg = vsd_loss if isinstance(vsd_loss, VSDLossConfig) else VSDLossConfig(**(vsd_loss or {}))
        if abs(cfg.sigma_data - teacher.sigma_data) > 1e-12:
            raise ValueError(
                f"loss.sigma_data={cfg.sigma_data} disagrees with the teacher's "
                f"sigma_data={teacher.sigma_data}"
            )
        self.vsd_cfg = cfg
        if not (math.isfinite(vsd_weight) and vsd_weight >= 0):
            raise ValueError(f"vsd_weight (λ_VSD) must be a finite number >= 0, got {vsd_weight}")
        self.vsd_weight = float(vsd_weight)
        self.fake_score_lr = None if fake_score_lr is None else float(fake_score_lr)
        # F_φ starts as the teacher (spec §3c); dropout off, as the teacher's copy in sCD.
        from scm_lightning.student import set_dropout

        self.fake_score = copy.deepcopy(teacher).requires_grad_(True).train()
        set_dropout(self.fake_score, 0.0)
        self.vsd_logvar = LogVarHead(self.student.logvar.num_channels)  # w_ψ, zero-initialised
        self._stepping_fake_score = False

    def compile_step(self, backend: str = "inductor") -> None:
        raise ValueError(f"trainer.compile is not supported with loss.mode={self.mode!r}")

    def configure_optimizers(self) -> Any:
        student = [p for p in self.student.parameters() if p.requires_grad]
        student += list(self.vsd_logvar.parameters())
        opt_student = self.optimizer_factory(student)
        fake = [p for p in self.fake_score.parameters() if p.requires_grad]
        lr = {} if self.fake_score_lr is None else {"lr": self.fake_score_lr}
        opt_fake = self.optimizer_factory(fake, **lr)
        if self.scheduler_factory is None:
            return [opt_student, opt_fake]
        schedulers = [self.scheduler_factory(opt_student), self.scheduler_factory(opt_fake)]
        return [opt_student, opt_fake], schedulers

    def _prior(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """The generator's input ``z' ~ N(0, σ_d² I)`` from the step RNG."""
        sd = self.vsd_cfg.sigma_data
        shape = (batch_size, *self.image_shape)
        return sd * torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)

    def _losses(
        self, x0: Tensor, labels: Tensor, generator: torch.Generator, r: float
    ) -> tuple[Tensor, dict[str, Tensor], Any, Tensor]:
        """``(θ loss, metrics, sCD output or None, generator samples)`` of one batch."""
        class_labels = labels if self.student.num_classes else None
        metrics: dict[str, Tensor] = {}
        total = x0.new_zeros((), dtype=torch.float32)
        scd = None
        if self.mode == "scd_vsd":
            scd = scm_loss(
                self.student,
                x0,
                self.loss_cfg,
                r=r,
                teacher=self.teacher,
                class_labels=class_labels,
                generator=generator,
                student_jvp=self.student_jvp,
            )
            total = total + scd.loss
            metrics |= {
                "scd_loss": scd.loss.detach(),
                "g_norm": scd.g_norm,
                "masked_fraction": scd.masked_fraction,
                "logvar": scd.logvar,
            }
        vsd = vsd_generator_loss(
            self.student,
            self.teacher,
            self.fake_score,
            self.vsd_logvar,
            self._prior(x0.shape[0], generator),
            self.vsd_cfg,
            class_labels=class_labels,
            generator=generator,
        )
        weight = self.vsd_weight if self.mode == "scd_vsd" else 1.0
        total = total + weight * vsd.loss  # sCD + λ_VSD·VSD (spec §3c)
        metrics |= {
            "vsd_loss": vsd.loss.detach(),
            "vsd_score_gap": vsd.score_gap,
            "vsd_logvar": vsd.logvar,
            "vsd_masked_fraction": vsd.masked_fraction,
        }
        return total, metrics, scd, vsd.samples

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        gen = self.step_rng(x0.device, batch_idx)
        opt_student, opt_fake = self.optimizers()
        # θ update: sCD + λ·VSD (or VSD alone); F_φ and the teacher are evaluated without grad.
        opt_student.zero_grad(set_to_none=True)
        opt_fake.zero_grad(set_to_none=True)
        loss, metrics, scd, samples = self._losses(x0, labels, gen, self.tangent_warmup_r)
        if scd is not None:
            self.unusable_batch = scd.masked_fraction >= 1
        self.manual_backward(loss)
        opt_student.step()  # on_before_optimizer_step: grad norm, skip of non-finite steps
        # φ update on the generator's detached samples (one per θ update, spec §3c).
        opt_student.zero_grad(set_to_none=True)
        class_labels = labels if self.student.num_classes else None
        fake_loss = fake_score_loss(self.fake_score, samples, self.vsd_cfg, class_labels, gen)
        self.manual_backward(fake_loss)
        self._uncounted_step(opt_fake)
        opt_fake.zero_grad(set_to_none=True)
        for scheduler in self._schedulers():
            scheduler.step()
        logged = {f"train/{k}": v for k, v in metrics.items()}
        logged |= {
            "train/loss": loss.detach(),
            "train/fake_score_loss": fake_loss.detach(),
            "train/r": float(self.tangent_warmup_r),
        }
        self.log_dict(logged, on_step=True, prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss.detach()

    def _schedulers(self) -> list[Any]:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return list(schedulers) if isinstance(schedulers, list) else [schedulers]

    def _uncounted_step(self, optimizer: Any) -> None:
        """Step the fake score's optimiser through Lightning (precision plugin, hooks) without
        advancing ``trainer.global_step``, which under manual optimisation counts every
        ``LightningOptimizer.step``: the step count is the student's alone."""
        before, after = optimizer._on_before_step, optimizer._on_after_step

        def nothing() -> None:
            return None

        optimizer._on_before_step = optimizer._on_after_step = nothing
        self._stepping_fake_score = True
        try:
            optimizer.step()
        finally:
            self._stepping_fake_score = False
            optimizer._on_before_step, optimizer._on_after_step = before, after

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._stepping_fake_score:
            super().on_before_optimizer_step(optimizer)
            return
        grads = [p.grad for p in self.fake_score.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            if grads
            else torch.zeros(1, device=self.device)
        )
        self.log("train/fake_score_grad_norm", norm, on_step=True, prog_bar=False)
        if not bool(torch.isfinite(norm)):  # a non-finite φ gradient must not reach F_φ
            optimizer.zero_grad(set_to_none=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, labels = batch
        gen = step_generator(self.seed, batch_idx, self.global_rank, x0.device)
        with torch.no_grad():
            loss, metrics, _, samples = self._losses(x0, labels, gen, 1.0)
            class_labels = labels if self.student.num_classes else None
            fake = fake_score_loss(self.fake_score, samples, self.vsd_cfg, class_labels, gen)
        self.log("val/loss", loss, sync_dist=True, prog_bar=True)
        self.log("val/vsd_loss", metrics["vsd_loss"], sync_dist=True)
        self.log("val/fake_score_loss", fake, sync_dist=True)
