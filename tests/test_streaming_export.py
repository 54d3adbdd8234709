"""Out-of-core export (cornerstone.streaming): a block plan applied to a safetensors folder tensor by tensor
gives the in-memory export's weights and config, in bounded memory, and refuses what it cannot do cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cornerstone.errors import CornerstoneError, ExportError, ModelLoadError, OutputError, PlanError, TrustError
from cornerstone.export import export
from cornerstone.loading import fingerprint_folder, load_model
from cornerstone.planner import Planner, make_plan
from cornerstone.streaming import edit_config, stream_export

from .conftest import TINY_CONFIGS, changed, snapshot
from .test_planner import report_with


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in _tensors_in(file).items()}


def _tensors_in(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _block_plan(folder: Path, removed: list[int], *, granularity: str = "block", fingerprint: bool = True):
    """A plan removing exactly ``removed`` from the model in ``folder``, its parameter counts read from the files
    (what a report of that model would say), made by the planner (lowest importance first)."""
    tensors = _tensors(folder)
    config = json.loads((folder / "config.json").read_text())
    layers = config.get("text_config", config)["num_hidden_layers"]
    prefix = next(p for p in ("model.layers.", "language_model.model.layers.") if any(n.startswith(p) for n in tensors))

    def size(block: int, part: str = "") -> int:
        return sum(t.numel() for n, t in tensors.items() if n.startswith(f"{prefix}{block}.{part}"))

    if granularity == "block":
        importances = {f"L{i}": -1.0 if i in removed else 1.0 for i in range(layers)}
        parameters = {f"L{i}": size(i) for i in range(layers)}
    else:  # the attention half of each removed block only (a sublayer plan that cuts no whole block)
        importances = {f"L{i}.{k}": -1.0 if i in removed and k == "attn" else 1.0 for i in range(layers) for k in ("attn", "mlp")}
        parameters = {f"L{i}.{k}": size(i, "self_attn") if k == "attn" else size(i) - size(i, "self_attn")
                      for i in range(layers) for k in ("attn", "mlp")}
    report = report_with(importances, parameters, granularity=granularity, total=sum(t.numel() for t in tensors.values()))
    plan = make_plan(report, Planner(drop=len(removed), keep_first=0, keep_last=0, granularity=granularity))
    plan.model["spec"] = str(folder)
    plan.model["fingerprint"] = fingerprint_folder(folder) if fingerprint else "folder-sha256:another"
    return plan


def _saved(model, tokenizer, folder: Path, shard: str = "20KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    return folder


def _model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=300, bos_token_id=1, eos_token_id=2,
                                  **{**TINY_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def _config(folder: Path) -> dict:
    from transformers import AutoConfig

    found = AutoConfig.from_pretrained(folder).to_dict()
    for key in ("transformers_version", "_name_or_path"):
        found.pop(key, None)
    return found


def _same_as_in_memory(source: Path, plan, tmp_path: Path, **options) -> tuple:
    """Stream and export in memory; the weights must be equal tensor for tensor. Returns both configs."""
    before = snapshot(source)
    result = stream_export(source, plan, tmp_path / "streamed", **options)
    assert changed(before, snapshot(source)) == set()
    export(load_model(str(source), device="cpu"), plan, tmp_path / "in-memory")
    streamed, in_memory = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "in-memory")
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[name], in_memory[name]) for name in streamed)
    assert result.verified == "full" and result.max_abs_logit_diff <= 1e-5
    assert result.parameters == plan.parameters.remaining
    return result, _config(tmp_path / "streamed"), _config(tmp_path / "in-memory")


def test_a_sharded_llama_streams_to_the_in_memory_exports_weights_and_config(tokenizer, tmp_path):
    source = _saved(_model("llama", num_hidden_layers=6), tokenizer, tmp_path / "base")
    assert len(list(source.glob("*.safetensors"))) > 2  # the source is read across shards
    plan = _block_plan(source, [1, 4])
    result, streamed, in_memory = _same_as_in_memory(source, plan, tmp_path, max_shard_size="30KB")
    assert streamed == in_memory and streamed["num_hidden_layers"] == 4
    out = tmp_path / "streamed"
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    for shard in shards:  # at most the limit, or one tensor larger than it (the 38.4 kB embeddings)
        held = _tensors_in(shard)
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held.values()) <= 30_000
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert result.tensors_removed == 2 * 9 and result.config_edits == {"num_hidden_layers": [6, 4]}
    manifest = json.loads((out / "cornerstone-export.json").read_text())
    assert manifest["base_model"]["spec"] == str(source) and manifest["players_removed"] == ["L1", "L4"]
    assert manifest["base_model"]["fingerprint"] == plan.model["fingerprint"]
    assert {"cornerstone-plan.yaml", "README.md", "tokenizer.json", "generation_config.json"} <= set(os.listdir(out))
    assert result.dtype == "float32"


def test_bfloat16_stays_bfloat16_and_dtype_converts(tokenizer, tmp_path):
    source = _saved(_model("llama", num_hidden_layers=4).to(torch.bfloat16), tokenizer, tmp_path / "base")
    plan = _block_plan(source, [2])
    kept = stream_export(source, plan, tmp_path / "bf16")
    assert kept.dtype == "bfloat16" and kept.max_abs_logit_diff <= 5e-2
    assert {t.dtype for t in _tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    wide = stream_export(source, plan, tmp_path / "f32", dtype="float32")
    written = _tensors(tmp_path / "f32")
    assert {t.dtype for t in written.values()} == {torch.float32} and wide.max_abs_logit_diff <= 1e-5
    assert all(torch.equal(written[n], t.float()) for n, t in _tensors(tmp_path / "bf16").items())
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("written_out", [True, False], ids=["layer_types-in-config", "layer_types-derived"])
def test_gemma3_layer_types_are_sliced_even_where_transformers_derives_them(written_out, tokenizer, tmp_path):
    pattern = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    source = _saved(_model("gemma3_text", num_hidden_layers=6, layer_types=pattern), tokenizer, tmp_path / "base")
    if not written_out:  # an older config: the pattern comes from the index, every third layer global
        config = json.loads((source / "config.json").read_text())
        del config["layer_types"]
        config.pop("_sliding_window_pattern", None)
        config["sliding_window_pattern"] = 3
        (source / "config.json").write_text(json.dumps(config))
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(source).layer_types == pattern
    plan = _block_plan(source, [1, 2])
    result, streamed, in_memory = _same_as_in_memory(source, plan, tmp_path)
    assert streamed["layer_types"] == [pattern[i] for i in (0, 3, 4, 5)] == in_memory["layer_types"]
    assert streamed == in_memory
    assert result.config_edits["layer_types"][0] == (pattern if written_out else None)


def test_qwen2_max_window_layers_counts_the_kept_layers_below_it(tokenizer, tmp_path):
    source = _saved(_model("qwen2", num_hidden_layers=6, use_sliding_window=True, sliding_window=4, max_window_layers=3),
                    tokenizer, tmp_path / "base")
    plan = _block_plan(source, [1, 4])
    result, streamed, in_memory = _same_as_in_memory(source, plan, tmp_path)
    # layers 0, 2 (full attention, below 3) and 3, 5 (sliding) are kept: full below 2 now
    assert streamed["max_window_layers"] == 2 and result.config_edits["max_window_layers"] == [3, 2]
    assert streamed["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2 == in_memory["layer_types"]
    # the in-memory export leaves max_window_layers at 3 (transformers follows layer_types; vLLM reads the count)
    assert {k: v for k, v in streamed.items() if k != "max_window_layers"} == \
        {k: v for k, v in in_memory.items() if k != "max_window_layers"}


def test_a_moe_layer_step_that_would_shift_is_written_as_mlp_only_layers(tokenizer, tmp_path):
    config = {"num_hidden_layers": 4, "decoder_sparse_step": 2, "num_experts": 4, "mlp_only_layers": []}
    # sparse layers are 1 and 3; dropping layer 0 would make the kept 1, 2, 3 dense, sparse, dense by the step
    edits = edit_config(config, [1, 2, 3])
    assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == [1]
    assert edits["decoder_sparse_step"] == [2, 1]
    untouched = {"num_hidden_layers": 4, "decoder_sparse_step": 2, "num_experts": 4, "mlp_only_layers": []}
    edit_config(untouched, [0, 1])  # 0 dense, 1 sparse: the step still says so
    assert untouched["decoder_sparse_step"] == 2 and untouched["mlp_only_layers"] == []
    deepseek = {"num_hidden_layers": 6, "moe_layer_freq": 2, "n_routed_experts": 8, "first_k_dense_replace": 1}
    with pytest.raises(ExportError, match="moe_layer_freq"):
        edit_config(deepseek, [0, 1, 3, 4, 5])
    assert edit_config({"num_hidden_layers": 6, "first_k_dense_replace": 3}, [0, 2, 4, 5]) == {
        "first_k_dense_replace": [3, 2], "num_hidden_layers": [6, 4]}
    # and on a real model: the rewritten config describes the weights (checked by the full verification)
    source = _saved(_model("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2), tokenizer, tmp_path / "moe")
    result = stream_export(source, _block_plan(source, [0]), tmp_path / "slim")
    assert result.max_abs_logit_diff <= 1e-5 and result.config_edits["mlp_only_layers"] == [[], [1]]


def test_layer_by_layer_verification_agrees(tokenizer, tmp_path):
    source = _saved(_model("llama", num_hidden_layers=4), tokenizer, tmp_path / "base")
    result = stream_export(source, _block_plan(source, [1]), tmp_path / "slim", verify="layers", layer_memory=20_000)
    assert result.verified == "layers" and result.max_abs_logit_diff <= 1e-5


def test_a_failed_check_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    import cornerstone.streaming as streaming

    source = _saved(_model("llama"), tokenizer, tmp_path / "base")
    plan = _block_plan(source, [1])
    monkeypatch.setattr(streaming, "_verify", lambda *args: 1.0)
    with pytest.raises(ExportError, match="differ"):
        stream_export(source, plan, tmp_path / "exports" / "slim")
    assert os.listdir(tmp_path / "exports") == []


# -- memory ---------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import transformers.utils.hub, transformers  # what the export imports, loaded before the measurement
    from transformers import AutoConfig
    from cornerstone.streaming import stream_export
    from cornerstone.planner import Plan

    def status(field):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    plan = Plan.load(sys.argv[2])
    AutoConfig.from_pretrained(sys.argv[1])  # the config's modules imported: a fixed cost, not the model's
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM (the peak) starts again from VmRSS
    result = stream_export(sys.argv[1], plan, sys.argv[3], verify=False, max_shard_size="100MB")
    print(json.dumps({"before": before, "peak": status("VmHWM"), "written": result.bytes_on_disk}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak through Linux's /proc")
def test_streaming_a_model_peaks_far_below_its_size(tmp_path):
    """A 4-block Llama of 277 MB (hidden 1024, float32) in 4 shards, streamed in a child process: its peak
    resident memory grows by less than two of its largest tensors (16.8 MB each), not by the model (measured
    on an AMD EPYC: 20 MB)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    source = tmp_path / "big"
    config = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    config.save_pretrained(source)
    generator = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj.weight": (1024, 1024), "self_attn.k_proj.weight": (1024, 1024),
              "self_attn.v_proj.weight": (1024, 1024), "self_attn.o_proj.weight": (1024, 1024),
              "mlp.gate_proj.weight": (4096, 1024), "mlp.up_proj.weight": (4096, 1024),
              "mlp.down_proj.weight": (1024, 4096), "input_layernorm.weight": (1024,),
              "post_attention_layernorm.weight": (1024,)}
    weight_map, size = {}, 0
    for block in range(4):
        file = f"model-{block + 1:05d}-of-00004.safetensors"
        tensors = {f"model.layers.{block}.{name}": torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        if block == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(1000, 1024, generator=generator)
        if block == 3:
            tensors |= {"model.norm.weight": torch.ones(1024), "lm_head.weight": torch.randn(1000, 1024, generator=generator)}
        save_file(tensors, source / file, metadata={"format": "pt"})
        weight_map |= {name: file for name in tensors}
        size += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                     "weight_map": weight_map}))
    plan = _block_plan(source, [1]).save(tmp_path / "plan.yaml")
    run = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(plan), str(tmp_path / "slim")],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    largest = 4096 * 1024 * 4
    assert size > 270e6 and measured["written"] > 200e6
    assert growth < 2 * largest < size / 8, measured  # two tensors' worth at most, and far below the model
    print(f"model {size / 1e6:.0f} MB, written {measured['written'] / 1e6:.0f} MB, peak RSS growth {growth / 1e6:.1f} MB")


