"""Noise schedules: continuous time ``t ∈ [0, 1] ↦ (α_t, σ_t, λ_t)``.

Convention (DESIGN.md): ``t = 0`` is data, ``t = 1`` is (almost) pure noise,
``x_t = α_t x0 + σ_t ε`` and ``λ_t = log(α_t² / σ_t²)`` is strictly decreasing in ``t``.

A discrete DDPM with ``T`` steps is the same object evaluated at ``t_i = i / T``
(``ᾱ_i = α_{t_i}²``). β-schedules are defined where their papers define them (as ``T`` betas) and
exposed through the continuous interface by interpolating ``log ᾱ`` linearly in ``t`` between grid
points, so the continuous schedule agrees with the paper's ``ᾱ_i`` exactly at every ``t_i``.

A schedule belongs to a *family*, the map ``λ ↦ (α, σ)`` (:meth:`NoiseSchedule.alpha_sigma_from_log_snr`):
variance preserving (``α² + σ² = 1``, the default), variance exploding (``α = 1``) or rectified flow
(``α + σ = 1``). Given ``λ_t`` and the family, ``α_t`` and ``σ_t`` follow.

Adding a schedule is one small subclass (implement :meth:`NoiseSchedule.log_snr`, or for a β-schedule
:meth:`DiscreteBetaSchedule.make_betas`) plus one YAML file under ``conf/schedule/``.

The package is split by family: :mod:`.base` (the interface, :class:`NoiseSchedule`, and the helpers every
schedule shares), :mod:`.beta` (β-schedules: linear, cosine), :mod:`.continuous` (closed-form ``λ_t``:
sigmoid, VE, rectified flow, and the resolution shift of any schedule) and :mod:`.learned` (VDM's learned
schedule). Everything is re-exported here, so ``diffusion_lab.diffusion.schedules.LinearSchedule`` (the
``_target_`` of configs and stored checkpoints) keeps resolving.
"""

from diffusion_lab.diffusion.schedules.base import (
    NoiseSchedule,
    ScheduleDerivatives,
    ScheduleOutput,
    VarianceReduction,
)
from diffusion_lab.diffusion.schedules.beta import (
    CosineSchedule,
    DiscreteBetaSchedule,
    LinearSchedule,
    rescale_zero_terminal_snr,
)
from diffusion_lab.diffusion.schedules.continuous import (
    RectifiedFlowSchedule,
    ShiftedSchedule,
    SigmoidSchedule,
    VESchedule,
)
from diffusion_lab.diffusion.schedules.learned import (
    LearnedSchedule,
    MonotoneLinear,
)

__all__ = [
    "CosineSchedule",
    "DiscreteBetaSchedule",
    "LearnedSchedule",
    "LinearSchedule",
    "MonotoneLinear",
    "NoiseSchedule",
    "RectifiedFlowSchedule",
    "ScheduleDerivatives",
    "ScheduleOutput",
    "ShiftedSchedule",
    "SigmoidSchedule",
    "VESchedule",
    "VarianceReduction",
    "rescale_zero_terminal_snr",
]
