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
    from cornerstone.masking import without
    from cornerstone.players import parse_players
    from cornerstone.scores import score

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    specs = harness.load_tasks(["toy_docs20"], include_paths=[twenty], limit=12, seed=1)
    report = score(loaded, specs, estimator=Ablation(granularity="block"), include_paths=[twenty])
    lm = harness.make_lm(loaded.model, loaded.tokenizer, batch_size=8)
    full = np.array(harness.run_tasks(lm, specs)["toy_docs20"].per_doc)
    for name, player in report.players.items():
        with without(loaded.model, parse_players(loaded.model, [name])):
            alone = np.array(harness.run_tasks(lm, specs)["toy_docs20"].per_doc)
        difference = full - alone
        assert player.importance == pytest.approx(difference.mean())
        assert player.stderr == pytest.approx(difference.std(ddof=1) / np.sqrt(len(difference)))
        gap = alone - report.rule.margin * full
        assert player.gap_stderr == pytest.approx(gap.std(ddof=1) / np.sqrt(len(gap)))
    assert report.tasks[0].base_stderr == pytest.approx(full.std(ddof=1) / np.sqrt(len(full)))


def test_undecided_players_by_margin_and_by_drop_boundary():
    from cornerstone.scores import CornerstoneRule, PlayerScore, ScoreReport, TaskScore
    from cornerstone.sequential import undecided

    def player(layer, importance, stderr, resolved):
        return PlayerScore(layer=layer, kind="block", importance=importance, share=0.0, stderr=stderr, resolved=resolved)

    report = ScoreReport(
        created="2026-01-01T00:00:00+00:00", method="ablation", granularity="block", model={}, settings={},
        tasks=[TaskScore(name="t", metric="acc", num_docs=10, total_docs=10, chance=0.25, base_score=0.7)],
        base_score=0.7, chance=0.25, rule=CornerstoneRule(), evaluations=5, timing={}, versions={}, cornerstones=[],
        players={"L0": player(0, 0.40, 0.05, False), "L1": player(1, 0.00, 0.01, True), "L2": player(2, 0.05, 0.01, True),
                 "L3": player(3, 0.07, 0.02, True), "L4": player(4, 0.30, 0.01, True)})
    assert undecided(report) == ["L0"]  # only its cornerstone decision is open
    # dropping 2: the boundary lies midway between 0.05 and 0.07; L2 (0.01 s.e.) is 0.01 from it, L3 (0.02 s.e.) too
    assert undecided(report, boundary=2) == ["L0", "L2", "L3"]
    assert undecided(report, boundary=1) == ["L0"]  # 0.025 lies 2.5 s.e. from both 0.00 and 0.05


def test_sequential_scoring_doubles_nested_documents_until_resolved(tiny_llama_dir, twenty):
    from cornerstone.estimators import Ablation
    from cornerstone.loading import load_model
    from cornerstone.scores import score
    from cornerstone.sequential import undecided

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    # boundary 1 of 3 blocks on a random tiny model: decided only with many documents, if ever
    report = score(loaded, ["toy_docs20"], limit=4, seed=0, until_resolved=16, boundary=1, include_paths=[twenty],
                   estimator=Ablation(granularity="block"), store=False)
    rounds = report.diagnostics["rounds"]
    sizes = [r["documents"]["toy_docs20"] for r in rounds]
    assert sizes[0] == 4 and all(b == min(16, 2 * a) for a, b in zip(sizes, sizes[1:]))
    assert all(r["undecided"] for r in rounds[:-1])  # it went on only while something was undecided
    assert rounds[-1]["undecided"] == undecided(report, 1) and (not rounds[-1]["undecided"] or sizes[-1] == 16)
    assert report.tasks[0].num_docs == sizes[-1] == len(report.tasks[0].doc_indices)
    first = harness.load_tasks(["toy_docs20"], include_paths=[twenty], limit=4, seed=0)[0].doc_indices
    assert set(first) <= set(report.tasks[0].doc_indices)  # the first round's documents are kept


