"""Which combinations a non-Gaussian source (``prior=toy2d``) allows, decided on the config alone (torch-free).

A flow may start from any distribution only where nothing relies on ``ε ~ N(0, I)``: the path must start from a
pure source draw (``α_1 = 0``: ``schedule=rectified_flow``), the sampler must integrate the ODE without injecting
Gaussian noise, and no likelihood may be asked for (the ELBO's prior term is ``KL(q(x_1 | x0) ‖ N(0, I))`` and the
PF-ODE likelihood adds ``log N(x_1; 0, I)``, Song et al. 2021 eq. 39; neither holds for another source).
"""

from __future__ import annotations

from typing import Any

from diffusion_lab.schema.errors import ConfigError

GAUSSIAN_PRIOR = "diffusion_lab.diffusion.priors.GaussianPrior"
SOURCE_SCHEDULES = ("diffusion_lab.diffusion.schedules.RectifiedFlowSchedule",)
# Samplers that only integrate the ODE (euler and heun with s_churn = 0, rk45): class name -> its option name.
ODE_SAMPLERS = {"EulerSampler": "euler", "HeunSampler": "heun", "RK45Sampler": "rk45"}
LIKELIHOOD_REASON = (
    "bits/dim needs a Gaussian prior (the ELBO's prior term is KL(q(x_1|x0) ‖ N(0, I)) and the PF-ODE likelihood adds "
    "log N(x_1; 0, I))"
)


def gaussian_prior(prior: Any) -> bool:
    """Whether a ``prior`` config node (or None: a run from before priors existed) is ``N(0, I)``."""
    return prior is None or str(prior.get("_target_")) == GAUSSIAN_PRIOR


def check_source_sampler(prior: Any, sampler: Any, key: str = "sampler") -> None:
    """A non-Gaussian ``prior`` needs a sampler that adds no Gaussian noise; raise :class:`ConfigError` naming
    ``key`` and the valid samplers."""
    if gaussian_prior(prior):
        return
    name = str(sampler.get("_target_", "")).rsplit(".", 1)[-1]
    churn = sampler.get("s_churn", 0.0) or 0.0
    if name not in ODE_SAMPLERS or churn > 0:
        what = f"{key}={name}" + (f" with {key}.s_churn={churn}" if churn else "")
        raise ConfigError(
            f"{what} injects Gaussian noise, which assumes ε ~ N(0, I), but prior={prior.get('name', prior._target_)} "
            f"is not Gaussian; valid: {key}=euler|heun (s_churn=0) or {key}=rk45"
        )


def check_source(cfg: Any) -> None:
    """``dlab-train``: the schedule, sampler, bits/dim and learned variance a non-Gaussian ``cfg.prior`` allows."""
    prior = cfg.prior
    if gaussian_prior(prior):
        return
    where = f"prior={prior.get('name', prior._target_)} (not Gaussian)"
    if str(cfg.schedule._target_) not in SOURCE_SCHEDULES:
        raise ConfigError(
            f"{where} needs a path that starts from a pure source draw (α = 0 at t = 1); schedule="
            f"{str(cfg.schedule._target_).rsplit('.', 1)[-1]} does not; valid: schedule=rectified_flow"
        )
    check_source_sampler(prior, cfg.sampler)
    if cfg.eval.bpd_examples > 0:
        raise ConfigError(f"{where}: {LIKELIHOOD_REASON}; valid: eval.bpd_examples=0")
    if cfg.loss.learned_variance:
        raise ConfigError(f"{where}: loss.learned_variance=true trains a Gaussian reverse variance; valid: false")
