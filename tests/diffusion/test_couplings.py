"""Minibatch OT coupling: the exact assignment optimum, its streaming over plans of several batches."""

import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from diffusion_lab.diffusion.couplings import IndependentCoupling, OTCoupling, ot_assignment, squared_distances
from diffusion_lab.diffusion.losses import DiffusionLoss
from diffusion_lab.diffusion.priors import GaussianPrior


def transport_cost(x0, eps):
    return float((x0.double() - eps.double()).square().flatten(1).sum(1).sum())


@pytest.mark.parametrize("seed", range(6))
def test_ot_assignment_is_the_brute_force_optimum(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 2 + seed % 5  # 2..6 points: all n! pairings
    x0, eps = torch.randn(n, 2, generator=gen), 3 * torch.randn(n, 2, generator=gen)
    best = min(transport_cost(x0, eps[list(p)]) for p in itertools.permutations(range(n)))
    _, paired, _ = OTCoupling()(x0, eps, None)
    assert transport_cost(x0, paired) == pytest.approx(best, rel=1e-12)


def test_ot_coupling_lowers_a_batch_cost_to_scipys_optimum():
    gen = torch.Generator().manual_seed(0)
    x0, eps, y = torch.randn(256, 2, generator=gen), 5 * torch.randn(256, 2, generator=gen), torch.arange(256)
    cost = squared_distances(x0, eps).numpy()
    rows, cols = linear_sum_assignment(cost)
    out_x0, out_eps, out_y = OTCoupling()(x0, eps, y)
    assert torch.equal(out_x0, x0) and torch.equal(out_y, y)  # data and labels keep their order
    assert sorted(map(tuple, out_eps.tolist())) == sorted(map(tuple, eps.tolist()))  # a permutation of the draws
    assert transport_cost(out_x0, out_eps) == pytest.approx(cost[rows, cols].sum(), rel=1e-10)
    assert transport_cost(out_x0, out_eps) < transport_cost(x0, eps)


def test_assignment_of_images_uses_the_flattened_squared_distance():
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 1, 2, 2, generator=gen), torch.randn(5, 1, 2, 2, generator=gen)
    perm = ot_assignment(x0, eps)
    best = min(itertools.permutations(range(5)), key=lambda p: transport_cost(x0, eps[list(p)]))
    assert perm.tolist() == list(best)


def test_a_plan_of_four_batches_is_served_one_batch_per_step():
    gen = torch.Generator().manual_seed(2)
    coupling, batch = OTCoupling(plan_size=16), 4
    batches = [(torch.randn(batch, 2, generator=gen), 4 * torch.randn(batch, 2, generator=gen)) for _ in range(8)]
    served = [coupling(x0, eps, None, stream=True) for x0, eps in batches]
    # Steps 0–2 (warm-up) plan within their batch; step 3 plans batches 0–3 and serves them over steps 3–6.
    for k in range(3):
        assert transport_cost(*served[k][:2]) == pytest.approx(
            transport_cost(*OTCoupling().pair(*batches[k], None)[:2])
        )
    x0_plan = torch.cat([x for x, _ in batches[:4]])
    eps_plan = torch.cat([e for _, e in batches[:4]])
    got_x0 = torch.cat([s[0] for s in served[3:7]])
    got_eps = torch.cat([s[1] for s in served[3:7]])
    assert torch.equal(got_x0, x0_plan)
    rows, cols = linear_sum_assignment(squared_distances(x0_plan, eps_plan).numpy())
    assert transport_cost(got_x0, got_eps) == pytest.approx(
        float(squared_distances(x0_plan, eps_plan)[rows, cols].sum())
    )
    assert torch.equal(served[7][0], batches[4][0])  # step 7 starts the plan of batches 4–7


def test_outside_training_each_batch_is_planned_alone_and_a_bad_plan_size_is_refused():
    coupling = OTCoupling(plan_size=16)
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    assert transport_cost(*coupling(x0, eps, None, stream=False)[:2]) == pytest.approx(
        transport_cost(*OTCoupling().pair(x0, eps, None)[:2])
    )
    assert coupling._kept == []
    with pytest.raises(ValueError, match=r"coupling.plan_size=16 must be a multiple of the batch size 5"):
        coupling(torch.randn(5, 2), torch.randn(5, 2), None, stream=True)


def test_gaussian_prior_draws_the_stream_the_loss_always_drew():
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(GaussianPrior().sample((7, 2), gen_a, "cpu"), torch.randn((7, 2), generator=gen_b))
    loss = DiffusionLoss.__new__(DiffusionLoss)
    DiffusionLoss.__init__(loss, weighting=None, time_sampler=None)  # type: ignore[arg-type]
    assert isinstance(loss.prior, GaussianPrior) and isinstance(loss.coupling, IndependentCoupling)
