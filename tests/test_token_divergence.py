"""The divergence objective on text (issue 20): a rolling task's value is exp(-KL) per token of the model's
next-token distributions from the full model's, computed by the fast engine in the passes that give its
log-likelihoods. Checked against a plain forward over the whole vocabulary, and for what the top-k coarsening
promises (never above the whole-vocabulary KL), prefix reuse, chance, and the loop that cannot compute it."""

from __future__ import annotations

import math

import pytest
import torch

from cornerstone import engine as engine_module
from cornerstone import harness
from cornerstone.engine import Engine
from cornerstone.errors import ConfigError
from cornerstone.loading import load_model
from cornerstone.masking import without
from cornerstone.players import enumerate_players
from cornerstone.value import ValueFunction

from .conftest import VOCAB, tiny_model
from .test_engine import masks_for, short_context_model
from .test_text_objective import PARAGRAPHS, texts  # noqa: F401 (a fixture)


def text_specs(texts):  # noqa: F811
    return harness.load_tasks([f"text:{texts / 'text.txt'}"], objective="divergence")


def whole_vocabulary_kl(model, lm, mask):
    """Per paragraph: the sum over its tokens of KL(q || p) over every token of the vocabulary, q the full
    model's next-token distribution and p the masked model's, from one plain forward of the whole paragraph
    (it fits the context) after the prefix token, as lm-eval's rolling window conditions the first token."""
    sums, counts = [], []
    for paragraph in PARAGRAPHS:
        ids = torch.tensor([[lm.prefix_token_id] + lm.tok_encode(paragraph.strip())])
        with torch.inference_mode():
            log_q = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            with without(model, mask):
                log_p = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        sums.append(float((log_q.exp() * (log_q - log_p)).sum()))
        counts.append(ids.shape[1] - 1)
    return sums, counts


def test_value_is_exp_minus_kl_per_token_over_the_whole_vocabulary_when_the_top_covers_it(texts, tokenizer,  # noqa: F811
                                                                                        monkeypatch):
    model = tiny_model("llama")
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    monkeypatch.setattr(engine_module, "TOKEN_KL_TOP", VOCAB)  # every token its own outcome: the exact KL
    specs = text_specs(texts)
    assert specs[0].metric == harness.TOKEN_DIVERGENCE_METRIC and specs[0].token_divergence
    engine = Engine(model, lm, specs, batch_size=4)
    name = specs[0].name
    for mask in masks_for(model, 2):
        sums, counts = whole_vocabulary_kl(model, lm, mask)
        expected = math.exp(-sum(sums) / sum(counts))
        result = engine.task_results(mask)[name]
        assert result.score == pytest.approx(expected, rel=1e-4, abs=1e-6), [p.name for p in mask]
        if not mask:
            assert result.score == 1.0 and result.per_doc == [1.0] * len(PARAGRAPHS)
        else:
            assert result.score < 1.0
        # the document that differs most from the full model is the one whose value falls most
        worst = max(range(len(sums)), key=lambda d: sums[d] / counts[d] - sum(sums) / sum(counts))
        if mask and sums[worst] > 1e-6:
            assert result.per_doc[worst] == min(result.per_doc)
    # chance: a uniform predictor's value against the same distributions, exp(-mean KL(q || uniform))
    log_q = []
    for paragraph in PARAGRAPHS:
        ids = torch.tensor([[lm.prefix_token_id] + lm.tok_encode(paragraph.strip())])
        with torch.inference_mode():
            log_q.append(torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1))
    log_q = torch.cat(log_q)
    uniform = (log_q.exp() * (log_q + math.log(VOCAB))).sum(dim=-1).mean()
    assert specs[0].chance == pytest.approx(math.exp(-float(uniform)), rel=1e-4)


