"""``python -m diffusion_lab`` is ``dlab-train``."""

from diffusion_lab.train import main

main()
