"""Samplers: every one is driven by the denoiser contract ``D(x_t, t, y) -> x̂0`` and a time grid."""

from diffusion_lab.samplers.base import TIME_GRIDS, SampleOutput, Sampler, time_grid
from diffusion_lab.samplers.ddim import DDIMSampler
from diffusion_lab.samplers.ddpm import DDPMSampler

__all__ = ["TIME_GRIDS", "DDIMSampler", "DDPMSampler", "SampleOutput", "Sampler", "time_grid"]
