"""An on-disk record of every v(S) computed, so a killed run resumes and runs share their work.

One append-only JSON-lines file per *game*: the model (its fingerprint and dtype) and the exact
documents and metric of every task. Two runs on the same game, in one process, in parallel processes
or on different days, read and extend the same file, and a coalition computed by one is never
computed again by another. Each evaluation is one line written with a single ``write`` on an
``O_APPEND`` descriptor and flushed to disk before the caller goes on, so a kill loses at most the
evaluation in flight; a torn last line (a kill mid-write) is ignored on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import OutputError


def default_store_root() -> Path:
    """``$CORNERSTONE_VALUES``, else ``$CORNERSTONE_CACHE/values``, else ``~/.cache/cornerstone/values``."""
    if os.environ.get("CORNERSTONE_VALUES"):
        return Path(os.environ["CORNERSTONE_VALUES"])
    base = os.environ.get("CORNERSTONE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "cornerstone") / "values"


def game_key(model: dict[str, Any], tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What makes two values comparable: same weights, dtype, documents and metrics.

    The engine and lm-eval's loop give equal per-document results in float32, so the engine is not
    part of the key.
    """
    return {"model": {"fingerprint": model["fingerprint"], "dtype": model["dtype"]}, "tasks": list(tasks)}


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
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            try:
                record = json.loads(line)
                self._records[tuple(record["removed"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by a kill, later overwritten by nothing: skip it
        self._offset += len(complete)

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
