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


# ------------------------------------------------------------------------------------------ entropic OT (Sinkhorn)
def c2ot_pair(n, seed):
    from diffusion_lab.data.toy2d import sample_c2ot_eight_gaussians, sample_torchdyn_moons

    gen = torch.Generator().manual_seed(seed)
    return sample_torchdyn_moons(n, gen), sample_c2ot_eight_gaussians(n, gen)


@pytest.mark.parametrize("reg", [0.01, 0.05, 1.0])
def test_the_entropic_plan_has_uniform_marginals(reg):
    from diffusion_lab.diffusion.couplings import entropic_plan

    x0, eps = c2ot_pair(128, 0)
    plan = entropic_plan(x0, eps, reg)
    assert plan.dtype == torch.float64 and plan.shape == (128, 128) and bool((plan >= 0).all())
    torch.testing.assert_close(plan.sum(0), torch.full((128,), 1 / 128, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(plan.sum(1), torch.full((128,), 1 / 128, dtype=torch.float64), rtol=0, atol=1e-8)


def test_the_entropic_plan_tends_to_the_exact_optimum_as_reg_shrinks():
    """⟨P_reg, C⟩ decreases with reg and reaches within 6 % of the assignment optimum at reg = 0.005 (on a cost
    scaled to max 1, the entropic bias is ≈ reg·log n in those units); reg = 50 is within 1 % of independent pairing."""
    from diffusion_lab.diffusion.couplings import entropic_plan

    x0, eps = c2ot_pair(256, 1)
    cost = squared_distances(x0, eps)
    exact = float(cost[torch.arange(256), ot_assignment(x0, eps)].sum()) / 256
    independent = float(cost.mean())
    costs = [float((entropic_plan(x0, eps, reg) * cost).sum()) for reg in (0.005, 0.05, 0.5, 50.0)]
    assert exact <= costs[0] <= 1.06 * exact
    assert costs == sorted(costs) and costs[1] < costs[2] < costs[3]
    assert costs[3] == pytest.approx(independent, rel=1e-2)  # the plan tends to uniform, 1/n² each


def test_sinkhorn_pairs_are_drawn_from_the_plan_reproducibly():
    x0, eps = c2ot_pair(256, 2)
    y = torch.arange(256)
    coupling = OTCoupling(solver="sinkhorn", reg=0.05)
    torch.manual_seed(7)
    out_x0, out_eps, out_y = coupling(x0, eps, y)
    torch.manual_seed(7)
    again = coupling(x0, eps, y)
    assert all(torch.equal(a, b) for a, b in zip((out_x0, out_eps, out_y), again, strict=True))
    assert torch.equal(out_x0, x0[out_y])  # each label travels with its data point
    rows_of_eps = {tuple(r) for r in eps.tolist()}
    assert all(tuple(r) in rows_of_eps for r in out_eps.tolist())
    assert len({tuple(r) for r in out_x0.tolist()}) < 256  # drawn with replacement, not a permutation
    paired, independent = transport_cost(out_x0, out_eps), transport_cost(x0, eps)
    assert paired < 0.5 * independent


def test_an_unknown_solver_and_an_unconverged_plan_are_refused(monkeypatch):
    import diffusion_lab.diffusion.couplings as couplings

    with pytest.raises(ValueError, match=r"unknown coupling.solver 'auction'; valid choices: \['exact', 'sinkhorn'\]"):
        OTCoupling(solver="auction")
    monkeypatch.setattr(couplings, "SINKHORN_ITERATIONS", 2)
    x0, eps = c2ot_pair(64, 3)
    with pytest.raises(RuntimeError, match=r"coupling.reg=0.001 did not converge on 64 pairs in 2 iterations"):
        OTCoupling(solver="sinkhorn", reg=0.001)(x0, eps, None)


def test_a_plan_with_one_column_marginal_off_by_1e_5_is_refused(monkeypatch):
    """The check reads the worst column, relative to 1/n: one column off by 1e-5·(1/n) of 64 is refused, naming
    the error and the way out; the same plan exact is accepted."""
    import diffusion_lab.diffusion.couplings as couplings

    n, x0, eps = 64, *c2ot_pair(64, 5)
    uniform = torch.full((n, n), 1.0 / n**2, dtype=torch.float64).numpy()
    off = uniform.copy()
    off[0, 0] += 1e-5 / n
    for plan, ok in ((uniform, True), (off, False)):
        monkeypatch.setattr(couplings, "sinkhorn_knopp", lambda *a, plan=plan, **k: plan)
        if ok:
            assert torch.equal(couplings.entropic_plan(x0, eps, 0.05), torch.from_numpy(uniform))
            continue
        with pytest.raises(RuntimeError, match=r"marginal error 1\.00e-05 relative to 1/n\); raise coupling.reg or "
                           r"use coupling.solver=exact"):  # fmt: skip
            couplings.entropic_plan(x0, eps, 0.05)


def test_pairs_are_drawn_with_replacement_as_iid_draws_from_the_plan():
    """Four far-apart pairs and a small reg: the plan is ≈ a permutation/4, so i.i.d. draws of 4 pairs repeat one in
    1 − 4!/4⁴ ≈ 0.906 of the batches (drawing without replacement never would)."""
    x0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    eps = x0 + 0.1
    coupling = OTCoupling(solver="sinkhorn", reg=0.01)
    torch.manual_seed(0)
    repeats = 0
    for _ in range(400):
        out_x0, _, _ = coupling(x0, eps, None)
        repeats += len({tuple(r) for r in out_x0.tolist()}) < 4
    assert 0.86 <= repeats / 400 <= 0.95


def test_a_reg_too_small_for_the_kernel_is_refused_not_turned_into_nan_pairs():
    x0, eps = c2ot_pair(64, 4)
    with pytest.raises(RuntimeError, match=r"coupling.reg=0.0001 did not converge on 64 pairs"):
        OTCoupling(solver="sinkhorn", reg=1e-4)(x0, eps, None)
