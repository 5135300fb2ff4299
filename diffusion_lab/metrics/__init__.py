"""Sample-quality metrics: FID/IS/KID (torch-fidelity), Fréchet digits distance, toy-2-D distances.

Every number these return is raw; log it under :func:`protocol_key` (sample count, NFE) and record the
reference split and feature extractor beside it (DESIGN.md: "every reported quality number carries its
protocol").
"""

from diffusion_lab.metrics.base import (
    DigitsFDMetric,
    SampleMetric,
    Toy2DMetric,
    format_count,
    metric_key,
    protocol_key,
)
from diffusion_lab.metrics.digits import (
    DigitsClassifierConfig,
    DigitsCNN,
    DigitsFrechetDistance,
    class_coverage,
    class_entropy,
    class_histogram,
    digits_split,
    load_or_train_classifier,
)
from diffusion_lab.metrics.fidelity import FidelityMetric, UInt8Images, to_uint8
from diffusion_lab.metrics.frechet import feature_statistics, frechet_distance, trace_sqrt_product
from diffusion_lab.metrics.inception import InceptionWeightsError
from diffusion_lab.metrics.toy2d import (
    DEFAULT_BANDWIDTHS,
    LogProbSummary,
    energy_distance,
    mean_log_prob,
    mmd_rbf,
    random_directions,
    sliced_wasserstein,
    wasserstein2_1d,
)

__all__ = [
    "DEFAULT_BANDWIDTHS",
    "DigitsCNN",
    "DigitsClassifierConfig",
    "DigitsFDMetric",
    "DigitsFrechetDistance",
    "FidelityMetric",
    "InceptionWeightsError",
    "LogProbSummary",
    "SampleMetric",
    "Toy2DMetric",
    "UInt8Images",
    "class_coverage",
    "class_entropy",
    "class_histogram",
    "digits_split",
    "energy_distance",
    "feature_statistics",
    "format_count",
    "frechet_distance",
    "load_or_train_classifier",
    "mean_log_prob",
    "metric_key",
    "mmd_rbf",
    "protocol_key",
    "random_directions",
    "sliced_wasserstein",
    "to_uint8",
    "trace_sqrt_product",
    "wasserstein2_1d",
]
