"""Text sets a step reads: the documents of lm-eval tasks, of the bundled tasks, or a user's file, drawn with a seed.

The one-pass proxies' calibration pass (:mod:`cornerstone.calibration`) and healing (:mod:`cornerstone.heal`)
both read their text here.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import harness
from .errors import ConfigError
from .textfiles import read_text_file

__all__ = ["read_texts"]

SOURCES_HINT = "Give 'tasks', 'bundled', or a .txt (blank-line separated), .jsonl (a 'text' field per line) or .json file."


def read_texts(source: str, samples: int, seed: int, tasks: Sequence[harness.TaskSpec] = ()) -> list[str]:
    """The non-blank texts of ``source``, at most ``samples`` of them (a draw with ``seed``, order kept).

    ``source``: ``tasks`` (the documents of ``tasks``, each as prompt + gold answer), ``bundled`` (every
    document of cornerstone's bundled tasks) or a path to a ``.txt`` file (paragraphs separated by
    blank lines, which may hold spaces), a ``.jsonl`` file (a ``text`` field per line) or a ``.json`` list of strings (or of
    objects with a ``text`` field).
    """
    if source == "tasks":
        if not tasks:
            raise ConfigError("text source 'tasks' needs tasks", hint="Pass tasks, or use --calibration bundled or a file.")
        texts = [text for spec in tasks for text in harness.document_texts(spec)]
    elif source == "bundled":
        specs = harness.load_tasks([harness.BUNDLED_TASK_GROUP])
        texts = [text for spec in specs for text in harness.document_texts(spec)]
    else:
        texts = read_text_file(source, hint=SOURCES_HINT)
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ConfigError(f"text source '{source}' has no text", hint=SOURCES_HINT)
    if len(texts) > samples:
        texts = [texts[i] for i in harness.seeded_draw(range(len(texts)), samples, seed)]
    return texts
