"""Which documents each step uses: recorded by scoring, reused exactly, avoided by evaluation; and the
paired standard errors that come with measuring every coalition on the same documents."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cornerstone import harness
from cornerstone.errors import TaskError
from cornerstone.estimators import paired_stderr

from .tasks import toy_docs, write_task


@pytest.fixture(scope="module")
def twenty(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("docs"), "toy_docs20", toy_docs(20))


def test_evaluation_documents_are_the_complement_of_the_scored_ones(twenty):
    scored = harness.load_tasks(["toy_docs20"], include_paths=[twenty], limit=8, seed=0)[0]
    rest = harness.load_tasks(["toy_docs20"], include_paths=[twenty], exclude={"toy_docs20": scored.doc_indices})[0]
    assert sorted(scored.doc_indices + rest.doc_indices) == list(range(20)) and not set(scored.doc_indices) & set(rest.doc_indices)
    # a seeded draw from the rest, with a seed that on the whole split would overlap
    for seed in range(5):
        drawn = harness.load_tasks(["toy_docs20"], include_paths=[twenty], limit=6, seed=seed,
                                   exclude={"toy_docs20": scored.doc_indices})[0]
        assert len(drawn.doc_indices) == 6 and not set(drawn.doc_indices) & set(scored.doc_indices)
    overlapping = [seed for seed in range(5) if set(random.Random(seed).sample(range(20), 6)) & set(scored.doc_indices)]
    assert overlapping, "the seeds above must include one whose plain draw overlaps, or the test shows nothing"
    assert "disjoint from the 8 scored" in harness.selection_text(rest)


def test_nothing_left_to_evaluate_is_an_error_not_an_overlap(twenty):
    with pytest.raises(TaskError, match="every document of task 'toy_docs20'"):
        harness.load_tasks(["toy_docs20"], include_paths=[twenty], exclude={"toy_docs20": list(range(20))})


def test_a_record_is_reused_exactly_and_checked(twenty):
    scored = harness.load_tasks(["toy_docs20"], include_paths=[twenty], limit=5, seed=7)[0]
    record = scored.record()
    again = harness.load_tasks(["toy_docs20"], include_paths=[twenty], documents={"toy_docs20": record})[0]
    assert again.doc_indices == scored.doc_indices and again.content_hash == scored.content_hash
    for broken in (record.model_copy(update={"total_docs": 21}), record.model_copy(update={"doc_indices": [0, 25]}),
                   record.model_copy(update={"doc_indices": [1, 1]}), record.model_copy(update={"content_sha256": "0" * 64})):
        with pytest.raises(TaskError):
            harness.load_tasks(["toy_docs20"], include_paths=[twenty], documents={"toy_docs20": broken})
    with pytest.raises(TaskError, match="no entry for task"):
        harness.load_tasks(["toy_docs20"], include_paths=[twenty], documents={})


def test_paired_standard_error_by_hand():
    # task A: differences 1, 0, 0, 0 -> mean 1/4, sample variance 1/4, variance of the mean 1/16
    # task B: differences 0, 0 -> 0. Macro mean (1/4 + 0) / 2, its error sqrt(1/16 + 0) / 2 = 1/8.
    assert paired_stderr([[1, 0, 0, 0], [0, 0]]) == pytest.approx(0.125)
    assert paired_stderr([[1.0, 0.0]]) == pytest.approx(0.5)  # variance 1/2, over 2 documents: sqrt(1/4)
    assert paired_stderr([[1.0]]) is None and paired_stderr([]) is None


def test_pairing_removes_the_documents_own_spread():
    """Two coalitions that answer 30 of 40 mixed documents alike: the unpaired error of their difference
    is about 0.1, the paired one about 0.07, and 0 when they agree on every document."""
    rng = np.random.default_rng(0)
    full = rng.integers(0, 2, 40).astype(float)
    removed = full.copy()
    flip = rng.choice(40, 10, replace=False)
    removed[flip] = 1 - removed[flip]
    unpaired = np.sqrt(full.var(ddof=1) / 40 + removed.var(ddof=1) / 40)
    paired = paired_stderr([list(full - removed)])
    assert paired == pytest.approx(np.std(full - removed, ddof=1) / np.sqrt(40))
    assert paired < unpaired
    assert paired_stderr([list(full - full)]) == 0.0


def test_ablation_errors_match_lm_evals_own_per_document_results(tiny_llama_dir, twenty):
    """The report's importance error, recomputed from lm-eval's loop (not the engine) per document."""
    from cornerstone.estimators import Ablation
    from cornerstone.loading import load_model
    from cornerstone.masking import removed
    from cornerstone.players import parse_players
    from cornerstone.scores import score

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    specs = harness.load_tasks(["toy_docs20"], include_paths=[twenty], limit=12, seed=1)
    report = score(loaded, specs, estimator=Ablation(granularity="block"), include_paths=[twenty])
    lm = harness.make_lm(loaded.model, loaded.tokenizer, batch_size=8)
    full = np.array(harness.evaluate(lm, specs)["toy_docs20"].per_doc)
    for name, player in report.players.items():
        with removed(loaded.model, parse_players(loaded.model, [name])):
            alone = np.array(harness.evaluate(lm, specs)["toy_docs20"].per_doc)
        difference = full - alone
        assert player.importance == pytest.approx(difference.mean())
        assert player.stderr == pytest.approx(difference.std(ddof=1) / np.sqrt(len(difference)))
        gap = alone - report.rule.margin * full
        assert player.gap_stderr == pytest.approx(gap.std(ddof=1) / np.sqrt(len(gap)))
    assert report.tasks[0].base_stderr == pytest.approx(full.std(ddof=1) / np.sqrt(len(full)))
