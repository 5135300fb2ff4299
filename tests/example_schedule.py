"""The README's worked example of adding an option (a schedule is one class, this file, and one YAML file), and an
option whose base class lies outside the project (tests/test_schema.py)."""

from __future__ import annotations

from json import JSONEncoder
from typing import Annotated, Any

from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.schema.domains import POSITIVE_INT


# Kingma & Gao 2023 §2 (any λ(t) defines a schedule): log-SNR linear in t from log_snr_max to log_snr_min.
class LinearLogSNRSchedule(NoiseSchedule):
    """``λ(t) = λ_max + (λ_min − λ_max)·t``, variance preserving; continuous unless ``num_timesteps`` is set."""

    def __init__(
        self,
        log_snr_max: float = 10.0,
        log_snr_min: float = -10.0,
        num_timesteps: Annotated[int | None, POSITIVE_INT.or_null("continuous")] = None,
    ) -> None:
        super().__init__()
        if not log_snr_min < log_snr_max:
            raise ValueError(f"needs log_snr_min < log_snr_max, got {log_snr_min}, {log_snr_max}")
        self.log_snr_max, self.log_snr_min, self.num_timesteps = log_snr_max, log_snr_min, num_timesteps

    def log_snr(self, t: Tensor) -> Tensor:
        """``λ(t)``, shape of ``t``."""
        return self.log_snr_max + (self.log_snr_min - self.log_snr_max) * t.clamp(0.0, 1.0)

    def log_snr_bounds(self) -> tuple[float, float]:
        """``(λ_min, λ_max)``."""
        return self.log_snr_min, self.log_snr_max

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """The exact inverse of :meth:`log_snr`, clamped to ``[0, 1]``."""
        return ((log_snr - self.log_snr_max) / (self.log_snr_min - self.log_snr_max)).clamp(0.0, 1.0)


class EncoderOptions(JSONEncoder):
    """An option whose base class is outside the project: its ``**options`` are not settings of ours."""

    def __init__(self, depth: int = 1, **options: Any) -> None:
        super().__init__(**options)
        self.depth = depth
