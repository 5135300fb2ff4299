"""Samplers: every one is driven by the denoiser contract ``D(x_t, t, y) -> x̂0`` and a time grid."""

from diffusion_lab.samplers.base import SampleOutput, Sampler
from diffusion_lab.samplers.ddim import DDIMSampler
from diffusion_lab.samplers.ddpm import DDPMSampler
from diffusion_lab.samplers.dpm_solver import DPMSolverSampler
from diffusion_lab.samplers.grids import GRID_OPTIONS, TIME_GRIDS, GridOptions, time_grid
from diffusion_lab.samplers.ode import EDMSampler, EulerSampler, HeunSampler, RK45Sampler
from diffusion_lab.samplers.sde import EulerMaruyamaSampler, PCSampler
from diffusion_lab.samplers.unipc import UniPCSampler

# Sampler name (``Sampler.name``) -> class.
SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        DDPMSampler,
        DDIMSampler,
        EulerSampler,
        HeunSampler,
        EDMSampler,
        RK45Sampler,
        DPMSolverSampler,
        UniPCSampler,
        EulerMaruyamaSampler,
        PCSampler,
    )
}

__all__ = [
    "GRID_OPTIONS",
    "SAMPLERS",
    "TIME_GRIDS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "EDMSampler",
    "EulerMaruyamaSampler",
    "EulerSampler",
    "GridOptions",
    "HeunSampler",
    "PCSampler",
    "RK45Sampler",
    "SampleOutput",
    "Sampler",
    "UniPCSampler",
    "time_grid",
]
