"""Text objectives (``text:FILE`` and lm-eval's loglikelihood_rolling tasks): the fast engine's per-document
log-likelihoods are lm-eval's ``loglikelihood_rolling`` ones under any mask, the value is 1 / perplexity per
token, prefix reuse applies, and a bad text file is one error line."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from cornerstone import harness
from cornerstone.engine import Engine
from cornerstone.errors import TaskError
from cornerstone.loading import LoadedModel, load_model
from cornerstone.masking import without
from cornerstone.players import enumerate_players
from cornerstone.value import ValueFunction

from .conftest import VOCAB, refused, tiny_model
from .test_engine import SHORT_CONTEXT, masks_for, short_context_model

# Paragraphs of several lengths, one repeated (a repeated document's windows are scored once), one a heading.
PARAGRAPHS = [
    "Question: What is the capital of France? Answer: Paris. The capital of France is Paris, and 2 + 3 is 5.",
    "What is 2 + 3? Answer: 5",
    "= Paris =",
    "What is 2 + 3? Answer: 5",
    ("The capital of France is Paris. " * 6).strip(),
    "Answer: 5",
]

ROLLING_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A .txt file (blank lines holding spaces and carriage returns between paragraphs, as WikiText's) and a
    folder with a YAML loglikelihood_rolling task on the same paragraphs."""
    folder = tmp_path_factory.mktemp("texts")
    (folder / "text.txt").write_text(" \r\n \r\n".join(PARAGRAPHS) + "\n")
    data = folder / "pages.jsonl"
    data.write_text("".join(json.dumps({"page": page}) + "\n" for page in PARAGRAPHS))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "toy_rolling.yaml").write_text(ROLLING_YAML.format(name="toy_rolling", data=data))
    return folder


def load_both(texts):
    return harness.load_tasks([f"text:{texts / 'text.txt'}", "toy_rolling"], include_paths=[texts / "tasks"],
                              vocab_size=VOCAB)


def lm_eval_rolling(lm, spec, mask, model):
    """lm-eval's own per-document log-likelihoods (HFLM.loglikelihood_rolling), in document order."""
    spec.task.build_all_requests(samples=spec.doc_indices, rank=0, world_size=1)
    instances = sorted(spec.task.instances, key=lambda instance: instance.doc_id)
    with without(model, mask):
        return lm.loglikelihood_rolling(instances, disable_tqdm=True)


def engine_rolling(engine, spec, mask):
    """The engine's per-document log-likelihoods: the sum over each document's windows."""
    answers = engine.per_document(engine.loglikelihoods(mask))[spec.name]
    return [sum(ll for ll, _ in windows) for windows in answers]


def test_text_file_is_an_lm_eval_rolling_task_with_the_usual_document_selection(texts):
    text_spec, yaml_spec = load_both(texts)
    assert text_spec.name == f"text:{texts / 'text.txt'}" and text_spec.output_type == "loglikelihood_rolling"
    assert [text_spec.task.doc_to_target(doc) for doc in text_spec.task.eval_docs] == [p.strip() for p in PARAGRAPHS]
    for spec in (text_spec, yaml_spec):
        assert spec.metric == harness.ROLLING_METRIC and spec.chance == 1 / VOCAB and spec.total_docs == len(PARAGRAPHS)
    # the same paragraphs, asked the same way: the same content
    assert text_spec.content_hash == yaml_spec.content_hash
    [drawn] = harness.load_tasks([text_spec.name], limit=3, seed=1)
    [again] = harness.load_tasks([text_spec.name], documents={text_spec.name: drawn.record()})
    assert again.doc_indices == drawn.doc_indices and len(drawn.doc_indices) == 3
    [rest] = harness.load_tasks([text_spec.name], exclude={text_spec.name: drawn.doc_indices})
    assert sorted(rest.doc_indices + drawn.doc_indices) == list(range(len(PARAGRAPHS)))


@pytest.mark.parametrize("context", ["long", "short"])
def test_engine_equals_lm_eval_loglikelihood_rolling_under_masks(context, texts, tokenizer):
    """Per document, under masks removing sublayers and blocks, on the text:FILE task and the YAML task; with a
    context of 8 tokens every longer document takes several windows."""
    model = tiny_model("llama") if context == "long" else short_context_model("llama")
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    specs = load_both(texts)
    engine = Engine(model, lm, specs, batch_size=4)
    if context == "short":
        assert lm.max_length == SHORT_CONTEXT
        assert max(len(doc.requests) for doc in engine.docs[specs[0].name]) >= 4
    assert [doc.tokens for doc in engine.docs[specs[0].name]] == [len(lm.tok_encode(p.strip())) for p in PARAGRAPHS]
    for mask in masks_for(model, 2):
        reference = harness.run_tasks(lm, specs) if not mask else None
        if mask:
            with without(model, mask):
                reference = harness.run_tasks(lm, specs)
        ours = engine.task_results(mask)
        for spec in specs:
            theirs = lm_eval_rolling(lm, spec, mask, model)
            assert engine_rolling(engine, spec, mask) == pytest.approx(theirs, rel=1e-4), [p.name for p in mask]
            assert ours[spec.name].score == pytest.approx(reference[spec.name].score, rel=1e-4)
            assert ours[spec.name].per_doc == pytest.approx(reference[spec.name].per_doc, rel=1e-4)


