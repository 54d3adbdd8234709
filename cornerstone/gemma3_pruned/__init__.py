"""Modeling code shipped inside sublayer-pruned Gemma 3 exports (no serving format describes them).

The two source files here are written to be copied into an exported folder (see :data:`MODELING_FILES`,
:data:`AUTO_MAP`, :func:`source_dir`), after which stock transformers loads that folder with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. The format is described in
configuration_gemma3_pruned.py.
"""

from __future__ import annotations

from pathlib import Path

from .configuration_gemma3_pruned import Gemma3PrunedTextConfig
from .modeling_gemma3_pruned import Gemma3PrunedForCausalLM

MODELING_FILES = ("configuration_gemma3_pruned.py", "modeling_gemma3_pruned.py")
AUTO_MAP = {
    "AutoConfig": "configuration_gemma3_pruned.Gemma3PrunedTextConfig",
    "AutoModelForCausalLM": "modeling_gemma3_pruned.Gemma3PrunedForCausalLM",
}


def source_dir() -> Path:
    """The folder holding :data:`MODELING_FILES`, to copy them into an export."""
    return Path(__file__).resolve().parent


__all__ = ["AUTO_MAP", "MODELING_FILES", "Gemma3PrunedForCausalLM", "Gemma3PrunedTextConfig", "source_dir"]
