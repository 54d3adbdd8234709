"""Plan what to drop: turn a score report into a list of players to cut, each with its reason.

:func:`make_plan` is the Python API behind ``cornerstone plan``. A :class:`Planner` holds the
options (it is also the ``plan:`` section of a recipe); a :class:`Plan` is the result, saved as YAML
that a person can read and that :func:`cornerstone.export.export` applies.

Policies
- ``lowest``: drop the players with the lowest importance in the report, in one shot (ShortGPT,
  Men et al. 2024, https://arxiv.org/abs/2403.03853, with any importance instead of block influence).
- ``greedy``: remove one player, re-measure every remaining candidate with the model removed so
  far, remove the one whose loss hurts least, repeat (SLEB, Song et al. 2024,
  https://arxiv.org/abs/2402.09025; FinerCut, Zhang et al. 2024, https://arxiv.org/abs/2405.18218,
  at sublayer granularity). It costs about ``candidates x steps`` evaluations and sees interactions
  that single-player scores miss. ``shortlist`` m makes it cheaper: after the first step, only the m
  candidates whose removal hurt least at the previous step are re-measured (a candidate that cost
  little one step earlier rarely costs much now; the others keep their last score as a bound), so a
  step costs m evaluations instead of one per remaining candidate. ``lazy`` keeps greedy's choice
  where it can (lazy greedy, Minoux 1978): if a player's removal never keeps a larger share of the
  score once more is removed, the share it kept at an earlier step bounds its score now, so
  candidates are measured best bound first, a few at a time, and a step stops once its best measured
  score reaches every unmeasured candidate's bound. It picks what full greedy picks whenever the
  bounds hold (a noisy objective can break one: the step then takes the best it measured), often at
  a handful of evaluations a step.
- ``mixed`` granularity (greedy and beam): every sublayer and every whole block is a candidate, a block
  excluding its own sublayers. Removing a layer's attention and keeping its FFN can hurt more than removing
  the whole block (the FFN then reads a hidden state it never saw: measured on Gemma 3, reports/fit), which
  a summed sublayer report cannot show, so only a measured search can choose between them.
- ``beam``: greedy that keeps the ``width`` best partial removal sets at every step instead of one,
  so a removal that looks worse alone but combines better survives; about ``width x candidates x
  steps`` evaluations (sets reached by two orders are measured once).
- ``fit``: drop what meets cost ``targets`` (KV cache, weight bytes, prefill or decode time, measured
  per sublayer on a device: :mod:`cornerstone.costs`) with the least summed importance, solved exactly
  as a covering knapsack (:mod:`cornerstone.solver`, HiGHS), as NVIDIA's Puzzle plans to measured costs.
- ``contiguous``: drop the consecutive span with the lowest summed importance (the span choice of
  angular-distance pruning, Gromov et al. 2024, https://arxiv.org/abs/2403.17887). With an
  ``angular`` report and a block plan, the span with the smallest measured distance d(l, n) between
  its two ends, as in that paper.

Any method's report can be planned from, one-pass proxies included: every method ranks players
with higher importance meaning more important. A proxy's importances are not task-score
differences, so its plans carry no predicted score.

Cornerstones are protected unless ``protect_cornerstones`` is off, and so are the first and last
``keep_first``/``keep_last`` blocks and any player named in ``keep``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .errors import PlanError, ReportError
from .estimation import Progress
from .files import atomic_write, parse_yaml, read_validated
from .harness import DocumentRecord
from .players import _PLAYER_ID, forward_order, removed_blocks
from .scores import ScoreReport, as_checked_mapping, first_non_finite, player_name_problem

PLAN_SCHEMA_VERSION = 1

# Report methods whose one-shot block plans (lowest, contiguous, fit) bench/plan_quality.py judged weak on tasks and
# documents they were not chosen on (AMD EPYC, float32; docs/planning.md), with what it measured. Data, not logic:
# a later benchmark edits this table.
ONE_SHOT_CAVEATS: dict[str, str] = {
    "ablation": ("single-removal ablation misses how removals interact: the lowest blocks of accuracy-ablation reports "
                 "kept 36% of the above-chance score on held-out tasks on average over six cells (16% in the worst) "
                 "in bench/plan_quality, against 45-49% for block influence, cosine, angular distance and greedy on "
                 "divergence (docs/planning.md#judged-on-1300-documents); plan from `cornerstone score --method bi` "
                 "too and compare the exports with `cornerstone eval` before shipping one"),
    "avss": ("AVSS's plans kept the least of every way bench/plan_quality judged: 20% (SmolLM2-135M) and 14% "
             "(Gemma 3 270M) of the above-chance score on held-out tasks, averaged over four budgets, against 54% and "
             "47% for block influence (docs/planning.md#which-way-of-choosing-keeps-the-most); plan from "
             "`cornerstone score --method bi` instead"),
}
_DROP = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


class Planner(BaseModel):
    """How to choose the players to drop.

    ``drop`` is a number of players (``8``) or a share of the model's parameters (``"25%"``: players
    are removed until at least that share of all parameters, embeddings included, is gone).
    """

    model_config = ConfigDict(extra="forbid")

    policy: Literal["lowest", "greedy", "beam", "contiguous", "fit"] = "lowest"
    granularity: Literal["block", "sublayer", "mixed"] = Field(
        "block", description="The players a plan may remove: whole blocks, attention/FFN sublayers, or mixed (greedy "
        "and beam from a sublayer report: every sublayer and every whole block, a block excluding its own sublayers, "
        "so the search measures whether removing a block hurts less than removing only its attention).")
    drop: int | str | None = Field(None, description="Players (8) or a share of parameters (25%) to drop; needed "
                                   "unless targets are given.")
    targets: list[str] = Field(default_factory=list, description="fit, greedy: cost targets the pruned model must "
                               "meet, e.g. [kv:50%, decode:1.3x, weights:90MB] (cornerstone.costs.parse_target), instead "
                               "of drop.")
    profile: str | None = Field(None, description="fit, greedy: the cost profile (cornerstone profile's JSON) the "
                                "targets are measured against.")
    headroom: float = Field(0.0, ge=0, lt=0.5, description="fit, greedy: plan prefill and decode targets to this share "
                            "below their limit (0.03: decode:1.3x is planned as 1.3/0.97 = 1.34x), so that the export "
                            "still meets them when its measured time lands a little off the profile's prediction.")
    keep_first: int = Field(1, ge=0, description="Never drop the first k blocks.")
    keep_last: int = Field(1, ge=0, description="Never drop the last k blocks.")
    protect_cornerstones: bool = True
    keep: list[str] = Field(default_factory=list, description="Players never dropped, e.g. [L5, L7.attn].")
    harmless_only: bool = Field(False, description="Drop only players whose removal has no measurable cost: the "
                                "report's interval importance +- z s.e. reaches zero or below (needs standard errors).")
    width: int = Field(4, ge=1, description="beam: partial removal sets kept at every step.")
    shortlist: int | None = Field(None, ge=1, description="greedy/beam: re-measure only this many candidates per step "
                                  "(those that hurt least at the previous step); null: all.")
    lazy: bool = Field(False, description="greedy: measure candidates best bound first, ``shortlist`` (default 4) "
                       "at a time, and stop a step once the best measured reaches every unmeasured candidate's bound, "
                       "the current score times the share its removal kept when last measured (lazy greedy, Minoux "
                       "1978; exact when a removal never keeps a larger share once more is removed).")
    search_until: int | str | None = Field(None, description="greedy/beam: search on to this many players or share of "
                                           "parameters (>= drop) and record the whole removal order; null: drop.")

    @model_validator(mode="after")
    def _what_to_drop(self) -> "Planner":
        if self.policy == "fit" or self.targets:
            if self.policy not in ("fit", "greedy"):
                raise ValueError("targets are planned with policy fit (the report's importances) or greedy (measured)")
            if not self.targets or self.profile is None:
                raise ValueError(f"policy {self.policy} to a cost target needs targets and a cost profile "
                                 "(--target kv:50% --profile PROFILE.json)")
            if self.drop is not None or self.search_until is not None:
                raise ValueError("a plan to cost targets chooses how much to drop from them; leave drop and search_until out")
            if self.lazy:
                raise ValueError("lazy greedy bounds a removal's score, not its score lost per cost saved: plan to a "
                                 "target without lazy (shortlist cuts the candidates instead)")
        elif self.drop is None:
            raise ValueError("drop is required: a number of players (8) or a share of parameters (25%)")
        return self

    @field_validator("headroom")
    @classmethod
    def _check_headroom(cls, headroom: float, info: ValidationInfo) -> float:
        from .costs import parse_target

        # targets is validated first (field order); when it failed it is not in info.data
        timed = [t for t in info.data.get("targets", []) if parse_target(t).timed]
        if headroom and not timed:
            raise ValueError("headroom widens prefill and decode targets, and none is given")
        return headroom

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, targets: list[str]) -> list[str]:
        from .costs import parse_target
        from .errors import ConfigError

        for text in targets:
            try:
                parse_target(text)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return targets

    @field_validator("search_until")
    @classmethod
    def _check_until(cls, until: int | str | None) -> int | str | None:
        return None if until is None else cls._check_drop(until)

    @field_validator("drop")
    @classmethod
    def _check_drop(cls, drop: int | str | None) -> int | str | None:
        if drop is None:
            return None
        if isinstance(drop, str) and drop.strip().isdigit():
            drop = int(drop)
        if isinstance(drop, int):
            if drop < 1:
                raise ValueError("drop must be at least 1 player")
            return drop
        match = _DROP.match(drop)
        if match is None or not 0 < float(match.group(1)) < 100:
            raise ValueError(f"drop '{drop}' is neither a number of players (8) nor a share of parameters (25%)")
        return f"{float(match.group(1)):g}%"

    @field_validator("granularity")
    @classmethod
    def _check_granularity(cls, granularity: str, info: ValidationInfo) -> str:
        if granularity == "mixed" and info.data.get("policy") not in ("greedy", "beam"):
            raise ValueError("mixed granularity is planned by measuring (policy greedy or beam): a report holds no "
                             "score of a whole block beside its sublayers', and summing them makes a block no "
                             "different from its two halves")
        return granularity

    @field_validator("drop", "search_until")
    @classmethod
    def _check_counted(cls, drop: int | str | None, info: ValidationInfo) -> int | str | None:
        if isinstance(drop, int) and info.data.get("granularity") == "mixed":
            raise ValueError("a mixed plan counts a block and a sublayer alike, so a number of players means nothing; "
                             "give a share of parameters (25%) or cost targets")
        return drop

    def parameter_share(self) -> float | None:
        """The share of parameters to remove, or None when ``drop`` counts players."""
        return float(self.drop[:-1]) / 100 if isinstance(self.drop, str) else None


class PlannedRemoval(BaseModel):
    """One player the plan drops, with the numbers that put it there."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    layer: int = Field(ge=0)
    kind: Literal["attn", "mlp", "block"]
    importance: float
    rank: int = Field(ge=1, description="1 = least important of all players at the plan's granularity.")
    parameters: int = Field(ge=0)
    reason: str
    step: int | None = Field(None, ge=1, description="Greedy: the order of removal.")
    score_after: float | None = Field(None, ge=0.0, le=1.0,
                                      description="Greedy: measured score with this and every earlier removal.")
    stderr: float | None = Field(None, ge=0.0,
                                 description="The importance's standard error in the report (paired over documents).")
    effect: Literal["hurts", "none measurable", "helps"] | None = Field(
        None, description="hurts / none measurable / helps: the importance interval's verdict.")


