"""The estimator interface: the :class:`Estimator` protocol every importance method implements, and its results.

Ablation and the Shapley estimators (:mod:`cornerstone.estimators`) and the one-pass proxies
(:mod:`cornerstone.proxies`) are pydantic models whose fields are their options. Each says which
``method`` it is, at which ``granularity`` it scores, how many coalitions a run on ``n`` players
evaluates at most (:meth:`Estimator.planned_evaluations`, which sizes the run before it starts) and
turns a value function into one :class:`PlayerEstimate` per player (:meth:`Estimator.estimate`).
:func:`configure` builds any of them from a bag of options, keeping only those it takes; the
registry that names them is :func:`cornerstone.estimators.make_estimator`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError
from .files import validation_problem

if TYPE_CHECKING:
    from .players import Player
    from .value import Evaluation, ValueFunction

Progress = Callable[[int, int, str], None]
"""``progress(done, total, label)``: called as work finishes and once at the end."""


class PlayerEstimate(BaseModel):
    """What an estimator says about one player."""

    model_config = ConfigDict(extra="forbid")

    importance: float
    score_removed: float | None = None
    per_task_removed: dict[str, float] = {}
    stderr: float | None = None


@dataclass
class Estimate:
    """An estimator's answer: the full model's evaluation, each player's estimate, and run diagnostics."""

    full: Evaluation
    players: dict[str, PlayerEstimate]
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Estimator(Protocol):
    """An importance method. Its options are pydantic fields, so ``model_dump()`` is what a report records."""

    @property
    def method(self) -> str:
        """``ablation``, ``shapley`` or a proxy's name: the report's ``method``."""

    @property
    def granularity(self) -> str:
        """``sublayer`` or ``block``: which players :func:`cornerstone.players.enumerate_players` gives it."""

    def planned_evaluations(self, players: int) -> int:
        """The most coalitions (``v(N)`` included) a run on ``players`` players evaluates."""

    def estimate(self, value: ValueFunction, players: Sequence[Player], progress: Progress | None = None) -> Estimate:
        """Every player's importance, measured with ``value`` (the others stay present)."""

    def model_dump(self) -> dict[str, Any]: ...


E = TypeVar("E", bound=BaseModel)


def configure(kind: type[E], granularity: str | None = None, **options: Any) -> E:
    """An estimator of class ``kind`` at ``granularity`` (None: the class's own), given the ``options``
    that are its fields and ignoring the rest, so one bag of options (the CLI's, a recipe's) serves
    every method. An option given as None takes the field's default.

    A granularity the class does not score, or an option it refuses, is a :class:`ConfigError` naming
    the method and the option; the class's ``granularity_hint`` (if any) says what to use instead.
    """
    fields = kind.model_fields
    name = fields["method"].default
    allowed = get_args(fields["granularity"].annotation)
    granularity = granularity or fields["granularity"].default
    if granularity not in allowed:
        raise ConfigError(f"{name} scores at {' or '.join(allowed)} granularity, not {granularity}",
                          hint=getattr(kind, "granularity_hint", None))
    given = {key: value for key, value in options.items() if key in fields and value is not None}
    try:
        return kind(granularity=granularity, **given)
    except ValidationError as exc:
        raise ConfigError(f"{name} option {validation_problem(exc)}") from None