# -- refused inputs: one line and a hint, the source unchanged, nothing written ----------------------------


def _refused(source: Path, call, error: type[CornerstoneError], *words: str) -> CornerstoneError:
    before = snapshot(source.parent)
    with pytest.raises(error) as failure:
        call()
    assert changed(before, snapshot(source.parent)) == set(), "a refused export changed files"
    assert "\n" not in failure.value.message and failure.value.hint
    for word in words:
        assert word in failure.value.message, failure.value.message
    return failure.value


@pytest.fixture
def sharded(tokenizer, tmp_path) -> Path:
    return _saved(_model("llama"), tokenizer, tmp_path / "base")


def test_sublayer_plans_and_plans_for_other_models_are_refused(sharded, tmp_path, tokenizer):
    half = _block_plan(sharded, [1], granularity="sublayer")
    error = _refused(sharded, lambda: stream_export(sharded, half, tmp_path / "out"), PlanError, "L1.attn")
    assert "in-memory export" in error.hint
    six = _saved(_model("llama", num_hidden_layers=6), tokenizer, tmp_path / "six")
    past = _block_plan(six, [5])
    _refused(sharded, lambda: stream_export(sharded, past, tmp_path / "out", allow_other_model=True), PlanError,
             "[5] do not exist")
    other = _block_plan(sharded, [1], fingerprint=False)
    _refused(sharded, lambda: stream_export(sharded, other, tmp_path / "out"), PlanError, "made for")


