"""DiffusionLoss = schedule ∘ time sampler ∘ parameterization ∘ weighting.

``L(θ) = E_{x0, t, ε}[ ŵ(t) · f_w(t) · ‖ε̂_θ(x_t, t) − ε‖² ]`` with ``ŵ`` the time sampler's importance
weight and ``f_w`` the loss weighting's factor (``w(λ_t)``, or ``½·w(λ_t)·(−dλ/dt)`` for weightings
defined per unit λ, Kingma & Gao 2023); the ε-MSE is computed in the network's output space as
``k(α, σ)·‖F̂ − F‖²`` (see :mod:`parameterizations`). The squared norm is a mean over data dimensions,
as in Ho et al. 2020's code. All loss arithmetic is float32, whatever the autocast dtype.

Two terms join the weighted ε-MSE when the model asks for them:
- a learned reverse variance (Nichol & Dhariwal 2021 §3.1): ``L_hybrid = L_simple + λ_vlb·T·L_t``, the
  sampled VLB term with a stop-gradient on the mean (eq. 16), in nats/dim;
- a learned schedule (Kingma et al. 2021): the prior and reconstruction terms of the ELBO, which are
  what train its endpoints; its interior follows the variance-minimising gradient (App. I.2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lab.diffusion.couplings import IndependentCoupling, OTCoupling
from diffusion_lab.diffusion.denoiser import Denoiser, NetworkOutput
from diffusion_lab.diffusion.likelihood_terms import prior_kl, reconstruction_nll, reverse_log_variance, vlb_term
from diffusion_lab.diffusion.parameterizations import Coefficients
from diffusion_lab.diffusion.priors import GaussianPrior, SourceDistribution
from diffusion_lab.diffusion.time_samplers import TimeSampler
from diffusion_lab.diffusion.weightings import Weighting


@dataclass(frozen=True)
class LossOutput:
    """``loss``: scalar; ``per_example``, ``eps_mse``, ``t``, ``log_snr``: each ``(B,)``.

    ``unweighted`` is the per-example loss before the importance weight (what a loss-aware time
    sampler records); ``vlb`` the learned-variance VLB term and ``endpoints`` a learned schedule's
    prior + reconstruction terms (nats/dim, ``(B,)``) or None.
    """

    loss: Tensor
    per_example: Tensor
    eps_mse: Tensor
    t: Tensor
    log_snr: Tensor
    unweighted: Tensor
    vlb: Tensor | None = None
    endpoints: Tensor | None = None


class DiffusionLoss:
    """The training objective; ``loss(denoiser, x0 (B, ...), y) -> LossOutput``.

    Holds no parameters: everything learnable (network, a learned schedule) lives in the denoiser.

    Args:
        weighting, time_sampler: two axes of the objective.
        vlb_weight: λ of L_hybrid, used when the denoiser learns its reverse variance.
        decoder: the data decoder of the VLB / ELBO terms: ``"discretized"`` (8-bit images) or ``"gaussian"``.
        prior: the source ``ε`` is drawn from (default ``N(0, I)``, :mod:`diffusion_lab.diffusion.priors`).
        coupling: pairs each ``x0`` with an ``ε`` of the batch before ``x_t`` is formed (default independent;
            ``ot``: minibatch optimal transport, :mod:`diffusion_lab.diffusion.couplings`).
    """

    def __init__(
        self,
        weighting: Weighting,
        time_sampler: TimeSampler,
        vlb_weight: float = 0.001,
        decoder: str = "gaussian",
        prior: SourceDistribution | None = None,
        coupling: IndependentCoupling | OTCoupling | None = None,
    ) -> None:
        self.weighting = weighting
        self.time_sampler = time_sampler
        self.vlb_weight = vlb_weight
        self.decoder = decoder
        self.prior = prior if prior is not None else GaussianPrior()
        self.coupling = coupling if coupling is not None else IndependentCoupling()

    def __call__(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        schedule = denoiser.schedule
        x0 = x0.float()
        t, importance = self.time_sampler.sample(x0.shape[0], schedule, x0.device, generator)
        eps = self.prior.sample(tuple(x0.shape), generator, x0.device)
        # A training step (grad on) streams into a plan spanning batches; validation plans each batch alone.
        x0, eps, y = self.coupling(x0, eps, y, stream=torch.is_grad_enabled())
        learned = schedule.learnable and torch.is_grad_enabled()
        ctx = schedule.variance_reduction() if learned else contextlib.nullcontext()
        with ctx as handle:
            with fp32(x0.device):  # α, σ, λ of a learned schedule would otherwise run in bf16 under autocast
                coefs = denoiser.coefficients(t, x0)
                x_t = coefs.alpha * x0 + coefs.sigma * eps
            net_out = denoiser.network_output(x_t, t, y, coefs)
            with fp32(x0.device):  # the error, log-SNR and weighting in fp32 whatever the autocast precision
                param = denoiser.parameterization
                sq_err = (net_out.out.float() - param.target(x0, eps, coefs)).square().flatten(1).mean(1)
                eps_mse = _scalar(param.eps_error_scale(coefs)) * sq_err
                log_snr = schedule.log_snr(t)
                unweighted = self._output_weight(denoiser, t, log_snr, coefs) * sq_err
            per_example = importance * unweighted
            if handle is not None:
                handle.set_loss(per_example.detach())
        vlb = self._vlb(denoiser, net_out, x0, x_t, t) if denoiser.learned_variance else None
        endpoints = self._endpoints(denoiser, x0, generator) if schedule.learnable else None
        total = per_example
        for extra in (vlb, endpoints):
            if extra is not None:
                total = total + extra
        return LossOutput(
            total.mean(), per_example, eps_mse.detach(), t, log_snr.detach(), unweighted.detach(), vlb, endpoints
        )

    def _output_weight(self, denoiser: Denoiser, t: Tensor, log_snr: Tensor, coefs: Coefficients) -> Tensor:
        """``factor_w(t)·k``, the multiplier of ``‖F̂ − F‖²`` in the network's output space ``(B,)`` (fp32)."""
        with fp32(t.device):
            return self._output_weight_fp32(denoiser, t, log_snr, coefs)

    def _output_weight_fp32(self, denoiser: Denoiser, t: Tensor, log_snr: Tensor, coefs: Coefficients) -> Tensor:
        schedule, param = denoiser.schedule, denoiser.parameterization
        weight = self.weighting.factor(t, log_snr, schedule) * _scalar(param.eps_error_scale(coefs))
        terminal = torch.isneginf(log_snr)
        if terminal.any():
            # Zero terminal SNR (Lin et al. 2024): at α = 0 the factor is ∞ and k = 0 while F stays finite;
            # their product is taken one float step before t = 1, where both are finite.
            t_near = torch.nextafter(t, torch.zeros_like(t))
            c_near = Coefficients.at(schedule, t_near, coefs.alpha, derivatives=param.needs_derivatives)
            factor_near = self.weighting.factor(t_near, schedule.log_snr(t_near), schedule)
            weight = torch.where(terminal, factor_near * _scalar(param.eps_error_scale(c_near)), weight)
        return weight

    def _vlb(self, denoiser: Denoiser, net_out: NetworkOutput, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Nichol & Dhariwal 2021 eq. 16: λ·T·L_t with the mean detached, so L_vlb trains only Σ."""
        schedule = denoiser.schedule
        assert net_out.variance is not None and schedule.num_timesteps is not None
        x0_hat, _ = denoiser.parameterization.to_x0_eps(net_out.out.detach(), x_t, net_out.coefs)
        s = t - 1.0 / schedule.num_timesteps
        log_var = reverse_log_variance(schedule, t, s, net_out.variance, x_t)
        term = vlb_term(x0, x_t, x0_hat, t, schedule, log_var, decoder=self.decoder)
        return self.vlb_weight * schedule.num_timesteps * term

    def _endpoints(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None) -> Tensor:
        """Kingma et al. 2021 eq. 11: prior KL at t = 1 + reconstruction at t = 0, per example in nats/dim."""
        schedule, dims = denoiser.schedule, x0[0].numel()
        t0 = torch.zeros(x0.shape[0], device=x0.device)
        nll = reconstruction_nll(x0, schedule, t0, self.decoder, generator)
        return (prior_kl(x0, schedule) + nll) / dims


def fp32(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Autocast off on ``device``: schedule, log-SNR and weighting math stays fp32 under mixed precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def _scalar(per_example: Tensor) -> Tensor:
    """A per-example coefficient broadcast like ``(B, 1, …)`` as ``(B,)``."""
    return per_example.flatten(1)[:, 0]
