"""The digits classifier registered in torch-fidelity gives the same Fréchet distance as DigitsFrechetDistance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_fidelity

from diffusion_lab.metrics.digits import DigitsFrechetDistance, classifier_path, digits_split
from diffusion_lab.metrics.digits_fidelity import digits_extractor_name
from diffusion_lab.metrics.fidelity import UInt8Images


def _on_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """Snap ``[-1, 1]`` images to ``k / 127.5 − 1`` so both paths see identical pixels."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1.0


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("digits_cache")  # the classifier is trained once for the module


@pytest.mark.parametrize("resize", ["pool", "center_crop"])
def test_fd_digits_through_torch_fidelity_equals_ours(cache_dir, resize) -> None:
    x_tr, _, x_va, _ = digits_split()
    up = (lambda x: F.interpolate(x, scale_factor=2)) if resize == "pool" else (lambda x: F.pad(x, (4,) * 4, value=-1))
    reference, samples = _on_uint8_grid(up(x_tr[:400])), _on_uint8_grid(up(x_va[:120]))
    ours = DigitsFrechetDistance(cache_dir=str(cache_dir), resize=resize)
    expected = ours.compute(samples, reference)["fd_digits"]
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(samples), input2=UInt8Images(reference), fid=True,
        feature_extractor=digits_extractor_name(resize),
        feature_extractor_weights_path=str(classifier_path(cache_dir)),
        cuda=False, cache=False, verbose=False, save_cpu_ram=True,
    )[torch_fidelity.KEY_METRIC_FID]  # fmt: skip
    assert expected > 0
    assert theirs == pytest.approx(expected, rel=1e-6)


def test_digits_extractor_names() -> None:
    assert digits_extractor_name("pool") == "digits-cnn-pool"
    with pytest.raises(ValueError, match="valid choices"):
        digits_extractor_name("bilinear")
    assert "digits-cnn-center_crop" in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
