"""The probability objective (issue 20): each document's value is the gold answer's probability under the
choice distribution whose argmax lm-eval's accuracy takes. The fast engine and lm-eval's own loop give the
same values, accuracy and probability agree where they must, and a plan made from such a report (or a divergence report) re-measures
the same objective."""

from __future__ import annotations

import json

import pytest

from cornerstone import harness
from cornerstone.engine import Engine
from cornerstone.estimators import Ablation
from cornerstone.loading import load_model
from cornerstone.masking import without
from cornerstone.planner import Planner, make_plan
from cornerstone.scores import score

from .conftest import refused, save_six_block_llama, tiny_model
from .test_engine import masks_for
from .test_engine import toy_folder as toy  # noqa: F401 (a fixture: the engine tests' toy tasks)


def test_probability_per_document_equals_lm_eval_and_agrees_with_accuracy(toy, tokenizer):
    model = tiny_model("llama")
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    names = ["toy_engine", "toy_engine_acc"]
    probability = harness.load_tasks(names, include_paths=[toy], objective="probability")
    accuracy = harness.load_tasks(names, include_paths=[toy])
    assert [s.metric for s in probability] == ["prob_norm", "prob"] and [s.metric for s in accuracy] == ["acc_norm", "acc"]
    assert [s.chance for s in probability] == [s.chance for s in accuracy]  # uniform guessing: 1 / choices either way
    engine = Engine(model, lm, probability, batch_size=4)
    choices = {s.name: [len(s.task.doc_to_choice(s.task.eval_docs[i])) for i in s.doc_indices] for s in probability}
    moved = 0
    for mask in masks_for(model):
        with without(model, mask):
            reference, right = harness.run_tasks(lm, probability), harness.run_tasks(lm, accuracy)
        ours = engine.task_results(mask)
        for spec in probability:
            values = ours[spec.name].per_doc
            assert values == pytest.approx(reference[spec.name].per_doc, rel=1e-6, abs=1e-9)
            assert all(0 < value < 1 for value in values)
            for value, correct, n in zip(values, right[spec.name].per_doc, choices[spec.name]):
                # the gold choice is the argmax exactly when it holds the largest share: at least 1/n, and above
                # one half it cannot be beaten
                assert value >= 1 / n - 1e-12 if correct else value <= 0.5 + 1e-12
        moved += ours["toy_engine"].per_doc != engine.task_results([])["toy_engine"].per_doc
    assert moved  # removing players changes the values


@pytest.mark.parametrize("objective, metric", [("probability", "prob_norm"), ("divergence", "exp_neg_kl_norm")])
def test_a_continuous_report_plans_greedily_on_its_objective(toy, tmp_path, objective, metric):
    loaded = load_model(str(save_six_block_llama(tmp_path / "six", seed=3)), device="cpu")
    specs = harness.load_tasks(["toy_engine"], include_paths=[toy], objective=objective)
    report = score(loaded, specs, estimator=Ablation(granularity="block"), include_paths=[toy], store=None)
    assert report.settings["objective"] == objective and report.tasks[0].metric == metric
    if objective == "divergence":
        assert report.base_score == 1.0  # the full model is its own reference
    written = tmp_path / "report.json"
    written.write_text(report.to_json())
    plan = make_plan(written, Planner(policy="greedy", drop=2, search_until=2, keep_first=0, keep_last=0,
                                      protect_cornerstones=False), loaded=loaded)
    # greedy measured its first step on the report's own objective (the documents reloaded with it; divergence's
    # reference taken again from the same full model): removing that block gives the value the report holds for
    # it, the best of all single removals (on accuracy it would be a multiple of 1/12)
    first = plan.search[0]
    assert first.score_after == pytest.approx(report.players[first.name].score_removed, abs=1e-12)
    assert first.score_after == pytest.approx(max(p.score_removed for p in report.players.values()), abs=1e-12)
    assert json.loads(written.read_text())["settings"]["objective"] == objective


def test_an_unknown_objective_is_one_line_naming_the_option(tmp_path):
    line = refused(tmp_path, ["score", "smollm2-135m", "--objective", "margin"], 2, "--objective")
    assert "accuracy" in line and "probability" in line
