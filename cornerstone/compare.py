"""How much do two or more importance methods agree about the same model's layers?

Leave-one-out ablation and Shapley values measure a player's importance against the task itself and
are the ground truth this tool trusts; cheap proxies (block influence, angular distance, cosine
similarity of a layer's input and output) need one forward pass but only guess. Before a proxy is
trusted to prune, it has to rank the layers the way the ground truth does. :func:`compare_reports`
puts saved score reports of one model side by side and measures, for every pair of methods:

* Spearman's rho and Kendall's tau-b between their importances: agreement over the whole ranking;
* the overlap of their bottom sets (the ``bottom`` share of least important players): agreement on
  the decision that matters for pruning, which players go. Two methods can disagree about the order
  of the important layers (a low correlation) and still cut the same ones.

It also lists where each method ranks every player that any report calls a cornerstone: a method
that ranks a cornerstone low would have a planner without cornerstone protection cut it.

:func:`compare_reports` is the Python API behind ``cornerstone compare``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from .errors import ConfigError, ReportError
from .correlation import kendall, spearman
from .files import write_with_markdown
from .players import forward_order
from .scores import ScoreReport

_MIN_PLAYERS = 3


class MethodScores(BaseModel):
    """One report's side of a comparison, at the compared granularity."""

    model_config = ConfigDict(extra="forbid")

    label: str
    method: str
    path: str | None
    importance: dict[str, float]
    bottom_set: list[str]
    cornerstones: list[str]
    # players of the bottom set whose removal does not measurably hurt by the report's own interval
    # (importance - z s.e. <= 0); None when the report has no standard errors at this granularity
    bottom_harmless: list[str] | None = None


class PairAgreement(BaseModel):
    """How two methods agree: rank correlations over all players, and the overlap of their bottom sets."""

    model_config = ConfigDict(extra="forbid")

    a: str
    b: str
    spearman: float
    kendall: float
    bottom_overlap: float


