"""An on-disk record of every v(S) computed, so a killed run resumes and runs share their work.

One append-only JSON-lines file per *game*: everything a value depends on (see :func:`game_key`).
Two runs on the same game, in one process, in parallel processes or on different days, read and
extend the same file, and a coalition computed by one is never computed again by another. Each
evaluation is one line written with a single ``write`` on an ``O_APPEND`` descriptor and flushed to
disk before the caller goes on, so a kill loses at most the evaluation in flight; a torn last line
(a kill mid-write) is ignored on reading.
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
    - ``tasks``: each task's name, version, metric, documents and the content of its prompts.
    """
    return {
        "model": {"fingerprint": model["fingerprint"], "dtype": model["dtype"],
                  "attn_implementation": model.get("attn_implementation"),
                  "device_type": str(model["device"]).split(":")[0]},
        "engine": dict(engine),
        "versions": {library: versions.get(library) for library in KEYED_LIBRARIES},
        "tasks": list(tasks),
    }


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
