"""Lightning callbacks: sample grids, periodic sample-quality evaluation, checkpoints/resume, non-finite guard."""

from diffusion_lab.callbacks.checkpoint import AtomicCheckpointIO, LastCheckpoint, checkpoint_callbacks
from diffusion_lab.callbacks.evaluation import (
    SampleEvaluation,
    generate_in_batches,
    guidance_suffix,
    sampling_protocol,
)
from diffusion_lab.callbacks.exact_resume import EpochSeededSampler, ExactResume
from diffusion_lab.callbacks.nan_guard import NonFiniteError, NonFiniteGuard
from diffusion_lab.callbacks.sample_grid import SampleGrid, save_png

__all__ = [
    "AtomicCheckpointIO",
    "EpochSeededSampler",
    "ExactResume",
    "LastCheckpoint",
    "NonFiniteError",
    "NonFiniteGuard",
    "SampleEvaluation",
    "SampleGrid",
    "checkpoint_callbacks",
    "generate_in_batches",
    "guidance_suffix",
    "sampling_protocol",
    "save_png",
]