def test_fewer_top_tokens_never_see_more_divergence_than_the_whole_vocabulary(texts, tokenizer, monkeypatch):  # noqa: F811
    """Coarsening both distributions to the full model's top k tokens and the rest can only lose divergence
    (the chain rule of KL), so the value can only rise; the coarse value still tells masks apart."""
    model = tiny_model("llama")
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    masks = masks_for(model, 2)[1:]
    scores = {}
    for top in (VOCAB, 8):
        monkeypatch.setattr(engine_module, "TOKEN_KL_TOP", top)
        engine = Engine(model, lm, text_specs(texts), batch_size=4)
        assert engine.numerics["token_kl_top"] == top  # part of a value's key in the store
        scores[top] = [next(iter(engine.task_results(mask).values())).score for mask in masks]
    for exact, coarse in zip(scores[VOCAB], scores[8]):
        assert coarse >= exact - 1e-6
    assert scores[8] != scores[VOCAB] and len(set(scores[8])) > 1


def test_prefix_reuse_gives_the_same_divergences(texts, tokenizer):  # noqa: F811
    """Windows of a short context, masks sharing early removals: a masked pass that starts from a kept state
    measures the same divergence as one from the start."""
    model = short_context_model("llama")
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    specs = text_specs(texts)
    sublayers = enumerate_players(model)
    chain = [sublayers[3:k] for k in range(4, len(sublayers) + 1)]
    shared = Engine(model, lm, specs, batch_size=4)
    alone = Engine(model, lm, specs, batch_size=4, cache_bytes=0)
    assert max(len(doc.requests) for doc in shared.docs[specs[0].name]) >= 4
    results = dict(shared.task_results_many(chain))
    for index, mask in enumerate(chain):
        assert results[index][specs[0].name].per_doc == pytest.approx(alone.task_results(mask)[specs[0].name].per_doc,
                                                                      rel=1e-6)
    assert shared.block_passes < alone.block_passes


def test_value_function_serves_it_and_the_lm_eval_loop_refuses_it(texts, tiny_llama_dir):  # noqa: F811
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    [spec] = text_specs(texts)
    assert spec.chance == 0.0  # known once the full model's distributions are
    value = ValueFunction(loaded, [spec], batch_size=4)
    assert 0 < value.chance < 1 and harness.objective_of([spec]) == "divergence"
    block = enumerate_players(loaded.model, "block")[1]
    assert value.evaluate([]).score == 1.0 and value.evaluate([block]).score < 1.0
    # the same text by perplexity is another game: its values are never read for these
    [perplexity] = harness.load_tasks([spec.name], objective="accuracy")
    assert perplexity.metric == harness.ROLLING_METRIC
    assert ValueFunction(loaded, [perplexity], batch_size=4).game() != value.game()
    with pytest.raises(ConfigError, match="fast engine only"):
        ValueFunction(loaded, text_specs(texts), batch_size=4, engine="lm-eval")
    with pytest.raises(ConfigError, match="fast engine only"):
        harness.run_tasks(harness.make_lm(loaded.model, loaded.tokenizer), text_specs(texts))


def test_a_report_scored_on_text_divergence_plans_greedy_on_the_same_objective(texts, tiny_llama_dir):  # noqa: F811
    """score -> plan --policy greedy: the plan re-measures the report's own game (text, objective, documents),
    so its first greedy step's measured score is the report's value of removing that block alone."""
    from cornerstone.estimators import Ablation
    from cornerstone.planner import Planner, make_plan
    from cornerstone.scores import score

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    report = score(loaded, text_specs(texts), estimator=Ablation(granularity="block"), store=False, batch_size=4)
    assert report.settings["objective"] == "divergence" and report.base_score == 1.0 and 0 < report.chance < 1
    plan = make_plan(report, Planner(policy="greedy", drop=1, keep_first=0, keep_last=0, protect_cornerstones=False),
                     loaded=loaded)
    [step] = plan.search
    assert step.score_after == pytest.approx(report.base_score - report.players[step.name].importance, abs=1e-9)
    # the block whose removal moved the distributions least
    assert report.players[step.name].importance == min(p.importance for p in report.players.values())