class SearchStep(BaseModel):
    """One step of a measured search: the player removed, and the score and parameters removed after it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    score_after: float = Field(ge=0.0, le=1.0)
    parameters_removed: int = Field(ge=0)


class ProtectedPlayer(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    importance: float
    reason: str


class ParameterCount(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    original: int = Field(ge=1)
    removed: int = Field(ge=0)
    remaining: int = Field(ge=0)
    removed_fraction: float = Field(ge=0.0, le=1.0)


class PlanModel(BaseModel):
    """The model a plan is for: exactly these fields (a plan is applied to a model and written into its
    export, so nothing free-form rides along). Every key is written; a value is null where the report had none."""

    model_config = ConfigDict(extra="forbid")

    spec: str | None
    fingerprint: str | None
    model_type: str | None
    architecture: str | None
    num_hidden_layers: int | None = Field(ge=1)
    parameters: int = Field(ge=1)


class PlanSource(BaseModel):
    """The report a plan was made from, as far as ``export``, ``eval`` and ``heal`` read it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str | None
    method: str
    granularity: Literal["block", "sublayer"]
    tasks: list[str] | None
    base_score: float = Field(ge=0.0, le=1.0)
    chance: float = Field(ge=0.0, le=1.0)
    cornerstones: list[str]
    # None, or absent in plans made before documents were recorded: `eval` then reads them from `path`
    documents: dict[str, DocumentRecord] | None = None


