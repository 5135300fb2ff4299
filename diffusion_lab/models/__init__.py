"""Denoising networks ``f_θ(x, c_noise, y)``; they know nothing of diffusion schedules."""

from diffusion_lab.models.embeddings import ConditionEmbedding, FourierFeatures, timestep_embedding
from diffusion_lab.models.mlp import MLP, MLPBlock
from diffusion_lab.models.unet import AttentionBlock, ResBlock, UNet

__all__ = [
    "MLP",
    "AttentionBlock",
    "ConditionEmbedding",
    "FourierFeatures",
    "MLPBlock",
    "ResBlock",
    "UNet",
    "timestep_embedding",
]
