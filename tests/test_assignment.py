"""The exact assignment: the brute-force optimum, scipy's optimum, degenerate costs, and every refusal."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import diffusion_lab.assignment as assignment
from diffusion_lab.assignment import optimal_permutation


def total(cost, perm):
    return float(cost[np.arange(cost.shape[0]), perm].sum())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_the_permutation_is_the_brute_force_optimum(n, seed, ties):
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, 3, size=(n, n)).astype(float) if ties else rng.exponential(size=(n, n))
    perm = optimal_permutation(cost)
    assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(n))
    best = min(total(cost, np.array(p)) for p in itertools.permutations(range(n)))
    assert total(cost, perm) == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n", [64, 1024])
def test_it_matches_scipys_optimum_on_the_c2ot_pair(n):
    rng = np.random.default_rng(n)
    angle = rng.uniform(0, np.pi, n)
    moons = np.stack([np.cos(angle), np.sin(angle)], 1) * 3 - 1
    k = rng.integers(0, 8, n)
    source = 5 * np.stack([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], 1) + 0.56 * rng.normal(size=(n, 2))
    cost = ((moons[:, None] - source[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    assert total(cost, optimal_permutation(cost)) == pytest.approx(cost[rows, cols].sum(), rel=1e-12)


def test_a_constant_cost_and_duplicated_points_still_give_a_permutation():
    for cost in (np.zeros((7, 7)), np.ones((5, 5)), np.tile(np.arange(6.0), (6, 1))):
        assert sorted(optimal_permutation(cost).tolist()) == list(range(cost.shape[0]))


@pytest.mark.parametrize(
    ("cost", "match"),
    [
        (np.zeros((3, 4)), r"square cost matrix, got shape \(3, 4\)"),
        (np.zeros(3), r"square cost matrix, got shape \(3,\)"),
        (np.zeros((0, 0)), r"non-empty square cost matrix, got shape \(0, 0\)"),
        (np.array([[0.0, np.nan], [np.inf, 1.0]]), "2 non-finite entries"),
    ],
)
def test_bad_costs_are_refused_naming_the_problem(cost, match):
    with pytest.raises(ValueError, match=match):
        optimal_permutation(cost)


def test_a_solver_stopped_before_optimality_is_an_error(monkeypatch):
    monkeypatch.setattr(assignment, "MAX_PIVOTS", 1)
    cost = np.random.default_rng(0).exponential(size=(50, 50))
    with pytest.raises(RuntimeError, match="assignment of 50 points did not reach optimality: numItermax"):
        optimal_permutation(cost)


def test_a_plan_that_is_not_a_permutation_is_an_error(monkeypatch):
    def uniform_plan(a, b, cost, numItermax, log):
        return np.full(cost.shape, 1.0 / cost.size), {"result_code": 1, "warning": None}

    monkeypatch.setattr(assignment, "emd", uniform_plan)
    with pytest.raises(RuntimeError, match="plan of 4 points is not a permutation"):
        optimal_permutation(np.zeros((4, 4)))
    # Each row's argmax distinct but a mass split within a row: still not a vertex.
    split = np.eye(3) / 3 * 0.9 + np.roll(np.eye(3), 1, axis=1) / 3 * 0.1
    monkeypatch.setattr(assignment, "emd", lambda *a, **k: (split, {"result_code": 1, "warning": None}))
    with pytest.raises(RuntimeError, match="plan of 3 points is not a permutation"):
        optimal_permutation(np.zeros((3, 3)))
