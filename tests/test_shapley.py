"""Shapley estimators on synthetic games whose Shapley values are known."""

import itertools
import math

import numpy as np
import pytest

from cornerstone.errors import ConfigError
from cornerstone.estimators import ExactShapley, Game, KernelShapley, PermutationShapley, Proximity


def game_of(value_of_present, n):
    """A Game from v(present set)."""
    everyone = frozenset(range(n))
    return Game(lambda removed_sets: [value_of_present(everyone - r) for r in removed_sets], n)


def brute_force_shapley(value_of_present, n):
    """phi_i as the mean over all n! orders of i's marginal contribution (the definition)."""
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        present = set()
        for player in order:
            before = value_of_present(frozenset(present))
            present.add(player)
            phi[player] += value_of_present(frozenset(present)) - before
    return phi / math.factorial(n)


def layer_game(n=8, seed=0):
    """Like a layer game: two 'cornerstones' without which the score falls to chance (0.25),
    small positive effects elsewhere, pairwise interactions, a saturating response."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.0, 0.3, n)
    interactions = np.triu(rng.normal(0.0, 0.15, (n, n)), 1)

    def v(present):
        z = np.zeros(n)
        z[list(present)] = 1
        if not (z[0] and z[1]):  # cornerstones
            return 0.25 + 0.02 * z.sum() / n
        drive = weights @ z + z @ interactions @ z
        return 0.25 + 0.5 / (1 + math.exp(-(drive - 1.0)))

    return v


def test_exact_matches_a_hand_computed_game():
    # v = 2 with players 0 and 1, 1 with 0 alone, else 0; player 2 is a dummy
    def v(present):
        return 2.0 if {0, 1} <= present else 1.0 if 0 in present else 0.0

    result = ExactShapley().shapley(game_of(v, 3))
    assert result.values == pytest.approx([1.5, 0.5, 0.0])
    assert result.efficiency_gap == pytest.approx(0.0)
    assert result.evaluations == 8


def test_exact_matches_the_definition_on_an_interacting_game():
    v = layer_game(6)
    assert ExactShapley().shapley(game_of(v, 6)).values == pytest.approx(brute_force_shapley(v, 6), abs=1e-12)


def test_exact_refuses_large_games():
    with pytest.raises(ConfigError, match="2\\^15"):
        ExactShapley().shapley(game_of(lambda present: 0.0, 15))


@pytest.mark.parametrize("estimator", [PermutationShapley(budget=200), PermutationShapley(budget=200, antithetic=False),
                                       Proximity(window=3)])
def test_additive_games_are_recovered_exactly(estimator):
    weights = np.array([0.5, -0.1, 0.0, 0.3, 0.2])
    result = estimator.shapley(game_of(lambda present: float(sum(weights[list(present)])), 5))
    assert result.values == pytest.approx(weights)
    if result.stderr is not None:
        assert result.stderr == pytest.approx(np.zeros(5), abs=1e-12)


def test_proximity_follows_the_paper_definition():
    # n = 4, k = 2: windows {0},{1},{2},{3},{0,1},{1,2},{2,3} and the full model
    def v(present):
        return 1.0 * (0 in present) + 0.5 * (1 in present and 2 in present) + 0.1 * len(present)

    game = game_of(v, 4)
    result = Proximity(window=2).shapley(game)
    full = v(frozenset(range(4)))
    without = lambda *players: v(frozenset(range(4)) - set(players))  # noqa: E731
    # player 1: leave-one-out, and the ends of windows {0,1} and {1,2}
    expected_1 = np.mean([full - without(1), without(0) - without(0, 1), without(2) - without(1, 2)])
    assert result.values[1] == pytest.approx(expected_1)
    expected_0 = np.mean([full - without(0), without(1) - without(0, 1)])
    assert result.values[0] == pytest.approx(expected_0)
    assert result.evaluations == 1 + 4 + 3 + 1  # full, windows, and v(empty) for the efficiency check
    # by hand: v(N) = 1.9; player 0: (1.1 + 1.1) / 2; players 1 and 2: (0.6 + 0.6 + 0.1) / 3; player 3: (0.1 + 0.1) / 2
    assert result.values == pytest.approx([1.1, 1.3 / 3, 1.3 / 3, 0.1])
    # proximity is not efficient: the diagnostic reports sum(phi) - (v(N) - v(empty)) = 2.0667 - 1.9
    assert result.efficiency_gap == pytest.approx(1 / 6)
    assert Proximity(window=3).game_evaluations(64) == 1 + 64 + 63 + 62
    # a run also measures the full model and each player alone, for the cornerstone rule
    assert Proximity(window=3).planned_evaluations(64) == 1 + 64 + 63 + 62 + 64 + 1


@pytest.mark.parametrize("estimator_class,options", [
    (PermutationShapley, dict(truncation=0.0)),
    (PermutationShapley, dict(truncation=0.0, antithetic=False)),
    (KernelShapley, {}),
    (KernelShapley, dict(variant="unbiased")),
    (KernelShapley, dict(variant="unbiased", border=False)),
])
def test_sampling_estimators_are_unbiased_and_their_intervals_cover(estimator_class, options):
    n = 7
    v = layer_game(n, seed=1)
    truth = ExactShapley().shapley(game_of(v, n)).values
    full_minus_empty = v(frozenset(range(n))) - v(frozenset())
    estimates, covered = [], 0
    runs = 40
    for seed in range(runs):
        result = estimator_class(budget=150, seed=seed, **options).shapley(game_of(v, n))
        assert result.evaluations <= 150
        # both are efficient by construction: checked on the game itself, not on the estimator's own diagnostic
        assert result.values.sum() == pytest.approx(full_minus_empty, abs=1e-9)
        estimates.append(result.values)
        covered += int(np.sum(np.abs(result.values - truth) <= 1.96 * result.stderr))
    estimates = np.array(estimates)
    # bias: the mean of 40 runs sits within 4 standard errors of the truth for every player
    spread = estimates.std(axis=0, ddof=1) / math.sqrt(runs)
    assert np.all(np.abs(estimates.mean(axis=0) - truth) <= 4 * spread + 1e-9)
    # nominal 95% intervals: coverage over 280 intervals within a binomial band (few samples per run
    # make the t-quantile a little wider than 1.96, hence the lower bound)
    assert 0.82 <= covered / (runs * n) <= 1.0


def test_truncation_is_exact_on_a_game_that_stays_at_its_floor_and_saves_evaluations():
    weights = np.array([0.3, 0.25, 0.1, 0.1, 0.05, 0.05, 0.05, 0.04, 0.03, 0.03])

    def v(present):  # monotone, and flat at 0.25 once the total falls to 0.6
        total = float(sum(weights[list(present)]))
        return max(0.25, total - 0.35)

    n = 10
    truth = ExactShapley().shapley(game_of(v, n)).values
    errors = {}
    for truncation in (0.0, 0.01):
        runs = [PermutationShapley(budget=300, truncation=truncation, seed=seed).shapley(game_of(v, n)) for seed in range(10)]
        # nothing above the floor was dropped: the values still add up to v(N) - v(empty) of the game
        assert all(r.values.sum() == pytest.approx(v(frozenset(range(n))) - v(frozenset()), abs=1e-12) for r in runs)
        errors[truncation] = (np.mean([np.abs(r.values - truth).mean() for r in runs]), np.mean([r.samples for r in runs]))
    (plain_error, plain_samples), (truncated_error, truncated_samples) = errors[0.0], errors[0.01]
    assert truncated_samples > 1.5 * plain_samples  # same budget, many more permutations
    assert truncated_error < plain_error


def test_antithetic_truncated_sampling_beats_plain_permutations_at_equal_budget():
    n = 10
    v = layer_game(n, seed=2)
    truth = ExactShapley().shapley(game_of(v, n)).values
    errors = {}
    for name, options in {"plain": dict(antithetic=False, truncation=0.0), "default": {}}.items():
        errors[name] = np.mean([
            np.sqrt(np.mean((PermutationShapley(budget=300, seed=seed, **options).shapley(game_of(v, n)).values - truth) ** 2))
            for seed in range(20)
        ])
    assert errors["default"] < 0.8 * errors["plain"], errors


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ConfigError, match="too small"):
        PermutationShapley(budget=10).shapley(game_of(lambda present: float(len(present)), 8))


def test_spearman_handles_ties_and_constants():
    from cornerstone.correlation import spearman

    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


@pytest.mark.parametrize("estimator_class", [PermutationShapley, KernelShapley])
def test_a_precision_target_stops_sampling_early(estimator_class):
    v = layer_game(8, seed=4)
    truth = ExactShapley().shapley(game_of(v, 8)).values
    loose = estimator_class(budget=5000, target_stderr=0.02, seed=0).shapley(game_of(v, 8))
    tight = estimator_class(budget=5000, target_stderr=0.001, seed=0).shapley(game_of(v, 8))
    assert loose.stderr.max() < 0.02 and loose.evaluations < tight.evaluations < 5000
    # the standard errors the estimator reports are honest: its actual error against the exact values is
    # within a few of them (the stopping rule alone would pass with a stderr that understates the error)
    assert np.abs(loose.values - truth).max() < 3 * 0.02
    assert np.abs(tight.values - truth).max() < 3 * 0.001
