"""DeciLM / Nemotron-NAS export code: a DeciLM with sublayers marked no_op is the stock Llama with
those sublayers removed (cornerstone.masking), it reloads through trust_remote_code, and generates
with a KV cache even when layer 0 has no attention."""

import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cornerstone.decilm import (
    AUTO_MAP,
    MODELING_FILES,
    DeciLMConfig,
    DeciLMForCausalLM,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
    source_dir,
)
from cornerstone.masking import without
from cornerstone.players import parse_players

from .conftest import TINY, VOCAB, tiny_model

INPUT = torch.tensor([[5, 17, 42, 99, 3, 7, 250, 11, 64, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
PATTERNS = ["", "L0.attn", "L1.mlp", "L0.attn,L0.mlp", "L0.attn,L1.attn,L2.attn", "L0.mlp,L1.attn,L2.attn,L2.mlp"]


def llama(**overrides):
    """conftest's tiny Llama, with config overrides (tied embeddings, rope scaling)."""
    if not overrides:
        return tiny_model("llama")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **TINY, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def split(pattern: str) -> tuple[set[int], set[int]]:
    ids = [p for p in pattern.split(",") if p]
    return ({int(p[1:].split(".")[0]) for p in ids if p.endswith(".attn")},
            {int(p[1:].split(".")[0]) for p in ids if p.endswith(".mlp")})


def pruned(stock, pattern: str) -> DeciLMForCausalLM:
    """The DeciLM of ``stock`` without the sublayers of ``pattern``, loaded strictly from stock weights
    minus the removed sublayers and their norms (the exact tensors an export writes)."""
    no_attn, no_mlp = split(pattern)
    config = DeciLMConfig.from_llama(stock.config, no_attention=no_attn, no_ffn=no_mlp)
    gone = [f"model.layers.{i}.{part}." for i in no_attn for part in ("self_attn", "input_layernorm")]
    gone += [f"model.layers.{i}.{part}." for i in no_mlp for part in ("mlp", "post_attention_layernorm")]
    model = DeciLMForCausalLM(config).eval()
    state = {k: v for k, v in stock.state_dict().items() if not k.startswith(tuple(gone))}
    model.load_state_dict(state, strict=True)
    return model


def logits(model, **kwargs):
    with torch.no_grad():
        return model(INPUT, **kwargs).logits


def stock_logits(stock, pattern: str):
    with without(stock, parse_players(stock, pattern) if pattern else []):
        return logits(stock)


@pytest.fixture(scope="module")
def stock():
    return tiny_model("llama")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pruned_decilm_equals_stock_llama_with_sublayers_removed(stock, pattern):
    expected = stock_logits(stock, pattern)
    assert (logits(pruned(stock, pattern)) - expected).abs().max() <= 1e-5
    if pattern:  # the removal must matter, or the comparison above proves nothing
        assert (expected - logits(stock)).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", ["", "L0.attn,L2.mlp"])
def test_tied_embeddings(pattern):
    stock = llama(tie_word_embeddings=True)
    model = pruned(stock, pattern)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (logits(model) - stock_logits(stock, pattern)).abs().max() <= 1e-5


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations(stock, implementation):
    model = pruned(stock, "L1.attn")
    model.set_attn_implementation(implementation)
    # per-layer attention configs are views of the model config, so they follow the switch
    assert model.model.layers[0].self_attn.config._attn_implementation == implementation
    original = stock.config._attn_implementation
    stock.set_attn_implementation(implementation)
    try:
        assert (logits(model) - stock_logits(stock, "L1.attn")).abs().max() <= 1e-5
    finally:
        stock.set_attn_implementation(original)
    if implementation == "eager":
        with torch.no_grad():
            out = model(INPUT, output_attentions=True, output_hidden_states=True)
        assert len(out.attentions) == 2 and len(out.hidden_states) == 4


def test_layers_hold_only_kept_sublayers_and_their_norms(stock):
    names = set(pruned(stock, "L0.attn,L1.mlp").state_dict())
    assert not any(n.startswith(("model.layers.0.self_attn", "model.layers.0.input_layernorm")) for n in names)
    assert not any(n.startswith(("model.layers.1.mlp", "model.layers.1.post_attention_layernorm")) for n in names)
    assert {"model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.1.input_layernorm.weight", "model.layers.1.self_attn.q_proj.weight",
            "model.layers.2.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"} <= names


def export(model, folder):
    model.save_pretrained(folder)
    for name in MODELING_FILES:
        shutil.copy(source_dir() / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = AUTO_MAP
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return config


def test_export_reloads_with_trust_remote_code(tmp_path):
    stock = llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  rope_theta=500000.0)
    model = pruned(stock, "L0.attn,L2.mlp")
    written = export(model, tmp_path)

    assert written["architectures"] == ["DeciLMForCausalLM"]
    assert written["model_type"] == "nemotron-nas"
    assert written["block_configs"] == model.config.block_configs
    # no_op sublayers carry nulls: llama.cpp's converter finds attention-free / FFN-free layers by them
    assert written["block_configs"][0]["attention"] == {"no_op": True, "replace_with_linear": False,
                                                        "n_heads_in_group": None}
    assert written["block_configs"][2]["ffn"] == {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
    assert written["block_configs"][1]["attention"]["n_heads_in_group"] == 2
    assert written["rope_theta"] == 500000.0 and written["rope_scaling"]["rope_type"] == "llama3"

    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.block_configs == written["block_configs"]
    assert config.rope_parameters == model.config.rope_parameters
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(reloaded).__module__.startswith("transformers_modules.")  # the copied file, not cornerstone
    assert torch.equal(logits(reloaded), logits(model))
    assert (logits(reloaded) - stock_logits(stock, "L0.attn,L2.mlp")).abs().max() <= 1e-5

    reloaded.save_pretrained(tmp_path / "again")  # a second round trip changes nothing
    assert json.loads((tmp_path / "again" / "config.json").read_text())["block_configs"] == written["block_configs"]


@pytest.mark.parametrize("pattern", ["L0.attn", "L0.attn,L2.attn,L1.mlp", "L0.attn,L1.attn,L2.attn"])
def test_cached_generation_equals_greedy_loop_without_cache(stock, pattern):
    model = pruned(stock, pattern)
    prompt = INPUT[:1]
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        if len(split(pattern)[0]) < 3:  # some attention kept: the cache must know the prompt's length
            assert out.past_key_values.get_seq_length() == prompt.shape[1]
        ids = prompt
        for _ in range(8):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("blocks, message", [
    ([{}, {}], "2 entries but the model has num_hidden_layers=3"),
    ([{"attention": {"replace_with_linear": True}}, {}, {}], "replace_with_linear is not supported"),
    ([{}, {"ffn": {"replace_with_linear": True, "ffn_mult": 3.0}}, {}], "replace_with_linear is not supported"),
    ([{"attention": {"n_heads_in_group": 3}}, {}, {}], "positive divisor of num_attention_heads=4"),
    ([{"attention": {"window_length": 64}}, {}, {}], "unsupported settings {'window_length': 64}"),
    ([{}, {"ffn": {"ffn_mult": -1.0}}, {}], "must be a positive number"),
])
def test_invalid_block_configs_are_rejected(blocks, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        DeciLMConfig(vocab_size=VOCAB, block_configs=blocks, **TINY)


def test_default_blocks_and_explicit_width():
    # a SmolLM2-shaped config: the formula reproduces the width, so no explicit key is written
    smol = DeciLMConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                        num_hidden_layers=2)
    assert smol.block_configs[1] == {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 3},
                                     "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": 4.0}}
    assert smol.layer_sizes(0) == (3, 1536)
    # the tiny model's 64 cannot come from the formula: the width is pinned, and attribute readers
    # (vLLM) see no ffn_mult, so they fall back to intermediate_size as well
    tiny = DeciLMConfig(vocab_size=VOCAB, **TINY)
    ffn = tiny.block_configs[0].ffn
    assert ffn["intermediate_size"] == 64 and ffn.intermediate_size == 64 and not hasattr(ffn, "ffn_mult")
    assert tiny.block_configs[0].attention.n_heads_in_group == 2 and not tiny.block_configs[0].attention.no_op


def test_ffn_mult_formula_matches_real_models():
    assert ffn_mult_to_intermediate_size(4.0, 576) == 1536  # SmolLM2-135M
    assert ffn_mult_to_intermediate_size(5.25, 4096) == 14336  # Llama-3-8B
    assert intermediate_size_to_ffn_mult(1536, 576) == 4.0
    assert intermediate_size_to_ffn_mult(14336, 4096) == 5.25
    assert ffn_mult_to_intermediate_size(3.0, 32) == 256  # rounds up to a multiple of 256
