"""The value function goes through lm-eval and agrees with lm-eval's own top-level evaluation."""

import pytest

from cornerstone import harness
from cornerstone.errors import ConfigError, TaskError
from cornerstone.loading import LoadedModel, load_model
from cornerstone.players import parse_players
from cornerstone.masking import without
from cornerstone.value import ValueFunction

from .tasks import toy_docs, write_task


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder, "toy_mc", toy_docs(12))
    write_task(folder, "toy_acc_only", toy_docs(6), metrics=("acc",))
    write_task(folder, "toy_empty", [])
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> LoadedModel:
    return load_model(str(tiny_llama_dir), device="cpu")


def lm_eval_reference(loaded, task, folder, limit):
    """lm-eval's public entry point, with nothing of cornerstone's in between."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    output = simple_evaluate(
        model=HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4),
        tasks=[task], task_manager=TaskManager(include_path=str(folder), include_defaults=False), limit=limit, bootstrap_iters=0,
    )
    return output["results"][task]


def test_metric_chance_and_fixed_documents(toy_tasks):
    [spec] = harness.load_tasks(["toy_mc"], include_paths=[toy_tasks])
    assert spec.metric == "acc_norm" and spec.total_docs == 12 and spec.doc_indices == list(range(12))
    assert spec.chance == pytest.approx((0.25 + 0.5) / 2)
    [acc_only] = harness.load_tasks(["toy_acc_only"], include_paths=[toy_tasks])
    assert acc_only.metric == "acc"
    first = harness.load_tasks(["toy_mc"], include_paths=[toy_tasks], limit=5)[0].doc_indices
    assert first == [0, 1, 2, 3, 4]
    seeded = [harness.load_tasks(["toy_mc"], include_paths=[toy_tasks], limit=5, seed=s)[0].doc_indices for s in (1, 1, 2)]
    assert seeded[0] == seeded[1] != seeded[2] and seeded[0] == sorted(seeded[0]) and len(set(seeded[0])) == 5


def test_bad_tasks_are_clear_errors(toy_tasks):
    with pytest.raises(TaskError, match="unknown task 'toy_mcq'.*did you mean toy_mc"):
        harness.load_tasks(["toy_mcq"], include_paths=[toy_tasks])
    with pytest.raises(TaskError, match="no documents|cannot load"):
        harness.load_tasks(["toy_empty"], include_paths=[toy_tasks])
    with pytest.raises(ConfigError, match="--limit"):
        harness.load_tasks(["toy_mc"], include_paths=[toy_tasks], limit=0)
    with pytest.raises(TaskError, match="not a folder"):
        harness.load_tasks(["toy_mc"], include_paths=[toy_tasks / "nope"])


def test_full_model_value_equals_lm_eval(tiny, toy_tasks):
    specs = harness.load_tasks(["toy_mc", "toy_acc_only"], include_paths=[toy_tasks], limit=10)
    value = ValueFunction(tiny, specs, batch_size=4)
    full = value.evaluate([])
    reference_mc = lm_eval_reference(tiny, "toy_mc", toy_tasks, 10)
    reference_acc = lm_eval_reference(tiny, "toy_acc_only", toy_tasks, 10)
    assert full.per_task["toy_mc"] == pytest.approx(reference_mc["acc_norm,none"], abs=1e-12)
    assert full.per_task["toy_acc_only"] == pytest.approx(reference_acc["acc,none"], abs=1e-12)
    assert full.score == pytest.approx((reference_mc["acc_norm,none"] + reference_acc["acc,none"]) / 2, abs=1e-12)
    assert len(full.per_doc["toy_mc"]) == 10 and len(full.per_doc["toy_acc_only"]) == 6
    # toy_docs alternate 4- and 2-choice questions: chance 3/8 on each task, whatever the draw of an even count
    assert value.chance == pytest.approx(0.375)


def test_masked_value_equals_lm_eval_under_the_same_mask(tiny, toy_tasks):
    specs = harness.load_tasks(["toy_mc"], include_paths=[toy_tasks])
    value = ValueFunction(tiny, specs, batch_size=4)
    players = parse_players(tiny.model, ["L0.mlp", "L2.attn"])
    masked = value.evaluate(players)
    with without(tiny.model, players):
        reference = lm_eval_reference(tiny, "toy_mc", toy_tasks, None)
    assert masked.score == pytest.approx(reference["acc_norm,none"], abs=1e-12)
    # memoised: asking again does not evaluate again
    count = value.evaluations
    assert value.evaluate(list(reversed(players))) is masked and value.evaluations == count


def test_non_finite_log_likelihoods_are_refused_not_scored(toy_tasks):
    from cornerstone.errors import EvaluationError

    [spec] = harness.load_tasks(["toy_mc"], include_paths=[toy_tasks])
    harness.check_finite(spec, 0, [(-1.5, False), (-2.0, True)])
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(EvaluationError, match="doc 3: the model returned a non-finite"):
            harness.check_finite(spec, 3, [(-1.5, False), (bad, False)])
