"""Lightning callbacks: sample grids and periodic sample-quality evaluation."""

from diffusion_lab.callbacks.evaluation import (
    SampleEvaluation,
    generate_in_batches,
    guidance_suffix,
    sampling_protocol,
)
from diffusion_lab.callbacks.sample_grid import SampleGrid, save_png

__all__ = ["SampleEvaluation", "SampleGrid", "generate_in_batches", "guidance_suffix", "sampling_protocol", "save_png"]
