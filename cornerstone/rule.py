"""When a player counts as a cornerstone, and when removing it measurably changes nothing: the rule and its intervals."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from .estimation import PlayerEstimate

if TYPE_CHECKING:
    from .scores import ScoreReport

__all__ = ["CornerstoneRule"]


class CornerstoneRule(BaseModel):
    """When a player counts as a cornerstone, and when a removal counts as changing nothing.

    Zhang, Dong & Kawaguchi (2024) call a layer a cornerstone when removing it alone drops the model
    to random guessing. With full-model score ``v(N)``, chance level ``c`` and the score without the
    player ``v(N \\ {i})``, player i is a cornerstone when

        g_i = v(N \\ {i}) - c - margin * (v(N) - c)  <=  0

    i.e. removing it alone leaves at most ``margin`` of the model's above-chance performance. The
    default 0.2 tolerates the sampling noise of a few hundred documents while still demanding a fall
    to near chance. When the full model is not above chance, nothing is a cornerstone.

    Both scores are measured on the same documents, so ``g_i`` has a paired standard error
    (:func:`~cornerstone.estimators.paired_stderr` of the per-document ``v_d(N \\ {i}) - margin *
    v_d(N)``; the chance level is a constant of the documents). The decision is *resolved* when
    ``|g_i| > z * SE``; with ``require="interval"`` only resolved cornerstones are marked, with
    ``"estimate"`` (the paper's rule, default) every ``g_i <= 0`` is, and the unresolved ones are
    listed in the report. Likewise a removal's *effect* is ``hurts`` when ``importance - z * SE > 0``,
    ``helps`` when ``importance + z * SE < 0`` and ``none measurable`` otherwise: only then does a
    removal "change nothing" as far as these documents can tell.

    One-pass proxies (:mod:`cornerstone.proxies`) measure no score without the player. For them a
    player is a cornerstone when it stands out: its importance is at least ``outlier`` times the
    median importance of the players of its kind (attention, FFN or block). This is a heuristic of
    cornerstone's, not the paper's; ``cornerstone compare`` shows how it matches the measured ones.
    """

    model_config = ConfigDict(extra="forbid")

    margin: float = Field(0.2, ge=0.0, le=1.0)
    outlier: float = Field(3.0, gt=1.0)
    z: float = Field(1.96, ge=0.0, description="Half-width of intervals, in standard errors (1.96: 95% normal).")
    require: Literal["estimate", "interval"] = "estimate"

    def gap(self, score_removed: float, base: float, chance: float) -> float:
        """``g_i``: how far the score without the player lies above the cornerstone threshold."""
        return score_removed - chance - self.margin * (base - chance)

    def is_cornerstone(self, score_removed: float | None, base: float, chance: float,
                       gap_stderr: float | None = None) -> bool:
        if score_removed is None or base <= chance:
            return False
        gap = self.gap(score_removed, base, chance)
        if self.require == "interval":
            return gap + self.z * (gap_stderr or 0.0) <= 0
        return gap <= 0

    def resolved(self, gap: float, gap_stderr: float | None) -> bool | None:
        """Whether the cornerstone decision lies outside its interval (None without an error)."""
        return None if gap_stderr is None else abs(gap) > self.z * gap_stderr

    def effect(self, importance: float, stderr: float | None) -> str | None:
        """``hurts``, ``helps`` or ``none measurable`` by the interval ``importance +- z * stderr``."""
        if stderr is None:
            return None
        if importance - self.z * stderr > 0:
            return "hurts"
        if importance + self.z * stderr < 0:
            return "helps"
        return "none measurable"

    def mark(self, estimates: dict[str, PlayerEstimate], kinds: dict[str, str], base: float, chance: float,
             gap_stderrs: dict[str, float | None] | None = None) -> set[str]:
        """The cornerstones among ``estimates``: by the score rule where scores were measured, else as outliers."""
        if any(e.score_removed is not None for e in estimates.values()):
            return {name for name, e in estimates.items()
                    if self.is_cornerstone(e.score_removed, base, chance, (gap_stderrs or {}).get(name))}
        marked: set[str] = set()
        for kind in set(kinds.values()):
            names = [name for name in estimates if kinds[name] == kind]
            median = statistics.median(estimates[name].importance for name in names)
            if median > 0:
                marked |= {name for name in names if estimates[name].importance >= self.outlier * median}
        return marked

    def describe(self, report: ScoreReport) -> str:
        """The rule as it applied to ``report``, in words."""
        if not report.measures_scores:
            return (f"rule: a one-pass proxy measures no score without the player; a cornerstone's importance is "
                    f"at least {self.outlier:g}x the median of its kind")
        interval = f" with {self.z:g} s.e. to spare" if self.require == "interval" else ""
        return (f"rule: removing the player alone leaves at most {self.margin:.0%} of the above-chance score{interval} "
                f"(score <= {report.chance + self.margin * (report.base_score - report.chance):.4f}); "
                f"intervals are +-{self.z:g} paired s.e.")
