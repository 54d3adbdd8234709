"""Which runtimes serve an exported checkpoint, decided from the config fields each runtime reads.

:func:`compatibility` gives one :class:`RuntimeSupport` row per runtime and per rule that applies to the
export's config: ``supported`` when nothing of this table applies, ``refused`` when the runtime fails to
load or build the model, ``caveat`` when it loads and computes another model than the export. Each rule
is data in :data:`RULES`: a *finding* (a function of the config, returning the fact it found in one line,
or None) and, per runtime, the verdict with the file and commit it was read from. The rules come from
reading the runtimes' sources, not from running them (no GPU serving runtime runs in CI):

- vLLM: ``vllm/model_executor/models/nemotron_nas.py`` (``DeciLMDecoderLayer``: layer 0 without attention
  meets ``residual=None`` in its FFN norm; the FFN width is ``ffn_mult`` rounded up to a multiple of 256
  unless the attribute is absent, then ``ffn.intermediate_size``; ``replace_with_linear`` is never read)
  and ``vllm/transformers_utils/model_arch_config_convertor.py`` (``num_key_value_heads`` from the first
  block whose attention is not no_op, a RuntimeError when there is none).
- llama.cpp: ``convert_hf_to_gguf.py`` (``DeciModel``: per-layer head counts from ``n_heads_in_group``,
  FFN widths from ``ffn_mult`` only, ``key_length = hidden_size // num_attention_heads``, and for a
  vocabulary other than 128256 the Llama-2 tokenizer path, ``LlamaHfVocab``, which accepts only a
  byte-fallback BPE ``tokenizer.json``) and ``src/models/deci.cpp`` (a layer with ``n_ff == 0`` is
  skipped whole with ``continue``: its attention output and, in the last layer, the selection of the
  output rows are lost). For stock Gemma 3, ``src/llama-model.cpp`` derives the sliding/global pattern
  from the layer index (see :mod:`cornerstone.gguf_export`).
- TensorRT-LLM (PyTorch backend): ``tensorrt_llm/_torch/models/modeling_nemotron_nas.py`` (handles a
  missing residual before the FFN, supports ``replace_with_linear``, reads ``ffn.ffn_mult`` only).
- SGLang: ``python/sglang/srt/models/nemotron_nas.py`` (vLLM's layer, reading ``ffn.ffn_mult`` only) and
  ``python/sglang/srt/configs/model_config.py`` (one KV head count for all layers, else ValueError).

cornerstone's DeciLM config (:mod:`cornerstone.decilm`) hides ``ffn_mult`` from attribute access when
``ffn.intermediate_size`` pins the width, so vLLM, which falls back to the explicit width, builds the
right layer, while TensorRT-LLM and SGLang, which read ``ffn.ffn_mult`` unconditionally, fail on it.

:func:`notes` turns a table into the export's notes: one line per finding, naming what each runtime
does with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Layout = Literal["stock", "decilm", "gemma3-pruned"]
Status = Literal["supported", "refused", "caveat"]

TRANSFORMERS = "transformers"
VLLM = "vLLM"
LLAMA_CPP = "llama.cpp (convert_hf_to_gguf)"
TENSORRT_LLM = "TensorRT-LLM"
SGLANG = "SGLang"
RUNTIMES = (TRANSFORMERS, VLLM, LLAMA_CPP, TENSORRT_LLM, SGLANG)

# The files the rules were read from (repository@commit path).
VLLM_DECI = "vllm-project/vllm@2ee6ae787f30 vllm/model_executor/models/nemotron_nas.py"
VLLM_KV_HEADS = "vllm-project/vllm@00bb6f59a0c7 vllm/transformers_utils/model_arch_config_convertor.py"
VLLM_QWEN2 = "vllm-project/vllm@013a27925170 vllm/model_executor/models/qwen2.py"
LLAMA_CONVERT = "ggml-org/llama.cpp@0024aa7417ef convert_hf_to_gguf.py (DeciModel)"
LLAMA_GRAPH = "ggml-org/llama.cpp@75dc8f64c930 src/models/deci.cpp"
LLAMA_GEMMA3 = "ggml-org/llama.cpp src/llama-model.cpp (LLM_ARCH_GEMMA3: set_swa_pattern(6); see gguf_export)"
TRTLLM_DECI = "NVIDIA/TensorRT-LLM@4d3653682429 tensorrt_llm/_torch/models/modeling_nemotron_nas.py"
SGLANG_DECI = "sgl-project/sglang@65cf1ed0b8b1 python/sglang/srt/models/nemotron_nas.py"
SGLANG_KV_HEADS = "sgl-project/sglang@001adf564fd3 python/sglang/srt/configs/model_config.py"
CORNERSTONE_DECI = "cornerstone/decilm/configuration_decilm.py (shipped in the export folder)"
CORNERSTONE_GEMMA3 = "cornerstone/gemma3_pruned/modeling_gemma3_pruned.py (shipped in the export folder)"
# what a runtime with no loader of its own for an architecture does: it looks ``architectures`` up in its registry
NO_LOADER = "the runtime's registry of architectures (config.json: architectures = Gemma3PrunedForCausalLM)"

# llama.cpp's converter takes this vocabulary size for a Llama 3 tokenizer and any other for Llama 2's.
LLAMA3_VOCAB = 128256


class RuntimeSupport(BaseModel):
    """One runtime's verdict on an export: ``finding`` is the config fact a rule found (None when no
    rule applies), ``reason`` what the runtime does with it, ``checked_against`` where that was read."""

    model_config = ConfigDict(extra="forbid")

    runtime: str
    status: Status
    checked_against: str
    reason: str
    finding: str | None = None


@dataclass(frozen=True)
class Verdict:
    status: Status
    checked_against: str
    reason: str


@dataclass(frozen=True)
class Rule:
    """A config fact (``finding``: config, tokenizer -> one line, or None where the rule does not apply)
    and what each runtime named in ``verdicts`` does when it holds."""

    layout: Layout
    finding: Callable[[Any, Any], str | None]
    verdicts: dict[str, Verdict]


# -- what the rules read -------------------------------------------------------------------------------

def _blocks(config: Any) -> list[dict]:
    return list(config.block_configs)


def _layers(indices: list[int]) -> str:
    return f"Layer {indices[0]}" if len(indices) == 1 else f"Layers {', '.join(map(str, indices))}"


def _explicit_ffn_width(config: Any, tokenizer: Any) -> str | None:
    from .decilm import ffn_mult_to_intermediate_size

    pinned = [i for i, block in enumerate(_blocks(config)) if not block["ffn"]["no_op"]
              and block["ffn"].get("intermediate_size") is not None
              and block["ffn"]["intermediate_size"] != ffn_mult_to_intermediate_size(block["ffn"]["ffn_mult"],
                                                                                     config.hidden_size)]
    if not pinned:
        return None
    return (f"The FFN width of {_layers(pinned).lower()} is stored explicitly (ffn.intermediate_size), which "
            "ffn_mult rounded up to a multiple of 256 does not give")


def _ffn_before_any_attention(config: Any, tokenizer: Any) -> str | None:
    # The first layer that computes anything starts the residual stream; vLLM/SGLang start it only in attention.
    for index, block in enumerate(_blocks(config)):
        if block["attention"]["no_op"] and block["ffn"]["no_op"]:
            continue
        if block["attention"]["no_op"]:
            first = "" if index == 0 else ", the first layer that computes anything,"
            return f"Layer {index}{first} keeps its FFN but not its attention"
        return None
    return None


def _attention_without_ffn(config: Any, tokenizer: Any) -> str | None:
    half = [i for i, block in enumerate(_blocks(config)) if block["ffn"]["no_op"] and not block["attention"]["no_op"]]
    if not half:
        return None
    return f"{_layers(half)} {'keeps' if len(half) == 1 else 'keep'} attention without an FFN"


def _last_layer_without_ffn(config: Any, tokenizer: Any) -> str | None:
    last = len(_blocks(config)) - 1
    return f"The last layer (L{last}) has no FFN" if _blocks(config)[last]["ffn"]["no_op"] else None


def _no_attention_at_all(config: Any, tokenizer: Any) -> str | None:
    if all(block["attention"]["no_op"] for block in _blocks(config)):
        return "No layer keeps its attention"
    return None


def _kv_heads_differ(config: Any, tokenizer: Any) -> str | None:
    groups = sorted({block["attention"]["n_heads_in_group"] for block in _blocks(config)
                     if not block["attention"]["no_op"]})
    if len(groups) < 2:
        return None
    return f"Layers differ in attention.n_heads_in_group ({', '.join(map(str, groups))}): variable GQA"


def _replace_with_linear(config: Any, tokenizer: Any) -> str | None:
    linear = [f"L{i}.{kind}" for i, block in enumerate(_blocks(config)) for kind in ("attention", "ffn")
              if block[kind].get("replace_with_linear")]
    return f"{', '.join(linear)} {'is' if len(linear) == 1 else 'are'} replace_with_linear" if linear else None


def _head_dim_not_derived(config: Any, tokenizer: Any) -> str | None:
    derived = config.hidden_size // config.num_attention_heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None or head_dim == derived:
        return None
    return f"head_dim is {head_dim}, not hidden_size // num_attention_heads = {derived}"


def _tokenizer_not_llama2_bpe(config: Any, tokenizer: Any) -> str | None:
    if tokenizer is None or config.vocab_size == LLAMA3_VOCAB:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return f"vocab_size is {config.vocab_size} and the tokenizer has no tokenizer.json (not a fast tokenizer)"
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    # LlamaHfVocab's own test, in the converter's words
    if model.get("type") == "BPE" and model.get("byte_fallback", False) and decoder.get("type") == "Sequence":
        return None
    return (f"vocab_size is {config.vocab_size} (not {LLAMA3_VOCAB}) and the tokenizer is not a byte-fallback "
            f"BPE (model {model.get('type')}, byte_fallback {model.get('byte_fallback', False)})")


def _layer_types_length(config: Any, tokenizer: Any) -> str | None:
    types = getattr(config, "layer_types", None)
    if types is None or len(types) == config.num_hidden_layers:
        return None
    return f"layer_types has {len(types)} entries for num_hidden_layers={config.num_hidden_layers}"


def _gemma3_pattern_shifted(config: Any, tokenizer: Any) -> str | None:
    if getattr(config, "model_type", None) not in ("gemma3", "gemma3_text") or not getattr(config, "layer_types", None):
        return None
    period = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", None) or 6
    derived = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(len(config.layer_types))]
    moved = [i for i, (kind, by_index) in enumerate(zip(config.layer_types, derived)) if kind != by_index]
    if not moved:
        return None
    return (f"layer_types no longer follows Gemma 3's every-{period}th-layer-global pattern "
            f"({_layers(moved).lower()} differ from the index-derived kind)")


def _qwen_window_threshold_stale(config: Any, tokenizer: Any) -> str | None:
    threshold, types = getattr(config, "max_window_layers", None), getattr(config, "layer_types", None)
    if not getattr(config, "use_sliding_window", False) or threshold is None or not types:
        return None
    # transformers' Qwen2/Qwen3 configs: layer i is sliding when i >= max_window_layers
    by_threshold = ["sliding_attention" if i >= threshold else "full_attention" for i in range(len(types))]
    if list(types) == by_threshold:
        return None
    return (f"max_window_layers={threshold} puts the sliding-window layers elsewhere than layer_types "
            "(the threshold was not renumbered with the kept layers)")


# -- the table ------------------------------------------------------------------------------------------

_READS_FFN_MULT = ("reads block_config.ffn.ffn_mult unconditionally, which cornerstone's config hides when the "
                   "width is pinned (AttributeError)")
_IGNORES_LINEAR = "never reads replace_with_linear and builds a full sublayer, whose weights are not in the checkpoint"

RULES: tuple[Rule, ...] = (
    Rule("decilm", _explicit_ffn_width, {
        LLAMA_CPP: Verdict("refused", LLAMA_CONVERT, "the converter ignores ffn.intermediate_size and writes the "
                           "width from ffn_mult, so llama.cpp rejects the FFN tensors' shapes on load"),
        TENSORRT_LLM: Verdict("refused", TRTLLM_DECI, _READS_FFN_MULT),
        SGLANG: Verdict("refused", SGLANG_DECI, _READS_FFN_MULT),
    }),
    Rule("decilm", _ffn_before_any_attention, {
        VLLM: Verdict("refused", VLLM_DECI, "vLLM's DeciLM layer then meets an empty residual (residual=None "
                      "in post_attention_layernorm) and fails; serve it with transformers, or protect L0.attn "
                      "when planning"),
        SGLANG: Verdict("refused", SGLANG_DECI, "SGLang's copy of vLLM's DeciLM layer fails the same way"),
    }),
    Rule("decilm", _attention_without_ffn, {
        LLAMA_CPP: Verdict("caveat", LLAMA_GRAPH, "llama.cpp's DeciLM graph skips such a layer whole (its attention "
                           "output is dropped), so a GGUF of this checkpoint is not this model; vLLM and "
                           "transformers compute it correctly"),
    }),
    Rule("decilm", _last_layer_without_ffn, {
        LLAMA_CPP: Verdict("caveat", LLAMA_GRAPH, "the graph's 'continue' also skips the selection of the output "
                           "rows in the last layer, so the logits returned are not those of the requested "
                           "positions (read from the source, not run)"),
    }),
    Rule("decilm", _no_attention_at_all, {
        VLLM: Verdict("refused", VLLM_KV_HEADS, "num_key_value_heads comes from the first layer with attention; "
                      "without one vLLM raises 'Could not determine the number of key-value attention heads'"),
        SGLANG: Verdict("refused", SGLANG_KV_HEADS, "raises 'Couldn't determine number of kv heads'"),
    }),
    Rule("decilm", _kv_heads_differ, {
        SGLANG: Verdict("refused", SGLANG_KV_HEADS, "raises 'Variable GQA (VGQA) is not yet supported for "
                        "nemotron-nas in sglang'"),
    }),
    Rule("decilm", _replace_with_linear, {
        TRANSFORMERS: Verdict("refused", CORNERSTONE_DECI, "cornerstone's DeciLM config rejects replace_with_linear"),
        VLLM: Verdict("refused", VLLM_DECI, _IGNORES_LINEAR),
        SGLANG: Verdict("refused", SGLANG_DECI, _IGNORES_LINEAR),
    }),
    Rule("decilm", _head_dim_not_derived, {
        LLAMA_CPP: Verdict("refused", LLAMA_CONVERT, "the converter writes key_length = hidden_size // "
                           "num_attention_heads but the RoPE dimension from head_dim, and deci.cpp asserts they "
                           "are equal"),
    }),
    Rule("decilm", _tokenizer_not_llama2_bpe, {
        LLAMA_CPP: Verdict("refused", LLAMA_CONVERT, "the converter reads such a vocabulary with LlamaHfVocab "
                           "(DeciLM-7B's path), which stops with 'Cannot find Llama BPE tokenizer'"),
    }),
    Rule("stock", _layer_types_length, {
        TRANSFORMERS: Verdict("refused", "transformers configuration validation (validate_layer_type)",
                              "its config class refuses a layer_types list of another length than the layers"),
    }),
    Rule("stock", _gemma3_pattern_shifted, {
        LLAMA_CPP: Verdict("caveat", LLAMA_GEMMA3, "a GGUF converted from this folder carries no per-layer "
                           "pattern, and llama.cpp builds that derive it from the layer index run other layers "
                           "with a sliding window; transformers and vLLM read layer_types"),
    }),
    Rule("stock", _qwen_window_threshold_stale, {
        VLLM: Verdict("caveat", VLLM_QWEN2, "vLLM's Qwen2 reads max_window_layers (not layer_types) to decide "
                      "which layers slide; transformers reads layer_types"),
    }),
)

# What holds when no rule applies, per layout and runtime.
SUPPORTED: dict[Layout, dict[str, Verdict]] = {
    "decilm": {
        TRANSFORMERS: Verdict("supported", CORNERSTONE_DECI, "loads with trust_remote_code=True (the folder's "
                              "modeling_decilm.py); the export checks its logits against the masked model"),
        VLLM: Verdict("supported", VLLM_DECI, "DeciLMForCausalLM reads block_configs; needs --trust-remote-code "
                      "for the folder's configuration_decilm.py"),
        LLAMA_CPP: Verdict("supported", f"{LLAMA_CONVERT}; {LLAMA_GRAPH}", "DeciModel converts block_configs to "
                           "per-layer head counts and FFN lengths (0 for a removed sublayer)"),
        TENSORRT_LLM: Verdict("supported", TRTLLM_DECI, "NemotronNASForCausalLM (DeciLMForCausalLM) reads "
                              "block_configs, including an FFN without attention"),
        SGLANG: Verdict("supported", f"{SGLANG_DECI}; {SGLANG_KV_HEADS}", "DeciLMForCausalLM reads block_configs; "
                        "needs --trust-remote-code"),
    },
    "gemma3-pruned": {
        TRANSFORMERS: Verdict("supported", CORNERSTONE_GEMMA3, "loads with trust_remote_code=True (the folder's "
                              "modeling_gemma3_pruned.py, transformers 5); the export checks its logits against the "
                              "masked model"),
        **{runtime: Verdict("refused", NO_LOADER, "no loader for a Gemma 3 with sublayers removed (no serving format "
                            "describes one); export a whole-block plan for this runtime")
           for runtime in (VLLM, LLAMA_CPP, TENSORRT_LLM, SGLANG)},
    },
    "stock": {runtime: Verdict("supported", "the base architecture's own loader (same model_type, fewer layers)",
                               "num_hidden_layers and every per-layer list describe the kept layers")
              for runtime in RUNTIMES},
}


def compatibility(config: Any, layout: Layout, tokenizer: Any = None) -> list[RuntimeSupport]:
    """Each runtime's verdict on an export whose (text) config is ``config``: for every rule of
    :data:`RULES` for ``layout`` whose finding holds, one row per runtime it names, in rule order; then a
    ``supported`` row for each runtime no rule applied to. ``tokenizer`` (optional, a fast tokenizer)
    lets the rules that read ``tokenizer.json`` run."""
    if layout not in SUPPORTED:
        raise ValueError(f"layout must be one of {', '.join(SUPPORTED)}, not {layout!r}")
    def row(runtime: str, verdict: Verdict, finding: str | None = None) -> RuntimeSupport:
        return RuntimeSupport(runtime=runtime, status=verdict.status, checked_against=verdict.checked_against,
                              reason=verdict.reason, finding=finding)

    rows: list[RuntimeSupport] = []
    for rule in RULES:
        if rule.layout == layout and (finding := rule.finding(config, tokenizer)) is not None:
            rows += [row(runtime, verdict, finding) for runtime, verdict in rule.verdicts.items()]
    flagged = {entry.runtime for entry in rows}
    return rows + [row(runtime, verdict) for runtime, verdict in SUPPORTED[layout].items() if runtime not in flagged]


def notes(table: list[RuntimeSupport]) -> list[str]:
    """The export's notes from a :func:`compatibility` table: one line per finding, in order, naming each
    runtime that refuses it or computes another model and why."""
    grouped: dict[str, list[RuntimeSupport]] = {}
    for row in table:
        if row.status != "supported" and row.finding is not None:
            grouped.setdefault(row.finding, []).append(row)
    return [f"{finding}: " + "; ".join(f"{row.runtime} {row.status}: {row.reason}" for row in rows) + "."
            for finding, rows in grouped.items()]


def status_of(table: list[RuntimeSupport], runtime: str) -> Status:
    """The worst verdict ``table`` gives ``runtime`` (refused > caveat > supported)."""
    statuses = {row.status for row in table if row.runtime == runtime}
    if not statuses:
        raise KeyError(f"{runtime!r} is not in the table")
    return next(status for status in ("refused", "caveat", "supported") if status in statuses)
