"""A multimodal model (Gemma 3's ``Gemma3ForConditionalGeneration``) keeps its decoder's settings in
``config.text_config``: every part of cornerstone that reads a decoder setting reads it there
(:func:`cornerstone.players.text_config`), so the model is described, sized, calibrated and scored
as its text-only twin would be. (The engine's lm-eval equality on it is in test_engine.py.)"""

from __future__ import annotations

import pytest

from cornerstone import harness, sizing
from cornerstone.calibration import record
from cornerstone.loading import LoadedModel
from cornerstone.players import enumerate_players
from cornerstone.value import ValueFunction

from .architectures import table_model
from .tasks import toy_docs, write_task


@pytest.fixture(scope="module")
def gemma3(tokenizer) -> LoadedModel:
    model = table_model("gemma3")
    assert not hasattr(model.config, "hidden_size") and not hasattr(model.config, "num_hidden_layers")
    return LoadedModel(model=model, tokenizer=tokenizer, spec="tiny-gemma3", source="folder", location="memory",
                       fingerprint="tiny-gemma3", dtype="float32", device="cpu", load_seconds=0.0)


def test_a_multimodal_model_is_described_and_sized_by_its_decoder(gemma3):
    described = gemma3.describe()
    assert described["model_type"] == "gemma3" and described["num_hidden_layers"] == 3
    assert described["attn_implementation"] == "sdpa"
    estimate = sizing.estimate_run(gemma3.model, evaluations=1, seconds_per_evaluation=1.0, batch_size=2,
                                   longest_request=10, cache_bytes=0)
    assert estimate.activation_bytes == 2 * 10 * (300 + 4 * 32) * 4  # the text vocabulary and hidden size


def test_a_multimodal_model_is_calibrated_and_scored(gemma3, tmp_path):
    stats = record(gemma3, ["Question: What is 2 + 3? Answer: 5", "Paris"], max_length=16)
    assert {f"L{i}{part}" for i in range(3) for part in ("", ".attn", ".mlp")} <= set(stats.sites)
    specs = harness.load_tasks(["toy_mm"], include_paths=[write_task(tmp_path, "toy_mm", toy_docs(4))])
    value = ValueFunction(gemma3, specs, batch_size=4)
    players = enumerate_players(gemma3.model)
    assert value.evaluate([players[1]]).per_doc == ValueFunction(gemma3, specs, engine="lm-eval").evaluate([players[1]]).per_doc
