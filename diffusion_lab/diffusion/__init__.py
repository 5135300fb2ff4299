"""The diffusion math: pure torch, no Lightning/Hydra/W&B imports."""

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.losses import DiffusionLoss, LossOutput
from diffusion_lab.diffusion.parameterizations import (
    EpsParameterization,
    Parameterization,
    VParameterization,
    X0Parameterization,
)
from diffusion_lab.diffusion.schedules import CosineSchedule, LinearSchedule, NoiseSchedule, ScheduleOutput
from diffusion_lab.diffusion.time_samplers import TimeSampler, UniformTimeSampler
from diffusion_lab.diffusion.weightings import EpsMSEWeighting, MinSNRWeighting, Weighting

__all__ = [
    "CosineSchedule",
    "Denoiser",
    "DiffusionLoss",
    "EpsMSEWeighting",
    "EpsParameterization",
    "LinearSchedule",
    "LossOutput",
    "MinSNRWeighting",
    "NoiseSchedule",
    "Parameterization",
    "ScheduleOutput",
    "TimeSampler",
    "UniformTimeSampler",
    "VParameterization",
    "Weighting",
    "X0Parameterization",
]
