"""The divergence objective (issue 20): each document's value is exp(-KL(q || p)) of the full model's choice
distribution q and the pruned model's p. The fast engine and lm-eval's own loop give the same values, the full
model scores exactly 1, the value agrees with the gold-probability objective where the two determine each
other (two choices). A report made on it plans greedily on it: tests/test_probability_objective.py, for both
continuous objectives."""

from __future__ import annotations

import math

import pytest
import torch

from cornerstone import harness
from cornerstone.errors import EvaluationError
from cornerstone.loading import load_model
from cornerstone.masking import without
from cornerstone.value import ValueFunction

from .tasks import toy_docs, write_task
from .test_engine import masks_for
from .test_engine import toy_folder as toy  # noqa: F401 (a fixture: the engine tests' toy tasks)


def _bernoulli_kl(q: float, p: float) -> float:
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


@pytest.fixture
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu")


def test_divergence_per_document_equals_lm_eval_and_is_one_for_the_full_model(toy, tiny):
    model = tiny.model
    names = ["toy_engine", "toy_engine_acc"]
    # a seeded subset: lm-eval's doc_id is a document's position among those chosen, not its index in the task
    fast = harness.load_tasks(names, include_paths=[toy], objective="divergence", limit=5, seed=1)
    slow = harness.load_tasks(names, include_paths=[toy], objective="divergence", limit=5, seed=1)
    assert fast[0].doc_indices != list(range(5))
    assert [s.metric for s in fast] == ["exp_neg_kl_norm", "exp_neg_kl"]
    engine_values = ValueFunction(tiny, fast, batch_size=4)
    loop_values = ValueFunction(tiny, slow, batch_size=4, engine="lm-eval")
    for spec_fast, spec_slow in zip(fast, slow):  # each path took its reference from the full model
        assert spec_fast.chance == pytest.approx(spec_slow.chance, rel=1e-6)
        assert 0 < spec_fast.chance < 1
    full = engine_values.evaluate([])
    assert all(value == 1.0 for values in full.per_doc.values() for value in values)
    moved = 0
    for mask in masks_for(model)[1:]:
        ours, theirs = engine_values.evaluate(mask), loop_values.evaluate(mask)
        for name in names:
            assert ours.per_doc[name] == pytest.approx(theirs.per_doc[name], rel=1e-5, abs=1e-9)
            assert all(0 < value <= 1 for value in ours.per_doc[name])
        moved += ours.score < 1
    assert moved


def test_two_choice_divergence_is_the_bernoulli_kl_of_the_gold_probabilities(toy, tiny):
    """On a two-choice document the choice distribution is fixed by its gold share, so exp(-KL) must equal the
    Bernoulli divergence of the probability objective's values: two code paths, one number."""
    model = tiny.model
    divergence = harness.load_tasks(["toy_engine_acc"], include_paths=[toy], objective="divergence")
    probability = harness.load_tasks(["toy_engine_acc"], include_paths=[toy], objective="probability")
    by_kl = ValueFunction(tiny, divergence, batch_size=4)
    by_gold = ValueFunction(tiny, probability, batch_size=4)
    docs = divergence[0].task.eval_docs
    two = [i for i, index in enumerate(divergence[0].doc_indices) if len(docs[index]["choices"]) == 2]
    assert two
    full = by_gold.evaluate([]).per_doc["toy_engine_acc"]
    checked = 0
    for mask in masks_for(model)[1:]:
        kl = by_kl.evaluate(mask).per_doc["toy_engine_acc"]
        gold = by_gold.evaluate(mask).per_doc["toy_engine_acc"]
        for i in two:
            assert kl[i] == pytest.approx(math.exp(-_bernoulli_kl(full[i], gold[i])), rel=1e-6)
            checked += 1
    assert checked


def test_chance_is_a_uniform_guess_measured_with_torch(toy, tiny):
    [spec] = harness.load_tasks(["toy_engine"], include_paths=[toy], objective="divergence")
    ValueFunction(tiny, [spec], batch_size=4)
    docs = spec.task.eval_docs
    values = []
    for position, index in enumerate(spec.doc_indices):
        choices = docs[index]["choices"]
        scores = torch.tensor(spec.reference[position][:len(choices)], dtype=torch.float64)
        scores = scores / torch.tensor([float(len(c)) for c in choices], dtype=torch.float64)  # acc_norm's scores
        q = torch.softmax(scores, 0)
        uniform = torch.full_like(q, 1 / len(choices))
        values.append(math.exp(-float(torch.nn.functional.kl_div(uniform.log(), q, reduction="sum"))))
    assert spec.chance == pytest.approx(sum(values) / len(values), rel=1e-9)


def test_a_loglikelihood_task_compares_the_targets_probabilities(tmp_path, tiny):
    # a loglikelihood document's target is text: the gold choice's
    docs = [{**doc, "label": doc["choices"][doc["label"]]} for doc in toy_docs(6)]
    folder = write_task(tmp_path / "tasks", "toy_target", docs, metrics=("acc",), output_type="loglikelihood")
    model = tiny.model
    [divergence] = harness.load_tasks(["toy_target"], include_paths=[folder], objective="divergence")
    [probability] = harness.load_tasks(["toy_target"], include_paths=[folder], objective="probability")
    by_kl = ValueFunction(tiny, [divergence], batch_size=4)
    by_target = ValueFunction(tiny, [probability], batch_size=4)
    assert divergence.chance == 0.0  # as the accuracy's: a uniform guess over the vocabulary almost never says it
    full = by_target.evaluate([]).per_doc["toy_target"]
    mask = masks_for(model)[3]
    kl = by_kl.evaluate(mask).per_doc["toy_target"]
    target = by_target.evaluate(mask).per_doc["toy_target"]
    assert kl == pytest.approx([math.exp(-_bernoulli_kl(q, p)) for q, p in zip(full, target)], rel=1e-6)
    assert any(value < 1 for value in kl)


def test_without_a_reference_a_divergence_value_is_refused(toy, tiny):
    model = tiny.model
    [spec] = harness.load_tasks(["toy_engine"], include_paths=[toy], objective="divergence")
    lm = harness.make_lm(model, tiny.tokenizer, batch_size=4)
    with without(model, masks_for(model)[1]), pytest.raises(EvaluationError, match="no full-model reference"):
        harness.run_tasks(lm, [spec])
