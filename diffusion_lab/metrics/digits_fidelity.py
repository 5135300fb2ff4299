"""The digits classifier (:class:`~diffusion_lab.metrics.digits.DigitsCNN`) as a torch-fidelity feature extractor,
registered once per resize rule (``digits-cnn-pool``, ``digits-cnn-center_crop``).

Split out of :mod:`diffusion_lab.metrics.fidelity`, which re-exports every name here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from diffusion_lab.metrics.digits import _RESIZERS as DIGITS_RESIZERS
from diffusion_lab.metrics.digits import load_classifier_file, load_or_train_classifier


class DigitsFeatureExtractor(FeatureExtractorBase):
    """:class:`~diffusion_lab.metrics.digits.DigitsCNN` as a torch-fidelity feature extractor.

    Input uint8 ``(B, 3, H, W)`` (channel 0 is used) -> ``[-1, 1]`` -> 8×8 by :attr:`resize` -> features
    ``"features"`` ``(B, feature_dim)`` (FID/KID/PRC) and ``"logits"`` ``(B, 10)`` (IS). Registered as
    ``digits-cnn-pool`` and ``digits-cnn-center_crop``; ``feature_extractor_weights_path`` is a classifier cache
    file written by :func:`~diffusion_lab.metrics.digits.load_or_train_classifier`, checked against its sha256
    (``None``: the default cache, trained there if absent).
    """

    resize = "pool"

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            model, _, _ = load_or_train_classifier()
        else:
            model = load_classifier_file(feature_extractor_weights_path)
        self.model = model.eval().requires_grad_(False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """uint8 ``(B, 3, H, W)`` -> the requested features, in :attr:`features_list` order."""
        images = x[:, :1].float() / 127.5 - 1.0
        f = self.model.features(DIGITS_RESIZERS[self.resize](images))
        out = {"features": f, "logits": self.model.head(f)}
        return tuple(out[name] for name in self.features_list)


def digits_extractor_name(resize: str) -> str:
    """torch-fidelity name of the digits extractor for a resize rule: ``"pool"`` -> ``"digits-cnn-pool"``."""
    if resize not in DIGITS_RESIZERS:
        raise ValueError(f"unknown resize {resize!r}; valid choices: {sorted(DIGITS_RESIZERS)}")
    return f"digits-cnn-{resize}"


def register_digits_extractors() -> None:
    """Register one extractor class per resize rule (idempotent: torch-fidelity refuses duplicates)."""
    for resize in DIGITS_RESIZERS:
        name = digits_extractor_name(resize)
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            cls = type(f"DigitsFeatureExtractor_{resize}", (DigitsFeatureExtractor,), {"resize": resize})
            torch_fidelity.register_feature_extractor(name, cls)


register_digits_extractors()
