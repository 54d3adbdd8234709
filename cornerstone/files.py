"""Writes that never leave a half-written result behind: a file or a folder appears complete or not at all."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Collection, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import CornerstoneError, OutputError

Model = TypeVar("Model", bound=BaseModel)


def output_modes() -> tuple[int, int]:
    """(folder mode, file mode) a new output gets: 0o777 and 0o666 less the process umask, as ``mkdir``
    and ``open`` would give. ``tempfile`` creates its staging names 0700 / 0600, private whatever the
    umask, so a serving account could not read an export or a report without this."""
    mask = _umask()
    return 0o777 & ~mask, 0o666 & ~mask


def _umask() -> int:
    # /proc reads the umask without changing it. os.umask can only set it: the fallback sets the usual
    # 022 for the instant before it puts the old mask back (never 0, which would make a thread's file world-writable)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_modes(root: Path) -> None:
    """Give ``root`` and everything under it :func:`output_modes` (links are left alone)."""
    folder_mode, file_mode = output_modes()
    os.chmod(root, folder_mode)
    for parent, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode if name in folders else file_mode)


def atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, so a reader never sees half a file; the
    file gets the mode the umask gives (:func:`output_modes`), not ``mkstemp``'s 0600."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            os.fchmod(out.fileno(), output_modes()[1])
        os.replace(staging, path)
    except OSError as exc:
        raise OutputError(f"cannot write '{path}': {exc.strerror or exc}") from exc


class Document(Protocol):
    """A result that is written as JSON with a Markdown rendering beside it (a comparison)."""

    def model_dump_json(self, *, indent: int | None = None) -> str: ...

    def to_markdown(self) -> str: ...


def write_with_markdown(document: Document, path: str | Path) -> tuple[Path, Path]:
    """Write ``document`` as JSON at ``path`` and, beside it, its Markdown (``.md``); return both paths."""
    path = Path(path)
    atomic_write(path, document.model_dump_json(indent=2).encode())
    markdown = path.with_suffix(".md")
    atomic_write(markdown, document.to_markdown().encode())
    return path, markdown


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"


def _staging_prefix(target: Path, role: Literal["partial", "old"]) -> str:
    """The name a staging folder starts with: its owner (pid@host) is in it, so a later run can tell
    the leftovers of a killed run from the folders of a run still writing (:func:`remove_leftovers`)."""
    return f".{target.name}-{role}-{os.getpid()}@{_host()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or a pid no kill can name: not ours to judge dead
    return True


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the staging folders (``.NAME-partial-*``, ``.NAME-old-*``) a killed run left beside
    ``target``: only those made on this host by a process that no longer exists. A run killed between
    moving the old ``target`` aside and putting the new one in place left no ``target``: the old one
    is put back. Returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(target.name)}-(partial|old)-([0-9]+)@([A-Za-z0-9._-]+)-[a-z0-9_]+")
    removed_paths = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if not found or found[3] != _host() or _alive(int(found[2])) or not entry.is_dir() or entry.is_symlink():
            continue
        kept = entry / target.name
        if found[1] == "old" and not os.path.lexists(target) and kept.is_dir():
            os.replace(kept, target)
        shutil.rmtree(entry, ignore_errors=True)
        removed_paths.append(entry)
    return removed_paths


def check_output(target: str | Path, *, overwrite: bool, marker: str | None = None,
                 protected: Collection[str | Path] = ()) -> None:
    """Refuse (:class:`OutputError`) an output folder whose writing would destroy what cornerstone did not write.

    ``target`` may not be, lie inside or contain any of the ``protected`` paths (the model being read:
    symlinks resolved). An existing ``target`` is an error unless ``overwrite``, and then it must be a
    folder (not a link) holding the file ``marker``: the manifest cornerstone writes into every
    output of this kind. A plain file, an unrelated folder or the model's own folder is never replaced.
    The leftovers of killed runs beside ``target`` are removed first (:func:`remove_leftovers`), which
    may put back an output a killed run had moved aside.
    """
    shown, target = str(target), Path(os.path.abspath(target))  # '.' and '..' have no name to stage beside
    if not target.name:
        raise OutputError(f"'{shown}' cannot be an output folder", hint="Choose a new folder for --out.")
    remove_leftovers(target)
    try:
        real = target.resolve()
        sources = [(source, Path(os.path.abspath(source)).resolve()) for source in protected
                   if os.path.lexists(source)]  # a hub id is not a path: nothing on disk to protect
    except (OSError, RuntimeError) as exc:  # a symlink loop, a folder that cannot be listed
        raise OutputError(f"cannot resolve '{shown}': {getattr(exc, 'strerror', None) or exc}") from None
    for source, source_real in sources:
        if real == source_real or source_real in real.parents or real in source_real.parents:
            where = ("is" if real == source_real else "is inside" if source_real in real.parents else "contains")
            raise OutputError(f"--out '{shown}' {where} the model being read ('{source}')",
                              hint="Write the output to a folder of its own, outside the model's folder.")
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise OutputError(f"'{shown}' already exists", hint="Choose another --out, or pass --overwrite.")
    if marker is None:
        raise TypeError("overwrite needs the marker file that identifies an output cornerstone wrote")
    hint = f"--overwrite replaces only a folder cornerstone wrote (one holding {marker}); choose another --out."
    if target.is_symlink():
        raise OutputError(f"'{shown}' is a symbolic link, not an output cornerstone wrote", hint=hint)
    if not target.is_dir():
        raise OutputError(f"'{shown}' is a file, not an output folder cornerstone wrote", hint=hint)
    if not (target / marker).is_file():
        raise OutputError(f"'{shown}' is not an output cornerstone wrote (it has no {marker})", hint=hint)


@contextmanager
def staged_directory(target: Path, if_exists: Literal["error", "replace", "keep"] = "error", *,
                     marker: str | None = None, protected: Collection[str | Path] = ()) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``target``; rename it to ``target`` only when the block succeeds.

    A failure or an interruption removes the staging folder, so ``target`` is either absent or
    complete; the staging folders of a run killed outright are removed by the next run to the same
    ``target`` (:func:`remove_leftovers`). ``if_exists`` decides what happens when ``target`` exists:
    an :class:`OutputError` (``error``), replace it (``replace``: only a folder holding ``marker``, see
    :func:`check_output`, checked before and again after the block), or keep the existing copy and drop
    the new one (``keep``: another process finished the same work first). A replaced folder is moved
    aside by one rename and removed only once the new one is in place. ``protected`` paths (the model
    being read) are never written into or replaced. The result gets the umask's modes (:func:`output_modes`).
    """
    shown, target = target, Path(os.path.abspath(target))
    if if_exists != "keep":
        check_output(shown, overwrite=if_exists == "replace", marker=marker, protected=protected)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if if_exists == "keep":
            remove_leftovers(target)  # check_output did it for the others
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target, "partial"), dir=target.parent))
    except OSError as exc:
        raise OutputError(f"cannot create a folder beside '{shown}': {exc.strerror or exc}") from exc
    try:
        yield staging
        _apply_modes(staging)
        if os.path.lexists(target):
            if if_exists == "keep":
                shutil.rmtree(staging)
                return
            if if_exists == "error":
                raise OutputError(f"'{shown}' appeared while it was being written", hint="Choose another --out.")
            check_output(shown, overwrite=True, marker=marker, protected=protected)
            retired = Path(tempfile.mkdtemp(prefix=_staging_prefix(target, "old"), dir=target.parent))
            os.replace(target, retired / target.name)
            try:
                os.replace(staging, target)
            except OSError:
                os.replace(retired / target.name, target)  # the old output back where it was
                shutil.rmtree(retired, ignore_errors=True)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk or a revoked permission half way through
            raise OutputError(f"cannot write '{shown}': {exc.strerror or exc}",
                              hint="Nothing was left behind; free space or choose another --out.") from exc
        raise


def validation_problem(exc: ValidationError) -> str:
    """The first problem pydantic found, in one line: ``dotted.location: message`` (without pydantic's
    "Value error, " prefix on the messages of our own validators)."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


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
        raise error(f"{kind} '{path}' is not a cornerstone {kind}: {validation_problem(exc)}", hint=hint) from None


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
