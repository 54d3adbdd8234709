"""Rank correlations between two rankings of the same players: Spearman's rho and Kendall's tau-b.

:mod:`cornerstone.compare` measures with them how far importance methods agree; the Shapley
estimators report their agreement with leave-one-out ablation. Both give 0 when either side is
constant (there is no order to agree with).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); 0 when either side is constant."""
    def positions(values: Sequence[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values))
        for value in set(values):  # mean rank for ties
            tied = np.flatnonzero(np.asarray(values) == value)
            ranked[tied] = ranked[tied].mean()
        return ranked

    ra, rb = positions(a), positions(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's rank correlation tau-b, which corrects for ties; 0 when either side is constant.

    Over all pairs i < j, P counts the concordant pairs (a and b order i, j the same way), Q the
    discordant ones, T_a the pairs tied in a only and T_b those tied in b only (pairs tied on both
    sides count nowhere):

        tau_b = (P - Q) / sqrt((P + Q + T_a)(P + Q + T_b))

    It equals ``scipy.stats.kendalltau(a, b, variant="b")``. O(n^2) in time and memory, which is
    nothing for the few hundred players of a model.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall needs two sequences of the same length, got {x.shape} and {y.shape}")
    upper = np.triu_indices(len(x), k=1)
    order_a = np.sign(x[:, None] - x[None, :])[upper]
    order_b = np.sign(y[:, None] - y[None, :])[upper]
    agreement = order_a * order_b
    concordant = int(np.count_nonzero(agreement > 0))
    discordant = int(np.count_nonzero(agreement < 0))
    tied_a_only = int(np.count_nonzero((order_a == 0) & (order_b != 0)))
    tied_b_only = int(np.count_nonzero((order_b == 0) & (order_a != 0)))
    denominator = math.sqrt((concordant + discordant + tied_a_only) * (concordant + discordant + tied_b_only))
    if denominator == 0:  # one side is constant: no ordering to agree with
        return 0.0
    return (concordant - discordant) / denominator