class BlockCount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    original: int = Field(ge=1)
    remaining: int = Field(ge=1)


class Plan(BaseModel):
    """What to cut from a model, why, and what is predicted to remain."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    schema_version: int = PLAN_SCHEMA_VERSION
    created: str
    model: Annotated[dict[str, Any], as_checked_mapping(PlanModel)]
    report: Annotated[dict[str, Any], as_checked_mapping(PlanSource)]
    planner: Planner
    granularity: Literal["block", "sublayer", "mixed"]
    removed: list[PlannedRemoval]
    protected: list[ProtectedPlayer]
    parameters: ParameterCount
    blocks: Annotated[dict[str, int], as_checked_mapping(BlockCount)]
    # finite, not bounded: plans written before the estimate was clipped to [0, 1] hold e.g. 1.19 (nothing acts on it)
    predicted_score: float | None = Field(None, description="Measured (greedy) or an additive estimate, clipped to "
                                          "the metric's range [0, 1]; see predicted_by.")
    predicted_by: str | None = None
    predicted_measured: bool = Field(False, description="Whether predicted_score was measured on the scored documents.")
    search: list[SearchStep] | None = Field(None, description="greedy/beam: the whole removal order, with the "
                                            "measured score after each step (to planner.search_until).")
    fit: dict[str, Any] | None = Field(None, description="fit: the solver, and per measure the whole model's cost, "
                                       "the predicted saving and the limit the targets set.")

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        """A plan is applied to a model by its players' ids, so every number it carries must agree with
        them and with each other (a plan is a file a person may edit); ``make_plan`` writes plans that pass."""
        problem = self.inconsistency()
        if problem:
            raise ValueError(problem)
        return self

    def inconsistency(self) -> str | None:
        """The first way the plan contradicts itself, as ``field: what was expected``; None if none."""
        non_finite = first_non_finite(self.model_dump())  # the free-form document selections too
        if non_finite:
            return f"{non_finite}: Input should be a finite number"
        kinds = {"block": {"block"}, "sublayer": {"attn", "mlp"}, "mixed": {"block", "attn", "mlp"}}[self.granularity]
        layers = self.model["num_hidden_layers"]
        if self.planner.granularity != self.granularity:
            return f"planner.granularity: {self.planner.granularity}, but the plan is at {self.granularity} granularity"
        seen: set[str] = set()
        for index, removal in enumerate(self.removed):
            where = f"removed.{index} ({removal.name})"
            problem = player_name_problem(removal.name, removal.layer, removal.kind)
            if problem:
                return f"{where} {problem}"
            if removal.kind not in kinds:
                return f"{where}.kind: a {self.granularity} plan removes {', '.join(sorted(kinds))} players"
            if layers is not None and removal.layer >= layers:
                return f"{where}.layer: {removal.layer} is past the model's {layers} blocks (model.num_hidden_layers)"
            if removal.name in seen:
                return f"removed: lists {removal.name} twice"
            seen.add(removal.name)
        whole = {r.layer for r in self.removed if r.kind == "block"}
        overlap = next((r for r in self.removed if r.kind != "block" and r.layer in whole), None)
        if overlap:
            return f"removed: lists both {overlap.name} and its whole block L{overlap.layer}"
        for index, kept in enumerate(self.protected):
            if not _PLAYER_ID.match(kept.name):
                return f"protected.{index}.name: '{kept.name}' is not a player id (L5, L5.attn or L5.mlp)"
            if kept.name in seen:
                return f"protected: {kept.name} is also removed"
        if isinstance(self.planner.drop, int) and len(self.removed) != self.planner.drop:
            return f"removed: planner.drop is {self.planner.drop} players, but {len(self.removed)} are listed"
        counts, removed = self.parameters, sum(r.parameters for r in self.removed)
        if counts.original != self.model["parameters"]:
            return f"parameters.original: {counts.original:,}, but model.parameters is {self.model['parameters']:,}"
        if counts.removed != removed:
            return f"parameters.removed: {counts.removed:,}, but the removed players hold {removed:,}"
        if counts.remaining != counts.original - counts.removed:
            return f"parameters.remaining: {counts.remaining:,} is not original - removed ({counts.original - counts.removed:,})"
        if abs(counts.removed_fraction - counts.removed / counts.original) > 1e-9:
            return f"parameters.removed_fraction: {counts.removed_fraction} is not removed / original ({counts.removed / counts.original})"
        if self.search is not None:
            order = [step.name for step in self.search]
            if len(set(order)) != len(order) or set(order[:len(self.removed)]) != seen:
                return "search: the removal order does not begin with the removed players"
        blocks = self.blocks
        if layers is not None and blocks["original"] != layers:
            return f"blocks.original: {blocks['original']}, but model.num_hidden_layers is {layers}"
        if any(r.layer >= blocks["original"] for r in self.removed):
            return f"removed: a player lies past the plan's {blocks['original']} blocks (blocks.original)"
        if blocks["remaining"] != blocks["original"] - len(removed_blocks(self.removed)):
            return (f"blocks.remaining: {blocks['remaining']}, but removing these players leaves "
                    f"{blocks['original'] - len(removed_blocks(self.removed))} of {blocks['original']}")
        return None

    @property
    def player_names(self) -> list[str]:
        return [removal.name for removal in self.removed]

    @property
    def notes(self) -> list[str]:
        """What the plan-quality benchmark measured about plans made this way, where it found them weak
        (:data:`ONE_SHOT_CAVEATS`): printed by ``plan`` and the recipes, so a user cutting from such a
        report learns it before shipping the export."""
        one_shot = self.planner.policy in ("lowest", "contiguous", "fit") and self.granularity == "block"
        caveat = ONE_SHOT_CAVEATS.get(self.report["method"]) if one_shot else None
        return [caveat] if caveat else []

    @property
    def what(self) -> str:
        """``8 blocks``, ``16 sublayers`` or ``5 blocks and 6 sublayers``: what the plan removes, in words."""
        def counted(count: int, unit: str) -> str:
            return f"{count} {unit}{'s' if count != 1 else ''}"

        blocks = sum(r.kind == "block" for r in self.removed)
        if self.granularity == "mixed":
            return f"{counted(blocks, 'block')} and {counted(len(self.removed) - blocks, 'sublayer')}"
        return counted(len(self.removed), "block" if self.granularity == "block" else "sublayer")

    def to_yaml(self) -> str:
        header = (f"# cornerstone plan: drop {self.what} of {self.model.get('spec')}"
                  f" ({self.parameters.removed_fraction:.1%} of parameters), policy {self.planner.policy}.\n"
                  "# Apply it with: cornerstone export MODEL THIS_FILE --out DIR\n")
        return header + yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, width=110)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, self.to_yaml().encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return read_validated(cls, path, parse_yaml, "YAML", PlanError, "plan",
                              hint="Write one with `cornerstone plan REPORT`.")


@dataclass
class _Candidate:
    name: str
    layer: int
    kind: str
    importance: float
    parameters: int
    cornerstone: bool
    note: str = ""
    rank: int = 0
    stderr: float | None = None
    effect: str | None = None
    # the sublayers its removal takes away (a block's are its two halves at mixed granularity, where two
    # candidates that share one cannot both be removed); empty: itself
    parts: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.parts = self.parts or frozenset({self.name})


def _candidates(report: ScoreReport, granularity: str, counts: dict[str, int]) -> list[_Candidate]:
    """The report's players at ``granularity``, in forward order. A block's importance from a sublayer
    report is the sum of its two sublayers' (additive approximation), and it is a cornerstone when either is.
    ``mixed``: the sublayers and the blocks both."""
    if report.granularity == "block" and granularity != "block":
        raise PlanError(f"a block report cannot be planned at {granularity} granularity",
                        hint="Score with --granularity sublayer, or plan with --granularity block.")
    found: list[_Candidate] = []
    if granularity in (report.granularity, "mixed"):  # the report's own players
        found += [_Candidate(name, p.layer, p.kind, p.importance, counts[name], p.cornerstone, stderr=p.stderr,
                             effect=p.effect) for name, p in report.players.items()]
    if granularity != report.granularity:  # blocks summed from the report's sublayers
        found += [_Candidate(name, block.layer, "block", block.importance, sum(counts[n] for n in block.members),
                             block.cornerstone, note=f" (sum of {' + '.join(block.members)})",
                             parts=frozenset(block.members) if granularity == "mixed" else frozenset())
                  for name, block in report.as_blocks().items()]
    found.sort(key=forward_order)
    for rank, candidate in enumerate(sorted(found, key=_least_important_first), start=1):
        candidate.rank = rank
    return found


def _least_important_first(candidate: _Candidate) -> tuple[float, int]:
    # ties go to the later layer: late layers are the usual redundant ones (Gromov et al. 2024)
    return candidate.importance, -candidate.layer


def _protection(candidates: list[_Candidate], planner: Planner, num_blocks: int) -> dict[str, str]:
    known = {c.name for c in candidates} | {f"L{c.layer}" for c in candidates}
    unknown = [name for name in planner.keep if name not in known]
    if unknown:
        raise PlanError(f"keep names players the report does not have: {', '.join(unknown)}",
                        hint="Player ids look like L5 or L5.attn; see the report.")
    reasons: dict[str, str] = {}
    for c in candidates:
        if c.layer < planner.keep_first:
            reasons[c.name] = f"keep_first {planner.keep_first}"
        elif c.layer >= num_blocks - planner.keep_last:
            reasons[c.name] = f"keep_last {planner.keep_last}"
        elif c.name in planner.keep or f"L{c.layer}" in planner.keep or c.parts & set(planner.keep):
            reasons[c.name] = "kept by the user"
        elif c.cornerstone and planner.protect_cornerstones:
            reasons[c.name] = "cornerstone"
        elif planner.harmless_only and c.effect == "hurts":
            reasons[c.name] = "its removal measurably hurts (harmless_only)"
    return reasons


class _Target:
    """When enough is dropped: a number of players, or a share of the model's parameters."""

    def __init__(self, drop: int | str, total_parameters: int) -> None:
        self.players = drop if isinstance(drop, int) else None
        self.parameters = None if isinstance(drop, int) else float(drop[:-1]) / 100 * total_parameters
        self.text = f"{drop} players" if isinstance(drop, int) else f"{drop} of {total_parameters:,} parameters"

    def met(self, chosen: Sequence[_Candidate]) -> bool:
        if self.players is not None:
            return len(chosen) >= self.players
        return sum(c.parameters for c in chosen) >= self.parameters  # type: ignore[operator]

    def unreachable(self, allowed: Sequence[_Candidate]) -> PlanError:
        allowed = _disjoint(allowed)
        return PlanError(f"cannot drop {self.text}: only {len(allowed)} players "
                         f"({sum(c.parameters for c in allowed):,} parameters) are not protected")


