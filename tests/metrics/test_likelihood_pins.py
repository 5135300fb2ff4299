"""Pins of diffusion_lab.metrics.likelihood: the standard error of bits/dim (``val/bpd_sem``) is the sample standard
deviation (n − 1) over √n of the per-example values, whatever the batching."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.parameterizations import EpsParameterization
from diffusion_lab.diffusion.schedules.continuous import SigmoidSchedule
from diffusion_lab.metrics import likelihood as likelihood_module
from diffusion_lab.metrics.likelihood import bits_per_dim

F64 = torch.float64
GAUSS = GaussianMixture(torch.ones(1, dtype=F64), torch.zeros(1, 2, dtype=F64), torch.tensor([0.5], dtype=F64))


def oracle() -> Denoiser:
    schedule, param = SigmoidSchedule(), EpsParameterization()  # continuous: method auto → continuous ELBO
    return Denoiser(OracleNetwork(GAUSS, schedule, param), schedule, param)


@pytest.fixture
def first_coordinate_bpd(monkeypatch):
    """The continuous ELBO replaced by one whose per-example bits/dim is the example's first coordinate."""

    def elbo(denoiser, x0, decoder, num_t_samples, generator):
        return SimpleNamespace(bits_per_dim=lambda dims: x0[:, 0].double())

    monkeypatch.setattr(likelihood_module, "continuous_elbo", elbo)


def examples(values: list[float]) -> torch.Tensor:
    """``(N, 2)`` data whose first coordinates are ``values``."""
    return torch.stack([torch.tensor(values, dtype=F64), torch.zeros(len(values), dtype=F64)], dim=1)


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_bpd_sem_is_the_n_minus_1_standard_deviation_over_root_n(first_coordinate_bpd, batch_size):
    values = [1.0, 2.0, 3.0, 4.0]
    result = bits_per_dim(oracle(), examples(values), batch_size=batch_size)
    assert (result.bpd, result.num_examples) == (2.5, 4)
    assert result.sem == pytest.approx(statistics.stdev(values) / 2.0, rel=1e-12)  # √(5/3)/2 = 0.6455
    assert result.sem != pytest.approx(statistics.pstdev(values) / 2.0, rel=1e-3)  # not √(5/4)/2 = 0.5590


def test_bpd_sem_of_two_values_and_of_one(first_coordinate_bpd):
    two = bits_per_dim(oracle(), examples([0.0, 1.0]))
    assert two.sem == pytest.approx(0.5, rel=1e-12)  # stdev √½, over √2 (the n-divided one would be 0.3536)
    one = bits_per_dim(oracle(), examples([7.0]))
    assert one.bpd == 7.0 and math.isnan(one.sem)


def test_val_bpd_sem_is_logged_from_the_same_standard_error(first_coordinate_bpd):
    """dlab-train's ``val/bpd_sem@N`` is the s.e. above, on the first ``eval.bpd_examples`` validation examples."""
    from diffusion_lab.train import evaluate_bpd

    cfg = OmegaConf.create({"seed": 0, "eval": {"bpd_examples": 4, "batch_size": 3, "bpd_num_t_samples": 2}})
    module = SimpleNamespace(ema_denoiser=oracle)
    datamodule = SimpleNamespace(val_tensor=lambda: examples([1.0, 2.0, 3.0, 4.0, 100.0]))
    logged = evaluate_bpd(cfg, module, datamodule)
    assert logged["val/bpd@4"] == 2.5
    assert logged["val/bpd_sem@4"] == pytest.approx(statistics.stdev([1.0, 2.0, 3.0, 4.0]) / 2.0, rel=1e-12)
    assert logged["protocol"]["num_examples"] == 4 and logged["protocol"]["method"] == "continuous"