def test_value_is_one_over_perplexity_per_token_from_lm_eval_rolling(texts, tiny_llama_dir):
    """v = exp(sum of log-likelihoods / sum of tokens), computed here from HFLM.loglikelihood_rolling alone; the
    per-document values average to it, and both engines give it."""
    loaded: LoadedModel = load_model(str(tiny_llama_dir), device="cpu")
    [spec] = harness.load_tasks([f"text:{texts / 'text.txt'}"])
    assert spec.chance == 0.0  # no model known yet
    fast = ValueFunction(loaded, [spec], batch_size=4)
    reference = ValueFunction(loaded, [spec], batch_size=4, engine="lm-eval")
    assert fast.chance == spec.chance == 1 / loaded.model.get_output_embeddings().weight.shape[0]
    block = enumerate_players(loaded.model, "block")[1]
    lm = harness.make_lm(loaded.model, loaded.tokenizer, batch_size=4)
    for mask in ([], [block]):
        loglikelihoods = lm_eval_rolling(lm, spec, mask, loaded.model)
        tokens = sum(len(loaded.tokenizer(p.strip(), add_special_tokens=False)["input_ids"]) for p in PARAGRAPHS)
        expected = math.exp(sum(loglikelihoods) / tokens)
        for value in (fast, reference):
            evaluation = value.evaluate(mask)
            assert evaluation.score == pytest.approx(expected, rel=1e-4)
            per_doc = evaluation.per_doc[spec.name]
            assert sum(per_doc) / len(per_doc) == pytest.approx(evaluation.score, rel=1e-12)
        assert 0 < expected < 1
    assert harness.perplexity(fast.evaluate([]).score) == pytest.approx(math.exp(-math.log(fast.evaluate([]).score)))


def test_prefix_reuse_applies_to_rolling_windows(texts, tokenizer):
    """Masks that remove the same early players share the forward pass up to where they differ, as for
    multiple-choice tasks: fewer block passes than with no cache, and the same numbers."""
    model = short_context_model("llama")
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    specs = load_both(texts)
    sublayers = enumerate_players(model)
    chain = [sublayers[3:k] for k in range(4, len(sublayers) + 1)]  # all share the blocks before block 1
    shared = Engine(model, lm, specs, batch_size=4)
    alone = Engine(model, lm, specs, batch_size=4, cache_bytes=0)
    results = dict(shared.task_results_many(chain))
    for index, mask in enumerate(chain):
        mine = alone.task_results(mask)
        for spec in specs:
            assert results[index][spec.name].per_doc == pytest.approx(mine[spec.name].per_doc, rel=1e-6)
    assert shared.block_passes < alone.block_passes - len(alone.batches) * len(enumerate_players(model, "block"))
    # a repeated document's windows are one request
    windows = sum(len(doc.requests) for doc in shared.docs[specs[0].name])
    assert len(shared.requests) < 2 * windows


@pytest.fixture
def work(tmp_path, tiny_llama_dir, monkeypatch):
    shutil.copytree(tiny_llama_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    (b"", "has no text"),
    (b"\n \n\r\n\t\n", "has no text"),
    (b"caf\xe9 au lait\n", "is not UTF-8 text (byte 3"),
])
def test_a_bad_text_file_is_one_error_line(work, content, words):
    path = work / "texts.txt"
    if content is not None:
        path.write_bytes(content)
    line = refused(work, ["score", work / "model", "--tasks", f"text:{path}", "--granularity", "block",
                          "--out", work / "out" / "report.json"], TaskError.exit_code, f"task 'text:{path}'", words)
    assert "\r" not in line


def test_a_text_task_naming_no_file_is_refused():
    with pytest.raises(TaskError, match="names no file") as info:
        harness.load_tasks(["text:"])
    assert "text:FILE" in info.value.hint


def test_a_text_file_without_blank_lines_is_one_document_per_line(tmp_path):
    """WikiText's raw split as ../shared/data keeps it: one paragraph or heading per line, no blank line."""
    path = tmp_path / "wiki.raw"
    path.write_bytes(b" = Heading = \r\n First paragraph . \r\n Second one . \r\n")
    [spec] = harness.load_tasks([f"text:{path}"])
    assert [spec.task.doc_to_target(doc) for doc in spec.task.eval_docs] == ["= Heading =", "First paragraph .", "Second one ."]
