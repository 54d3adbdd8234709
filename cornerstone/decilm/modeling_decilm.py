"""A sublayer-pruned Llama in the DeciLM / Nemotron-NAS format, for ``trust_remote_code`` loading.

This file is copied into every exported model folder next to configuration_decilm.py, its only
import besides transformers and torch. Sources of the format: NVIDIA's remote code for
Llama-3_1-Nemotron-51B-Instruct (modeling_decilm.py), vLLM (vllm/model_executor/models/nemotron_nas.py)
and llama.cpp (convert_hf_to_gguf.py ``DeciModel``, src/models/deci.cpp).

Layout: the stock Llama weight names, one ``model.layers.{i}`` slot per ``block_configs`` entry (no
renumbering). A layer holds ``input_layernorm`` + ``self_attn`` only when its attention is kept and
``post_attention_layernorm`` + ``mlp`` only when its FFN is kept, exactly the modules vLLM's
``DeciLMDecoderLayer`` builds and loads; a removed sublayer leaves the residual stream unchanged.
Per layer, ``n_heads_in_group`` sets the key/value heads and ``ffn_mult`` (or the explicit
``intermediate_size``) the FFN width.

Everything numeric is transformers' own Llama code (attention with every backend it supports, MLP,
RMSNorm, rotary embeddings with any rope scaling, and ``LlamaModel.forward`` itself), so a DeciLM
with nothing removed is the stock Llama, whatever transformers version loads the folder.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_decilm import DeciLMConfig


class _LayerConfig:
    """The model config with a few per-layer values overridden.

    A view rather than a copy: Llama's attention reads ``config._attn_implementation`` at every
    forward, and ``model.set_attn_implementation`` only updates the model's own config object.
    """

    def __init__(self, base: DeciLMConfig, **overrides: Any):
        self.__dict__.update(overrides, _base=base)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_base":  # copy/pickle probe dunders before __dict__ is filled
            raise AttributeError(name)
        return getattr(self._base, name)


class DeciLMDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer whose attention and/or FFN sublayer may be absent (no_op)."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_idx: int | None):
        super().__init__()
        self.hidden_size = config.hidden_size
        kv_heads, width = config.layer_sizes(layer_idx)
        self.input_layernorm = self.self_attn = self.post_attention_layernorm = self.mlp = None
        if kv_heads is not None:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            # cache_idx counts attention layers only, so the KV cache holds no empty slot for a removed
            # attention: DynamicCache.get_seq_length() reads slot 0 and would say 0 if layer 0 had none.
            self.self_attn = LlamaAttention(_LayerConfig(config, num_key_value_heads=kv_heads), cache_idx)
        if width is not None:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = LlamaMLP(_LayerConfig(config, intermediate_size=width))

    def forward(self, hidden_states, **kwargs):
        # kwargs (mask, rotary cos/sin, cache, positions, ...) are whatever this transformers version's
        # LlamaModel.forward hands a decoder layer; they go to Llama's attention untouched.
        if self.self_attn is not None:
            attn_output, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states + attn_output
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMPreTrainedModel(LlamaPreTrainedModel):
    config_class = DeciLMConfig
    config: DeciLMConfig
    _no_split_modules: ClassVar[list[str]] = ["DeciLMDecoderLayer"]
    _can_record_outputs: ClassVar[dict[str, type]] = {"hidden_states": DeciLMDecoderLayer, "attentions": LlamaAttention}


class DeciLMModel(DeciLMPreTrainedModel, LlamaModel):
    """``LlamaModel`` with DeciLM layers; its ``forward`` is Llama's, inherited unchanged."""

    def __init__(self, config: DeciLMConfig):
        DeciLMPreTrainedModel.__init__(self, config)  # not LlamaModel.__init__: it would build full Llama layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers, cache_idx = [], 0
        for i, block in enumerate(config.block_configs):
            layers.append(DeciLMDecoderLayer(config, i, cache_idx))
            cache_idx += not block["attention"]["no_op"]
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DeciLMForCausalLM(DeciLMPreTrainedModel, LlamaForCausalLM):
    """``LlamaForCausalLM`` over :class:`DeciLMModel` (same head, tying, loss and generation)."""

    def __init__(self, config: DeciLMConfig):
        DeciLMPreTrainedModel.__init__(self, config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["DeciLMDecoderLayer", "DeciLMForCausalLM", "DeciLMModel", "DeciLMPreTrainedModel"]
