"""Score a model: run an estimator, mark cornerstones, and keep every number in a :class:`ScoreReport`.

:func:`score` is the Python API behind ``cornerstone score``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from . import harness
from .errors import EvaluationError, ReportError
from .provenance import machine, package_versions
from .files import parse_json, read_validated
from .estimation import Estimator, PlayerEstimate, Progress
from .rule import CornerstoneRule
from .sequential import score_until_resolved
from .estimators import paired_stderr
from .loading import DEFAULT_MODEL, LoadedModel, load_model
from .players import _PLAYER_ID, enumerate_players, parse_players, player_parameters
from .sizing import RunEstimate, check_fits, estimate_run
from .value import ValueFunction

if TYPE_CHECKING:
    from .distributed import Ranks
    from .settings import ScoreSettings

SCHEMA_VERSION = 1
# Metric scores (acc, acc_norm: harness.PREFERRED_METRICS) and their chance levels are shares.
_SCORE = (0.0, 1.0)
# Float sums taken in another order differ in the last bits; a file's numbers must agree to this.
_TOLERANCE = 1e-9


def player_name_problem(name: str, layer: int, kind: str) -> str | None:
    """What is wrong with a player entry whose id is ``name`` and whose fields say ``layer`` and ``kind``
    (None when they agree): the id is the one the model's players are cut by, so the two must name the
    same part (``L5.attn`` is layer 5, kind attn; ``L5`` is block 5)."""
    match = _PLAYER_ID.match(name)
    if match is None:
        return "is not a player id (L5, L5.attn or L5.mlp)"
    named_layer, named_kind = int(match.group(1)), match.group(2) or "block"
    if (named_layer, named_kind) != (layer, kind):
        return f"has layer {layer}, kind {kind}, but its id names layer {named_layer}, kind {named_kind}"
    return None


def as_checked_mapping(schema: type[BaseModel]) -> BeforeValidator:
    """Validate a free-form mapping field against ``schema`` (types, finite numbers; ``extra`` as the
    schema says) and keep it a plain ``dict`` of exactly the keys given, for the code that reads it with ``.get``."""
    def check(value: Any, info: ValidationInfo) -> Any:
        return schema.model_validate(value, strict=True, context=info.context).model_dump(exclude_unset=True)
    return BeforeValidator(check)


def first_non_finite(data: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinity in ``data`` (nested dicts and lists), or None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else where
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class ReportModel(BaseModel):
    """The ``model`` block of a report (:meth:`~cornerstone.loading.LoadedModel.describe`): the fields
    cornerstone reads are typed, anything else is kept as written. Older or hand-built reports may lack
    some; the code that needs one says so."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    spec: str | None = None
    source: str | None = None
    location: str | None = None
    fingerprint: str | None = None
    revision: str | None = None
    model_type: str | None = None
    architecture: str | None = None
    num_hidden_layers: int | None = Field(None, ge=1)
    parameters: int | None = Field(None, ge=1)
    dtype: str | None = None
    device: str | None = None
    attn_implementation: str | None = None


