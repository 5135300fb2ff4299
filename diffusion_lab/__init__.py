"""diffusion_lab: a Lightning + Hydra framework for diffusion-model research."""
