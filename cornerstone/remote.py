"""The modeling code cornerstone ships inside sublayer exports, per checkpoint layout.

A sublayer plan is written in the layout its architecture names (:attr:`cornerstone.players.Architecture.sublayer_layout`):
``decilm`` (:mod:`cornerstone.decilm`, the DeciLM / Nemotron-NAS format of Llama-family models) or
``gemma3-pruned`` (:mod:`cornerstone.gemma3_pruned`). Each package holds ``MODELING_FILES`` (copied into
the export folder), ``AUTO_MAP`` (written to its config) and ``source_dir()``. Loading trusts a folder's
remote code without ``--trust-remote-code`` only when every file it maps to is byte-identical to one of
these (:func:`cornerstone.loading.remote_code_trusted`).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from types import ModuleType

PACKAGES = {"decilm": "cornerstone.decilm", "gemma3-pruned": "cornerstone.gemma3_pruned"}


def package(layout: str) -> ModuleType:
    """The package of ``layout``'s modeling code (``KeyError`` for a layout without any, such as ``stock``)."""
    return import_module(PACKAGES[layout])


def shipped_files() -> dict[str, Path]:
    """Every modeling file cornerstone ships, by file name."""
    files: dict[str, Path] = {}
    for layout in PACKAGES:
        found = package(layout)
        files.update({name: found.source_dir() / name for name in found.MODELING_FILES})
    return files
