"""Tests for diffusion_lab.models.embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.models.embeddings import ConditionEmbedding, FourierFeatures, timestep_embedding


def test_embedding_of_zero_is_sin_zeros_then_cos_ones() -> None:
    emb = timestep_embedding(torch.zeros(3), 8)
    assert emb.shape == (3, 8)
    assert torch.equal(emb, torch.tensor([[0.0] * 4 + [1.0] * 4] * 3))


def test_embedding_known_values_ddpm_frequencies() -> None:
    # DDPM: f_k = 10000^(-k / (half - 1)); half = 3 -> f = [1, 1e-2, 1e-4].
    c = torch.tensor([2.0])
    freqs = torch.tensor([1.0, 1e-2, 1e-4])
    expected = torch.cat([torch.sin(2.0 * freqs), torch.cos(2.0 * freqs)])[None]
    assert torch.allclose(timestep_embedding(c, 6), expected, atol=1e-5)


def test_embedding_odd_dim_is_zero_padded_and_not_rescaled() -> None:
    emb = timestep_embedding(torch.tensor([1.0, 999.0]), 7)
    assert emb.shape == (2, 7)
    assert torch.all(emb[:, -1] == 0)
    # Lowest column is sin(c · 1): c_noise is used as given (no scaling inside).
    assert torch.allclose(emb[:, 0], torch.sin(torch.tensor([1.0, 999.0])), atol=1e-5)


def test_embedding_is_float32_for_integer_and_half_input() -> None:
    assert timestep_embedding(torch.arange(4), 16).dtype == torch.float32
    assert timestep_embedding(torch.ones(4, dtype=torch.bfloat16), 16).dtype == torch.float32


def test_embedding_rejects_non_vector_input() -> None:
    with pytest.raises(ValueError, match="c_noise"):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_fourier_features_shape_range_and_buffer() -> None:
    torch.manual_seed(0)
    ff = FourierFeatures(16, scale=1.0)
    out = ff(torch.linspace(-1, 1, 5))
    assert out.shape == (5, 16)
    # sin² + cos² = 1 for every frequency.
    assert torch.allclose(out[:, :8] ** 2 + out[:, 8:] ** 2, torch.ones(5, 8), atol=1e-5)
    assert "freqs" in ff.state_dict() and not list(ff.parameters())
    assert torch.allclose(out[:, 0], torch.sin(2 * math.pi * torch.linspace(-1, 1, 5) * ff.freqs[0]), atol=1e-5)


def test_condition_embedding_null_label_is_default_for_missing_y() -> None:
    torch.manual_seed(0)
    cond = ConditionEmbedding(8, 16, num_classes=3)
    c = torch.tensor([1.0, 2.0])
    assert cond.null_label == 3
    assert torch.allclose(cond(c), cond(c, torch.tensor([3, 3])), atol=1e-5)
    assert not torch.allclose(cond(c), cond(c, torch.tensor([0, 0])))


def test_condition_embedding_rejects_labels_when_unconditional() -> None:
    with pytest.raises(ValueError, match="num_classes=None"):
        ConditionEmbedding(8, 16)(torch.zeros(2), torch.zeros(2, dtype=torch.long))
