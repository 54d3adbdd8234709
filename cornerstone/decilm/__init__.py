"""DeciLM / Nemotron-NAS modeling code shipped inside sublayer-pruned Llama exports.

The two source files here are written to be copied into an exported folder (see :data:`MODELING_FILES`,
:data:`AUTO_MAP`, :func:`source_dir`), after which stock transformers loads that folder with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, and vLLM / llama.cpp read
the same ``block_configs``. The format is described in configuration_decilm.py.
"""

from __future__ import annotations

from pathlib import Path

from .configuration_decilm import (
    DeciLMConfig,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
)
from .modeling_decilm import DeciLMForCausalLM

MODELING_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}


def source_dir() -> Path:
    """The folder holding :data:`MODELING_FILES`, to copy them into an export."""
    return Path(__file__).resolve().parent


__all__ = ["AUTO_MAP", "MODELING_FILES", "DeciLMConfig", "DeciLMForCausalLM", "ffn_mult_to_intermediate_size",
           "intermediate_size_to_ffn_mult", "source_dir"]
