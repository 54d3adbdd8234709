"""Estimators of player importance. Each is a small pydantic model: its fields are its options.

The value function ``v`` comes from :mod:`cornerstone.value`; an estimator decides which coalitions
to evaluate and how to turn their values into one number per player.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .players import Player
from .value import Evaluation, ValueFunction

Progress = Callable[[int, int, str], None]
"""``progress(done, total, label)``: called before each evaluation and once at the end."""


class PlayerEstimate(BaseModel):
    """What an estimator says about one player."""

    model_config = ConfigDict(extra="forbid")

    importance: float
    score_removed: float | None = None
    per_task_removed: dict[str, float] = {}
    stderr: float | None = None


class Ablation(BaseModel):
    """Single-player ablation (leave-one-out), Zhang, Dong & Kawaguchi 2024, Sec. 4.1
    (https://arxiv.org/abs/2409.14381).

    For each player i, remove it alone and measure ``importance_i = v(N) - v(N \\ {i})``. With
    ``granularity="block"`` the players are whole decoder blocks (a removed block is the identity),
    as in ShortGPT/SLEB-style block pruning. Costs ``n + 1`` evaluations.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["ablation"] = "ablation"
    granularity: Literal["sublayer", "block"] = "sublayer"

    def estimate(
        self,
        value: ValueFunction,
        players: Sequence[Player],
        progress: Progress | None = None,
    ) -> tuple[Evaluation, dict[str, PlayerEstimate]]:
        """Return the full model's evaluation and each player's estimate."""
        total = len(players) + 1
        done = 0

        def report(evaluation: Evaluation) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total, "without " + ",".join(evaluation.removed) if evaluation.removed else "full model")

        if progress:
            progress(0, total, "full model")
        full, *without = value.evaluate_many([[]] + [[p] for p in players], on_done=report)
        estimates = {
            player.name: PlayerEstimate(importance=full.score - alone.score, score_removed=alone.score,
                                        per_task_removed=alone.per_task)
            for player, alone in zip(players, without)
        }
        if progress:
            progress(total, total, "done")
        return full, estimates
