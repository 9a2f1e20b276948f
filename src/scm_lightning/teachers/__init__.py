"""Teachers: any diffusion model as a TrigFlow velocity (spec §2)."""

from scm_lightning.teachers.base import NetAdapter, TrigFlowModel
from scm_lightning.teachers.denoiser import DenoiserAdapter
from scm_lightning.teachers.edm import EDMAdapter
from scm_lightning.teachers.guidance import (
    GuidanceEmbedding,
    GuidedTeacher,
    attach_guidance_embedding,
    guided_F,
    guided_velocity,
)
from scm_lightning.teachers.loading import (
    check_teacher_matches_data,
    load_teacher,
)
from scm_lightning.teachers.schedule import FlowSchedule, ScheduleAdapter, TabulatedSchedule
from scm_lightning.teachers.trigflow import TrigFlowNative

__all__ = [
    "DenoiserAdapter",
    "EDMAdapter",
    "FlowSchedule",
    "GuidanceEmbedding",
    "GuidedTeacher",
    "NetAdapter",
    "ScheduleAdapter",
    "TabulatedSchedule",
    "TrigFlowModel",
    "TrigFlowNative",
    "attach_guidance_embedding",
    "check_teacher_matches_data",
    "guided_F",
    "guided_velocity",
    "load_teacher",
]
