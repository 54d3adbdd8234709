"""The covering-knapsack solver behind `plan --target`, against brute force on small problems."""

import itertools
import random

import pytest

from cornerstone.errors import PlanError
from cornerstone.solver import Item, solve


def clipped(items, names):
    """The loss the solver minimises: a negative loss (a gain within noise) counts as zero."""
    return sum(max(item.loss, 0.0) for item in items if item.name in names)


def brute_force(items, needs):
    """(least clipped loss, fewest removals among the sets with that loss) over every feasible set."""
    best = None
    for size in range(len(items) + 1):
        for subset in itertools.combinations(range(len(items)), size):
            if all(sum(items[i].savings.get(k, 0) for i in subset) >= need for k, need in needs.items()):
                loss = clipped(items, {items[i].name for i in subset})
                if best is None or loss < best[0] - 1e-12:
                    best = (loss, size)
    return best


def random_problem(seed, n=10, costs=("weights", "kv")):
    rng = random.Random(seed)
    items = [Item(f"p{i}", round(rng.uniform(-0.01, 0.2), 4),
                  {k: rng.choice([0.0, round(rng.uniform(0.5, 10), 2)]) for k in costs}) for i in range(n)]
    totals = {k: sum(item.savings[k] for item in items) for k in costs}
    needs = {k: round(rng.uniform(0.2, 0.6) * totals[k], 2) for k in costs}
    return items, needs


@pytest.mark.parametrize("seed", range(12))
def test_the_exact_solver_finds_brute_forces_optimum(seed):
    items, needs = random_problem(seed)
    solution = solve(items, needs)
    assert solution.method == "exact"
    assert (clipped(items, solution.names), len(solution.names)) == pytest.approx(brute_force(items, needs), abs=1e-9)
    assert all(solution.savings[k] >= need - 1e-9 for k, need in needs.items())


@pytest.mark.parametrize("seed", range(12))
def test_greedy_meets_every_target_and_never_beats_the_optimum(seed):
    items, needs = random_problem(seed)
    solution = solve(items, needs, exact=False)
    assert solution.method == "greedy"
    assert all(solution.savings[k] >= need - 1e-9 for k, need in needs.items())
    assert clipped(items, solution.names) >= brute_force(items, needs)[0] - 1e-9


def test_a_known_case_where_cheapest_per_unit_is_not_optimal():
    """Need 10: one big cheap-per-unit item (loss 5, saves 10) against two that together save 10 for 4."""
    items = [Item("big", 5.0, {"weights": 10}), Item("a", 2.0, {"weights": 5}), Item("b", 2.0, {"weights": 5}),
             Item("tiny", 0.1, {"weights": 0.5})]
    assert solve(items, {"weights": 10}).names == ("a", "b")


def test_two_targets_at_once_need_players_of_both_kinds():
    """KV bytes come only from attention, weight bytes mostly from MLPs: both rows must be met."""
    items = [Item("L1.attn", 0.05, {"kv": 1, "weights": 1}), Item("L1.mlp", 0.01, {"kv": 0, "weights": 3}),
             Item("L2.attn", 0.02, {"kv": 1, "weights": 1}), Item("L2.mlp", 0.04, {"kv": 0, "weights": 3})]
    solution = solve(items, {"kv": 1, "weights": 4})
    assert solution.names == ("L1.mlp", "L2.attn") and solution.loss == pytest.approx(0.03)


def test_an_unreachable_target_is_refused_with_what_is_available():
    items = [Item("a", 0.1, {"kv": 1}), Item("b", 0.1, {"kv": 2})]
    with pytest.raises(PlanError, match="saves 3 of kv, short of the 5"):
        solve(items, {"kv": 5})


@pytest.mark.parametrize("exact", [True, False])
def test_nothing_is_removed_that_no_target_needs(exact):
    """A player whose removal measured as a gain (noise, within its interval) is not removed for free: it is
    taken when it meets the need, and nothing beyond the need is."""
    items = [Item("a", 0.1, {"kv": 1}), Item("gain", -0.02, {"kv": 1}), Item("free", 0.0, {"kv": 1})]
    assert solve(items, {"kv": 0}, exact=exact).names == ()
    assert len(solve(items, {"kv": 1}, exact=exact).names) == 1
    assert solve(items, {"kv": 2}, exact=exact).names == ("gain", "free")