class _CostTarget:
    """When enough is dropped for cost targets (policy fit or greedy with ``targets``): every measure's need
    saved, on the profile's costs (:mod:`cornerstone.costs`)."""

    def __init__(self, planner: Planner, report: ScoreReport) -> None:
        from .costs import needs, parse_target

        self.profile = _profile_for(planner, report)
        self.targets = [parse_target(text) for text in planner.targets]
        self.need = needs(self.targets, self.profile, planner.headroom)
        self.text = ", ".join(planner.targets)
        self.players = self.parameters = None

    def saved(self, chosen: Sequence[_Candidate]) -> dict[str, float]:
        from .costs import savings

        return savings(self.profile, [c.name for c in chosen], self.need)

    def met(self, chosen: Sequence[_Candidate]) -> bool:
        saved = self.saved(chosen)
        return all(saved[m] >= need * (1 - 1e-12) for m, need in self.need.items())

    def gain(self, chosen: Sequence[_Candidate], candidate: _Candidate) -> float:
        """The share of the need still open that removing ``candidate`` after ``chosen`` covers,
        ``sum_k min(c_k, r_k) / need_k`` (the solver's greedy rule, :mod:`cornerstone.solver`)."""
        saved = self.saved(chosen)
        return sum(min(max(self.profile.cost(candidate.name, m), 0.0), max(need - saved[m], 0.0)) / need
                   for m, need in self.need.items() if need > 0)

    def unreachable(self, allowed: Sequence[_Candidate]) -> PlanError:
        from .costs import format_cost

        saved = self.saved(_disjoint(allowed))
        return PlanError(f"cannot meet {self.text}: removing every allowed player saves "
                         + ", ".join(f"{format_cost(m, saved[m])} of the {format_cost(m, n)} {m} needed"
                                     for m, n in self.need.items()),
                         hint="Relax the target, or allow more players (--keep-first/--keep-last, --no-protect, a sublayer plan).")

    def record(self, planner: Planner, names: Sequence[str], **extra: Any) -> dict[str, Any]:
        """The plan's ``fit`` block: per measure the whole model's cost, the predicted saving and the limit."""
        from .costs import savings

        measures = sorted(self.need)
        saved = savings(self.profile, names, measures)
        return {**extra, "profile": planner.profile, "device": self.profile.device, "dtype": self.profile.dtype,
                "headroom": planner.headroom,
                "measures": {m: {"whole": self.profile.total(m), "saved": saved[m],
                                 "limit": min(t.limit(self.profile.total(m)) for t in self.targets if t.measure == m),
                                 "planned_limit": self.profile.total(m) - self.need[m]}
                             for m in measures},
                "shapes": {"prefill_lengths": self.profile.prefill_lengths[:1],
                           "decode_shapes": self.profile.decode_shapes[:1]}}


