"""The runtime compatibility table: each rule fires on the config field it reads, and only then."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from transformers import LlamaConfig

from cornerstone.decilm import DeciLMConfig
from cornerstone.export import drop_blocks
from cornerstone.serving import (LLAMA_CPP, RUNTIMES, SGLANG, TENSORRT_LLM, TRANSFORMERS, VLLM, RuntimeSupport,
                                 compatibility, notes, status_of)
from tests.conftest import tiny_model, tiny_tokenizer

# ffn_mult 4.0 gives exactly 1024 at hidden 384 (2/3 * 4 * 384 = 1024, a multiple of 256): no width is pinned
CLEAN = dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2,
             num_hidden_layers=4, vocab_size=1000, max_position_embeddings=256)


def deci(no_attention=(), no_ffn=(), **overrides) -> DeciLMConfig:
    return DeciLMConfig.from_llama(LlamaConfig(**{**CLEAN, **overrides}), no_attention=no_attention, no_ffn=no_ffn)


def flagged(table: list[RuntimeSupport]) -> dict[str, str]:
    """runtime -> its worst status, for the runtimes some rule applied to."""
    return {row.runtime: status_of(table, row.runtime) for row in table if row.status != "supported"}


def test_a_clean_decilm_config_is_supported_everywhere():
    table = compatibility(deci(), "decilm")
    assert [row.runtime for row in table] == list(RUNTIMES)
    assert {row.status for row in table} == {"supported"} and notes(table) == []
    assert all(row.checked_against and row.reason and row.finding is None for row in table)


@pytest.mark.parametrize("config, expected, finding", [
    (deci(no_attention=[0]), {VLLM: "refused", SGLANG: "refused"}, "Layer 0 keeps its FFN but not its attention"),
    # an empty layer 0 passes the stream through: layer 1 is where vLLM's residual starts
    (deci(no_attention=[0, 1], no_ffn=[0]), {VLLM: "refused", SGLANG: "refused"},
     "Layer 1, the first layer that computes anything, keeps its FFN"),
    (deci(no_attention=[2]), {}, None),  # attention removed later: the residual exists by then
    (deci(no_ffn=[1]), {LLAMA_CPP: "caveat"}, "Layer 1 keeps attention without an FFN"),
    (deci(no_ffn=[3]), {LLAMA_CPP: "caveat"}, "The last layer (L3) has no FFN"),
    (deci(no_attention=[0, 1, 2, 3]), {VLLM: "refused", SGLANG: "refused"}, "No layer keeps its attention"),
    (deci(head_dim=32), {LLAMA_CPP: "refused"}, "head_dim is 32"),
])
def test_decilm_rules_fire_on_the_layout_they_read(config, expected, finding):
    table = compatibility(config, "decilm")
    assert flagged(table) == expected
    if finding:
        assert any(finding in note for note in notes(table))
    else:
        assert notes(table) == []


def test_a_pinned_ffn_width_is_refused_by_the_runtimes_that_read_ffn_mult_only():
    # hidden 32 / intermediate 64: ffn_mult 3.0 would round up to 256, so the width is stored explicitly
    config = DeciLMConfig.from_llama(tiny_model("llama").config)
    ffn = config.block_configs[0].ffn
    assert ffn["intermediate_size"] == 64 and ffn["ffn_mult"] == 3.0
    # vLLM's access (hasattr(ffn, "ffn_mult") else ffn.intermediate_size) gets the pinned width ...
    assert (ffn.ffn_mult if hasattr(ffn, "ffn_mult") else ffn.intermediate_size) == 64
    # ... SGLang's and TensorRT-LLM's plain ffn.ffn_mult does not
    with pytest.raises(AttributeError):
        ffn.ffn_mult
    table = compatibility(config, "decilm")
    assert flagged(table) == {LLAMA_CPP: "refused", TENSORRT_LLM: "refused", SGLANG: "refused"}
    assert "ffn.intermediate_size" in notes(table)[0]


def test_variable_gqa_is_refused_by_sglang_only():
    blocks = [{"attention": {"n_heads_in_group": group}} for group in (3, 3, 2, 3)]
    config = DeciLMConfig(block_configs=blocks, **CLEAN)
    assert flagged(compatibility(config, "decilm")) == {SGLANG: "refused"}
    same = DeciLMConfig(block_configs=[{"attention": {"n_heads_in_group": 3}}] * 4, **CLEAN)
    assert flagged(compatibility(same, "decilm")) == {}


def test_replace_with_linear_is_refused_where_it_is_not_implemented():
    blocks = [{}, {"attention": {"no_op": False, "replace_with_linear": True}}, {}, {}]
    with pytest.raises(ValueError, match="replace_with_linear is not supported"):
        DeciLMConfig(block_configs=blocks, **CLEAN)  # what the transformers verdict says
    config = deci()
    config.block_configs[1]["attention"]["replace_with_linear"] = True  # as another tool's config.json would
    table = compatibility(config, "decilm")
    assert flagged(table) == {TRANSFORMERS: "refused", VLLM: "refused", SGLANG: "refused"}
    assert "L1.attention is replace_with_linear" in notes(table)[0]


def test_the_converter_tokenizer_rule_reads_vocab_size_and_tokenizer_json():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    byte_level = tiny_tokenizer()  # GPT-2 style byte-level BPE, as SmolLM2's
    assert flagged(compatibility(deci(vocab_size=300), "decilm", byte_level)) == {LLAMA_CPP: "refused"}
    # a Llama 3 sized vocabulary takes the converter's other path; without a tokenizer the rule cannot run
    assert flagged(compatibility(deci(vocab_size=128256), "decilm", byte_level)) == {}
    assert flagged(compatibility(deci(vocab_size=300), "decilm")) == {}
    spm = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>", byte_fallback=True))
    spm.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    llama2 = PreTrainedTokenizerFast(tokenizer_object=spm)
    assert flagged(compatibility(deci(vocab_size=32000), "decilm", llama2)) == {}


def test_the_notes_of_the_export_test_plan_keep_their_three_findings_in_order():
    # the plan of test_export's sublayer export: L0.attn and L1.mlp removed from the tiny Llama
    config = DeciLMConfig.from_llama(tiny_model("llama").config, no_attention=[0], no_ffn=[1])
    lines = notes(compatibility(config, "decilm"))
    assert len(lines) == 3 and "ffn.intermediate_size" in lines[0]
    assert "Layer 0 keeps its FFN but not its attention" in lines[1] and "vLLM" in lines[1]
    assert "Layer 1 keeps attention without an FFN" in lines[2] and "llama.cpp" in lines[2]
    assert all("\n" not in line for line in lines)


def test_a_stock_export_of_llama_is_supported_everywhere():
    slim = drop_blocks(tiny_model("llama"), [1])
    table = compatibility(slim.config, "stock")
    assert [row.runtime for row in table] == list(RUNTIMES) and flagged(table) == {}


def test_gemma3_stock_export_that_moves_a_global_layer_is_a_llamacpp_caveat():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma3_text", vocab_size=300, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  sliding_window=4, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    # S S S S S F: dropping the global L5 keeps every kind at its index; dropping L0 moves L5 to index 4
    assert flagged(compatibility(drop_blocks(model, [5]).config, "stock")) == {}
    shifted = compatibility(drop_blocks(model, [0]).config, "stock")
    assert flagged(shifted) == {LLAMA_CPP: "caveat"}
    assert "layer 4 differ" in notes(shifted)[0]


def test_qwen2_sliding_threshold_left_behind_is_a_vllm_caveat():
    from transformers import AutoConfig

    from cornerstone.streaming import edit_config

    model = tiny_model("qwen2")
    model.config.use_sliding_window, model.config.max_window_layers = True, 1
    model.config.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    assert flagged(compatibility(model.config, "stock")) == {}
    stale = drop_blocks(model, [0]).config  # a threshold left as it was is flagged...
    stale.max_window_layers = 1
    assert flagged(compatibility(stale, "stock")) == {VLLM: "caveat"}
    # ...and both exports renumber it (streaming.LAYER_FIELDS): nothing left to flag
    assert drop_blocks(model, [0]).config.max_window_layers == 0
    assert flagged(compatibility(drop_blocks(model, [0]).config, "stock")) == {}
    edited = model.config.to_dict()
    edit_config(edited, keep=[1, 2])
    assert flagged(compatibility(AutoConfig.for_model("qwen2", **{k: v for k, v in edited.items()
                                                                    if k != "model_type"}), "stock")) == {}


def test_layer_types_of_another_length_is_refused_by_transformers():
    config = drop_blocks(tiny_model("qwen2"), [1]).config
    assert flagged(compatibility(config, "stock")) == {}
    config.layer_types = config.layer_types + ["full_attention"]
    assert flagged(compatibility(config, "stock")) == {TRANSFORMERS: "refused"}


def test_table_rows_are_strict_and_the_layout_is_checked():
    row = compatibility(deci(), "decilm")[0]
    with pytest.raises(ValidationError):
        RuntimeSupport(**row.model_dump(), version="1")
    with pytest.raises(ValidationError):
        RuntimeSupport(**{**row.model_dump(), "status": "maybe"})
    with pytest.raises(ValueError, match="layout"):
        compatibility(deci(), "gguf")
    with pytest.raises(KeyError):
        status_of([row], "Ollama")