class EstimatorSettings(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    method: str | None = None
    granularity: str | None = None
    estimator: str | None = None


class ReportSettings(BaseModel):
    """The ``settings`` block: what documents were drawn and how they were evaluated (redrawn by
    :meth:`ScoreReport.documents` and re-used by greedy planning)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    tasks: list[str] | None = None
    include_paths: list[str] | None = None
    limit: int | None = Field(None, ge=1)
    seed: int | None = None
    batch_size: int | None = Field(None, ge=1)
    engine: str | None = None
    players: list[str] | None = None
    estimator: Annotated[dict[str, Any], as_checked_mapping(EstimatorSettings)] | None = None
    processes: int | None = Field(None, ge=1)


class CalibrationInfo(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    source: str
    texts: int = Field(ge=0)
    tokens: int = Field(ge=0)


class MachineInfo(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    cpu: str
    amx: bool
    torch_threads: int = Field(ge=1)


class ReportDiagnostics(BaseModel):
    """The ``diagnostics`` block: the entries the planner, ``report`` and its plots read are typed
    (``spans``: the angular proxy's d(l, n) by span length n, which contiguous plans look up)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    spans: dict[str, list[float]] | None = None
    calibration: Annotated[dict[str, Any], as_checked_mapping(CalibrationInfo)] | None = None
    machine: Annotated[dict[str, Any], as_checked_mapping(MachineInfo)] | None = None
    efficiency_gap: float | None = None
    spearman_with_ablation: float | None = None
    top4_share: float | None = None
    unresolved: list[str] | None = None


class PlayerScore(BaseModel):
    """One player's numbers in a report. ``share`` clips negative importances to zero, as the paper does."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layer: int = Field(ge=0)
    kind: Literal["attn", "mlp", "block"]
    importance: float
    share: float = Field(ge=0.0, le=1.0)
    score_removed: float | None = None
    per_task_removed: dict[str, float] = {}
    stderr: float | None = Field(None, ge=0.0)
    cornerstone: bool = False
    # What a checkpoint loses when the player is cut (players.player_parameters); None in older reports.
    parameters: int | None = Field(None, ge=0)
    # CornerstoneRule.effect of the importance interval, and the cornerstone decision's gap g_i, its
    # paired standard error and whether the interval resolves it (None for proxies and older reports).
    effect: Literal["hurts", "none measurable", "helps"] | None = None
    gap: float | None = None
    gap_stderr: float | None = Field(None, ge=0.0)
    resolved: bool | None = None


class TaskScore(BaseModel):
    """One task of a report: its metric, chance level, full-model score and the exact documents scored.

    ``doc_indices`` and ``content_sha256`` (:class:`~cornerstone.harness.DocumentRecord`) are what
    greedy planning re-measures on and what ``eval``/``heal`` keep away from; reports written before
    they were kept have neither, and their documents are redrawn from ``settings`` (limit, seed).
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str
    metric: str
    num_docs: int = Field(ge=0)
    total_docs: int = Field(ge=0)
    chance: float = Field(ge=_SCORE[0], le=_SCORE[1])
    base_score: float = Field(ge=_SCORE[0], le=_SCORE[1])
    base_stderr: float | None = Field(None, ge=0.0)
    doc_indices: list[int] | None = None
    content_sha256: str | None = None
    selection: dict[str, Any] = {}

    def record(self) -> harness.DocumentRecord | None:
        if self.doc_indices is None or self.content_sha256 is None:
            return None
        return harness.DocumentRecord(name=self.name, doc_indices=self.doc_indices, total_docs=self.total_docs,
                                      content_sha256=self.content_sha256, selection=self.selection)


class ScoreReport(BaseModel):
    """Everything a scoring run measured, with enough metadata to reproduce it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    schema_version: int = SCHEMA_VERSION
    created: str
    method: str
    granularity: Literal["sublayer", "block"]
    model: Annotated[dict[str, Any], as_checked_mapping(ReportModel)]
    tasks: list[TaskScore]
    settings: Annotated[dict[str, Any], as_checked_mapping(ReportSettings)]
    base_score: float = Field(ge=_SCORE[0], le=_SCORE[1])
    # standard error of the macro-averaged full-model score (documents as a sample of each split)
    base_stderr: float | None = Field(None, ge=0.0)
    chance: float = Field(ge=_SCORE[0], le=_SCORE[1])
    players: dict[str, PlayerScore]
    cornerstones: list[str]
    rule: CornerstoneRule
    evaluations: int = Field(ge=0)
    diagnostics: Annotated[dict[str, Any], as_checked_mapping(ReportDiagnostics)] = {}
    timing: dict[str, float]
    versions: dict[str, str]

    @model_validator(mode="after")
    def _names_agree(self) -> "ScoreReport":
        """A player's id and its layer and kind name the same part: the planner cuts by the id."""
        for name, player in self.players.items():
            problem = player_name_problem(name, player.layer, player.kind)
            if problem:
                raise ValueError(f"players.{name} {problem}")
        return self

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "ScoreReport":
        """Cross-checks of a report read from a file (:meth:`load`), where any field may have been edited:
        what ``score`` writes always passes them."""
        if not (info.context or {}).get("file"):
            return self
        problem = self.inconsistency()
        if problem:
            raise ValueError(problem)
        return self

    def inconsistency(self) -> str | None:
        """The first way the report contradicts itself, as ``field: what was expected``; None if none."""
        non_finite = first_non_finite(self.model_dump())  # free-form entries too (diagnostics, task extras)
        if non_finite:
            return f"{non_finite}: Input should be a finite number"
        model, players = self.model, self.players
        layers, parameters = model.get("num_hidden_layers"), model.get("parameters")
        kinds = {"block"} if self.granularity == "block" else {"attn", "mlp"}
        for name, p in players.items():
            where = f"players.{name}"
            if p.kind not in kinds:
                return f"{where}.kind: a {self.granularity} report holds {' and '.join(sorted(kinds))} players, not {p.kind}"
            if layers is not None and p.layer >= layers:
                return f"{where}.layer: {p.layer} is past the model's {layers} blocks (model.num_hidden_layers)"
            if self.method == "ablation" and p.score_removed is not None and \
                    abs(p.importance - (self.base_score - p.score_removed)) > _TOLERANCE:
                return (f"{where}.importance: {p.importance} is not base_score - score_removed "
                        f"({self.base_score - p.score_removed}), as leave-one-out importances are")
            if p.effect is not None and p.effect != self.rule.effect(p.importance, p.stderr):
                return f"{where}.effect: '{p.effect}' is not what the importance interval says ({self.rule.effect(p.importance, p.stderr)})"
        counted = [p.parameters for p in players.values() if p.parameters is not None]
        if parameters is not None and sum(counted) > parameters:
            return (f"players.*.parameters: the players hold {sum(counted):,} parameters, more than the model's "
                    f"{parameters:,} (model.parameters)")
        if sum(p.share for p in players.values()) > 1 + 1e-6:
            return "players.*.share: shares sum to more than 1"
        if len(set(self.cornerstones)) != len(self.cornerstones) or set(self.cornerstones) - set(players):
            return "cornerstones: must list players of the report, each once"
        flagged = {name for name, p in players.items() if p.cornerstone}
        if set(self.cornerstones) != flagged:
            return (f"cornerstones: lists {', '.join(self.cornerstones) or 'none'} but the players flagged as "
                    f"cornerstones are {', '.join(sorted(flagged)) or 'none'}")
        return self._spans_problem()

    def _spans_problem(self) -> str | None:
        """The angular proxy's span distances have d(l, n) for every start l of every length n, as
        contiguous planning looks them up."""
        spans = self.diagnostics.get("spans")
        if not spans:
            return None
        blocks = len(spans.get("1", []))
        if blocks == 0 or any(p.layer >= blocks for p in self.players.values()):
            return "diagnostics.spans: needs the distance of every single block under '1'"
        for n, values in spans.items():
            if not n.isascii() or not n.isdigit() or not 1 <= int(n) <= blocks or len(values) != blocks - int(n) + 1:
                return f"diagnostics.spans.{n}: expected a span length 1..{blocks} with {blocks} - n + 1 distances"
            if any(value < 0 for value in values):
                return f"diagnostics.spans.{n}: distances cannot be negative"
        return None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "ScoreReport":
        return read_validated(cls, path, parse_json, "JSON", ReportError, "score report")

    def top_share(self, k: int = 4) -> float:
        """The share of the k players with the largest shares (the paper's "top-4 share")."""
        return sum(sorted((p.share for p in self.players.values()), reverse=True)[:k])

    @property
    def measures_scores(self) -> bool:
        """Whether importances are task-score differences (ablation, Shapley), not a one-pass proxy's units."""
        return any(p.score_removed is not None for p in self.players.values()) or self.method in ("ablation", "shapley")

    def as_blocks(self) -> dict[str, "BlockSum"]:
        """The players as whole blocks, in forward order. A sublayer report's block importance is the
        sum of its sublayers' (the additive approximation: exact when their removals do not interact),
        and the block is a cornerstone when either sublayer is. Block reports come back as they are."""
        members: dict[int, list[str]] = {}
        for name, player in self.players.items():
            members.setdefault(player.layer, []).append(name)
        return {f"L{layer}": BlockSum(layer=layer, members=names,
                                      importance=sum(self.players[n].importance for n in names),
                                      cornerstone=any(self.players[n].cornerstone for n in names))
                for layer, names in sorted(members.items())}

    def task_cornerstones(self, task: str) -> list[str]:
        """The players whose removal alone takes ``task`` to near chance: the cornerstone rule applied to
        that task's own full-model score, chance and per-task score without the player (measured
        methods only; a one-pass proxy has no per-task scores)."""
        entry = next((t for t in self.tasks if t.name == task), None)
        if entry is None:
            raise ReportError(f"the report has no task '{task}'", hint=f"Its tasks: {', '.join(t.name for t in self.tasks)}.")
        return [name for name, player in self.players.items()
                if self.rule.is_cornerstone(player.per_task_removed.get(task), entry.base_score, entry.chance)]

    def documents(self) -> dict[str, harness.DocumentRecord]:
        """Every task's scored documents (:meth:`TaskScore.record`). A report written before documents
        were recorded gets them redrawn from its settings (the same limit and seed give the same draw)."""
        records = {task.name: task.record() for task in self.tasks}
        if all(record is not None for record in records.values()):
            return records  # type: ignore[return-value]
        settings = self.settings
        try:
            specs = harness.load_tasks(settings["tasks"], include_paths=settings.get("include_paths") or [],
                                       limit=settings.get("limit"), seed=settings.get("seed"))
        except KeyError as exc:
            raise ReportError(f"the report records neither its documents nor the setting {exc} to redraw them",
                              hint="Re-score the model.") from None
        return {spec.name: spec.record() for spec in specs}

    def ranking(self) -> list[str]:
        """Player names from least to most important."""
        return sorted(self.players, key=lambda name: self.players[name].importance)


@dataclass(frozen=True)
class BlockSum:
    """One block of a report seen whole (:meth:`ScoreReport.as_blocks`): the players it sums."""

    layer: int
    members: list[str]
    importance: float
    cornerstone: bool


def _gaps(value: ValueFunction, playing: Sequence[Any], estimates: dict[str, PlayerEstimate], rule: CornerstoneRule,
          full: Any) -> dict[str, tuple[float, float | None]]:
    """Each measured player's cornerstone gap g_i (:class:`CornerstoneRule`) and its paired standard
    error, from the per-document values of v(N) and v(N \\ {i}) (already evaluated: memoised)."""
    from .estimators import differences

    found: dict[str, tuple[float, float | None]] = {}
    for player in playing:
        removed = estimates[player.name].score_removed
        if removed is None:
            continue
        alone = value.evaluate([player])
        found[player.name] = (rule.gap(removed, full.score, value.chance),
                              paired_stderr(differences(alone, full, weight=rule.margin)))
    return found


def _common_selection(specs: Sequence[harness.TaskSpec]) -> dict[str, Any]:
    """``limit`` and ``seed`` as the specs were drawn; None where the tasks were drawn differently
    (their ``doc_indices`` in the report are the record either way)."""
    found: dict[str, Any] = {}
    for key in ("limit", "seed"):
        values = {spec.selection.get(key) for spec in specs}
        found[key] = values.pop() if len(values) == 1 else None
    return found


def score(
    model: str | LoadedModel = DEFAULT_MODEL,
    tasks: Sequence[str] | Sequence[harness.TaskSpec] | None = None,
    settings: ScoreSettings | None = None,
    *,
    estimator: Estimator | None = None,
    rule: CornerstoneRule | None = None,
    dtype: str = "float32",
    device: str | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
    on_estimate: Callable[[RunEstimate], None] | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> ScoreReport:
    """Score the players of ``model`` on ``tasks`` and mark its cornerstones.

    ``settings`` (:class:`~cornerstone.settings.ScoreSettings`, the settings of ``cornerstone score``
    and of a recipe's ``score:``) says how; ``options`` set any of its fields by name (``limit``,
    ``seed`` and ``include_paths`` are those of ``settings.tasks``), e.g. ``score(loaded, ["cs_capitals"],
    limit=30)``. ``model`` is a spec for :func:`~cornerstone.loading.load_model` (loaded with
    ``dtype``/``device``) or an already loaded model; ``tasks`` are lm-eval task names (default:
    ``settings.tasks.names``) or specs already loaded with :func:`~cornerstone.harness.load_tasks`.
    ``estimator`` and ``rule``, when given, are used instead of the ones the settings describe.
    ``players`` restricts the game to those players (the others stay present throughout); by default
    every player at the estimator's granularity plays.
    ``importance_i`` is the estimator's value for player i (ablation: ``v(N) - v(N \\ {i})``;
    Shapley estimators: phi_i) and ``share_i = max(importance_i, 0) / sum_j max(importance_j, 0)``:
    negative values are clipped to zero for shares, as the paper does. ``store`` is a folder that
    keeps every v(S) on disk (see :mod:`cornerstone.store`): a killed run resumes from it. ``ranks``
    (:func:`cornerstone.distributed.from_environment`) splits the evaluations across the processes of
    a torchrun / ``accelerate launch`` job; every rank returns the same report. Once the full model is
    evaluated the run is sized (:func:`cornerstone.sizing.estimate_run`), ``on_estimate`` is called
    with the estimate, and a run that will not fit in memory is refused unless ``force``. With
    ``until_resolved`` the documents grow round by round (:mod:`cornerstone.sequential`; ``log`` hears
    of each round).
    """
    from .options import with_options
    from .settings import ScoreSettings

    settings = with_options(settings, ScoreSettings, options, {"include_paths": "tasks", "limit": "tasks", "seed": "tasks"},
                            function="score")
    loaded_tasks = bool(tasks) and all(isinstance(task, harness.TaskSpec) for task in tasks)  # type: ignore[union-attr]
    if tasks is not None and not loaded_tasks:
        settings = with_options(settings, ScoreSettings, {"names": [str(task) for task in tasks]}, {"names": "tasks"},
                                function="score")
    sequential = settings.sequential()
    if sequential is not None:
        names = [spec.name for spec in tasks] if loaded_tasks else settings.tasks.names  # type: ignore[union-attr]
        once = settings.model_copy(update={"until_resolved": None, "boundary": None})
        return score_until_resolved(score, model, names, sequential=sequential, include_paths=settings.tasks.include_paths,
                                    log=log, settings=once, estimator=estimator, rule=rule, dtype=dtype, device=device,
                                    progress=progress, ranks=ranks, on_estimate=on_estimate)
    include_paths, players, batch_size, engine = (settings.tasks.include_paths, settings.players, settings.batch_size,
                                                  settings.engine)
    started = time.perf_counter()
    estimator = estimator or settings.make_estimator()
    rule = rule or settings.rule()
    specs = list(tasks) if loaded_tasks else settings.tasks.load()  # type: ignore[arg-type]
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    playing = (parse_players(loaded.model, list(players)) if players
               else enumerate_players(loaded.model, estimator.granularity))
    value = ValueFunction(loaded, specs, batch_size=batch_size, engine=engine, store=settings.store_folder(),  # type: ignore[arg-type]
                          ranks=ranks)
    scoring_started = time.perf_counter()
    full_model = value.evaluate([])  # every method starts from v(N); timing it sizes the run
    timed_now = value.evaluations > 0  # else v(N) came from the store, with the time of the run that computed it
    longest, cache_bytes = value.footprint()
    estimate = estimate_run(loaded.model, evaluations=estimator.planned_evaluations(len(playing)),
                            seconds_per_evaluation=full_model.seconds, batch_size=batch_size, longest_request=longest,
                            cache_bytes=cache_bytes, processes=ranks.world if ranks else 1, timed_now=timed_now,
                            requests=value.requests)
    if on_estimate is not None:
        on_estimate(estimate)
    check_fits(estimate, force=settings.force)
    result = estimator.estimate(value, playing, progress)
    scoring_seconds = time.perf_counter() - scoring_started
    full, estimates = result.full, result.players

    positive_total = sum(max(e.importance, 0.0) for e in estimates.values())
    gaps = _gaps(value, playing, estimates, rule, full)
    cornerstones = rule.mark(estimates, {p.name: p.kind for p in playing}, full.score, value.chance,
                             {name: stderr for name, (_, stderr) in gaps.items()})
    try:
        player_scores = {
            p.name: PlayerScore(
                layer=p.layer,
                kind=p.kind,
                importance=estimates[p.name].importance,
                share=(max(estimates[p.name].importance, 0.0) / positive_total) if positive_total > 0 else 0.0,
                score_removed=estimates[p.name].score_removed,
                per_task_removed=estimates[p.name].per_task_removed,
                stderr=estimates[p.name].stderr,
                cornerstone=p.name in cornerstones,
                parameters=player_parameters(loaded.model, p),
                effect=rule.effect(estimates[p.name].importance, estimates[p.name].stderr),
                gap=gaps[p.name][0] if p.name in gaps else None,
                gap_stderr=gaps[p.name][1] if p.name in gaps else None,
                resolved=rule.resolved(*gaps[p.name]) if p.name in gaps else None,
            )
            for p in playing
        }
        report = ScoreReport(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            method=estimator.method,
            granularity=estimator.granularity,
            model=loaded.describe(),
            tasks=[TaskScore(**spec.describe(), base_score=full.per_task[spec.name],
                             base_stderr=paired_stderr([full.per_doc[spec.name]]),
                             doc_indices=spec.doc_indices, content_sha256=spec.content_hash, selection=spec.selection)
                   for spec in specs],
            settings={
                "tasks": [spec.name for spec in specs],
                "include_paths": [str(p) for p in include_paths],
                # what the task objects say, not the arguments: a caller may pass loaded tasks
                **_common_selection(specs),
                "objective": harness.objective_of(specs),
                "batch_size": batch_size,
                "engine": engine,
                "players": list(players) if players else None,
                "estimator": estimator.model_dump(),
                "processes": ranks.world if ranks else 1,
            },
            base_score=full.score,
            base_stderr=paired_stderr(list(full.per_doc.values())),
            chance=value.chance,
            players=player_scores,
            cornerstones=[name for name, s in player_scores.items() if s.cornerstone],
            rule=rule,
            evaluations=value.evaluations + value.reused,
            diagnostics={**result.diagnostics, "machine": machine(), "unresolved": sorted(name for name, (gap, error) in gaps.items()
                                                                     if rule.resolved(gap, error) is False),
                         "estimate": estimate.model_dump(), "computed_evaluations": value.evaluations,
                         "reused_evaluations": value.reused, "store": str(value.store.path) if value.store else None},
            timing={
                "load_seconds": loaded.load_seconds,
                "scoring_seconds": scoring_seconds,
                "seconds_per_evaluation": value.seconds / max(1, value.evaluations),
                "total_seconds": time.perf_counter() - started,
            },
            versions=package_versions(),
        )
    except ValidationError as exc:
        # value.py refuses a non-finite log-likelihood, but an estimator's arithmetic (a regression, a
        # division) could still make one: never hand out, or write, a report that `report` and `plan` refuse
        bad = next((error for error in exc.errors() if error["type"] == "finite_number"), None)
        if bad is None:
            raise
        raise EvaluationError(f"scoring produced a non-finite number at {'.'.join(map(str, bad['loc']))}; "
                              "no report was written",
                              hint="Re-run with --debug and report it; another --estimator or --dtype float32 may avoid it.") from None
    report.diagnostics["top4_share"] = report.top_share(4)
    return report