def test_bad_folders_are_refused(sharded, tmp_path):
    plan = _block_plan(sharded, [1])
    out = tmp_path / "out"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((sharded / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    _refused(pickled, lambda: stream_export(pickled, plan, out, allow_other_model=True), TrustError, "pickled")
    index = sharded / "model.safetensors.index.json"
    original = index.read_text()
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    first.rename(tmp_path / "aside.safetensors")
    _refused(sharded, lambda: stream_export(sharded, plan, out, allow_other_model=True), ModelLoadError, first.name)
    (tmp_path / "aside.safetensors").rename(first)
    weight_map = json.loads(original)
    weight_map["weight_map"]["model.layers.1.mlp.up_proj.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(weight_map))
    _refused(sharded, lambda: stream_export(sharded, plan, out, allow_other_model=True), ModelLoadError, "../elsewhere")
    index.write_text(original)


def test_a_per_layer_looking_tensor_or_config_list_without_a_rule_is_refused(sharded, tmp_path):
    from safetensors.torch import save_file

    plan = _block_plan(sharded, [1])
    out = tmp_path / "out"
    save_file({"model.adapters.blocks.2.weight": torch.zeros(4)}, sharded / "extra.safetensors")
    index = sharded / "model.safetensors.index.json"
    original = index.read_text()
    weight_map = json.loads(original)
    weight_map["weight_map"]["model.adapters.blocks.2.weight"] = "extra.safetensors"
    index.write_text(json.dumps(weight_map))
    _refused(sharded, lambda: stream_export(sharded, plan, out, allow_other_model=True), ExportError,
             "model.adapters.blocks.2.weight")
    index.write_text(original)
    (sharded / "extra.safetensors").unlink()
    config_path = sharded / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "attention_chunk_sizes": [4, 8, 16]}))
    _refused(sharded, lambda: stream_export(sharded, plan, out, allow_other_model=True), ExportError,
             "attention_chunk_sizes")
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 5}))
    _refused(sharded, lambda: stream_export(sharded, plan, out, allow_other_model=True), ModelLoadError,
             "num_hidden_layers=5")


