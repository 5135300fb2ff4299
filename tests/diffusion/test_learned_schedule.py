import math

import pytest
import torch

from diffusion_lab.diffusion.schedules import LearnedSchedule, NoiseSchedule, ShiftedSchedule

F64 = torch.float64


def make(seed: int = 0, hidden: int = 64, randomize: bool = False) -> LearnedSchedule:
    torch.manual_seed(seed)
    s = LearnedSchedule(hidden=hidden)
    if randomize:
        with torch.no_grad():
            for name, p in s.named_parameters():
                if name.startswith("gamma"):
                    p.add_(torch.randn(()))
                else:
                    p.normal_()
    return s


def shape_params(s: LearnedSchedule) -> dict[str, torch.Tensor]:
    return {n: p for n, p in s.named_parameters() if not n.startswith("gamma")}


@pytest.mark.parametrize("randomize", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monotone_with_exact_endpoints(randomize, seed):
    s = make(seed, hidden=1024, randomize=randomize)
    for dtype in (torch.float32, F64) if not randomize else (F64,):
        t = torch.linspace(0, 1, 10_000, dtype=dtype)
        lam = s.log_snr(t)
        assert bool((lam[1:] < lam[:-1]).all()), "log-SNR must be strictly decreasing"
        assert lam[0].item() == -s.gamma_0.to(dtype).item() and lam[-1].item() == -s.gamma_1.to(dtype).item()
    # Endpoints are exact inside any batch, and the bounds report them.
    lam = s.log_snr(torch.tensor([0.3, 1.0, 0.0, 0.7]))
    assert lam[1] == -s.gamma_1 and lam[2] == -s.gamma_0
    assert s.log_snr_bounds() == (-s.gamma_1.item(), -s.gamma_0.item())


def test_defaults_and_attributes():
    s = LearnedSchedule()
    assert s.learnable and not s.zero_terminal_snr and s.num_timesteps is None and not s.is_discrete
    assert s.l2.weight.shape == (1024, 1) and s.l3.weight.shape == (1, 1024)
    assert s.log_snr_bounds() == pytest.approx((-5.0, 13.3))
    assert isinstance(s.gamma_0, torch.nn.Parameter) and isinstance(s.gamma_1, torch.nn.Parameter)
    # Close to linear in γ at init (the nonlinear part is small).
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(s.gamma(t), -13.3 + 18.3 * t, atol=0.5, rtol=0)
    t = torch.linspace(0, 1, 1001, dtype=F64)
    alpha, sigma = s.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        LearnedSchedule(gamma_min=1.0, gamma_max=0.0)


def test_arbitrary_input_shapes():
    s = make(0, randomize=True)
    t = torch.rand(3, 4, 5)
    flat = s.log_snr(t.reshape(-1)).reshape(t.shape)
    torch.testing.assert_close(s.log_snr(t), flat)
    torch.testing.assert_close(s.log_snr_rate(t), s.log_snr_rate(t.reshape(-1)).reshape(t.shape))
    assert s.log_snr(torch.tensor(0.5)).shape == ()


@pytest.mark.parametrize("randomize", [False, True])
def test_log_snr_rate_equals_autograd_and_is_differentiable_in_the_parameters(randomize):
    s = make(3, randomize=randomize).double()
    t = torch.rand(64, dtype=F64).requires_grad_(True)
    (d_lam,) = torch.autograd.grad(s.log_snr(t).sum(), t)
    rate = s.log_snr_rate(t.detach())
    torch.testing.assert_close(rate, -d_lam, rtol=1e-10, atol=1e-10)
    assert bool((rate > 0).all())
    # The rate (the ELBO's −λ') carries gradients to every parameter.
    grads = torch.autograd.grad(rate.sum(), list(s.parameters()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    d = s.derivatives(t.detach())
    h = 1e-6
    for name, fn in [("d_alpha", lambda u: s.alpha_sigma(u)[0]), ("d_sigma", lambda u: s.alpha_sigma(u)[1])]:
        u = t.detach()
        fd = (fn(u + h) - fn(u - h)) / (2 * h)
        torch.testing.assert_close(getattr(d, name).double(), fd.detach(), rtol=1e-3, atol=1e-4)


def test_t_from_log_snr_round_trip_without_a_graph():
    s = make(4, randomize=True)
    t = torch.rand(200, dtype=F64) * 0.998 + 0.001
    lam = s.log_snr(t)
    assert lam.requires_grad
    with s.variance_reduction():  # no hooks (and so no missing-set_loss error) from the bisection
        back = s.t_from_log_snr(lam)
    assert not back.requires_grad
    torch.testing.assert_close(back, t, atol=1e-6, rtol=0)


def toy_loss(s: NoiseSchedule, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-example loss (B,) using every schedule output at t, like the ELBO's ½(−λ')‖ε − ε̂‖²."""
    alpha, sigma = s.alpha_sigma(t)
    lam = s.log_snr(t)
    return 0.5 * s.log_snr_rate(t) * (x - alpha) ** 2 + sigma * torch.tanh(lam) + 0.1 * lam


def grads(s: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in s.named_parameters()}
    s.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("wrap", [False, True])
def test_variance_reduction_gives_squared_loss_gradient_to_the_shape_only(wrap):
    s = make(5, randomize=True).double()
    sched: NoiseSchedule = ShiftedSchedule(s, 64, 128) if wrap else s
    gen = torch.Generator().manual_seed(0)
    t, x = torch.rand(16, dtype=F64, generator=gen), torch.randn(16, dtype=F64, generator=gen)
    t[0], t[1] = 0.0, 1.0  # endpoints too

    with sched.variance_reduction() as ctx:  # type: ignore[attr-defined]
        loss = toy_loss(sched, t, x)
        ctx.set_loss(loss.detach())
    loss.mean().backward()  # hooks fire after the context has exited
    with_ctx = grads(s)

    toy_loss(sched, t, x).square().mean().backward()
    squared = grads(s)
    toy_loss(sched, t, x).mean().backward()
    plain = grads(s)

    for name in shape_params(s):
        torch.testing.assert_close(with_ctx[name], squared[name], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(with_ctx[name], plain[name])
    for name in ("gamma_0", "gamma_1"):
        torch.testing.assert_close(with_ctx[name], plain[name], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(with_ctx[name], squared[name])


def test_variance_reduction_without_set_loss_raises_and_no_hooks_outside():
    s = make(6)
    t = torch.rand(8)
    with s.variance_reduction():
        loss = toy_loss(s, t, torch.zeros(8))
    with pytest.raises(RuntimeError, match="set_loss"):
        loss.mean().backward()
    s.zero_grad()
    with s.variance_reduction() as ctx:
        loss = toy_loss(s, t, torch.zeros(8))
        ctx.set_loss(torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        loss.mean().backward()
    # Outside the context nothing is hooked: the plain gradient.
    s.zero_grad(set_to_none=True)
    toy_loss(s, t, torch.zeros(8)).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in s.parameters())
    assert s._handle is None


def test_shifted_learned_schedule_is_learnable():
    s = ShiftedSchedule(make(7), 64, 256)
    assert s.learnable and s.num_timesteps is None
    assert s.log_snr_bounds()[0] == pytest.approx(-s.base.gamma_1.item() - 2 * math.log(4.0))
