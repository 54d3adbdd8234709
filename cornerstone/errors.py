"""One error hierarchy for cornerstone.

Every failure a user can cause or meet is a :class:`CornerstoneError` with a one-line message, a hint
that says what to do, and a distinct exit code. The CLI turns these into a single line on stderr
(no traceback unless ``--debug``); Python callers catch the class they care about.
"""

from __future__ import annotations


class CornerstoneError(Exception):
    """Base class: ``message`` names the problem, ``hint`` says what to do about it."""

    exit_code: int = 1
    default_hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        # one line, whatever a wrapped parser or library put in it: pipelines read the first line of stderr
        message = " ".join(str(message).split())
        super().__init__(message)
        self.message = message
        self.hint = " ".join((hint if hint is not None else self.default_hint).split())


class ModelNotFoundError(CornerstoneError):
    """The model argument names nothing that can be loaded here."""

    exit_code = 3
    default_hint = (
        "Give a hub id (needs network or a filled HF cache), a local transformers folder, a .gguf file, "
        "or a bundled alias: see `cornerstone models`."
    )


class ModelLoadError(CornerstoneError):
    """The model exists but could not be loaded (corrupt files, unsupported quantisation, ...)."""

    exit_code = 4


class UnsupportedArchitectureError(CornerstoneError):
    """The model's architecture is not in cornerstone's table of module paths."""

    exit_code = 5


class TaskError(CornerstoneError):
    """A task is unknown, has no documents, or has no usable metric."""

    exit_code = 6
    default_hint = "List bundled tasks with `cornerstone tasks`; add your own YAMLs with --include-path DIR."


class PlayerError(CornerstoneError):
    """A player id is misspelled or out of range for this model."""

    exit_code = 7
    default_hint = "Player ids look like L0.attn, L0.mlp or L0 (a whole block); see `cornerstone players MODEL`."


class ReportError(CornerstoneError):
    """A saved report cannot be read."""

    exit_code = 8
    default_hint = "Pass a JSON report written by `cornerstone score`."


class ConfigError(CornerstoneError):
    """An option or a recipe value is invalid."""

    exit_code = 2


class EvaluationError(CornerstoneError):
    """The model produced unusable output (NaN/inf) or the evaluation failed."""

    exit_code = 9


class OutputError(CornerstoneError):
    """A result could not be written."""

    exit_code = 10
    default_hint = "Choose a writable --out path."


class PlanError(CornerstoneError):
    """A pruning plan cannot be made as asked, or does not fit the model it is applied to."""

    exit_code = 11
    default_hint = "Lower --drop, relax --keep-first/--keep-last, or let cornerstones go with --no-protect."


class ExportError(CornerstoneError):
    """A plan cannot be written as a checkpoint in the requested format."""

    exit_code = 12


class TrustError(CornerstoneError):
    """Loading would run code from the model's files: pickled weights, or remote modeling code."""

    exit_code = 13


class HealError(CornerstoneError):
    """A healing run cannot start, diverged, or its checkpoint does not fit."""

    exit_code = 14
