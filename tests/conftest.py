"""Shared test set-up: one intra-op thread per test process (pytest-xdist runs one worker per core)."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def config_dir() -> str:
    from diffusion_lab.schema.registry import CONFIG_DIR

    return CONFIG_DIR


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init torch-fidelity InceptionV3 state dict saved as a local weights file (He-normal convs, so
    features neither vanish nor explode): the real FID code path without downloading the Inception weights."""
    from unittest import mock

    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    from diffusion_lab.metrics.inception import INCEPTION

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    with (
        torch.random.fork_rng(devices=[]),
        mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        torch.manual_seed(0)
        model = tf_inception.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path
