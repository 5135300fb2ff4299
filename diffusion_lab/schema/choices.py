"""The enumerated choices of option parameters.

They live here, not beside their classes, because the config layer reads them while composing, before torch
is imported; the classes annotate their parameters with them, so the derived schema lists the valid values.
"""

from __future__ import annotations

from enum import Enum


def values(choices: type[Enum]) -> tuple[str, ...]:
    """The values of an enum of choices, in declaration order (what a constructor checks a string against)."""
    return tuple(str(member.value) for member in choices)


class NoiseConditioning(str, Enum):
    time = "time"  # integer timestep (discrete) or 1000·t (continuous)
    log_snr = "log_snr"  # λ
    log_sigma = "log_sigma"  # EDM's ¼ ln σ, σ = e^{−λ/2}


class Grid(str, Enum):
    uniform = "uniform"  # uniform in t (a discrete schedule snaps to evenly respaced integer steps)
    leading = "leading"  # diffusers' timestep_spacing="leading" (discrete schedules)
    trailing = "trailing"  # diffusers' timestep_spacing="trailing", starts at t = 1 (discrete schedules)
    karras = "karras"  # Karras et al. 2022 eq. 5 in σ/α (options rho, sigma_min, sigma_max)
    log_snr = "log_snr"  # uniform in log-SNR (options sigma_min, sigma_max)
    time_power = "time_power"  # eq. 5's ramp in t, ρ = 2: DPM-Solver's time_quadratic (options rho, sigma_min)
    tuned = "tuned"  # fitted to the checkpoint by dlab-tune-grid (dlab-sample / dlab-evaluate only)


class DDPMVariance(str, Enum):
    small = "small"  # β̃ (posterior variance)
    large = "large"  # β
    learned = "learned"  # the network's interpolation (needs loss.learned_variance=true)


class DPMSolverMethod(str, Enum):
    multistep = "multistep"  # DPM-Solver++(2M)/(3M): one evaluation per step
    singlestep = "singlestep"  # DPM-Solver++(2S): two evaluations per step


class UniPCVariant(str, Enum):
    bh1 = "bh1"  # B(h) = h (recommended for unconditional sampling below 10 steps)
    bh2 = "bh2"  # B(h) = 1 − e^{−h} (diffusers' default; recommended otherwise)


class UniPCPredictor(str, Enum):
    unip = "unip"  # UniP-p
    dpm_solver = "dpm_solver"  # DPM-Solver++ multistep (ours: 3M integrates the quadratic exactly)


class RKMethod(str, Enum):
    RK45 = "RK45"  # Dormand–Prince 5(4)
    RK23 = "RK23"
    DOP853 = "DOP853"


class OTSolver(str, Enum):
    exact = "exact"  # the optimal permutation (network simplex): each data point keeps exactly one source draw
    sinkhorn = "sinkhorn"  # entropic OT (Cuturi 2013), pairs drawn from the plan with replacement (as torchcfm)


class MNISTResize(str, Enum):
    pad = "pad"  # 2 background pixels on each side: 28 -> 32, digits pixel-exact
    resize = "resize"  # bilinear (antialiased) 28 -> 32, rounded to 8 bits
    none = "none"  # native 28x28


class CelebACrop(str, Enum):
    ddim = "ddim"  # 128x128 box centred on (x, y) = (89, 121): Song, Meng & Ermon 2021
    center140 = "center140"  # central 140x140: Song & Ermon 2019, Song et al. 2021


class CelebAValSplit(str, Enum):
    valid = "valid"  # list_eval_partition.txt partition 1
    test = "test"  # partition 2


class FolderCrop(Enum):  # no str mixin: a member named "center" would shadow str.center
    center = "center"
    random = "random"  # random train crops of the stored load_size squares (needs load_size > resolution)