def test_the_share_above_chance_is_given_only_where_the_base_is_measurably_above_chance():
    from cornerstone.evaluate import above_chance_kept

    assert above_chance_kept(0.70, 0.50, 0.25) == pytest.approx(0.25 / 0.45)
    assert above_chance_kept(0.70, 0.50, 0.25, base_stderr=0.05) == pytest.approx(0.25 / 0.45)
    # ARC-Challenge on SmolLM2: 0.270 against chance 0.251 with s.e. 0.0315 would give (0.205-0.251)/0.019 = -240%
    assert above_chance_kept(0.270, 0.205, 0.251, base_stderr=0.0315) is None
    assert above_chance_kept(0.25, 0.30, 0.25) is None


def test_the_share_kept_carries_a_paired_standard_error_that_a_bootstrap_confirms():
    """The delta-method error of (P - C) / (B - C) against a paired bootstrap over documents (base and pruned
    resampled together), on correlated 0/1 answers like a pruned model's: the two estimators are computed
    differently, so agreement within 4% checks the formula (the bootstrap's own error is about 1%; pairing by
    plain differences, p - b instead of p - kept b, is about 9% off here), and pairing must make it smaller
    than the error that treats the two models' samples as independent."""
    from cornerstone.evaluate import ModelSummary, Retention

    rng = np.random.default_rng(7)
    chance = {"a": 0.25, "b": 0.5}
    base_docs, pruned_docs = {}, {}
    for task, size, p_base in (("a", 800, 0.7), ("b", 600, 0.8)):
        base = rng.random(size) < p_base
        # the pruned model mostly keeps the base's answers, loses some and guesses on a few
        pruned = np.where(rng.random(size) < 0.4, base, rng.random(size) < chance[task])
        base_docs[task], pruned_docs[task] = base.astype(float).tolist(), pruned.astype(float).tolist()

    def summary(per_doc):
        scores = {t: float(np.mean(v)) for t, v in per_doc.items()}
        return ModelSummary(spec="m", pretrained="m", parameters=1, bytes_on_disk=1, tokens_per_second=1.0,
                            scores=scores, stderr={t: float(np.std(v, ddof=1) / np.sqrt(len(v))) for t, v in per_doc.items()},
                            mean_score=float(np.mean(list(scores.values()))), per_doc=per_doc)

    retention = Retention.of(summary(base_docs), summary(pruned_docs), chance)
    replicates = []
    for _ in range(4000):
        picks = {t: rng.integers(0, len(v), len(v)) for t, v in base_docs.items()}
        b = np.mean([np.mean(np.asarray(base_docs[t])[i]) - chance[t] for t, i in picks.items()])
        p = np.mean([np.mean(np.asarray(pruned_docs[t])[i]) - chance[t] for t, i in picks.items()])
        replicates.append(p / b)
    bootstrap = float(np.std(replicates, ddof=1))
    assert retention.mean_above_chance_kept_stderr == pytest.approx(bootstrap, rel=0.04)
    kept = retention.mean_above_chance_kept
    unpaired = np.sqrt(sum((np.var(pruned_docs[t], ddof=1) + kept ** 2 * np.var(base_docs[t], ddof=1)) / len(base_docs[t])
                           for t in chance)) / len(chance) / np.mean([np.mean(base_docs[t]) - chance[t] for t in chance])
    assert retention.mean_above_chance_kept_stderr < unpaired
    assert set(retention.above_chance_kept_stderr) == {"a", "b"} and all(
        0 < e < 0.2 for e in retention.above_chance_kept_stderr.values())
    # no per-document values (a corpus-level metric, or a comparison saved before they were kept): no error
    assert Retention.of(summary(base_docs).model_copy(update={"per_doc": {}}), summary(pruned_docs),
                        chance).mean_above_chance_kept_stderr is None
