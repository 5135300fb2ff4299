"""Time samplers: draw training times ``t`` and the importance weight that keeps the loss unbiased.

A sampler returns ``(t, weight)`` with ``E[weight · ℓ(t)] = E_{t∼ref}[ℓ(t)]`` for every ``ℓ``, where the
reference is uniform over ``(t_min, 1]``, or over the integer timesteps ``{1..T}`` (``t = i/T``) of a
discrete schedule. A non-uniform proposal ``p`` therefore changes the variance of the loss estimate, never
its mean: ``weight = p_ref(t) / p(t)``.

Samplers defined by a density on ``t`` (log-normal, logit-normal, low-discrepancy) share
:class:`DensityTimeSampler`: it draws ``u`` and maps it through the inverse CDF, and for a discrete schedule
bins the draw to its integer step with that step's exact probability. Loss-aware samplers
(:class:`ImportanceTimeSampler`) learn from :meth:`TimeSampler.update` and checkpoint their state through
:meth:`TimeSampler.state_dict`. Every sampler reads the schedule only through ``log_snr`` and
``t_from_log_snr``. Adding one is a subclass plus one YAML file.

The package: :mod:`.base` (the :class:`TimeSampler` interface, the uniform sampler and the helpers the others
share), :mod:`.density` (samplers defined by a density on ``t``) and :mod:`.importance` (the loss-aware
sampler). Everything is re-exported here, so ``diffusion_lab.diffusion.time_samplers.ImportanceTimeSampler``
(the ``_target_`` of configs and stored checkpoints) keeps resolving.
"""

from diffusion_lab.diffusion.time_samplers.base import StateDict, TimeSampler, UniformTimeSampler
from diffusion_lab.diffusion.time_samplers.density import (
    DensityTimeSampler,
    LogitNormalTimeSampler,
    LogNormalTimeSampler,
    LowDiscrepancyTimeSampler,
    TruncatedNormalTimeSampler,
)
from diffusion_lab.diffusion.time_samplers.importance import ImportanceTimeSampler

__all__ = [
    "DensityTimeSampler",
    "ImportanceTimeSampler",
    "LogNormalTimeSampler",
    "LogitNormalTimeSampler",
    "LowDiscrepancyTimeSampler",
    "StateDict",
    "TimeSampler",
    "TruncatedNormalTimeSampler",
    "UniformTimeSampler",
]
