"""An on-disk record of every v(S) computed, so a killed run resumes and runs share their work.

One append-only JSON-lines file per *game*: everything a value depends on (see :func:`game_key`).
Two runs on the same game, in one process, in parallel processes or on different days, read and
extend the same file: a run looks a coalition up before computing it, so a value one run has stored
is never computed again by a run that asks for it later. Runs at the same time do not claim
coalitions from each other: two runs that reach an unknown coalition before either has stored it
both compute it (the same value; whichever line is read last is kept). Each evaluation is one line
written with a single ``write`` on an ``O_APPEND`` descriptor and flushed to disk before the caller
goes on, so a kill loses at most the evaluation in flight.

A line is used only if it is a valid record (:class:`StoredValue`): a line torn by a kill, edited by
hand or damaged on disk (not JSON, not UTF-8, a missing key, a string or non-finite number) is
skipped, with one warning per store naming how many lines were skipped, and its value is computed
again: a bad line never stops a run and never reaches a report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from .errors import OutputError
from .files import parse_json, validation_problem

log = logging.getLogger(__name__)


def default_store_root() -> Path:
    """``$CORNERSTONE_VALUES``, else ``$CORNERSTONE_CACHE/values``, else ``~/.cache/cornerstone/values``."""
    if os.environ.get("CORNERSTONE_VALUES"):
        return Path(os.environ["CORNERSTONE_VALUES"])
    base = os.environ.get("CORNERSTONE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "cornerstone") / "values"


# Libraries whose releases change numbers: kernels and their summation order (torch), model code
# (transformers), request building, tokenisation rules and metrics (lm_eval).
KEYED_LIBRARIES = ("torch", "transformers", "lm_eval")


def game_key(model: dict[str, Any], tasks: Sequence[dict[str, Any]], *, engine: dict[str, str],
             versions: dict[str, str]) -> dict[str, Any]:
    """Everything a stored value depends on; two value functions share values only when all of it is equal.

    - ``model`` (:meth:`~cornerstone.loading.LoadedModel.describe`): the content fingerprint (every
      weight byte, config and tokenizer of a folder or GGUF file; the commit of a hub model), the
      dtype, the attention implementation (sdpa, eager and flash kernels sum in different orders) and
      the device type (CPU and GPU kernels round differently; ``cuda:0`` and ``cuda:1`` do not);
    - ``engine``: the evaluation loop and its numerics, e.g. ``{"engine": "fast", "logsoftmax": "float32"}``
      against lm-eval's loop, which takes its log-softmax in the model's dtype. They agree to ~1e-6 in
      float32 but not in bfloat16 (see :mod:`cornerstone.engine`);
    - ``versions`` of :data:`KEYED_LIBRARIES`;
    - ``tasks``: each task's name, version, metric, documents and the content of its prompts (and for the
      divergence objective, a digest of the full-model reference its values are relative to).
    """
    return {
        "model": {"fingerprint": model["fingerprint"], "dtype": model["dtype"],
                  "attn_implementation": model.get("attn_implementation"),
                  "device_type": str(model["device"]).split(":")[0]},
        "engine": dict(engine),
        "versions": {library: versions.get(library) for library in KEYED_LIBRARIES},
        "tasks": list(tasks),
    }


class StoredValue(BaseModel):
    """One line of the store: what :class:`~cornerstone.value.Evaluation` is rebuilt from, checked as
    strictly as the reports made from it. Keys beyond these are allowed (a later version may add some);
    every number is finite; ``removed`` is sorted and unique (the key it is found by); ``score`` is the
    mean of ``per_task``, whose tasks are ``per_doc``'s. With the game's tasks in the validation
    context (``{"tasks": {name: document count or None}}``) the tasks must be the game's and each
    ``per_doc`` list must hold one value per document."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    removed: list[str]
    score: float
    per_task: dict[str, float] = Field(min_length=1)
    per_doc: dict[str, list[float]]
    seconds: float = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "StoredValue":
        if self.removed != sorted(set(self.removed)):
            raise ValueError("removed must list distinct player names in sorted order")
        if set(self.per_doc) != set(self.per_task):
            raise ValueError("per_doc and per_task name different tasks")
        mean = sum(self.per_task.values()) / len(self.per_task)
        if not math.isclose(self.score, mean, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"score {self.score} is not the mean of per_task ({mean})")
        tasks = (info.context or {}).get("tasks")
        if tasks:
            if set(self.per_task) != set(tasks):
                raise ValueError(f"per_task names {sorted(self.per_task)}, the game's tasks are {sorted(tasks)}")
            for name, count in tasks.items():
                if count is not None and len(self.per_doc[name]) != count:
                    raise ValueError(f"per_doc.{name} holds {len(self.per_doc[name])} values for {count} documents")
        return self


