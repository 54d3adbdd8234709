"""A sublayer-pruned Gemma 3 (text), for ``trust_remote_code`` loading.

This file is copied into every sublayer export of a Gemma 3 model next to
configuration_gemma3_pruned.py, its only import besides transformers and torch.

Layout: the stock Gemma 3 weight names, one ``model.layers.{i}`` slot per layer (no renumbering). A
layer holds ``input_layernorm``, ``self_attn`` and ``post_attention_layernorm`` only when its attention
is kept, and ``pre_feedforward_layernorm``, ``mlp`` and ``post_feedforward_layernorm`` only when its FFN
is kept; a removed sublayer leaves the residual stream unchanged, which is exactly what the stock
layer computes when the sublayer's output is zero (Gemma's post-norm of zero is zero).

Everything numeric is transformers' own Gemma 3 code: attention with every backend it supports (sliding
window and global layers as ``layer_types`` says), MLP, RMSNorm, the scaled embedding, rotary embeddings
per layer type and ``Gemma3TextModel.forward`` itself, so a pruned Gemma 3 with nothing removed is the
stock model. A removed attention stores no KV cache (see configuration_gemma3_pruned.py).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3Attention,
    Gemma3DecoderLayer,
    Gemma3ForCausalLM,
    Gemma3PreTrainedModel,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextModel,
    Gemma3TextScaledWordEmbedding,
)

from .configuration_gemma3_pruned import Gemma3PrunedTextConfig


def _check_cache(config: Gemma3PrunedTextConfig) -> None:
    """Refuse a transformers whose cache would keep a slot for a removed attention: generation would then
    read the cache's length (or a global layer's mask size) from a slot nothing ever fills. transformers 5
    makes a ``DummyLayer`` of a layer ``kv_sharing_modes`` calls ``"reuse"``; this checks that it does."""
    from transformers.cache_utils import DynamicCache

    try:
        layers = list(DynamicCache(config=config).layers)
    except Exception:  # an older signature: no per-layer cache from the config at all
        layers = []
    if len(layers) != config.num_hidden_layers or any(type(layers[i]).__name__ != "DummyLayer"
                                                      for i in config.no_attention):
        raise RuntimeError("this transformers' DynamicCache would keep a KV cache slot for a removed attention "
                           "(it needs DummyLayer and kv_sharing_modes); upgrade transformers to load this model")


class Gemma3PrunedDecoderLayer(Gemma3DecoderLayer):
    """A Gemma 3 decoder layer whose attention and/or FFN sublayer (with its norms) may be absent."""

    def __init__(self, config: Gemma3PrunedTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if layer_idx in config.no_attention:
            self.input_layernorm = self.self_attn = self.post_attention_layernorm = None
        if layer_idx in config.no_ffn:
            self.pre_feedforward_layernorm = self.mlp = self.post_feedforward_layernorm = None

    def forward(self, hidden_states, **kwargs):
        # kwargs (mask, rotary cos/sin, cache, positions, ...) are whatever this transformers version's
        # Gemma3TextModel.forward hands a decoder layer; they go to Gemma 3's attention untouched.
        if self.self_attn is not None:
            attention, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states + self.post_attention_layernorm(attention)
        if self.mlp is not None:
            hidden_states = hidden_states + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden_states)))
        return hidden_states


class Gemma3PrunedPreTrainedModel(Gemma3PreTrainedModel):
    config_class = Gemma3PrunedTextConfig
    config: Gemma3PrunedTextConfig
    _no_split_modules: ClassVar[list[str]] = ["Gemma3PrunedDecoderLayer"]
    _can_record_outputs: ClassVar[dict[str, type]] = {"hidden_states": Gemma3PrunedDecoderLayer,
                                                      "attentions": Gemma3Attention}


class Gemma3PrunedTextModel(Gemma3PrunedPreTrainedModel, Gemma3TextModel):
    """``Gemma3TextModel`` with pruned layers; its ``forward`` is Gemma 3's, inherited unchanged."""

    def __init__(self, config: Gemma3PrunedTextConfig):
        Gemma3PrunedPreTrainedModel.__init__(self, config)  # not Gemma3TextModel.__init__: it would build full layers
        _check_cache(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = Gemma3TextScaledWordEmbedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                                          embed_scale=config.hidden_size**0.5)
        self.layers = nn.ModuleList([Gemma3PrunedDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Gemma3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma3RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()


class Gemma3PrunedForCausalLM(Gemma3PrunedPreTrainedModel, Gemma3ForCausalLM):
    """``Gemma3ForCausalLM`` over :class:`Gemma3PrunedTextModel` (same head, tying, softcapping and generation)."""

    def __init__(self, config: Gemma3PrunedTextConfig):
        Gemma3PrunedPreTrainedModel.__init__(self, config)
        self.model = Gemma3PrunedTextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["Gemma3PrunedDecoderLayer", "Gemma3PrunedForCausalLM", "Gemma3PrunedPreTrainedModel",
           "Gemma3PrunedTextModel"]
