"""cornerstone: find the layers of a language model that matter, and cut the rest.

The work flows in one line: load a model (:func:`load_model`) -> enumerate its players
(:func:`enumerate_players`) -> score them through lm-eval (:func:`score`) -> report the cornerstones
(:mod:`cornerstone.report`).
"""

from .errors import CornerstoneError
from .estimators import Ablation
from .loading import LoadedModel, load_model
from .masking import removed
from .players import ARCHITECTURES, Player, enumerate_players, parse_players
from .scores import CornerstoneRule, ScoreReport, score
from .value import ValueFunction

__all__ = [
    "ARCHITECTURES",
    "Ablation",
    "CornerstoneError",
    "CornerstoneRule",
    "LoadedModel",
    "Player",
    "ScoreReport",
    "ValueFunction",
    "enumerate_players",
    "load_model",
    "parse_players",
    "removed",
    "score",
]
