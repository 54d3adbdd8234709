"""Export: for every architecture, score -> plan -> export -> reload gives the masked original's logits,
with the parameters the plan predicts; sublayer plans become DeciLM checkpoints; writes are atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cornerstone import harness
from cornerstone.errors import ExportError, OutputError
from cornerstone.estimators import Ablation
from cornerstone.export import drop_blocks, export
from cornerstone.exported import load_exported
from cornerstone.loading import load_model
from cornerstone.masking import without
from cornerstone.planner import Planner, make_plan
from cornerstone.players import parse_players
from cornerstone.scores import score

from .conftest import ARCHITECTURE_NAMES, tiny_model
from .tasks import toy_docs, write_task


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = write_task(tmp_path_factory.mktemp("export-tasks"), "toy_export", toy_docs(6))
    return folder, harness.load_tasks(["toy_export"], include_paths=[folder])


def saved(model, tokenizer, folder: Path):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder), device="cpu")


def assert_reloaded_equals_masked(original, names: list[str], reloaded) -> None:
    """The reloaded export against the original with ``names`` removed, on token ids of this test's own
    (not the exporter's probe); the removal must change the original's logits, or the comparison proves nothing."""
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, original.config.get_text_config().vocab_size, (2, 40), generator=generator)
    with torch.no_grad():
        intact = original(ids).logits
        with without(original, parse_players(original, names)):
            masked = original(ids).logits
        exported = reloaded(ids).logits
    assert (exported - masked).abs().max() <= 1e-5
    assert (intact - masked).abs().max() > 1e-3


def scored_plan(loaded, toy, granularity: str, keep: list[str], drop: int):
    folder, specs = toy
    report = score(loaded, specs, estimator=Ablation(granularity=granularity), include_paths=[folder])
    return make_plan(report, Planner(granularity=granularity, drop=drop, keep_first=0, keep_last=0, keep=keep))


@pytest.mark.parametrize("model_type", ARCHITECTURE_NAMES)
def test_block_export_reloads_stock_and_equals_the_masked_original(model_type, toy, tokenizer, tmp_path):
    loaded = saved(tiny_model(model_type), tokenizer, tmp_path / "base")
    plan = scored_plan(loaded, toy, "block", keep=["L2"], drop=2)  # L0 and L1 go; L2 becomes L0
    assert plan.player_names == ["L0", "L1"]
    result = export(loaded, plan, tmp_path / "slim")
    assert result.format == "stock" and result.max_abs_logit_diff <= 1e-5
    config = json.loads((tmp_path / "slim" / "config.json").read_text())
    assert "auto_map" not in config
    reloaded = load_exported(tmp_path / "slim", dtype=torch.float32)
    assert type(reloaded) is type(loaded.model)
    assert reloaded.config.num_hidden_layers == 1
    assert_reloaded_equals_masked(loaded.model, plan.player_names, reloaded)
    assert sum(p.numel() for p in reloaded.parameters()) == plan.parameters.remaining == result.parameters
    files = set(os.listdir(tmp_path / "slim"))
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "cornerstone-plan.yaml",
            "cornerstone-export.json", "generation_config.json"} <= files


def test_gemma3_layer_types_survive_export(tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    pattern = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    config = AutoConfig.for_model("gemma3_text", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                  layer_types=pattern, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    slim = drop_blocks(model, [1, 2])
    assert slim.config.layer_types == ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    loaded = saved(model, tokenizer, tmp_path / "gemma")
    from cornerstone.planner import Plan

    plan = scored_plan(loaded, _toy_for(tmp_path), "block", keep=["L0", "L3", "L4", "L5"], drop=2)
    assert plan.player_names == ["L1", "L2"]
    export(loaded, plan, tmp_path / "slim")
    reloaded = load_exported(tmp_path / "slim", dtype=torch.float32)
    expected = [pattern[i] for i in (0, 3, 4, 5)]
    assert reloaded.config.layer_types == expected
    assert [layer.self_attn.is_sliding for layer in reloaded.model.layers] == [t == "sliding_attention" for t in expected]
    # 40 tokens > the window of 4: a wrongly sliced pattern changes the logits
    assert_reloaded_equals_masked(loaded.model, ["L1", "L2"], reloaded)
    assert Plan.load(tmp_path / "slim" / "cornerstone-plan.yaml").player_names == ["L1", "L2"]


def _toy_for(tmp_path):
    folder = write_task(tmp_path / "tasks", "toy_gemma", toy_docs(6))
    return folder, harness.load_tasks(["toy_gemma"], include_paths=[folder])


def test_sublayer_plan_of_a_llama_exports_as_decilm_and_reloads_with_remote_code(toy, tokenizer, tmp_path):
    loaded = saved(tiny_model("llama"), tokenizer, tmp_path / "base")
    plan = scored_plan(loaded, toy, "sublayer", keep=["L0.mlp", "L1.attn", "L2.attn", "L2.mlp"], drop=2)
    assert plan.player_names == ["L0.attn", "L1.mlp"]
    result = export(loaded, plan, tmp_path / "slim")
    assert result.format == "decilm" and result.max_abs_logit_diff <= 1e-5
    # what vLLM / llama.cpp would get wrong about this plan is said, not hidden
    assert len(result.notes) == 4 and "ffn.intermediate_size" in result.notes[0]
    assert "Layer 0 keeps its FFN but not its attention" in result.notes[1] and "vLLM" in result.notes[1]
    assert "Layer 1 keeps attention without an FFN" in result.notes[2] and "llama.cpp" in result.notes[2]
    assert "Cannot find Llama BPE tokenizer" in result.notes[3]  # the tests' byte-level BPE tokenizer, as SmolLM2's
    verdicts = {(row.runtime, row.status) for row in result.runtimes}
    assert ("transformers", "supported") in verdicts and any(s == "refused" for _, s in verdicts)
    config = json.loads((tmp_path / "slim" / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert [(b["attention"]["no_op"], b["ffn"]["no_op"]) for b in config["block_configs"]] == [
        (True, False), (False, True), (False, False)]
    assert {"modeling_decilm.py", "configuration_decilm.py"} <= set(os.listdir(tmp_path / "slim"))
    reloaded = load_exported(tmp_path / "slim", dtype=torch.float32)
    assert_reloaded_equals_masked(loaded.model, plan.player_names, reloaded)
    assert sum(p.numel() for p in reloaded.parameters()) == plan.parameters.remaining
    assert "trust_remote_code=True" in (tmp_path / "slim" / "README.md").read_text()


def test_sublayer_plans_outside_the_llama_family_are_refused_unless_they_cut_whole_blocks(toy, tokenizer, tmp_path):
    loaded = saved(tiny_model("qwen2"), tokenizer, tmp_path / "base")
    partial = scored_plan(loaded, toy, "sublayer", keep=["L0.mlp", "L1.attn", "L1.mlp", "L2.attn", "L2.mlp"], drop=1)
    with pytest.raises(ExportError, match="Llama-family") as failure:
        export(loaded, partial, tmp_path / "partial")
    assert "--granularity block" in failure.value.hint
    assert not (tmp_path / "partial").exists()
    whole = scored_plan(loaded, toy, "sublayer", keep=["L0.attn", "L0.mlp", "L2.attn", "L2.mlp"], drop=2)
    assert whole.player_names == ["L1.attn", "L1.mlp"]
    assert export(loaded, whole, tmp_path / "whole").format == "stock"


def test_writes_are_atomic_and_never_clobber(toy, tokenizer, tmp_path, monkeypatch):
    loaded = saved(tiny_model("llama"), tokenizer, tmp_path / "base")
    plan = scored_plan(loaded, toy, "block", keep=["L0", "L2"], drop=1)
    out = tmp_path / "exports" / "slim"
    import cornerstone.export as export_module

    monkeypatch.setattr(export_module, "max_logit_difference", lambda *args: 1.0)
    with pytest.raises(ExportError, match="differ"):
        export(loaded, plan, out)
    assert os.listdir(tmp_path / "exports") == []  # neither the folder nor a staging leftover
    monkeypatch.undo()
    export(loaded, plan, out)
    with pytest.raises(OutputError, match="already exists"):
        export(loaded, plan, out)
    (out / "stale.txt").write_text("old")
    export(loaded, plan, out, overwrite=True)
    assert not (out / "stale.txt").exists() and os.listdir(tmp_path / "exports") == ["slim"]


def test_an_export_works_with_the_unchanged_lm_eval_command_line(toy, tokenizer, tmp_path):
    loaded = saved(tiny_model("llama"), tokenizer, tmp_path / "base")
    plan = scored_plan(loaded, toy, "block", keep=["L0", "L2"], drop=1)
    export(loaded, plan, tmp_path / "slim")
    folder, _ = toy
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'slim'}",
               "--tasks", "toy_export", "--include_path", str(folder), "--batch_size", "4", "--device", "cpu"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "toy_export" in run.stdout and "acc_norm" in run.stdout


def test_large_exports_are_sharded_and_reload_whole(toy, tokenizer, tmp_path):
    loaded = saved(tiny_model("llama"), tokenizer, tmp_path / "base")
    plan = scored_plan(loaded, toy, "block", keep=["L0", "L2"], drop=1)
    result = export(loaded, plan, tmp_path / "slim", max_shard_size="40KB")
    shards = sorted(name for name in result.files if name.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in result.files
    index = json.loads((tmp_path / "slim" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    reloaded = load_exported(tmp_path / "slim", dtype=torch.float32)
    assert_reloaded_equals_masked(loaded.model, ["L1"], reloaded)


@pytest.mark.parametrize("model_type", ARCHITECTURE_NAMES)
def test_drop_blocks_gives_a_model_that_runs_as_it_is(model_type):
    """The slim model works before any save and reload: buffers the checkpoint does not hold (rotary
    frequencies) come from the original, and its logits are the masked original's."""
    model = tiny_model(model_type)
    slim = drop_blocks(model, [1])
    assert not any(buffer.is_meta for buffer in slim.buffers()) and not any(p.is_meta for p in slim.parameters())
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), without(model, parse_players(model, ["L1"])):
        expected = model(ids).logits
    with torch.no_grad():
        assert (slim(ids).logits - expected).abs().max() <= 1e-5
