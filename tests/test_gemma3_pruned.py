"""Sublayer plans of Gemma 3 export in cornerstone's pruned-Gemma-3 layout (remote code): the reloaded folder
computes the masked original, its cache holds nothing for a removed attention and generation with it
equals the loop without a cache, and edited modeling code is foreign code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cornerstone.export import export
from cornerstone.exported import load_exported
from cornerstone.planner import Planner, make_plan

from .architectures import random_model
from .conftest import TINY_CONFIGS
from .test_export import assert_reloaded_equals_masked, saved
from .test_hardening import assert_own_code_trusted_until_edited, model_report

PATTERN = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# the first attention of the model and the first global one go: the cache's length and the global mask's
# size must then be read from layers that kept theirs
REMOVED = ["L0.attn", "L1.attn", "L2.mlp"]


def gemma3():
    return random_model("gemma3_text", **{**TINY_CONFIGS["gemma3_text"], "num_hidden_layers": len(PATTERN)},
                        layer_types=PATTERN, vocab_size=300, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("gemma3-pruned")
    loaded = saved(gemma3(), tokenizer, folder / "base")
    importances = {f"L{i}.{kind}": 1.0 for i in range(len(PATTERN)) for kind in ("attn", "mlp")}
    importances.update({name: 0.0 for name in REMOVED})
    plan = make_plan(model_report(loaded, importances),
                     Planner(granularity="sublayer", drop=len(REMOVED), keep_first=0, keep_last=0), loaded=loaded)
    assert sorted(plan.player_names) == sorted(REMOVED)
    result = export(loaded, plan, folder / "slim")
    return loaded, plan, result, Path(result.path)


def test_a_gemma3_sublayer_plan_exports_and_reloads_as_the_masked_original(exported):
    loaded, plan, result, folder = exported
    assert result.format == "gemma3-pruned" and result.max_abs_logit_diff <= 1e-5
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3PrunedForCausalLM"] and config["model_type"] == "gemma3_pruned_text"
    assert (config["no_attention"], config["no_ffn"], config["layer_types"]) == ([0, 1], [2], PATTERN)
    assert {"modeling_gemma3_pruned.py", "configuration_gemma3_pruned.py"} <= set(os.listdir(folder))
    reloaded = load_exported(folder, dtype=torch.float32)
    # a removed sublayer takes its weights and its own norms with it
    names = {name for name, _ in reloaded.named_parameters()}
    assert not any(name.startswith(("model.layers.0.self_attn.", "model.layers.0.input_layernorm.",
                                    "model.layers.1.post_attention_layernorm.", "model.layers.2.mlp.",
                                    "model.layers.2.pre_feedforward_layernorm.")) for name in names)
    assert "model.layers.2.self_attn.q_proj.weight" in names and "model.layers.0.mlp.up_proj.weight" in names
    assert sum(p.numel() for p in reloaded.parameters()) == plan.parameters.remaining == result.parameters
    # 40 tokens > the window of 4: a kept layer that slid where it should not (or the reverse) changes the logits
    assert_reloaded_equals_masked(loaded.model, plan.player_names, reloaded)
    verdicts = {row.runtime: row.status for row in result.runtimes}
    assert verdicts["transformers"] == "supported" and verdicts["vLLM"] == "refused"
    assert "trust_remote_code=True" in (folder / "README.md").read_text()


def test_cached_generation_equals_the_loop_without_cache_on_a_padded_batch(exported):
    from transformers import DynamicCache

    _, _, _, folder = exported
    model = load_exported(folder, dtype=torch.float32)
    cache = DynamicCache(config=model.config)
    assert [type(layer).__name__ for layer in cache.layers][:2] == ["DummyLayer", "DummyLayer"]
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 300, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the masks are built from the cache's sizes, not skipped
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        sequence, seen = ids, mask
        for _ in range(8):
            positions = (seen.cumsum(-1) - 1).clamp(min=0)
            logits = model(sequence, attention_mask=seen, position_ids=positions, use_cache=False).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            sequence, seen = torch.cat([sequence, token], 1), torch.cat([seen, torch.ones_like(token)], 1)
    assert torch.equal(generated, sequence)


def test_cornerstone_code_needs_no_flag_but_edited_code_does(exported, tmp_path):
    import shutil

    _, _, _, folder = exported
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))  # the module's export stays unedited
    assert_own_code_trusted_until_edited(copy, "modeling_gemma3_pruned.py", "gemma3_pruned_text")


@pytest.mark.parametrize("fields, message", [
    ({"no_attention": [0, 1, 2, 3]}, "at least one must stay"),
    ({"no_ffn": [4]}, "outside 0..3"),
    ({"no_attention": ["1"]}, "ints"),
])
def test_invalid_pruned_configs_are_rejected(fields, message):
    from cornerstone.gemma3_pruned import Gemma3PrunedTextConfig

    with pytest.raises(ValueError, match=message):
        Gemma3PrunedTextConfig(num_hidden_layers=4, layer_types=PATTERN, **fields)


def test_a_transformers_whose_cache_keeps_removed_slots_is_refused(monkeypatch):
    """Where DynamicCache ignores kv_sharing_modes (an older transformers), a removed attention would get a slot
    nothing fills and generation would read a length of 0 from it: loading says so instead."""
    from cornerstone.gemma3_pruned import Gemma3PrunedForCausalLM, Gemma3PrunedTextConfig

    config = Gemma3PrunedTextConfig.from_gemma3(gemma3().config, no_attention=[0])
    assert Gemma3PrunedForCausalLM(config) is not None
    monkeypatch.setattr(Gemma3PrunedTextConfig, "kv_sharing_modes", property(lambda self: ["none"] * 4))
    with pytest.raises(RuntimeError, match="upgrade transformers"):
        Gemma3PrunedForCausalLM(config)
