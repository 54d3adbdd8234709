"""Sizing a run: the estimate's formulas, its place in the report, and the refusal of a run that will not fit."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cornerstone import harness, sizing
from cornerstone.cli import app
from cornerstone.errors import ConfigError
from cornerstone.estimators import Ablation, make_estimator
from cornerstone.loading import load_model
from cornerstone.scores import score

from .conftest import tiny_model
from .tasks import toy_docs, write_task


def test_the_estimate_follows_its_formulas():
    model = tiny_model("llama")
    estimate = sizing.estimate_run(model, evaluations=13, seconds_per_evaluation=2.0, batch_size=4, longest_request=10,
                                   cache_bytes=1000, processes=2)
    # by hand: the tiny Llama has 2 x 300 x 32 (embeddings and the untied head) + 3 x 9280 (q and o 32x32, k and v
    # 32x16, gate, up and down 32x64, two norms of 32) + 32 (the final norm) = 47072 float32 parameters
    assert estimate.parameters == 47072 and estimate.weight_bytes == 4 * 47072
    # a batch of 4 requests of 10 tokens, each holding 300 logits and 4 hidden states of 32, in float32
    assert estimate.activation_bytes == 4 * 10 * (300 + 4 * 32) * 4 == 68480
    assert estimate.memory_bytes == 188288 + 1000 + 68480
    assert estimate.seconds == 13.0 and estimate.available_bytes > 0
    assert "13 evaluations x 2.0 s / 2 processes = 13 s" in estimate.describe()
    sizing.check_fits(estimate)
    starved = estimate.model_copy(update={"available_bytes": 10})
    with pytest.raises(ConfigError, match="GiB are free"):
        sizing.check_fits(starved)
    sizing.check_fits(starved, force=True)


def test_score_sizes_the_run_from_the_full_model_before_the_rest(tiny_llama_dir, tmp_path):
    folder = write_task(tmp_path, "toy_size", toy_docs(6))
    specs = harness.load_tasks(["toy_size"], include_paths=[folder])
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    seen = []
    report = score(loaded, specs, estimator=Ablation(), on_estimate=seen.append)
    [estimate] = seen
    assert estimate.evaluations == 3 * 2 + 1 == report.evaluations  # v(N) and each of the 6 sublayers removed
    assert report.diagnostics["estimate"] == estimate.model_dump()
    kernel = make_estimator("shapley", "kernel", granularity="block", budget=20)
    report = score(loaded, specs, estimator=kernel, on_estimate=seen.append)
    # the budget of 20, each of the 3 blocks removed alone (the cornerstone test) and v(N): an upper bound of what
    # the run evaluates, which on 3 players is at most the 2^3 coalitions there are
    assert seen[-1].evaluations == 20 + 3 + 1 and report.evaluations <= 2**3


def test_cli_refuses_a_run_that_will_not_fit_unless_forced(tiny_llama_dir, tmp_path, monkeypatch):
    folder = write_task(tmp_path, "toy_size", toy_docs(4))
    monkeypatch.setattr(sizing, "available_memory", lambda device: 1024)
    base = ["score", str(tiny_llama_dir), "--tasks", "toy_size", "--include-path", str(folder), "--no-store",
            "--out", str(tmp_path / "r.json")]
    refused = CliRunner().invoke(app, base)
    assert refused.exit_code == ConfigError.exit_code and "--force" in refused.stderr and "GiB are free" in refused.stderr
    forced = CliRunner().invoke(app, [*base, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "estimate: 7 evaluations" in forced.output
