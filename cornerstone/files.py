"""Writes that never leave a half-written result behind: a file or a folder appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import CornerstoneError, OutputError

Model = TypeVar("Model", bound=BaseModel)


def atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, so a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(staging, path)
    except OSError as exc:
        raise OutputError(f"cannot write '{path}': {exc.strerror or exc}") from exc


@contextmanager
def staged_directory(target: Path, if_exists: Literal["error", "replace", "keep"] = "error") -> Iterator[Path]:
    """Yield a hidden staging folder beside ``target``; rename it to ``target`` only when the block succeeds.

    A failure or an interruption removes the staging folder, so ``target`` is either absent or
    complete. ``if_exists`` decides what happens when ``target`` already exists at the end: an
    :class:`OutputError` (``error``), replace it (``replace``), or keep the existing copy and drop
    the new one (``keep``: another process finished the same work first).
    """
    target = Path(target)
    if if_exists == "error" and target.exists():
        raise OutputError(f"'{target}' already exists", hint="Choose another --out, or pass --overwrite.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-partial-", dir=target.parent))
    except OSError as exc:
        raise OutputError(f"cannot create a folder beside '{target}': {exc.strerror or exc}") from exc
    try:
        yield staging
        if target.exists():
            if if_exists == "keep":
                shutil.rmtree(staging)
                return
            if if_exists == "error":
                raise OutputError(f"'{target}' appeared while it was being written", hint="Choose another --out.")
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk or a revoked permission half way through
            raise OutputError(f"cannot write '{target}': {exc.strerror or exc}",
                              hint="Nothing was left behind; free space or choose another --out.") from exc
        raise


def read_validated(model: type[Model], path: str | Path, parse: Callable[[str], Any], fmt: str,
                   error: type[CornerstoneError], kind: str, hint: str | None = None) -> Model:
    """Read ``path``, parse it (``fmt`` names the format in messages) and validate it as ``model``;
    a missing file, a parse failure or a schema mismatch is one ``error`` naming the first bad field."""
    path = Path(path)
    try:
        data = parse(path.read_text())
    except FileNotFoundError:
        raise error(f"{kind} '{path}' does not exist", hint=hint) from None
    except Exception as exc:  # json and yaml parsers raise their own error classes
        raise error(f"{kind} '{path}' is not valid {fmt} ({exc})", hint=hint) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise error(f"{kind} '{path}' is not a cornerstone {kind}: {where}: {first['msg']}", hint=hint) from None