def _disjoint(allowed: Sequence[_Candidate]) -> list[_Candidate]:
    """``allowed`` without the candidates that others make up (at mixed granularity, a block whose halves are
    both allowed): removing all of them removes each sublayer once."""
    return [c for c in allowed if not any(o is not c and o.parts < c.parts for o in allowed)]


def _profile_for(planner: Planner, report: ScoreReport) -> Any:
    from .costs import CostProfile

    profile = CostProfile.load(planner.profile)  # type: ignore[arg-type]
    layers = report.model.get("num_hidden_layers")
    if profile.model.get("num_hidden_layers") != layers or (
            profile.model.get("fingerprint") and report.model.get("fingerprint")
            and profile.model["fingerprint"] != report.model["fingerprint"]):
        raise PlanError(f"the cost profile '{planner.profile}' was measured on another model than the report's",
                        hint="Profile the report's model: cornerstone profile MODEL --out PROFILE.json.")
    return profile


def _lowest(allowed: list[_Candidate], target: _Target) -> list[_Candidate]:
    chosen: list[_Candidate] = []
    for candidate in sorted(allowed, key=_least_important_first):
        if target.met(chosen):
            break
        chosen.append(candidate)
    if not target.met(chosen):
        raise target.unreachable(allowed)
    return chosen


def _span_distance(report: ScoreReport, planner: Planner) -> Callable[[list[_Candidate]], float] | None:
    """For an angular-distance report planned by blocks: a span's cost is the measured distance
    d(l, n) between the input of its first block and the input of the block after it (Gromov et al.
    2024), not the sum of its blocks' one-step distances."""
    spans = report.diagnostics.get("spans") if report.method == "angular" else None
    if not spans or planner.granularity != "block":
        return None

    def distance(span: list[_Candidate]) -> float:
        return spans[str(len(span))][span[0].layer]

    return distance


def _contiguous(candidates: list[_Candidate], protected: dict[str, str], target: _Target,
                cost: Callable[[list[_Candidate]], float] | None = None) -> list[_Candidate]:
    cost = cost or (lambda span: sum(c.importance for c in span))
    best: list[_Candidate] | None = None
    for start in range(len(candidates)):
        span: list[_Candidate] = []
        for candidate in candidates[start:]:
            if candidate.name in protected:
                break
            span.append(candidate)
            if target.met(span):
                break
        if not target.met(span):
            continue
        # ties go to the later span
        if best is None or cost(span) <= cost(best):
            best = span
    if best is None:
        raise PlanError(f"no run of consecutive unprotected players reaches {target.text}",
                        hint="Lower --drop, relax --keep-first/--keep-last/--no-protect, or use --policy lowest.")
    return best


