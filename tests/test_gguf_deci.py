"""Sublayer plans as GGUF (cornerstone.gguf_export.prune_gguf_sublayers): a llama file becomes llama.cpp's
deci architecture. A tiny, complete Llama GGUF is written here; llama.cpp runs it when xllamacpp is installed."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from cornerstone.errors import CornerstoneError, ExportError, PlanError, PlayerError
from cornerstone.gguf_export import (MARKER_KEY, NULL_FFN_WIDTH, SOURCE_BLOCKS_KEY, SUBLAYERS_KEY,
                                     prune_gguf_sublayers)

from .test_gguf_export import _refused as refused_by
from .test_gguf_export import fields, tensors, write_tiny

BLOCKS, WIDTH, HEADS, KV_HEADS, FFN = 5, 64, 4, 2, 128
ATTENTION = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
FEED_FORWARD = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def write_llama(path: Path) -> Path:
    """A complete llama GGUF of ``BLOCKS`` blocks as llama.cpp's converter writes one (norms F32, projections
    Q8_0, tied output) with seeded random weights, large enough that every sublayer changes the output,
    and the tests' byte-level BPE tokenizer as a gpt2 vocabulary, so llama.cpp and transformers both run it."""
    import json

    from .conftest import tiny_tokenizer

    rng = np.random.default_rng(0)
    tokenizer = tiny_tokenizer()
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = len(bpe["vocab"])
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(sorted(bpe["vocab"], key=bpe["vocab"].get))
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (vocab - 3))
    writer.add_token_merges([" ".join(pair) for pair in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    for key, value in {"block_count": BLOCKS, "context_length": 256, "embedding_length": WIDTH,
                       "feed_forward_length": FFN, "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS,
                       "rope.dimension_count": WIDTH // HEADS, "vocab_size": vocab}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)

    def quantised(name: str, rows: int, columns: int, scale: float = 0.15) -> None:
        data = gguf.quants.quantize(scale * rng.standard_normal((rows, columns), dtype=np.float32),
                                    gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    embedding = rng.standard_normal((vocab, WIDTH), dtype=np.float32)
    # llama.cpp's server reports no log-probabilities for a token that ends in part of a UTF-8 character (a lone
    # byte >= 0x80): with zero embeddings (tied output), such tokens score 0 and are never the top token
    embedding[np.array(["\ufffd" in tokenizer.decode([token]) for token in range(vocab)])] = 0
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for block in range(BLOCKS):
        writer.add_tensor(f"blk.{block}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(WIDTH, dtype=np.float32))
        quantised(f"blk.{block}.attn_q.weight", WIDTH, WIDTH)
        quantised(f"blk.{block}.attn_k.weight", WIDTH // HEADS * KV_HEADS, WIDTH)
        quantised(f"blk.{block}.attn_v.weight", WIDTH // HEADS * KV_HEADS, WIDTH)
        quantised(f"blk.{block}.attn_output.weight", WIDTH, WIDTH)
        writer.add_tensor(f"blk.{block}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(WIDTH, dtype=np.float32))
        quantised(f"blk.{block}.ffn_gate.weight", FFN, WIDTH)
        quantised(f"blk.{block}.ffn_up.weight", FFN, WIDTH)
        quantised(f"blk.{block}.ffn_down.weight", WIDTH, FFN)
    writer.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


PLAN = ["L1.attn", "L0.mlp", "L2.attn", "L2.mlp", "L4.mlp"]  # L2 loses both halves: the block goes


def test_a_sublayer_plan_becomes_a_deci_file(tmp_path):
    source = write_llama(tmp_path / "tiny.gguf")
    result = prune_gguf_sublayers(source, PLAN, tmp_path / "out.gguf")
    before, after = fields(source), fields(tmp_path / "out.gguf")
    assert after["general.architecture"] == "deci" and result.architecture == "deci"
    assert not [key for key in after if key.startswith("llama.")]
    # source blocks 0, 1, 3, 4 become 0..3: attention gone in 1, FFNs gone in 0 and 4 (a null FFN's width)
    assert after["deci.block_count"] == 4
    assert after["deci.attention.head_count"] == [HEADS, 0, HEADS, HEADS]
    assert after["deci.attention.head_count_kv"] == [KV_HEADS, 0, KV_HEADS, KV_HEADS]
    assert after["deci.feed_forward_length"] == [NULL_FFN_WIDTH, FFN, FFN, NULL_FFN_WIDTH]
    assert after["deci.attention.key_length"] == after["deci.attention.value_length"] == WIDTH // HEADS
    renamed = {f"deci.{key[len('llama.'):]}": value for key, value in before.items() if key.startswith("llama.")}
    per_layer = {"deci.block_count", "deci.attention.head_count", "deci.attention.head_count_kv",
                 "deci.feed_forward_length"}
    assert {key: after[key] for key in renamed.keys() - per_layer} == {key: renamed[key] for key in renamed.keys() - per_layer}
    assert after["tokenizer.ggml.tokens"] == before["tokenizer.ggml.tokens"]
    assert after[SUBLAYERS_KEY] == result.sublayers_removed == ["L0.mlp", "L1.attn", "L4.mlp"]
    assert after[MARKER_KEY] == [2] and after[SOURCE_BLOCKS_KEY] == BLOCKS

    old, new = tensors(source), tensors(tmp_path / "out.gguf")
    expected = {name: old[name] for name in ("token_embd.weight", "output_norm.weight")}
    for new_index, old_index in enumerate([0, 1, 3, 4]):
        parts = {0: ATTENTION, 1: FEED_FORWARD, 3: ATTENTION + FEED_FORWARD, 4: ATTENTION}[old_index]
        for part in parts:  # same type, shape and bytes
            expected[f"blk.{new_index}.{part}.weight"] = old[f"blk.{old_index}.{part}.weight"]
    nulls = {name: value for name, value in new.items() if name not in expected}
    assert {name: value for name, value in new.items() if name in expected} == expected
    assert sorted(nulls) == sorted(f"blk.{b}.{part}.weight" for b in (0, 3) for part in FEED_FORWARD)
    for name, (kind, shape, data) in nulls.items():
        values = np.frombuffer(data, dtype=np.float32)
        assert kind == gguf.GGMLQuantizationType.F32
        assert (values == (1 if "ffn_norm" in name else 0)).all()
        assert shape == ((WIDTH,) if "ffn_norm" in name else (NULL_FFN_WIDTH, WIDTH) if "ffn_down" in name
                         else (WIDTH, NULL_FFN_WIDTH))
    assert result.tensors_removed == 5 + 4 + 9 + 4 and result.size_accounted
    assert result.added_tensor_bytes == 2 * 4 * WIDTH * 4


def test_a_plan_of_whole_blocks_stays_a_llama_file(tmp_path):
    source = write_llama(tmp_path / "tiny.gguf")
    result = prune_gguf_sublayers(source, ["L3.attn", "L3.mlp", "L1"], tmp_path / "out.gguf")
    assert fields(tmp_path / "out.gguf")["general.architecture"] == "llama"
    assert result.blocks_removed == [1, 3] and result.sublayers_removed == []


def test_overwrite_replaces_a_deci_file_cornerstone_wrote(tmp_path):
    source = write_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "out.gguf"
    prune_gguf_sublayers(source, ["L1.attn"], out)
    assert MARKER_KEY not in fields(out)  # no block emptied: only the sublayer key marks the file
    prune_gguf_sublayers(source, ["L3.mlp"], out, overwrite=True)
    assert fields(out)[SUBLAYERS_KEY] == ["L3.mlp"]


def _refused(tmp_path: Path, error: type[CornerstoneError], source: Path, plan) -> CornerstoneError:
    return refused_by(tmp_path, error, source, plan, prune=prune_gguf_sublayers)


def test_what_deci_cannot_hold_is_refused_and_touches_nothing(tmp_path):
    from cornerstone.planner import Plan, PlannedRemoval

    source = write_llama(tmp_path / "tiny.gguf")
    qwen = write_tiny(tmp_path / "qwen.gguf", "qwen2")
    error = _refused(tmp_path, ExportError, qwen, ["L1.attn"])
    assert "qwen2" in error.message and "L1.attn" in error.message and "--granularity block" in error.hint
    assert error.exit_code == 12
    moe = write_tiny(tmp_path / "moe.gguf", extra={"llama.expert_count": (8, gguf.GGUFValueType.UINT32, None)})
    assert "mixture-of-experts" in _refused(tmp_path, ExportError, moe, ["L1.mlp"]).message
    assert "do not exist" in _refused(tmp_path, PlanError, source, ["L5.attn"]).message
    assert "'L1.ffn'" in _refused(tmp_path, PlayerError, source, ["L1.ffn"]).message
    # llama.cpp takes the head size from layer 0: the first kept block must keep its attention
    assert "L0.attn" in _refused(tmp_path, ExportError, source, ["L0.attn"]).message
    assert "--keep L1.attn" in _refused(tmp_path, ExportError, source, ["L0", "L1.attn"]).hint
    other = Plan.model_construct(removed=[PlannedRemoval.model_construct(name="L1.attn", layer=1, kind="attn")],
                                 model={"fingerprint": "gguf-sha256:0"})
    assert "not for" in _refused(tmp_path, PlanError, source, other).message


def test_the_deci_file_runs_in_llamacpp_like_the_masked_model(tmp_path, tmp_path_factory, monkeypatch):
    """llama.cpp loads the deci file (FFN gone from the first and the last layer, attention from one, a block emptied)
    and agrees with the float model of the source with the same players masked as well as the source file
    agrees with the unmasked one (GGUFCheck)."""
    pytest.importorskip("xllamacpp")
    monkeypatch.setenv("CORNERSTONE_CACHE", str(tmp_path_factory.mktemp("cache")))  # the dequantised source
    source = write_llama(tmp_path / "tiny.gguf")
    result = prune_gguf_sublayers(source, PLAN, tmp_path / "out.gguf", probe="Paris is in France.")
    check = result.check
    assert check.passed and check.sublayers_removed == ["L0.mlp", "L1.attn", "L4.mlp"], check
    assert check.control_gap > check.bound, check  # the unmasked model is far off, so the check can fail
