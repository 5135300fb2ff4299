"""Shared test set-up: one intra-op thread per test process (pytest-xdist runs one worker per core)."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def config_dir() -> str:
    from diffusion_lab.train import CONFIG_DIR

    return CONFIG_DIR