def _search(allowed: list[_Candidate], target: _Target | _CostTarget, value: Any, progress: Progress | None, *,
            width: int = 1, shortlist: int | None = None, lazy: bool = False) -> tuple[list[_Candidate], list[float]]:
    """Measured search for the removal order that keeps the score highest (``greedy``: ``width`` 1; ``beam``).

    Every step extends each kept path by one more player, measures v(N minus the path) for every
    extension (one batch: the engine shares the forward pass between masks that agree early) and keeps
    the ``width`` best paths; sets reached twice are measured once (the value function memoises them).
    With ``shortlist`` m, a path tries only the m players whose removal, at the previous step, left the
    highest score (at the first step: the report's lowest importances). Ties go to the lower
    importance, then the earlier layer. With ``lazy`` (greedy only), a step measures the candidates
    best bound first, ``shortlist`` (default 4) at a time, until its best measured score is at least
    every unmeasured candidate's bound ``v(S) * r_c``, where ``r_c = v(S' + c) / v(S')`` is the share of
    the score c's removal kept when it was last measured (on an earlier path S'). Returns the best path that meets
    ``target`` and its score after every step.

    At mixed granularity a block and its own sublayers exclude each other (a path holds each sublayer once), and
    within a step a block and the path that removes both its halves are one set, measured once.

    To cost targets (a :class:`_CostTarget`, greedy only) a step takes the player with the least score lost per
    share of the open need it covers, ``max(0, v(S) - v(S + c)) / gain(c)`` (the solver's greedy rule on measured
    losses, so interactions between removals count; ties to the larger gain), and ``shortlist`` keeps the players
    with the least of it at the previous step.
    """
    from .players import parse_players

    players = {c.name: parse_players(value.loaded.model, [c.name])[0] for c in allowed}
    last_score: dict[str, float] = {}  # each player's most recent measured score as the next removal
    # lazy: the share of the score each player's removal kept when last measured, v(S + c) / v(S)
    last_ratio: dict[str, float] = {}
    base = value.evaluate_many([[]])[0].score if lazy or isinstance(target, _CostTarget) else 0.0

    costed = isinstance(target, _CostTarget)
    last_rate: dict[str, tuple[float, float]] = {}  # to cost targets: each player's last (score lost per share, -share)

    def promise(c: _Candidate) -> tuple[float, ...]:
        if costed:
            return (*last_rate.get(c.name, (float("-inf"), 0.0)), c.importance, c.layer)
        return (-last_score[c.name] if c.name in last_score else float("-inf"), c.importance, c.layer)

    def rate(path: tuple[list[_Candidate], list[float]]) -> tuple[float, float]:
        # a removal that raised the score (noise, on these documents) counts as free, as the solver clips a negative
        # importance: dividing a gain by a small share would otherwise prefer the removals that save least
        chosen, scores = path
        gain = target.gain(chosen[:-1], chosen[-1])  # type: ignore[union-attr]
        lost = max(0.0, (scores[-2] if len(scores) > 1 else base) - scores[-1])
        return (lost / gain if gain > 0 else math.inf, -gain)

    def rank(path: tuple[list[_Candidate], list[float]]) -> tuple[Any, ...]:
        chosen, scores = path
        if costed and scores:
            return (*rate(path), sum(c.importance for c in chosen), sum(c.layer for c in chosen))
        return (-scores[-1] if scores else 0.0, sum(c.importance for c in chosen), sum(c.layer for c in chosen))

    paths: list[tuple[list[_Candidate], list[float]]] = [([], [])]
    done, planned = 0, 0
    while not all(target.met(chosen) for chosen, _ in paths):
        extensions: list[tuple[list[_Candidate], list[float]]] = []
        seen: set[frozenset[str]] = set()
        for chosen, scores in paths:
            if target.met(chosen):
                extensions.append((chosen, scores))
                continue
            taken = frozenset().union(*(x.parts for x in chosen))
            # at mixed granularity a block and its own sublayers exclude each other
            left = [c for c in allowed if not (c.parts & taken) and (not costed or target.gain(chosen, c) > 0)]  # type: ignore[union-attr]
            if not left:
                raise target.unreachable(allowed)
            if shortlist is not None and not lazy:
                def first(c: _Candidate) -> tuple[float, int]:  # the report's importance (per share of need)
                    return (max(c.importance, 0.0) / target.gain(chosen, c) if costed else c.importance,  # type: ignore[union-attr]
                            -c.layer)

                left = sorted(left, key=lambda c: promise(c) if last_score else first(c))[:shortlist]
            for c in left:
                key = taken | c.parts  # a block and both its halves are one set
                if key not in seen:
                    seen.add(key)
                    extensions.append((chosen + [c], scores))
        new = [path for path in extensions if len(path[1]) < len(path[0])]
        if lazy and last_ratio:
            now = paths[0][1][-1] if paths[0][1] else base

            def bound(path: tuple[list[_Candidate], list[float]]) -> float:
                ratio = last_ratio.get(path[0][-1].name)
                return math.inf if ratio is None or now <= 0 else now * ratio

            new.sort(key=lambda path: (-bound(path), path[0][-1].importance, -path[0][-1].layer))
        chunk = (shortlist or 4) if lazy and last_ratio else len(new)
        planned = done + len(new)

        def tick(_evaluation: Any) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, planned, f"search step {max(len(c) for c, _ in new)}")

        measured = []
        for start in range(0, len(new), chunk):
            batch = new[start:start + chunk]
            results = value.evaluate_many([[players[c.name] for c in chosen] for chosen, _ in batch], on_done=tick)
            measured += [(chosen, scores + [result.score]) for (chosen, scores), result in zip(batch, results)]
            rest = new[start + chunk:]
            if rest and lazy and last_ratio and max(s[-1] for _, s in measured) >= max(map(bound, rest)):
                planned = done  # the bounds of the rest cannot beat what is measured: the step is done
                break
        for chosen, scores in measured:
            last_score[chosen[-1].name] = scores[-1]
            if costed:
                last_rate[chosen[-1].name] = rate((chosen, scores))
            before = scores[-2] if len(scores) > 1 else base
            if lazy and before > 0:
                last_ratio[chosen[-1].name] = scores[-1] / before
        finished = [path for path in extensions if len(path[1]) == len(path[0])]
        paths = sorted(finished + measured, key=rank)[:width]
    best = min((path for path in paths if target.met(path[0])), key=rank)
    return best


