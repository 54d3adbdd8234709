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
    parameters = sum(p.numel() for p in model.parameters())
    assert estimate.parameters == parameters and estimate.weight_bytes == 4 * parameters
    assert estimate.activation_bytes == 4 * 10 * (model.config.vocab_size + 4 * model.config.hidden_size) * 4
    assert estimate.memory_bytes == estimate.weight_bytes + 1000 + estimate.activation_bytes
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
    assert estimate.evaluations == len(report.players) + 1 == report.evaluations
    assert report.diagnostics["estimate"] == estimate.model_dump()
    kernel = make_estimator("shapley", "kernel", granularity="block", budget=20)
    report = score(loaded, specs, estimator=kernel, on_estimate=seen.append)
    assert seen[-1].evaluations == kernel.planned_evaluations(3) + 3 + 1 >= report.evaluations


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
