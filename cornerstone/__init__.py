"""cornerstone: find the layers of a language model that matter, and cut the rest.

The work flows in one line, one function per step. Each takes its step's settings
(:mod:`cornerstone.settings`, the same models the CLI and recipes use) or their fields as keyword
arguments, and objects already loaded where it can::

    import cornerstone

    loaded = cornerstone.load_model("smollm2-135m")
    report = cornerstone.score(loaded, ["cornerstone_bundled"], limit=25, seed=0)   # -> ScoreReport
    plan = cornerstone.plan(report, drop=8)                                          # -> Plan
    slim = cornerstone.export(loaded, plan, "exports/slim")                         # -> ExportResult
    comparison = cornerstone.evaluate(loaded, slim.path, ["cornerstone_bundled"])   # -> Comparison
    healed = cornerstone.heal(slim.path, "exports/healed", data="cs_capitals")      # -> HealResult

``cornerstone.export``, ``cornerstone.evaluate`` and ``cornerstone.heal`` are also the modules of those
steps (``cornerstone.export.ExportResult``, ...): calling one calls the step's entry function
(:func:`cornerstone.export.export`, :func:`cornerstone.evaluate.evaluate_models`, :func:`cornerstone.heal.heal`).
"""

import types
from collections.abc import Callable
from typing import Any

from . import evaluate, export, heal
from .errors import CornerstoneError
from .estimators import Ablation
from .loading import LoadedModel, load_model
from .masking import without
from .planner import Plan, Planner, make_plan
from .players import ARCHITECTURES, Player, enumerate_players, parse_players
from .scores import CornerstoneRule, ScoreReport, score
from .settings import EvalSettings, ExportSettings, ScoreSettings, TaskSelection
from .value import ValueFunction

Healing = heal.Healing
plan = make_plan


class _Step(types.ModuleType):
    """A step's module that is also its entry point: ``cornerstone.export(...)`` calls ``cornerstone.export.export``,
    while everything else in the module stays where it was (``import cornerstone.export as m`` still gives the module)."""

    _entry: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._entry(*args, **kwargs)


for _module, _entry in ((export, export.export), (evaluate, evaluate.evaluate_models), (heal, heal.heal)):
    _module.__class__ = _Step
    _module._entry = _entry  # type: ignore[attr-defined]
del _module, _entry

__all__ = [
    "ARCHITECTURES",
    "Ablation",
    "CornerstoneError",
    "CornerstoneRule",
    "EvalSettings",
    "ExportSettings",
    "Healing",
    "LoadedModel",
    "Plan",
    "Planner",
    "Player",
    "ScoreReport",
    "ScoreSettings",
    "TaskSelection",
    "ValueFunction",
    "enumerate_players",
    "evaluate",
    "export",
    "heal",
    "load_model",
    "make_plan",
    "parse_players",
    "plan",
    "without",
    "score",
]
