"""Tiny random models for every row of the architecture table (:data:`cornerstone.players.ARCHITECTURES`).

conftest.py builds the text-only families; the rows it has no model for are built here: Gemma (v1)
and the multimodal Gemma 3 (``Gemma3ForConditionalGeneration``), whose decoder settings (sizes,
sliding window, logit softcapping) live in ``config.text_config`` beside a vision tower. Its text
part has a 4-token sliding window, as conftest's ``gemma3_text`` has, and a final-logit softcap
that the multimodal class does not apply (transformers 5): the engine must follow the model, not
the config.
"""

from __future__ import annotations

import torch

from .conftest import ARCHITECTURE_NAMES, TINY, VOCAB, tiny_model

_IDS = dict(bos_token_id=1, eos_token_id=2)

EXTRA_CONFIGS: dict[str, dict] = {
    "gemma": {**TINY, "head_dim": 8, "vocab_size": VOCAB, **_IDS},
    "gemma3": {
        "text_config": {**TINY, "head_dim": 8, "sliding_window": 4, "final_logit_softcapping": 3.0,
                        "vocab_size": VOCAB, **_IDS},
        "vision_config": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14),
        "mm_tokens_per_image": 4, **_IDS,
    },
}

# every row of the table has a model here (tests/test_players.py checks the two lists are equal)
TABLE_NAMES = sorted({*ARCHITECTURE_NAMES, *EXTRA_CONFIGS})


def random_model(model_type: str, seed: int = 0, **config: object) -> torch.nn.Module:
    """A randomly initialised causal LM of ``model_type`` built from ``config``, in eval mode (float32),
    with every parameter perturbed so that no norm is exactly 1 and no bias exactly 0 (as conftest's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def table_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random 3-block model for any row of the architecture table."""
    if model_type in EXTRA_CONFIGS:
        return random_model(model_type, seed, **EXTRA_CONFIGS[model_type])
    return tiny_model(model_type, seed)