def _parameter_counts(report: ScoreReport, loaded: Any) -> dict[str, int]:
    """Per-player parameters from the report, or counted on the model for reports written before they were kept."""
    if all(p.parameters is not None for p in report.players.values()):
        return {name: p.parameters for name, p in report.players.items()}  # type: ignore[misc]
    from .loading import load_model
    from .players import parse_players, player_parameters

    if loaded is None:
        loaded = load_model(_report_spec(report))
    return {name: player_parameters(loaded.model, parse_players(loaded.model, [name])[0]) for name in report.players}


def make_plan(
    report: ScoreReport | str | Path,
    planner: Planner | None = None,
    *,
    loaded: Any = None,
    value: Any = None,
    store: str | Path | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> Plan:
    """Choose the players to drop from ``report`` with ``planner``'s policy and constraints.

    ``planner`` is the plan step's settings (those of ``cornerstone plan`` and a recipe's ``plan:``);
    ``options`` set its fields by name, e.g. ``make_plan(report, drop=8)``.

    ``greedy`` measures as it goes: it uses ``value`` (a :class:`~cornerstone.value.ValueFunction`)
    or builds one on ``loaded`` (or on the report's model) with the report's tasks and documents.
    The other policies read the report only. ``predicted_score`` is measured for ``greedy`` (on the
    report's own documents) and, for the others, the additive estimate ``v(N) - sum_i
    importance_i``, labelled as such and clipped to [0, 1] (:func:`_prediction`). The plan keeps
    the report's document record, so ``cornerstone eval`` measures the export on other documents.
    """
    from .options import with_options

    planner = with_options(planner, Planner, options, function="make_plan")
    report_path = None
    if not isinstance(report, ScoreReport):
        report_path = str(report)
        report = ScoreReport.load(report)
    if not report.players:
        raise PlanError("the report scores no players", hint="Score the model first: `cornerstone score`.")
    if planner.harmless_only and planner.granularity != report.granularity:
        raise PlanError("harmless_only needs each candidate's own interval; a block plan from a sublayer report sums them",
                        hint="Plan at the report's granularity, or score with --granularity block.")
    if planner.harmless_only and all(p.effect is None for p in report.players.values()):
        raise PlanError("harmless_only needs standard errors, and this report has none",
                        hint="Re-score with this version of cornerstone (ablation reports carry paired standard errors).")
    num_blocks = report.model.get("num_hidden_layers") or 1 + max(p.layer for p in report.players.values())
    total_parameters = report.model.get("parameters")
    if total_parameters is None:
        raise ReportError(f"the report{f' {report_path!r}' if report_path else ''} does not record model.parameters, "
                        "which shares of parameters and the plan's counts need", hint="Re-score the model with `cornerstone score`.")
    counts = _parameter_counts(report, loaded)
    candidates = _candidates(report, planner.granularity, counts)
    protected = _protection(candidates, planner, num_blocks)
    allowed = [c for c in candidates if c.name not in protected]
    target: _Target | _CostTarget | None = (_Target(planner.drop, total_parameters) if planner.drop is not None else
                                            _CostTarget(planner, report) if planner.policy == "greedy" else None)
    step_scores: list[float] = []
    search: list[SearchStep] | None = None
    fit: dict[str, Any] | None = None
    if planner.policy == "fit":
        chosen, fit = _fit(allowed, planner, report)
    elif planner.policy == "lowest":
        chosen = _lowest(allowed, target)
    elif planner.policy == "contiguous":
        span_distance = _span_distance(report, planner)
        chosen = _contiguous(candidates, protected, target, span_distance)
        span_reason = (f"in the span with the smallest angular distance between its ends, d = {span_distance(chosen):.4f}"
                       if span_distance else "in the span with the lowest summed importance")
    else:
        if value is None:
            value = _report_value_function(report, loaded, store)
        until = _Target(planner.search_until, total_parameters) if planner.search_until is not None else target
        if until is not target and until.players is not None and target.players is not None and until.players < target.players or (
                until.parameters is not None and target.parameters is not None and until.parameters < target.parameters):
            raise PlanError(f"search_until {planner.search_until} is less than drop {planner.drop}",
                            hint="Give --search-until at least --drop (in the same unit), or leave it out.")
        order, order_scores = _search(allowed, until, value, progress,
                                      width=planner.width if planner.policy == "beam" else 1, shortlist=planner.shortlist,
                                      lazy=planner.lazy and planner.policy == "greedy")
        removed_so_far = [sum(c.parameters for c in order[:k + 1]) for k in range(len(order))]
        search = [SearchStep(name=c.name, score_after=score, parameters_removed=count)
                  for c, score, count in zip(order, order_scores, removed_so_far)]
        cut = next(k for k in range(1, len(order) + 1) if target.met(order[:k]))
        chosen, step_scores = order[:cut], order_scores[:cut]
        if isinstance(target, _CostTarget):
            fit = target.record(planner, [c.name for c in chosen], solver="measured greedy")

    removed_parameters = sum(c.parameters for c in chosen)
    removals = []
    for step, c in enumerate(chosen):
        importance = f"importance {c.importance:+.4f}" + (f" ±{report.rule.z * c.stderr:.4f} ({c.effect})"
                                                          if c.stderr is not None else "")
        why = {"lowest": f"{importance}{c.note}, rank {c.rank} of {len(candidates)}",
               "contiguous": f"{span_reason if planner.policy == 'contiguous' else ''}; {importance}{c.note}",
               "greedy": f"greedy step {step + 1}: its removal hurt least"
               f"{' per share of the target it met' if planner.targets else ''} ({step_scores[step]:.4f} after)"
               if step_scores else "",
               "beam": f"beam step {step + 1} of the best path ({step_scores[step]:.4f} after)"
               if step_scores else "",
               "fit": f"{importance}{c.note}: part of the least-loss set meeting {', '.join(planner.targets)}"}[planner.policy]
        removals.append(PlannedRemoval(name=c.name, layer=c.layer, kind=c.kind, importance=c.importance, rank=c.rank,
                                       parameters=c.parameters, reason=why + "; not protected",
                                       stderr=c.stderr, effect=c.effect,
                                       step=step + 1 if step_scores else None,
                                       score_after=step_scores[step] if step_scores else None))
    emptied = removed_blocks(chosen)
    if len(emptied) == num_blocks:
        raise PlanError(f"dropping {target.text if target else ', '.join(planner.targets)} would remove every block of the model")
    predicted, predicted_by = _prediction(report, chosen, step_scores)
    return Plan(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model={key: report.model.get(key) for key in ("spec", "fingerprint", "model_type", "architecture",
                                                      "num_hidden_layers", "parameters")},
        report={"path": report_path, "method": report.method, "granularity": report.granularity,
                "tasks": report.settings.get("tasks"), "base_score": report.base_score, "chance": report.chance,
                "cornerstones": report.cornerstones,
                # the documents the plan was chosen on: `eval` and `heal` keep away from them by default
                "documents": _document_record(report)},
        planner=planner,
        granularity=planner.granularity,
        removed=sorted(removals, key=lambda r: (r.layer, r.kind != "attn")),
        protected=[ProtectedPlayer(name=c.name, importance=c.importance, reason=protected[c.name])
                   for c in candidates if c.name in protected],
        parameters=ParameterCount(original=total_parameters, removed=removed_parameters,
                                  remaining=total_parameters - removed_parameters,
                                  removed_fraction=removed_parameters / total_parameters),
        blocks={"original": num_blocks, "remaining": num_blocks - len(emptied)},
        predicted_score=predicted,
        predicted_by=predicted_by,
        predicted_measured=bool(step_scores),
        search=search,
        fit=fit,
    )


def _fit(allowed: list[_Candidate], planner: Planner, report: ScoreReport) -> tuple[list[_Candidate], dict[str, Any]]:
    """The least-importance set of ``allowed`` whose summed costs meet ``planner.targets`` (policy fit)."""
    from .solver import Item, solve

    target = _CostTarget(planner, report)
    items = [Item(c.name, c.importance, {m: target.profile.cost(c.name, m) for m in target.need}) for c in allowed]
    solution = solve(items, target.need)
    by_name = {c.name: c for c in allowed}
    return [by_name[n] for n in solution.names], target.record(planner, solution.names, solver=solution.method,
                                                               summed_importance=solution.loss)


def _document_record(report: ScoreReport) -> dict[str, Any] | None:
    """The report's scored documents as plain data, or None when they can be neither read nor redrawn
    (a report written before they were kept, whose tasks cannot be loaded here): ``eval`` then says
    that it could not check for overlap."""
    from .errors import CornerstoneError

    try:
        return {name: record.model_dump() for name, record in report.documents().items()}
    except CornerstoneError:
        return None


def _prediction(report: ScoreReport, chosen: Sequence[_Candidate], step_scores: list[float]) -> tuple[float | None, str]:
    """What the plan can say about the pruned model's score on the scored documents.

    Greedy measured it. Otherwise, for task-score importances, the additive estimate
    ``v(N) - sum_i importance_i`` is exact only when removals do not interact, and they do (a block
    plan on SmolLM2 was estimated above the full model's score and measured near chance), so it is
    labelled as an estimate and clipped to the metric's range [0, 1]. Proxies give none.
    """
    if step_scores:
        return step_scores[-1], "measured by the search on the report's documents"
    if not report.measures_scores:
        return None, (f"none: {report.method} importances are not in task-score units; "
                      "measure the export with `cornerstone eval`")
    additive = report.base_score - sum(c.importance for c in chosen)
    clipped = min(1.0, max(0.0, additive))
    note = f", clipped from {additive:.4f}" if clipped != additive else ""
    return clipped, ("additive estimate v(N) - sum of importances, not measured: removals interact, so it can be far "
                     f"off{note}; measure the export with `cornerstone eval`")


def _report_spec(report: ScoreReport) -> str:
    """The model a report scored, for the steps that load it; a report without one cannot say."""
    spec = report.model.get("spec")
    if not spec:
        raise ReportError("the report does not record which model it scored (model.spec)",
                        hint="Re-score the model, or plan with --policy lowest from a report with per-player parameters.")
    return spec


def _report_value_function(report: ScoreReport, loaded: Any, store: str | Path | None) -> Any:
    """The value function the report was scored with: same model, tasks, documents and engine."""
    from . import harness
    from .loading import load_model
    from .value import ValueFunction

    settings = report.settings
    if loaded is None:
        loaded = load_model(_report_spec(report), dtype=report.model.get("dtype") or "float32")
    if loaded.fingerprint != report.model.get("fingerprint"):
        raise PlanError(f"the model given is not the one the report scored ({report.model.get('spec')})",
                        hint="Pass the report's model, or score this model first (a folder's report made before "
                             "fingerprints covered the whole weights no longer matches it: re-score).")
    # exactly the scored documents, checked against their recorded content: the same game the report played
    specs = harness.load_tasks(settings["tasks"], include_paths=settings.get("include_paths") or [],
                               documents=report.documents(), objective=settings.get("objective") or "accuracy")
    return ValueFunction(loaded, specs, batch_size=settings.get("batch_size", 32),
                         engine=settings.get("engine", "fast"), store=store)
