"""Configuration of a sublayer-pruned Gemma 3 (text) model, for ``trust_remote_code`` loading.

This file is copied into every sublayer export of a Gemma 3 model, next to modeling_gemma3_pruned.py.
No serving format describes a Gemma 3 layer without its attention or its FFN (the DeciLM /
Nemotron-NAS ``block_configs`` that vLLM and llama.cpp read are a Llama format), so this is the stock
``Gemma3TextConfig`` plus two lists:

- ``no_attention``: layers whose attention sublayer is gone, with the two norms that serve only it
  (``input_layernorm``, ``post_attention_layernorm``);
- ``no_ffn``: layers whose FFN sublayer is gone, with ``pre_feedforward_layernorm`` and
  ``post_feedforward_layernorm``.

Every other field keeps its Gemma 3 meaning, ``layer_types`` included: a layer keeps its slot and its
index, and a kept attention keeps its sliding window or global pattern. A removed attention holds no
KV cache: the config names those layers in ``kv_sharing_modes`` as ``"reuse"``, which is how
transformers' ``DynamicCache`` makes a layer that stores nothing (its ``DummyLayer``), so the sequence
length and mask sizes are read from a layer that has a cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig


def _layers(value: Iterable[Any] | None, name: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of layer indices, got {value!r}")
    indices = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"{name} must hold layer indices (ints), got {item!r}")
        indices.append(item)
    return sorted(set(indices))


class Gemma3PrunedTextConfig(Gemma3TextConfig):
    """A :class:`~transformers.Gemma3TextConfig` whose layers ``no_attention`` have no attention and whose
    layers ``no_ffn`` have no FFN (see the module docstring). Validated on init: indices in range, and at
    least one attention left (the masks and the cache's length are read from one)."""

    model_type = "gemma3_pruned_text"

    def __init__(self, no_attention: Iterable[int] | None = None, no_ffn: Iterable[int] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.no_attention = _layers(no_attention, "no_attention")
        self.no_ffn = _layers(no_ffn, "no_ffn")
        layers = self.num_hidden_layers
        for name, indices in (("no_attention", self.no_attention), ("no_ffn", self.no_ffn)):
            if indices and not 0 <= indices[0] <= indices[-1] < layers:
                raise ValueError(f"{name}={indices} names a layer outside 0..{layers - 1}")
        if len(self.no_attention) == layers:
            raise ValueError("no_attention removes every attention sublayer; at least one must stay")

    @property
    def kv_sharing_modes(self) -> list[str]:
        # read by transformers' cache (get_layer_types_and_kwargs): "reuse" makes a layer's cache a DummyLayer
        return ["reuse" if i in self.no_attention else "none" for i in range(self.num_hidden_layers)]

    @classmethod
    def from_gemma3(cls, config: Gemma3TextConfig, no_attention: Iterable[int] = (), no_ffn: Iterable[int] = ()
                    ) -> Gemma3PrunedTextConfig:
        """The pruned config of ``config`` without the attention of ``no_attention`` and the FFN of ``no_ffn``."""
        kwargs = {k: v for k, v in config.to_dict().items()
                  if k not in ("model_type", "architectures", "auto_map", "transformers_version", "no_attention",
                               "no_ffn")}
        return cls(no_attention=list(no_attention), no_ffn=list(no_ffn), **kwargs)


__all__ = ["Gemma3PrunedTextConfig"]