class ReportComparison(BaseModel):
    """Agreement between the importance methods of several score reports of one model."""

    model_config = ConfigDict(extra="forbid")

    created: str
    model: str
    granularity: Literal["sublayer", "block"]
    players: list[str]
    bottom: float
    bottom_k: int
    methods: list[MethodScores]
    pairs: list[PairAgreement]
    cornerstone_ranks: dict[str, dict[str, int]]
    notes: list[str] = []

    @property
    def labels(self) -> list[str]:
        return [entry.label for entry in self.methods]

    def pair(self, a: str, b: str) -> PairAgreement:
        """The agreement of methods ``a`` and ``b`` (labels, in either order)."""
        for found in self.pairs:
            if {found.a, found.b} == {a, b}:
                return found
        raise KeyError(f"no pair {a!r}, {b!r}; labels are {self.labels}")

    def to_markdown(self) -> str:
        """The comparison as Markdown: correlation and overlap matrices, bottom sets, cornerstones."""
        labels = self.labels
        lines = [f"# Agreement of importance methods on {self.model}", "",
                 f"{len(self.players)} {self.granularity} players; bottom set = the {self.bottom_k} least important "
                 f"({self.bottom:.0%}). {self.created}.", ""]
        lines += ["## Rank correlation (Spearman ρ / Kendall τ_b)", "", *_matrix(
            self, lambda pair: f"{pair.spearman:+.3f} / {pair.kendall:+.3f}", diagonal="1 / 1"), ""]
        lines += [f"## Bottom-{self.bottom_k} overlap", "",
                  "Share of the bottom set two methods have in common: whether they would prune the same players.", "",
                  *_matrix(self, lambda pair: f"{pair.bottom_overlap:.0%}", diagonal="100%"), ""]
        lines += ["## Bottom sets (least important first)", "",
                  "Harmless: the players of the bottom set whose removal does not measurably hurt by the "
                  "report's own interval (importance - z s.e. <= 0).", "",
                  "| method | bottom set | harmless |", "|---|---|---|"]
        lines += [f"| {entry.label} | {', '.join(entry.bottom_set)} | "
                  f"{'n/a' if entry.bottom_harmless is None else f'{len(entry.bottom_harmless)} of {len(entry.bottom_set)}'} |"
                  for entry in self.methods]
        lines += ["", "## Cornerstones", "", "| method | cornerstones |", "|---|---|"]
        lines += [f"| {entry.label} | {', '.join(entry.cornerstones) or 'none'} |" for entry in self.methods]
        if self.cornerstone_ranks:
            lines += ["", f"Rank of each cornerstone under each method (1 = most important of {len(self.players)}):", "",
                      "| player | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
            lines += [f"| {name} | " + " | ".join(str(ranks[label]) for label in labels) + " |"
                      for name, ranks in self.cornerstone_ranks.items()]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _matrix(comparison: ReportComparison, cell: Callable[[PairAgreement], str], diagonal: str) -> list[str]:
    # pairs are unordered, so both halves of the matrix show the same numbers: a row reads across every method
    labels = comparison.labels
    return ["| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)] + [
        f"| **{row}** | " + " | ".join(diagonal if row == column else cell(comparison.pair(row, column))
                                       for column in labels) + " |"
        for row in labels]


def compare_reports(
    reports: Sequence[ScoreReport | str | Path],
    *,
    bottom: float = 0.25,
    labels: Sequence[str] | None = None,
) -> ReportComparison:
    """Measure how far the importance methods of ``reports`` (two or more, of one model) agree.

    Reports are :class:`~cornerstone.scores.ScoreReport` objects or paths to their JSON. Players are
    those every report scored. When the reports mix sublayer and block granularity, the comparison is
    at block granularity: a sublayer report's block importance is the sum of its sublayers' (the
    additive rule the planner uses) and the block is a cornerstone when either sublayer is.

    For every pair of methods: Spearman's rho and Kendall's tau-b between the importances, and
    ``bottom_overlap = |A ∩ B| / bottom_k``, where A and B are each method's ``bottom_k =
    max(1, round(bottom * n))`` least important players (ties go to the later layer, as the planner
    breaks them). Labels default to the method (``shapley-kernel`` for a Shapley estimator); where
    two would be equal, the file name (or the position) tells them apart.
    """
    if not 0.0 < bottom < 1.0:
        raise ConfigError(f"bottom must be a share between 0 and 1 (exclusive), got {bottom}")
    if len(reports) < 2:
        raise ReportError(f"compare needs at least two score reports, got {len(reports)}",
                          hint="Pass two or more JSON reports of the same model, e.g. an ablation and a Shapley report.")
    loaded = [(report, None) if isinstance(report, ScoreReport) else (ScoreReport.load(report), Path(report))
              for report in reports]
    _check_same_model(loaded)
    names = _labels([report for report, _ in loaded], [path for _, path in loaded], labels)

    notes: list[str] = []
    granularities = {report.granularity for report, _ in loaded}
    granularity: Literal["sublayer", "block"] = "block" if len(granularities) > 1 else next(iter(granularities))  # type: ignore[assignment]
    if len(granularities) > 1:
        notes.append("the reports mix sublayer and block granularity, so players are compared as blocks: a sublayer "
                     "report's block importance is the sum of its attn and mlp importances (the additive rule the "
                     "planner uses), and the block is a cornerstone when either sublayer is")
    scored = [_at_granularity(report, granularity, label, notes) for (report, _), label in zip(loaded, names)]

    common = set.intersection(*(set(players) for players in scored))
    every = set.union(*(set(players) for players in scored))
    if len(common) < _MIN_PLAYERS:
        raise ReportError(f"the reports have only {len(common)} {granularity} player(s) in common; "
                          f"at least {_MIN_PLAYERS} are needed to compare rankings",
                          hint="Compare reports that scored the same players (the same --players, or all of them).")
    if len(common) < len(every):
        left_out = sorted(every - common, key=lambda name: forward_order(_union_player(scored, name)))
        notes.append(f"compared the {len(common)} players every report scored; left out {', '.join(left_out)}")
    players = sorted(common, key=lambda name: forward_order(scored[0][name]))
    index = {name: i for i, name in enumerate(players)}
    bottom_k = max(1, round(bottom * len(players)))

    methods = []
    for (report, path), label, table in zip(loaded, names, scored):
        importance = {name: table[name].importance for name in players}
        # a loaded report is finite by its schema; a report object edited in Python is not re-validated, and
        # one NaN would sort arbitrarily and give a Spearman that contradicts the Kendall
        broken = next((name for name, value in importance.items() if not math.isfinite(value)), None)
        if broken is not None:
            raise ReportError(f"{label}: player {broken} has a non-finite importance ({importance[broken]})",
                              hint="Re-score the model; a report read from a file is checked for this when loaded.")
        # least important first; ties go to the later player, the usual redundant one (as in the planner)
        least_first = sorted(players, key=lambda name: (importance[name], -index[name]))
        effects = ({name: report.players[name].effect for name in players} if report.granularity == granularity else {})
        within = (None if not effects or any(effect is None for effect in effects.values())
                  else [name for name in least_first[:bottom_k] if effects[name] != "hurts"])
        methods.append(MethodScores(label=label, method=report.method, path=str(path) if path else None,
                                    importance=importance, bottom_set=least_first[:bottom_k],
                                    cornerstones=[name for name in players if table[name].cornerstone],
                                    bottom_harmless=within))

    pairs = []
    for first, second in itertools.combinations(methods, 2):
        a = [first.importance[name] for name in players]
        b = [second.importance[name] for name in players]
        pairs.append(PairAgreement(a=first.label, b=second.label, spearman=spearman(a, b), kendall=kendall(a, b),
                                   bottom_overlap=len(set(first.bottom_set) & set(second.bottom_set)) / bottom_k))

    flagged = {name for entry in methods for name in entry.cornerstones}
    dropped = {name for table in scored for name, entry in table.items() if entry.cornerstone} - set(players)
    if dropped:
        notes.append(f"cornerstone(s) {', '.join(sorted(dropped))} not scored by every report: no ranks for them")
    ranks = {entry.label: _ranks(entry.importance, index) for entry in methods}
    cornerstone_ranks = {name: {label: ranks[label][name] for label in names}
                         for name in players if name in flagged}

    return ReportComparison(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=str(loaded[0][0].model.get("spec", "unknown")),
        granularity=granularity,
        players=players,
        bottom=bottom,
        bottom_k=bottom_k,
        methods=methods,
        pairs=pairs,
        cornerstone_ranks=cornerstone_ranks,
        notes=notes,
    )


def save(comparison: ReportComparison, path: str | Path) -> tuple[Path, Path]:
    """Write the comparison as JSON and, beside it, Markdown; return both paths."""
    return write_with_markdown(comparison, path)


class _Entry(NamedTuple):
    """One player of a report at the compared granularity."""

    layer: int
    kind: str
    importance: float
    cornerstone: bool


def _union_player(scored: list[dict[str, _Entry]], name: str) -> _Entry:
    return next(table[name] for table in scored if name in table)


def _at_granularity(report: ScoreReport, granularity: str, label: str, notes: list[str]) -> dict[str, _Entry]:
    """The report's players at ``granularity`` (its own, or blocks made from its sublayers)."""
    if report.granularity == granularity:
        return {name: _Entry(p.layer, p.kind, p.importance, p.cornerstone) for name, p in report.players.items()}
    blocks = report.as_blocks()
    for name, block in blocks.items():
        if len(block.members) < 2:
            notes.append(f"{label} scored only {block.members[0]} of block {name}: that sublayer alone stands for the block")
    return {name: _Entry(block.layer, "block", block.importance, block.cornerstone) for name, block in blocks.items()}


def _ranks(importance: dict[str, float], index: dict[str, int]) -> dict[str, int]:
    """1 = most important; ties are broken as for the bottom set (the later player ranks lower)."""
    most_first = sorted(importance, key=lambda name: (-importance[name], index[name]))
    return {name: rank for rank, name in enumerate(most_first, start=1)}


def _default_label(report: ScoreReport) -> str:
    estimator = report.settings.get("estimator")
    if isinstance(estimator, dict) and estimator.get("estimator"):
        return f"{report.method}-{estimator['estimator']}"
    return report.method


def _labels(reports: list[ScoreReport], paths: list[Path | None], given: Sequence[str] | None) -> list[str]:
    if given is not None:
        given = [str(label) for label in given]
        if len(given) != len(reports):
            raise ConfigError(f"{len(given)} labels for {len(reports)} reports", hint="Give one label per report.")
        if len(set(given)) != len(given):
            raise ConfigError(f"labels must differ, got {', '.join(given)}")
        return given
    labels = [_default_label(report) for report in reports]
    for clashing in {label for label in labels if labels.count(label) > 1}:
        for i, label in enumerate(labels):
            if label == clashing:
                labels[i] = f"{label} ({paths[i].stem})" if paths[i] is not None else f"{label} #{i + 1}"
    # two files with one stem (runs/a/report.json, runs/b/report.json) still clash: their position tells them apart
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} #{i + 1}"
    return labels


def _check_same_model(loaded: list[tuple[ScoreReport, Path | None]]) -> None:
    """Rankings of different models say nothing about each other: refuse them (when both carry a fingerprint)."""
    fingerprinted = [(report, path) for report, path in loaded if report.model.get("fingerprint")]
    for report, path in fingerprinted[1:]:
        first, first_path = fingerprinted[0]
        if report.model["fingerprint"] != first.model["fingerprint"]:
            def named(r: ScoreReport, p: Path | None) -> str:
                return f"{r.model.get('spec', 'unknown')}" + (f" ('{p}')" if p is not None else "")
            raise ReportError(f"the reports are of different models: {named(first, first_path)} and {named(report, path)}",
                              hint="Compare reports scored on the same model (the same weights).")
