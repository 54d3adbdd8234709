"""A user's text file as a list of texts: what ``text:FILE`` tasks (:mod:`cornerstone.harness`) and calibration and
healing text (:mod:`cornerstone.texts`) read.

Kept apart from :mod:`cornerstone.texts`, which reads lm-eval tasks' documents through the harness, so that the
harness can read a text file without importing it back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import ConfigError

FORMATS_HINT = ("Give a .txt (paragraphs separated by blank lines, or one per line), .jsonl (a 'text' field per line) "
                "or .json file.")

# a blank line may hold spaces or a carriage return (WikiText's raw files separate paragraphs with " \r\n")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def read_text_file(path: str | Path, hint: str = FORMATS_HINT) -> list[str]:
    """The non-blank texts of ``path``, in file order: a ``.jsonl`` file's ``text`` fields, a ``.json`` list's
    strings (or its objects' ``text`` fields), else the paragraphs of a UTF-8 text file, each stripped of the
    whitespace around it: separated by blank lines, or, in a file with no blank line, one per line (WikiText's raw
    files as ../shared/data keeps them hold one paragraph or heading per line).

    Raises :class:`ConfigError` (one line, with ``hint``) for a missing file, a folder, a file that is not UTF-8
    or not the JSON it claims to be, and a file with no non-blank text.
    """
    path = Path(path)
    if "\0" in str(path):  # the OS takes no path with one; is_file() would raise a bare ValueError
        raise ConfigError(f"text file '{str(path).replace(chr(0), '?')}' contains a NUL byte in its name", hint=hint)
    if not path.is_file():
        raise ConfigError(f"text file '{path}' {'is a folder' if path.is_dir() else 'does not exist'}", hint=hint)
    try:
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            texts = [str(json.loads(line)["text"]) for line in raw.splitlines() if line.strip()]
        elif path.suffix == ".json":
            items = json.loads(raw)
            texts = [str(item["text"] if isinstance(item, dict) else item) for item in items]
        else:
            paragraphs = _BLANK_LINE.split(raw.strip())
            texts = [paragraph.strip() for paragraph in (paragraphs if len(paragraphs) > 1 else raw.splitlines())]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"text file '{path}' is not UTF-8 text (byte {exc.start} cannot be decoded)", hint=hint) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read text file '{path}': {type(exc).__name__}: {exc}", hint=hint) from None
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ConfigError(f"text file '{path}' has no text (only blank lines or empty entries)", hint=hint)
    return texts
