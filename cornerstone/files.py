"""Writes that never leave a half-written result behind: a file or a folder appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import yaml
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
    """Read ``path``, parse it (``fmt`` names the format in messages; use :func:`parse_json` or
    :func:`parse_yaml`) and validate it strictly as ``model``: no type coercion, and validators see
    ``{"file": path}`` as their context, so a model can cross-check what a person may have edited. A
    missing or unreadable file, a parse failure or a schema mismatch is one ``error`` naming the first bad field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{kind} '{path}' does not exist", hint=hint) from None
    except UnicodeDecodeError:
        raise error(f"{kind} '{path}' is not valid {fmt} (not UTF-8 text)", hint=hint) from None
    except OSError as exc:
        raise error(f"cannot read {kind} '{path}': {exc.strerror or exc}", hint=hint) from None
    try:
        data = parse(text)
    except Exception as exc:  # json and yaml parsers raise their own error classes
        raise error(f"{kind} '{path}' is not valid {fmt} ({exc})", hint=hint) from None
    try:
        return model.model_validate(data, strict=True, context={"file": str(path)})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise error(f"{kind} '{path}' is not a cornerstone {kind}: {where + ': ' if where else ''}{message}",
                    hint=hint) from None


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"the key '{key}' appears twice in one object")
        found[key] = value
    return found


def parse_json(text: str) -> Any:
    """``json.loads``, but an object that repeats a key is an error: json keeps the last copy silently."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except RecursionError:
        raise ValueError("nested too deeply") from None


class _StrictYamlLoader(yaml.SafeLoader):
    """YAML's safe subset without aliases (``*name`` repeats a node: a few hundred bytes can expand to
    gigabytes) and without repeated keys (YAML keeps the last copy silently)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in cornerstone files",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # SafeConstructor refuses it with its own message
                if key in seen:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found the key {key!r} twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases or repeated keys (:class:`_StrictYamlLoader`); errors are
    ``yaml.YAMLError``, as ``safe_load``'s are."""
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
