"""Choose what to remove to meet cost targets while losing the least score: a covering knapsack.

Each candidate player i has a loss w_i (the score its removal costs, from a report) and a saving
c_ik in each cost k a target is set on (weight bytes, KV-cache bytes per token, seconds of prefill
or decode, from :mod:`cornerstone.costs`). With losses and savings taken as additive, the best
removal set R solves

    minimise  sum_{i in R} w_i   subject to   sum_{i in R} c_ik >= need_k  for every target k,

a 0/1 covering knapsack with one row per target. :func:`solve` solves it exactly as a mixed-integer
program with HiGHS (through ``scipy.optimize.milp``), as NVIDIA's Puzzle (Bercovich et al. 2024,
https://arxiv.org/abs/2411.19146) plans against measured per-block costs, or, with ``exact=False``
(or when HiGHS gives no optimum), greedily: repeatedly remove the candidate with the least loss per
unit of the normalised need it still covers, ``w_i / sum_k min(c_ik, r_k) / need_k`` with r_k the
need left, then drop any removal the others make unnecessary (most loss first).

A negative loss (the score rose without the player: noise, for a player whose interval reaches zero)
counts as zero, and every removal carries a tie-breaking cost of 1e-5 of the largest loss, so no
player is removed that the targets do not need: among sets of equal loss the solver takes the one
with the fewest removals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import PlanError


@dataclass(frozen=True)
class Item:
    """One removable player: the score its removal loses and what it saves in each cost."""

    name: str
    loss: float
    savings: Mapping[str, float]


@dataclass(frozen=True)
class Solution:
    names: tuple[str, ...]  # in the order of the items given
    loss: float
    savings: dict[str, float]
    method: str  # "exact" (proven optimal by HiGHS) or "greedy"


def _infeasible(items: Sequence[Item], needs: Mapping[str, float]) -> PlanError | None:
    for cost, need in needs.items():
        available = sum(max(0.0, item.savings.get(cost, 0.0)) for item in items)
        if available + 1e-12 < need:
            return PlanError(f"removing every allowed player saves {available:.4g} of {cost}, short of the {need:.4g} "
                             "the target needs", hint="Relax the target, or allow more players (--keep-first/--keep-last, "
                             "--no-protect, a sublayer plan).")
    return None


def _summary(items: Sequence[Item], chosen: Sequence[int], needs: Mapping[str, float], method: str) -> Solution:
    return Solution(names=tuple(items[i].name for i in sorted(chosen)), loss=sum(items[i].loss for i in chosen),
                    savings={k: sum(items[i].savings.get(k, 0.0) for i in chosen) for k in needs}, method=method)


def solve(items: Sequence[Item], needs: Mapping[str, float], *, exact: bool = True) -> Solution:
    """The removal set with the least summed loss whose savings reach every ``needs[k]`` (module docstring)."""
    needs = {k: float(v) for k, v in needs.items() if v > 0}
    problem = _infeasible(items, needs)
    if problem is not None:
        raise problem
    if exact:
        chosen = _exact(items, needs)
        if chosen is not None:
            return _summary(items, chosen, needs, "exact")
    return _summary(items, _greedy(items, needs), needs, "greedy")


def _exact(items: Sequence[Item], needs: Mapping[str, float]) -> list[int] | None:
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not items:
        return []
    clipped = np.array([max(item.loss, 0.0) for item in items], dtype=float)
    # scaled to at most 1 (HiGHS' absolute gap is 1e-6), plus the tie-breaking cost of a removal
    loss = clipped / (float(clipped.max()) or 1.0) + 1e-5
    constraints = []
    if needs:
        matrix = np.array([[item.savings.get(k, 0.0) for item in items] for k in needs], dtype=float)
        # scaled per row so bytes and seconds sit in one tolerance
        scale = np.array([max(abs(v), 1e-300) for v in needs.values()])
        constraints.append(LinearConstraint(matrix / scale[:, None], lb=np.ones(len(needs)) - 1e-9, ub=np.inf))
    result = milp(loss, integrality=np.ones(len(items)), bounds=Bounds(0, 1), constraints=constraints,
                  options={"time_limit": 60.0, "mip_rel_gap": 1e-9})
    if result.status != 0 or result.x is None:  # 0: optimal; a time-out or failure falls back to greedy
        return None
    return [i for i, x in enumerate(result.x) if x > 0.5]


def _greedy(items: Sequence[Item], needs: Mapping[str, float]) -> list[int]:
    chosen: list[int] = []
    left = dict(needs)
    while any(r > 1e-12 for r in left.values()):
        def covered(i: int) -> float:
            return sum(min(max(items[i].savings.get(k, 0.0), 0.0), r) / needs[k] for k, r in left.items() if r > 0)

        options = [i for i in range(len(items)) if i not in chosen and covered(i) > 0]
        best = min(options, key=lambda i: (max(items[i].loss, 0.0) / covered(i), -covered(i), i))
        chosen.append(best)
        left = {k: r - items[best].savings.get(k, 0.0) for k, r in left.items()}
    # a removal the others make unnecessary is dropped, most loss first
    for i in sorted(chosen, key=lambda i: -items[i].loss):
        rest = [j for j in chosen if j != i]
        if all(sum(items[j].savings.get(k, 0.0) for j in rest) >= need - 1e-12 for k, need in needs.items()):
            chosen = rest
    return chosen
