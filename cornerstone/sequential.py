"""Score on more documents until the decisions that matter are resolved.

A leave-one-out importance measured on n documents per task has a paired standard error of order
1/sqrt(n) (:func:`~cornerstone.estimators.paired_stderr`). Most players are far from any decision
and need few documents; the ones that matter are those near a decision:

- the **cornerstone margin**: the gap ``g_i`` of :class:`~cornerstone.scores.CornerstoneRule` lies
  within ``z`` standard errors of zero (the report marks them ``resolved: false``);
- the **drop boundary** (with ``boundary = k``, the number of players a plan will drop): the
  importance lies within ``z`` standard errors of the midpoint between the k-th and (k+1)-th lowest
  importance, so whether it is dropped is decided by noise.

:func:`score_until_resolved` scores on ``start`` documents per task, and while any player is
undecided doubles the documents (the earlier ones kept, the new ones a seeded draw from the rest of
each split) up to ``max_docs`` per task. Every round scores every player on the same, larger
document set, so the final report is an ordinary report on its documents; doubling keeps the total
cost under twice that of the last round. This is a group-sequential design with a fixed number of
looks; the stopping rule is a budget guard, not a corrected test.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from . import harness
from .errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .scores import ScoreReport


class Sequential(BaseModel):
    """When to add documents, and how many at most."""

    model_config = ConfigDict(extra="forbid")

    start: int = Field(25, ge=2, description="Documents per task in the first round.")
    max_docs: int = Field(200, ge=2, description="Most documents per task.")
    boundary: int | None = Field(None, ge=1, description="Players a plan will drop: resolve who is on either side.")
    seed: int = 0


def undecided(report: ScoreReport, boundary: int | None = None) -> list[str]:
    """The players whose cornerstone decision, or side of the drop boundary, is within the noise."""
    z = report.rule.z
    found = {name for name, p in report.players.items() if p.resolved is False}
    if boundary is not None and 0 < boundary < len(report.players):
        ordered = sorted(p.importance for p in report.players.values())
        threshold = (ordered[boundary - 1] + ordered[boundary]) / 2
        found |= {name for name, p in report.players.items()
                  if p.stderr is not None and abs(p.importance - threshold) <= z * p.stderr}
    return sorted(found)


def _grow(specs: Sequence[harness.TaskSpec], size: int, seed: int) -> dict[str, harness.DocumentRecord]:
    """Each task's documents grown to ``size``: the current ones plus a seeded draw from the rest."""
    grown = {}
    for spec in specs:
        rest = sorted(set(range(spec.total_docs)) - set(spec.doc_indices))
        extra = random.Random(f"{seed}:{spec.name}:{size}").sample(rest, min(len(rest), size - len(spec.doc_indices)))
        record = spec.record()
        grown[spec.name] = record.model_copy(update={"doc_indices": sorted(spec.doc_indices + extra), "content_sha256": None,
                                                     "selection": {"sequential": True, "seed": seed}})
    return grown


def score_until_resolved(score: Callable[..., ScoreReport], model: Any, tasks: Sequence[str], *, sequential: Sequential,
                         include_paths: Sequence[str | Path] = (), log: Any = None, **options: Any) -> ScoreReport:
    """Score ``model`` on ``tasks`` with ``score`` (:func:`cornerstone.scores.score`, which calls this for
    ``until_resolved``; ablation, ``options`` as it takes them), doubling the documents while
    :func:`undecided` finds players. The report's ``diagnostics.rounds`` lists each round's documents
    per task and its undecided players."""
    estimator = options.get("estimator")
    if estimator is not None and getattr(estimator, "method", "ablation") != "ablation":
        raise ConfigError("sequential scoring adds documents to leave-one-out ablation only",
                          hint="Drop --until-resolved, or score with --method ablation.")
    if sequential.max_docs < sequential.start:
        raise ConfigError(f"--until-resolved {sequential.max_docs} is below the first round's {sequential.start} documents",
                          hint="Give a larger maximum, or a smaller --limit.")
    settings = options.get("settings")
    objective = settings.tasks.objective if settings is not None else "accuracy"
    specs = harness.load_tasks(list(tasks), include_paths=include_paths, limit=sequential.start, seed=sequential.seed,
                               objective=objective)
    rounds: list[dict[str, Any]] = []
    size = sequential.start
    while True:
        report = score(model, specs, include_paths=include_paths, **options)
        left = undecided(report, sequential.boundary)
        rounds.append({"documents": {spec.name: len(spec.doc_indices) for spec in specs}, "undecided": left})
        if log is not None:
            log(f"round {len(rounds)}: {size} documents per task, {len(left)} undecided" + (f": {', '.join(left)}" if left else ""))
        exhausted = all(len(spec.doc_indices) >= spec.total_docs for spec in specs)
        if not left or size >= sequential.max_docs or exhausted:
            break
        size = min(sequential.max_docs, 2 * size)
        specs = harness.load_tasks(list(tasks), include_paths=include_paths, documents=_grow(specs, size, sequential.seed),
                                   objective=objective)
    report.diagnostics["rounds"] = rounds
    report.diagnostics["sequential"] = sequential.model_dump()
    return report
