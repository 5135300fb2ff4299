"""``python -m diffusion_lab`` is ``dlab-train``."""

from diffusion_lab.cli import train_main

train_main()