def _game_tasks(game: dict[str, Any]) -> dict[str, int | None]:
    """{task name: document count (None where the game does not list them)} of a :func:`game_key`."""
    tasks = game.get("tasks") or []
    if not all(isinstance(task, dict) and isinstance(task.get("name"), str) for task in tasks):
        return {}
    return {task["name"]: len(task["doc_indices"]) if isinstance(task.get("doc_indices"), list) else None
            for task in tasks}


class ValueStore:
    """v(S) records of one game under ``root``, keyed by the sorted names of the removed players."""

    def __init__(self, root: str | Path, game: dict[str, Any]) -> None:
        self.root = Path(root)
        self.game = game
        digest = hashlib.sha256(json.dumps(game, sort_keys=True).encode()).hexdigest()[:20]
        self.path = self.root / f"{digest}.jsonl"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            header = self.root / f"{digest}.game.json"
            if not header.exists():
                header.write_text(json.dumps(game, indent=2, sort_keys=True))
        except OSError as exc:
            raise OutputError(f"cannot write the value store at '{self.root}' ({exc.strerror})",
                              hint="Pass a writable --store folder, or --no-store.") from None
        self._records: dict[tuple[str, ...], dict[str, Any]] = {}
        self._offset = 0
        self._lines = 0  # complete lines read so far, to name a bad one
        self._tasks = _game_tasks(game)
        self._warned = False
        self._refresh()

    def __len__(self) -> int:
        return len(self._records)

    def _refresh(self) -> None:
        """Read whatever was appended since the last read (by this or another process)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]  # an incomplete last line may still be being written
        skipped: list[tuple[int, str]] = []
        for line in complete.split(b"\n")[:-1]:
            self._lines += 1
            if not line.strip():
                continue
            record, problem = self._parse(line)
            if record is None:
                skipped.append((self._lines, problem))
            else:
                self._records[tuple(record["removed"])] = record
        self._offset += len(complete)
        if skipped and not self._warned:
            self._warned = True
            first, problem = skipped[0]
            problem = " ".join(problem.split())  # a key read from the line may hold a newline
            many = len(skipped) > 1
            # one line, as the CLI's error: lines are (logging's last-resort handler prints the bare message)
            log.warning(f"warning: value store '{self.path}': skipped {len(skipped)} line{'s' if many else ''} that "
                        f"{'are' if many else 'is'} not a valid value record (line {first}: {problem}); "
                        f"{'their values are' if many else 'its value is'} computed again")

    def _parse(self, line: bytes) -> tuple[dict[str, Any] | None, str]:
        """(the record, "") or (None, what is wrong with the line)."""
        try:
            data = parse_json(line.decode("utf-8"))
        except UnicodeDecodeError:
            return None, "not UTF-8 text"
        except ValueError as exc:  # also a line torn by a kill, ended by the next record's newline
            return None, f"not JSON ({exc})"
        try:
            StoredValue.model_validate(data, context={"tasks": self._tasks})
        except ValidationError as exc:
            return None, validation_problem(exc)
        return data, ""

    def get(self, removed: tuple[str, ...]) -> dict[str, Any] | None:
        record = self._records.get(removed)
        if record is None:
            self._refresh()
            record = self._records.get(removed)
        return record

    def put(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if os.fstat(descriptor).st_size and self._ends_torn(descriptor):
                    line = b"\n" + line  # end a torn line first, so this record stands on its own line
                os.write(descriptor, line)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise OutputError(f"cannot append to the value store '{self.path}' ({exc.strerror})",
                              hint="Free some disk space or pass another --store folder.") from None
        self._records[tuple(record["removed"])] = record

    @staticmethod
    def _ends_torn(descriptor: int) -> bool:
        size = os.fstat(descriptor).st_size
        return os.pread(descriptor, 1, size - 1) != b"\n"