def test_the_output_never_replaces_the_source_or_a_folder_cornerstone_did_not_write(sharded, tmp_path):
    plan = _block_plan(sharded, [1])
    _refused(sharded, lambda: stream_export(sharded, plan, sharded, overwrite=True), OutputError, "is the model")
    _refused(sharded, lambda: stream_export(sharded, plan, sharded / "inside"), OutputError, "inside the model")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _refused(sharded, lambda: stream_export(sharded, plan, mine, overwrite=True), OutputError, "not an output")
    assert (mine / "notes.txt").read_text() == "keep me"
    stream_export(sharded, plan, tmp_path / "slim")
    stream_export(sharded, plan, tmp_path / "slim", overwrite=True, verify=False)  # its own output: replaced
    with pytest.raises(OutputError, match="already exists"):
        stream_export(sharded, plan, tmp_path / "slim")


def test_export_cli_streams_a_bfloat16_folder_and_refuses_what_cannot_be_streamed(tokenizer, tmp_path):
    from typer.testing import CliRunner

    from cornerstone.cli import app

    from .conftest import refused

    source = _saved(_model("llama", num_hidden_layers=4).to(torch.bfloat16), tokenizer, tmp_path / "base")
    plan_file = _block_plan(source, [2]).save(tmp_path / "plan.yaml")
    result = CliRunner().invoke(app, ["export", str(source), str(plan_file), "--out", str(tmp_path / "slim"),
                                      "--stream", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    # streamed (its own fields), in the source's dtype, with the API's result
    assert printed["dtype"] == "bfloat16" and printed["tensors_removed"] == 9 and printed["verified"] == "full"
    assert {t.dtype for t in _tensors(tmp_path / "slim").values()} == {torch.bfloat16}
    refused(tmp_path, ["export", source, plan_file, "--out", tmp_path / "other", "--stream", "--repair"],
            2, "--stream", "--repair")
    refused(tmp_path, ["export", "smollm2-135m", plan_file, "--out", tmp_path / "other", "--stream"],
            12, "--stream", "local safetensors folder")
