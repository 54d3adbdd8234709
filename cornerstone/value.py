"""The value function of the layer game: v(S) = task score of the model with only the players in S.

Following Zhang, Dong & Kawaguchi (2024), v is an lm-eval accuracy: ``acc_norm`` where the task
has it, else ``acc``. With several tasks v is their unweighted mean (a macro average), and so is the
chance level. Coalitions are named by what they remove, since every estimator here works near the
full model: ``value.evaluate([L0_mlp])`` is v(N \\ {L0.mlp}).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from . import harness
from .errors import ConfigError
from .loading import LoadedModel
from .masking import removed as removed_players
from .players import Player


@dataclass(frozen=True)
class Evaluation:
    """v of one coalition: the macro-averaged score, each task's score and each document's value."""

    removed: tuple[str, ...]
    score: float
    per_task: dict[str, float]
    per_doc: dict[str, list[float]] = field(repr=False)
    seconds: float


class ValueFunction:
    """v(N \\ removed) for one model, one fixed task/document set and one metric per task.

    Results are memoised per coalition within the object, so an estimator may ask for the same
    coalition twice (the full model, for instance) and pay once.

    ``engine="fast"`` (default) computes with :class:`~cornerstone.engine.Engine`, which reuses work
    across masks and gives lm-eval's per-document results; ``engine="lm-eval"`` runs lm-eval's own
    evaluation loop for every coalition (the reference).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        tasks: Sequence[harness.TaskSpec],
        *,
        batch_size: int = 32,
        engine: Literal["fast", "lm-eval"] = "fast",
        cache_bytes: int = 2 << 30,
    ) -> None:
        self.loaded = loaded
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.engine = engine
        self._lm = harness.make_lm(loaded.model, loaded.tokenizer, batch_size=batch_size)
        if engine == "fast":
            from .engine import Engine

            self._engine: Engine | None = Engine(loaded.model, self._lm, self.tasks, batch_size=batch_size,
                                                 cache_bytes=cache_bytes)
        elif engine == "lm-eval":
            self._engine = None
        else:
            raise ConfigError(f"unknown engine '{engine}'", hint="Use 'fast' or 'lm-eval'.")
        self._memo: dict[frozenset[str], Evaluation] = {}
        self.evaluations = 0
        self.seconds = 0.0

    @property
    def chance(self) -> float:
        return sum(spec.chance for spec in self.tasks) / len(self.tasks)

    def evaluate(self, removed: Iterable[Player] = ()) -> Evaluation:
        players = list(removed)
        key = frozenset(p.name for p in players)
        if key in self._memo:
            return self._memo[key]
        started = time.perf_counter()
        if self._engine is not None:
            results = self._engine.evaluate(players)
        else:
            with removed_players(self.loaded.model, players):
                results = harness.evaluate(self._lm, self.tasks)
        seconds = time.perf_counter() - started
        evaluation = Evaluation(
            removed=tuple(sorted(key)),
            score=sum(r.score for r in results.values()) / len(results),
            per_task={name: r.score for name, r in results.items()},
            per_doc={name: r.per_doc for name, r in results.items()},
            seconds=seconds,
        )
        self._memo[key] = evaluation
        self.evaluations += 1
        self.seconds += seconds
        return evaluation

    def __call__(self, removed: Iterable[Player] = ()) -> float:
        return self.evaluate(removed).score
