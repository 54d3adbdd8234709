"""Every call into lm-eval lives here.

lm-eval's internal API moves between releases (cornerstone pins the 0.4 line), so the rest of the
package sees only this module: tasks (:class:`TaskSpec`, :func:`load_tasks`, :class:`DocumentRecord`,
:func:`list_tasks`), the model wrapper (:func:`make_lm`, :func:`context_length`), the requests and
scoring the engine runs (:func:`encode_requests`, :func:`score_doc`, :func:`aggregate`,
:func:`check_finite`) and lm-eval's own loop (:func:`run_tasks`, :func:`load_lm` + :func:`evaluate_pretrained`).
Task definitions, prompts, few-shot handling and metrics stay lm-eval's own.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError, EvaluationError, TaskError
from .quiet import no_tqdm
from .textfiles import FORMATS_HINT, read_text_file

PREFERRED_METRICS = ("acc_norm", "acc")
# What a task's per-document value is: lm-eval's accuracy metric, the probability the model gives the gold
# answer (:func:`gold_probability`), or how close the model's choice distribution stays to the full model's
# (:func:`divergence_value`); the last two are continuous values from the same log-likelihoods.
OBJECTIVES = ("accuracy", "probability", "divergence")
PROBABILITY_METRICS = {"acc": "prob", "acc_norm": "prob_norm"}
DIVERGENCE_METRICS = {"acc": "exp_neg_kl", "acc_norm": "exp_neg_kl_norm"}
# The value of a rolling log-likelihood task (a text:FILE task, or lm-eval's loglikelihood_rolling tasks such as
# wikitext): 1 / perplexity per token. See :func:`rolling_result`.
ROLLING_METRIC = "inv_perplexity"
# The same tasks under the divergence objective: exp(-KL) per token of the model's next-token distribution from
# the full model's. See :func:`token_divergence_result`.
TOKEN_DIVERGENCE_METRIC = "exp_neg_token_kl"
ROLLING = "loglikelihood_rolling"
# ``--tasks text:FILE``: FILE's texts are the documents of a rolling log-likelihood task
TEXT_TASK_PREFIX = "text:"
SCORED_OUTPUT_TYPES = ("multiple_choice", "loglikelihood", ROLLING)
BUNDLED_TASK_GROUP = "cornerstone_bundled"
REAL_TASK_GROUP = "cornerstone_real"


def recipes_dir() -> Path:
    """The ``recipes/`` folder: packaged inside the wheel, or beside the package in a source checkout."""
    packaged = Path(__file__).parent / "_recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


def bundled_tasks_dir() -> Path:
    return recipes_dir() / "tasks"


def real_tasks_dir() -> Path:
    """Real benchmarks (``cornerstone_real``) that read ../shared/data where it lies."""
    return bundled_tasks_dir() / "shared"


@dataclass
class TaskSpec:
    """One lm-eval task with the fixed document set and metric used for every coalition of a run.

    ``chance`` is the expected metric of uniform guessing: the mean over the chosen documents of
    1 / (number of choices); for a rolling log-likelihood task, 1 / (the model's vocabulary size), a
    uniform next-token predictor's :data:`ROLLING_METRIC` (0 until a model is known: :func:`set_vocabulary`).
    """

    name: str
    task: Any
    metric: str
    doc_indices: list[int]
    total_docs: int
    chance: float
    output_type: str
    # How doc_indices were chosen, in words and numbers (recorded in reports; see :func:`load_tasks`).
    selection: dict[str, Any] = field(default_factory=dict)
    # The divergence objective's reference: the full model's log-likelihoods of each document's requests, by
    # lm-eval's doc_id, the document's position in doc_indices (:func:`set_reference`); None until the model is known.
    reference: dict[int, list[float]] | None = field(default=None, repr=False)

    @property
    def probability(self) -> bool:
        """Whether the value is the gold answer's probability (:func:`gold_probability`), not lm-eval's metric."""
        return self.metric in PROBABILITY_METRICS.values()

    @property
    def divergence(self) -> bool:
        """Whether the value is exp(-KL) from the full model's choice distribution (:func:`divergence_value`)."""
        return self.metric in DIVERGENCE_METRICS.values()

    @property
    def token_divergence(self) -> bool:
        """Whether the value is exp(-KL) per token from the full model's next-token distributions
        (:func:`token_divergence_result`): a rolling task under the divergence objective."""
        return self.metric == TOKEN_DIVERGENCE_METRIC

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 of what the model is asked: each chosen document's prompt, choices and target.

        A task's name and version do not change when its data or template do (a local JSON file
        edited, a label column fixed); values stored for the old content must not be reused.
        """
        docs = self.task.eval_docs
        digest = hashlib.sha256()
        for index in self.doc_indices:
            doc = docs[index]
            choices = self.task.doc_to_choice(doc) if self.output_type == "multiple_choice" else None
            digest.update(json.dumps([self.task.doc_to_text(doc), choices, self.task.doc_to_target(doc)],
                                     default=str).encode())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "num_docs": len(self.doc_indices),
            "total_docs": self.total_docs,
            "chance": self.chance,
            "output_type": self.output_type,
            "version": (self.task.config.metadata or {}).get("version"),
        }

    def record(self) -> "DocumentRecord":
        """The exact documents of this spec, for a report to keep and later steps to reuse or avoid."""
        return DocumentRecord(name=self.name, doc_indices=list(self.doc_indices), total_docs=self.total_docs,
                              content_sha256=self.content_hash, selection=dict(self.selection))


class DocumentRecord(BaseModel):
    """Which documents of one task a run used: their indices in the task's evaluation split, how many the
    split has, and a sha256 of what the model was asked on them (:attr:`TaskSpec.content_hash`).

    Scoring writes one per task into its report; greedy planning re-measures on exactly these
    documents, and ``eval``/``heal`` default to the other documents of the split, so a plan is never
    judged on the documents it was chosen on.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    doc_indices: list[int]
    total_docs: int
    content_sha256: str | None = Field(None, description="None only for a new selection (nothing to check yet).")
    selection: dict[str, Any] = {}


@dataclass
class TaskResult:
    """The metric of one task under one mask, and each document's value of it (document order)."""

    score: float
    per_doc: list[float] = field(default_factory=list)


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs and draws tqdm bars on every call; cornerstone shows its own progress instead."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def task_manager(include_paths: Sequence[str | Path] = (), *, include_defaults: bool = True) -> Any:
    """lm-eval's registry with cornerstone's bundled tasks and the user's include paths.

    Indexing lm-eval's own ~200 task folders takes seconds, so :func:`load_tasks` first tries a
    registry of the bundled and user folders alone and builds the full one only when needed.
    """
    for given in include_paths:
        if "\0" in str(given):  # the OS takes no path with one; resolve() would raise a bare ValueError
            raise TaskError(f"include path '{str(given).replace(chr(0), '?')}' contains a NUL byte")
    paths = [str(bundled_tasks_dir())] + [str(Path(p).expanduser().resolve()) for p in include_paths]
    for path in paths[1:]:
        if not os.path.isdir(path):  # False, not an exception, for a name too long for the system too
            raise TaskError(f"include path '{path}' is not a folder")
    return _cached_manager(tuple(paths), include_defaults)


def task_manager_for(names: Sequence[str], include_paths: Sequence[str | Path] = ()) -> Any:
    """The registry that knows ``names``: the bundled and user folders alone when they hold them all, else the full one."""
    manager = task_manager(include_paths, include_defaults=False)
    return manager if set(names) <= set(manager.all_tasks) else task_manager(include_paths)


@functools.lru_cache(maxsize=8)
def _cached_manager(paths: tuple[str, ...], include_defaults: bool) -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def _name_of(key: Any) -> str:
    """The name of a key of lm-eval's task dict: a task's name, or a group's (its key is a group object)."""
    return key if isinstance(key, str) else getattr(key, "group_name", str(key))


def _leaf_tasks(task_dict: dict) -> Iterator[tuple[str, Any]]:
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        else:
            yield _name_of(key), value


def _choose_metric(name: str, task: Any, objective: str = "accuracy") -> str:
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{objective}'", hint=f"Use one of: {', '.join(OBJECTIVES)}.")
    if task.config.output_type == ROLLING:
        # computed here from the model's outputs, whatever the task's own metrics; a text has no choices, so
        # accuracy and probability both value it by its perplexity
        return TOKEN_DIVERGENCE_METRIC if objective == "divergence" else ROLLING_METRIC
    available = set(task.aggregation())
    for metric in PREFERRED_METRICS:
        if metric in available:
            return {"probability": PROBABILITY_METRICS, "divergence": DIVERGENCE_METRICS}.get(objective, {}).get(metric, metric)
    raise TaskError(
        f"task '{name}' has no acc or acc_norm metric (it has: {', '.join(sorted(available)) or 'none'})",
        hint="cornerstone scores multiple-choice and loglikelihood tasks by accuracy.",
    )


def _chance(task: Any, docs: Sequence[Any], output_type: str, vocab_size: int | None = None,
            metric: str | None = None) -> float:
    if metric == TOKEN_DIVERGENCE_METRIC:
        return 0.0  # a uniform predictor's value against the full model's distributions, known once they are
    if output_type == ROLLING:
        return 1.0 / vocab_size if vocab_size else 0.0
    if output_type != "multiple_choice" or not docs:
        return 0.0
    return sum(1.0 / max(1, len(task.doc_to_choice(doc))) for doc in docs) / len(docs)


def request_count(spec: TaskSpec) -> int:
    """The loglikelihood requests of ``spec``'s documents: one per choice of a multiple-choice document, one per
    loglikelihood document, at least one per rolling document (one per window of the model's context)."""
    if spec.output_type != "multiple_choice":
        return len(spec.doc_indices)
    docs = spec.task.eval_docs
    return sum(len(spec.task.doc_to_choice(docs[index])) for index in spec.doc_indices)


def load_tasks(
    names: Sequence[str],
    *,
    include_paths: Sequence[str | Path] = (),
    limit: int | None = None,
    seed: int | None = None,
    documents: Mapping[str, DocumentRecord] | None = None,
    exclude: Mapping[str, Sequence[int]] | None = None,
    vocab_size: int | None = None,
    objective: str = "accuracy",
) -> list[TaskSpec]:
    """Resolve task names (or tags/groups) to :class:`TaskSpec` objects with a fixed document set.

    ``objective``: each multiple-choice or loglikelihood task's value is lm-eval's accuracy (``acc_norm``,
    else ``acc``), or the gold answer's probability (``prob_norm`` / ``prob``, :func:`gold_probability`).

    A name ``text:FILE`` is a rolling log-likelihood task whose documents are FILE's texts
    (:func:`text_task`); ``vocab_size`` (the model's) sets rolling tasks' chance level.

    Which documents, per leaf task:

    - ``documents[task]`` given: exactly those (a report's record), after checking that the task
      still has that many documents and that their content hashes to the recorded sha256;
    - else the pool is every document, less ``exclude[task]`` (documents another step used), and
      ``limit`` keeps N of the pool: the first N (lm-eval's ``--limit``) or, with ``seed``, a seeded
      random N, in document order. An empty pool is an error, never a silent overlap.
    """
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of documents, got {limit}")
    if not names:
        raise TaskError("no tasks given")
    registered = [name for name in names if not name.startswith(TEXT_TASK_PREFIX)]
    loaded: dict[Any, Any] = {}
    if registered:
        manager = task_manager_for(registered, include_paths)
        known = set(manager.all_tasks)
        for name in registered:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                raise TaskError(
                    f"unknown task '{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                )
        from lm_eval.tasks import get_task_dict

        try:
            with _quiet(), _no_dataset_progress():
                loaded = get_task_dict(registered, manager)
        except Exception as exc:  # lm-eval raises bare exceptions when a dataset cannot be read
            _explain_first_document(exc)
            raise TaskError(f"cannot load tasks {', '.join(registered)}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    # in the order given: lm-eval's tasks (a group stays one entry) and text tasks interleaved as named
    by_name = {_name_of(key): key for key in loaded}
    task_dict = {by_name.get(name, name): text_task(name) if name.startswith(TEXT_TASK_PREFIX) else loaded[by_name[name]]
                 for name in names if name.startswith(TEXT_TASK_PREFIX) or name in by_name}
    task_dict.update({key: task for key, task in loaded.items() if key not in task_dict})
    specs: list[TaskSpec] = []
    for name, task in _leaf_tasks(task_dict):
        output_type = task.config.output_type
        if output_type not in SCORED_OUTPUT_TYPES:
            raise TaskError(
                f"task '{name}' is a {output_type} task",
                hint="cornerstone scores multiple-choice, loglikelihood and loglikelihood_rolling tasks.",
            )
        docs = list(task.eval_docs)
        if not docs:
            raise TaskError(f"task '{name}' has no documents in its evaluation split")
        if documents is not None:
            if name not in documents:
                raise TaskError(f"the document record has no entry for task '{name}'",
                                hint="The task group changed since the report was written; re-score.")
            indices, selection = _recorded(name, documents[name], len(docs))
        else:
            indices, selection = _draw(name, len(docs), limit, seed, (exclude or {}).get(name, ()))
        for index in indices:
            check_document(name, task, docs[index], index, output_type)
        metric = _choose_metric(name, task, objective)
        spec = TaskSpec(name=name, task=task, metric=metric, doc_indices=indices, total_docs=len(docs),
                        chance=_chance(task, [docs[i] for i in indices], output_type, vocab_size, metric),
                        output_type=output_type, selection=selection)
        expected = documents[name].content_sha256 if documents is not None else None
        if expected is not None and spec.content_hash != expected:
            raise TaskError(f"the documents of task '{name}' changed since they were recorded (content sha256 differs)",
                            hint="The task's data or prompt was edited; re-score so plan and evaluation use what was measured.")
        specs.append(spec)
    return specs


def text_task(name: str) -> Any:
    """The lm-eval task ``text:FILE`` names: a ``ConfigurableTask`` of output type ``loglikelihood_rolling`` whose
    documents (its test split) are FILE's non-blank texts (:func:`cornerstone.textfiles.read_text_file`: a .txt
    file's paragraphs, a .jsonl file's ``text`` fields, a .json list), each scored whole as lm-eval scores
    wikitext's pages. FILE is read relative to the working directory; the task keeps the name as given.

    Being lm-eval's own task type, lm-eval's loop (:func:`run_tasks`) evaluates it as it evaluates any other, and
    document selection (``limit``, ``seed``, ``exclude``, recorded documents and their content hash) is unchanged.
    """
    import datasets
    from lm_eval.api.task import ConfigurableTask

    path = name[len(TEXT_TASK_PREFIX):]
    hint = f"'{TEXT_TASK_PREFIX}FILE' reads FILE's texts as documents. {FORMATS_HINT}"
    if not path:
        raise TaskError(f"task '{name}' names no file", hint=hint)
    try:
        texts = read_text_file(path, hint=hint)
    except ConfigError as exc:  # a task that cannot be read is a task error, whatever read it
        raise TaskError(f"task '{name}': {exc.message}", hint=exc.hint) from None
    documents = datasets.Dataset.from_dict({"text": texts})
    config = {
        "task": name,
        "output_type": ROLLING,
        "test_split": "test",
        "custom_dataset": lambda **_: {"test": documents},
        "doc_to_text": "",
        "doc_to_target": _text_of,
        # lm-eval's own metrics of a rolling task (what ``lm_eval`` itself would report on it)
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0},
    }
    with _quiet():
        return ConfigurableTask(config=config)


def _text_of(doc: dict) -> str:
    return doc["text"]


def objective_of(specs: Sequence[TaskSpec]) -> str:
    """The objective ``specs`` were loaded with (:data:`OBJECTIVES`; a rolling task is valued by its perplexity
    under accuracy and probability alike, and by its token divergence under divergence)."""
    if any(spec.divergence or spec.token_divergence for spec in specs):
        return "divergence"
    return "probability" if any(spec.probability for spec in specs) else "accuracy"


def set_reference(spec: TaskSpec, loglikelihoods: Mapping[int, Sequence[float]]) -> None:
    """Make the full model's ``loglikelihoods`` (one per request, by lm-eval's doc_id: the document's position in
    ``spec.doc_indices``) ``spec``'s divergence reference, and its chance the value a uniform guess gets: the mean
    over documents of exp(-KL(q || uniform)), ``q`` the full model's choice distribution (0 for a loglikelihood
    task, as for its accuracy)."""
    positions = range(len(spec.doc_indices))
    if set(loglikelihoods) != set(positions):
        raise EvaluationError(f"the divergence reference of task '{spec.name}' does not cover its "
                              f"{len(spec.doc_indices)} documents")
    spec.reference = {position: [float(ll) for ll in loglikelihoods[position]] for position in positions}
    if spec.output_type != "multiple_choice":
        spec.chance = 0.0
        return
    docs = spec.task.eval_docs
    values = []
    for position, index in enumerate(spec.doc_indices):
        scores = _choice_scores(spec, docs[index], spec.reference[position])
        values.append(_exp_neg_kl(scores, np.zeros_like(scores)))
    spec.chance = float(np.mean(values))


def set_vocabulary(specs: Sequence[TaskSpec], vocab_size: int) -> None:
    """Set the chance level of ``specs``' rolling tasks to a uniform predictor's over ``vocab_size`` tokens
    (a model's output size); other tasks' chance does not depend on the model (a token divergence task's is set
    from the full model's distributions, :meth:`cornerstone.engine.Engine.set_references`)."""
    for spec in specs:
        if spec.output_type == ROLLING and not spec.token_divergence:
            spec.chance = 1.0 / vocab_size


def check_document(name: str, task: Any, doc: Any, index: int, output_type: str) -> None:
    """Refuse a document lm-eval would score wrongly or crash on: the first problem is a
    :class:`TaskError` naming the task, the document's index and the field.

    lm-eval reads the gold answer of a multiple-choice document as an index into its choices or as
    one of the choices' texts, and scores anything else as a wrong answer (-1, the string "0"), warns
    (7 of 2 choices) or crashes (1.5, a missing label): each would pull the task's score below chance
    without a word. Its templates and fields raise their own errors ("list index out of range").
    """

    def read(field: str) -> Any:
        try:
            return getattr(task, field)(doc)
        except Exception as exc:  # jinja, ast and the task's own Python functions raise their own types
            raise TaskError(f"task '{name}' document {index}: {_field(task, field)} cannot be read "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'})",
                            hint=_DATA_HINT) from None

    text, target = read("doc_to_text"), read("doc_to_target")
    if output_type != "multiple_choice":
        for entry, value in (("doc_to_text", text), ("doc_to_target", target)):
            if not isinstance(value, str):
                raise TaskError(f"task '{name}' document {index}: {_field(task, entry)} gave {_short(value)}, not text",
                                hint=_DATA_HINT)
        if output_type == ROLLING and not target:
            # no token to predict: it would add nothing to a score that is a mean over tokens
            raise TaskError(f"task '{name}' document {index}: {_field(task, 'doc_to_target')} gave an empty text",
                            hint=_DATA_HINT)
        return
    choices = read("doc_to_choice")
    if not isinstance(choices, list) or not choices or not all(isinstance(choice, str) for choice in choices):
        raise TaskError(f"task '{name}' document {index}: {_field(task, 'doc_to_choice')} gave {_short(choices)}, "
                        "not a non-empty list of texts", hint=_DATA_HINT)
    # winogrande-style tasks put the choices in the context: the prompt is then the gold index
    field, gold = ("doc_to_text", text) if isinstance(text, int) and not isinstance(text, bool) else ("doc_to_target", target)
    for label in gold if isinstance(gold, list) and gold else [gold]:
        integer = isinstance(label, numbers.Integral) and not isinstance(label, bool)
        if not ((integer and 0 <= label < len(choices)) or (isinstance(label, str) and label in choices)):
            raise TaskError(f"task '{name}' document {index}: gold label {_short(label)} ({_field(task, field)}) is not "
                            f"a choice: expected an index 0..{len(choices) - 1} or one of its {len(choices)} choices' texts",
                            hint=_DATA_HINT)


_DATA_HINT = ("Fix that document in the task's data (or its YAML's doc_to_text/doc_to_choice/doc_to_target); "
              "a gold label is an integer index into the choices.")


def _field(task: Any, field: str) -> str:
    """``doc_to_target 'label'``: the task's setting for ``field``, as its YAML spells it."""
    setting = getattr(getattr(task, "config", None), field, None)
    return f"{field} {setting!r}" if isinstance(setting, str) else field


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _explain_first_document(exc: BaseException) -> None:
    """lm-eval reads a task's first document while it builds the task, and a bad one fails there with a bare
    error ("list index out of range" for a label beyond the choices). When that is what happened, raise
    the :class:`TaskError` :func:`check_document` gives for that document instead."""
    frame_locals = []
    trace = exc.__traceback__
    while trace is not None:
        frame_locals.append(trace.tb_frame.f_locals)
        trace = trace.tb_next
    for found in reversed(frame_locals):
        task, doc = found.get("self"), found.get("test_doc")
        if doc is not None and hasattr(getattr(task, "config", None), "task"):
            check_document(str(task.config.task), task, doc, 0, str(task.config.output_type))
            return


def _recorded(name: str, record: DocumentRecord, total: int) -> tuple[list[int], dict[str, Any]]:
    indices = list(record.doc_indices)
    if record.total_docs != total or not indices or min(indices) < 0 or max(indices) >= total \
            or len(set(indices)) != len(indices):
        raise TaskError(f"the recorded documents of task '{name}' do not fit its {total} documents "
                        f"(recorded: {len(indices)} of {record.total_docs})",
                        hint="The task's data changed since the report was written; re-score.")
    return sorted(indices), {**record.selection, "reused": True}


def seeded_draw(pool: Sequence[int], k: int, seed: int) -> list[int]:
    """``k`` items of ``pool`` drawn with ``seed``, in increasing order: how documents and calibration texts are
    subsampled, so one seed draws the same items wherever it is used."""
    return sorted(random.Random(seed).sample(pool, k))


def _draw(name: str, total: int, limit: int | None, seed: int | None,
          excluded: Sequence[int]) -> tuple[list[int], dict[str, Any]]:
    """``limit`` documents of the pool ``range(total) - excluded``: the first, or a seeded draw."""
    taken = set(excluded)
    pool = [index for index in range(total) if index not in taken]
    if not pool:
        raise TaskError(f"every document of task '{name}' ({total}) was used for scoring; none is left to evaluate on",
                        hint="Score on fewer documents (--limit), evaluate on another task, or pass --allow-overlap.")
    indices = pool
    if limit is not None and limit < len(pool):
        indices = seeded_draw(pool, limit, seed) if seed is not None else pool[:limit]
    selection: dict[str, Any] = {"limit": limit, "seed": seed}
    if taken:
        selection["excluded"] = len(taken)
    return indices, selection


def selection_text(spec: TaskSpec) -> str:
    """How ``spec``'s documents were chosen, in a few words (for terminal output)."""
    chosen = spec.selection
    if chosen.get("reused"):
        return f"{len(spec.doc_indices)} recorded documents"
    pool = spec.total_docs - chosen.get("excluded", 0)
    what = (f"{len(spec.doc_indices)} of {pool}" + (f" (seed {chosen['seed']})" if chosen.get("seed") is not None else ", the first")
            if len(spec.doc_indices) < pool else f"all {pool}")
    if chosen.get("excluded"):
        what += f", disjoint from the {chosen['excluded']} scored"
    return what


def document_texts(spec: TaskSpec) -> list[str]:
    """Each chosen document of ``spec`` as the text a model reads when it answers right: the prompt,
    the task's target delimiter and the gold answer (lm-eval's own templates; used as calibration text)."""
    docs = spec.task.eval_docs
    delimiter = getattr(spec.task.config, "target_delimiter", " ")
    texts = []
    for index in spec.doc_indices:
        doc = docs[index]
        choices = spec.task.doc_to_choice(doc) if spec.output_type == "multiple_choice" else None
        context, target = spec.task.doc_to_text(doc), spec.task.doc_to_target(doc)
        if choices is not None:
            # lm-eval lets either side be an index into the choices (winogrande-style tasks index the context)
            context = choices[context] if isinstance(context, int) else context
            target = choices[target[0] if isinstance(target, list) else target] if not isinstance(target, str) else target
        texts.append(f"{context}{delimiter}{target}")
    return texts


def list_tasks(include_paths: Sequence[str | Path] = (), bundled_only: bool = True, *, real: bool = False) -> list[str]:
    """Task names the registry knows; by default only the bundled offline ones, with ``real`` only the
    ``cornerstone_real`` tasks that read ../shared/data."""
    manager = task_manager(include_paths, include_defaults=not bundled_only)
    if not bundled_only:
        return sorted(manager.all_tasks)
    folder, shared = str(bundled_tasks_dir()), str(real_tasks_dir())

    def where(entry: Any) -> str:
        return str(entry.get("yaml_path", "") if isinstance(entry, dict) else getattr(entry, "yaml_path", ""))

    return sorted(name for name, entry in manager.task_index.items()
                  if where(entry).startswith(folder) and where(entry).startswith(shared) == real)


def make_lm(model: Any, tokenizer: Any, batch_size: int = 16) -> Any:
    """lm-eval's ``HFLM`` around an in-memory model, so masks applied to ``model`` reach the evaluation."""
    from lm_eval.models.huggingface import HFLM

    with _quiet():
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))


def context_length(lm: Any) -> int:
    """The longest input ``lm`` (a :func:`make_lm` object) feeds the model: where HFLM cuts requests from the left."""
    return int(lm.max_length)


def _lm_eval_samples(lm: Any, tasks: Sequence[TaskSpec]) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """lm-eval's own evaluation loop on the fixed documents of ``tasks``: each task's logged samples, in
    document order, their responses checked finite; and lm-eval's results (its aggregated metrics)."""
    from lm_eval import evaluator

    try:
        with _quiet(), no_tqdm():
            output = evaluator.evaluate(
                lm=lm,
                task_dict={spec.name: spec.task for spec in tasks},
                samples={spec.name: spec.doc_indices for spec in tasks},
                log_samples=True,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
    except AssertionError as exc:  # lm-eval asserts on requests it cannot score (a continuation longer than the context)
        raise EvaluationError(f"lm-eval refused a request: {str(exc).splitlines()[0] if str(exc) else 'an assertion failed'}",
                              hint="A continuation longer than the model's context cannot be scored; leave the "
                                   "document out (another --limit or --seed) or use a model with a longer context.") from exc
    samples = {}
    for spec in tasks:
        samples[spec.name] = sorted(output["samples"][spec.name], key=lambda sample: sample["doc_id"])
        for sample in samples[spec.name]:
            check_finite(spec, sample["doc_id"], sample.get("resps"))
    return samples, output["results"]


def lm_eval_loglikelihoods(lm: Any, tasks: Sequence[TaskSpec]) -> dict[str, dict[int, list[float]]]:
    """Each document's log-likelihoods (one per request, lm-eval's order) from lm-eval's own loop, by task and
    position in the task's ``doc_indices`` (what :func:`set_reference` takes; lm-eval logs the dataset index)."""
    samples, _ = _lm_eval_samples(lm, tasks)
    return {spec.name: {position: [float(ll) for ll, _ in sample["filtered_resps"]]
                        for position, sample in enumerate(samples[spec.name])} for spec in tasks}


def check_lm_eval_loop(tasks: Sequence[TaskSpec]) -> None:
    """Refuse what lm-eval's own loop cannot measure: it returns log-likelihoods, not the next-token
    distributions the divergence objective on text compares (:func:`token_divergence_result`)."""
    token_tasks = [spec.name for spec in tasks if spec.token_divergence]
    if token_tasks:
        raise ConfigError(f"the divergence objective on text ({', '.join(token_tasks)}) is measured by the fast engine only",
                          hint="Use --engine fast, or score the text by perplexity (--objective accuracy).")


def run_tasks(lm: Any, tasks: Sequence[TaskSpec]) -> dict[str, TaskResult]:
    """Run lm-eval's own evaluation loop on the fixed documents of ``tasks``.

    Raises :class:`EvaluationError` when the model's log-likelihoods are NaN or infinite, since a
    comparison of NaNs would silently count as a wrong answer.
    """
    check_lm_eval_loop(tasks)
    logged, metrics = _lm_eval_samples(lm, tasks)
    results: dict[str, TaskResult] = {}
    for spec in tasks:
        samples = logged[spec.name]
        if spec.output_type == ROLLING:
            # lm-eval's metrics of a rolling task count words and bytes; the tokens it predicted are the target's
            results[spec.name] = rolling_result([float(sample["filtered_resps"][0]) for sample in samples],
                                                [len(lm.tok_encode(sample["target"])) for sample in samples])
            continue
        if spec.probability or spec.divergence:  # not one of lm-eval's metrics: from its log-likelihoods
            # the samples come in doc_indices' order; a document's position is its doc_id in the engine's requests
            per_doc = [score_doc(spec, sample["doc"], sample["filtered_resps"], position)
                       for position, sample in enumerate(samples)]
            results[spec.name] = TaskResult(score=aggregate(spec, per_doc), per_doc=per_doc)
            continue
        per_doc = [float(sample[spec.metric]) for sample in samples]
        results[spec.name] = TaskResult(score=float(metrics[spec.name][f"{spec.metric},none"]), per_doc=per_doc)
    return results


def rolling_result(loglikelihoods: Sequence[float], tokens: Sequence[int]) -> TaskResult:
    """The value of a rolling log-likelihood task from each document's log-likelihood ``l_d`` (of all its ``t_d``
    tokens, summed over lm-eval's rolling windows) : ``score = exp(m)``, ``m = sum_d l_d / sum_d t_d``.

    ``m`` is the mean log-probability per token, so the score is 1 / perplexity per token, the geometric-mean
    probability the model gives each token: in (0, 1], higher is better, 1 / V for a uniform predictor over a
    vocabulary of V (the task's chance, :func:`set_vocabulary`). What the report's "above-chance kept"
    ``(s' - 1/V) / (s - 1/V)`` then keeps is, up to 1/V (about 2e-5 for a 49k vocabulary), ``s' / s =
    ppl / ppl'``, the ratio of the two perplexities: 80% kept is a perplexity 1.25 times the full model's. It is
    not the share of the log-probability gained over the uniform predictor, ``(m' + log V) / (m + log V)``: that
    is linear in log-likelihood but turns negative for a model worse than uniform (a heavily pruned one), and
    would be neither bounded nor exact after clipping.

    Per-document values (for the paired standard errors, :func:`cornerstone.estimators.paired_stderr`) are the
    score's linearisation around this document set (the delta method for a ratio of sums): with n documents
    and T = sum_d t_d tokens, ``v_d = s * (1 + (n / T) * (l_d - m * t_d))``. Their mean is exactly ``s`` (the
    bracket's terms sum to zero), their standard error is the delta-method standard error of ``s`` with
    documents drawn at random, and a document's paired difference between two models is its share of the change
    in the score; a single ``v_d`` is not a probability and may fall outside [0, 1].
    """
    total = sum(tokens)
    if total <= 0:
        raise EvaluationError("a rolling log-likelihood task predicted no token", hint="Give documents with text.")
    m = sum(loglikelihoods) / total
    score = math.exp(m)
    n = len(tokens)
    per_doc = [score * (1.0 + n / total * (ll - m * t)) for ll, t in zip(loglikelihoods, tokens, strict=True)]
    return TaskResult(score=score, per_doc=per_doc)


def token_divergence_result(divergences: Sequence[float], tokens: Sequence[int]) -> TaskResult:
    """The value of a rolling task under the divergence objective, from each document's divergence ``k_d``: the
    sum over its ``t_d`` tokens of ``KL(q_t || p_t)``, ``q_t`` the full model's next-token distribution at the
    token's position and ``p_t`` the model's (:class:`cornerstone.engine.Engine` computes it over the full model's
    top tokens and the rest of the vocabulary as one outcome, :data:`cornerstone.engine.TOKEN_KL_TOP`).

    ``score = exp(-sum_d k_d / sum_d t_d)``: the geometric mean over tokens of ``exp(-KL)``, 1 for the full model
    and lower for any change of its next-token distributions. It is :func:`rolling_result` of the log-likelihoods
    ``-k_d`` (same token weighting, same per-document linearisation): the log-likelihood of the text is
    ``-KL(onehot_t || p_t)`` summed over tokens, so perplexity compares the model with the text's next tokens
    and this compares it with the full model's whole distributions, what distillation fits to (Hinton et al.
    2015; Puzzle, Minitron), on any text, no labels needed (issue 20)."""
    return rolling_result([-divergence for divergence in divergences], tokens)


def perplexity(score: float) -> float:
    """The perplexity per token a rolling task's score (:func:`rolling_result`) stands for: 1 / score."""
    return 1.0 / score


def load_lm(pretrained: str, *, batch_size: int = 16, device: str = "cpu", dtype: str = "float32",
            trust_remote_code: bool = False) -> Any:
    """lm-eval's ``HFLM`` loaded from a saved model (folder or hub id), exactly as ``lm_eval --model hf
    --model_args pretrained=PATH,dtype=DTYPE`` builds it; its ``.model`` is the loaded torch model."""
    from lm_eval.models.huggingface import HFLM

    try:
        with _quiet(), _no_dataset_progress():
            return HFLM(pretrained=pretrained, dtype=dtype, trust_remote_code=trust_remote_code, batch_size=batch_size,
                        device=device)
    except (OSError, ValueError, RuntimeError) as exc:
        raise EvaluationError(f"lm-eval could not load '{pretrained}': {str(exc).splitlines()[0]}") from exc


def evaluate_pretrained(lm: Any, tasks: Sequence[TaskSpec], *, include_paths: Sequence[str | Path] = ()
                        ) -> dict[str, dict[str, float | None]]:
    """lm-eval's standard path, ``simple_evaluate``, on a saved model loaded by :func:`load_lm`, on the
    documents of ``tasks``: what ``lm_eval --model hf --model_args pretrained=PATH`` runs.

    Returns ``{task: {"score": ..., "stderr": ..., "per_doc": [...]}}`` in each task's :class:`TaskSpec` metric;
    ``per_doc`` holds each document's value of that metric in document-index order (what a paired standard error
    of two models on the same documents needs), and is None where the score is not their mean (a perplexity).
    """
    import lm_eval

    names = [spec.name for spec in tasks]
    manager = task_manager_for(names, include_paths)
    try:
        with _quiet(), no_tqdm(), _no_dataset_progress():
            output = lm_eval.simple_evaluate(
                model=lm, tasks=names, samples={spec.name: spec.doc_indices for spec in tasks}, task_manager=manager,
                bootstrap_iters=1000, log_samples=True, verbosity="ERROR",
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise EvaluationError(f"lm-eval could not evaluate '{lm.model.name_or_path}': {str(exc).splitlines()[0]}") from exc
    scores: dict[str, dict[str, float | None]] = {}
    for spec in tasks:
        row = output["results"][spec.name]
        stderr = row.get(f"{spec.metric}_stderr,none")
        score = float(row[f"{spec.metric},none"])
        scores[spec.name] = {"score": score, "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                             "per_doc": _per_document(output.get("samples", {}).get(spec.name, []), spec.metric, score)}
    return scores


def _per_document(samples: Sequence[dict[str, Any]], metric: str, score: float) -> list[float] | None:
    """Each document's ``metric`` from lm-eval's logged samples (filter ``none``), in document-index order; None
    unless they are plain numbers whose mean is the task's ``score`` (a corpus-level metric such as a word
    perplexity is not a mean of per-document values, so no per-document pairing can stand for it)."""
    pairs = sorted((s["doc_id"], s.get(metric)) for s in samples if s.get("filter", "none") == "none")
    values = [v for _, v in pairs]
    if not values or not all(isinstance(v, (int, float)) for v in values):  # a bool is an int: acc can be True
        return None
    values = [float(v) for v in values]
    return values if abs(sum(values) / len(values) - score) <= 1e-9 else None


def check_finite(spec: TaskSpec, doc_id: int, responses: Any) -> None:
    """Refuse NaN/inf log-likelihoods: compared as numbers they would silently count as wrong answers."""
    if _has_nonfinite(responses):
        raise EvaluationError(
            f"task '{spec.name}' doc {doc_id}: the model returned a non-finite log-likelihood",
            hint="Try --dtype float32; a mask that removes too much can also overflow.",
        )


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return value != value or value in (float("inf"), float("-inf"))
    if isinstance(value, (list, tuple)):
        return any(_has_nonfinite(item) for item in value)
    return False


@contextmanager
def _no_dataset_progress() -> Iterator[None]:
    """datasets draws a bar per split it prepares; one status line in the CLI says the same."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@dataclass
class EncodedDoc:
    """One document's loglikelihood requests, tokenised exactly as lm-eval's HFLM tokenises them."""

    doc_id: int
    doc: Any
    # (context tokens, continuation tokens) per choice; for a rolling document, per window of its text
    requests: list[tuple[list[int], list[int]]]

    @property
    def tokens(self) -> int:
        """The tokens its requests score (a rolling document's: every token of its text, once)."""
        return sum(len(continuation) for _, continuation in self.requests)


def rolling_windows(lm: Any, text: str) -> list[tuple[list[int], list[int]]]:
    """``text``'s (context, continuation) token windows as HFLM's ``loglikelihood_rolling`` makes them: the text
    tokenised, cut into windows of the model's context that predict every token once (the first conditioned on
    the prefix token), each context cut so it does not overlap its continuation. A text's log-likelihood is
    the sum of its windows'."""
    from lm_eval import utils

    windows = utils.get_rolling_token_windows(token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id,
                                              max_seq_len=lm.max_length, context_len=1)
    return [utils.make_disjoint_window(window) for window in windows]


def encode_requests(lm: Any, spec: TaskSpec) -> list[EncodedDoc]:
    """Build ``spec``'s requests with lm-eval's own task code and tokenise them once.

    Context/continuation splitting (trailing spaces move to the continuation, an empty context becomes
    the prefix token) is HFLM's, so the engine scores the very token sequences lm-eval scores; a rolling
    document's requests are its windows (:func:`rolling_windows`).
    """
    with _quiet(), no_tqdm():
        spec.task.build_all_requests(samples=spec.doc_indices, rank=0, world_size=1)
    by_doc: dict[int, list[Any]] = {}
    for instance in spec.task.instances:
        if instance.request_type not in ("loglikelihood", "multiple_choice", ROLLING):
            raise TaskError(f"task '{spec.name}' makes {instance.request_type} requests, which the engine cannot score")
        by_doc.setdefault(instance.doc_id, []).append(instance)
    encoded = []
    for doc_id in sorted(by_doc):
        instances = sorted(by_doc[doc_id], key=lambda instance: instance.idx)
        pairs = []
        for instance in instances:
            if instance.request_type == ROLLING:
                pairs += rolling_windows(lm, instance.args[0])
                continue
            context, continuation = instance.args
            if context == "":
                pairs.append(([lm.prefix_token_id], lm.tok_encode(continuation)))
            else:
                pairs.append(lm._encode_pair(context, continuation))
        encoded.append(EncodedDoc(doc_id=doc_id, doc=instances[0].doc, requests=pairs))
    return encoded


def score_doc(spec: TaskSpec, doc: Any, responses: list[tuple[float, bool]], doc_id: int) -> float:
    """The task's own metric for document ``doc_id``, from its (loglikelihood, is_greedy) responses (or the gold
    answer's probability, :func:`gold_probability`, or the divergence objective's :func:`divergence_value`)."""
    if spec.probability:
        return gold_probability(spec, doc, [float(ll) for ll, _ in responses])
    if spec.divergence:
        return divergence_value(spec, doc, [float(ll) for ll, _ in responses], doc_id)
    return float(spec.task.process_results(doc, responses)[spec.metric])


def _choice_scores(spec: TaskSpec, doc: Any, loglikelihoods: Sequence[float]) -> np.ndarray:
    """What a multiple-choice document's accuracy ranks its choices by: the log-likelihoods ``l_i`` (``acc``), or
    ``l_i / len(choice_i)`` in characters (``acc_norm``); for a loglikelihood task, the one target's ``l``."""
    scores = np.asarray(loglikelihoods, dtype=np.float64)
    if spec.output_type != "multiple_choice":
        return scores[:1]
    choices = spec.task.doc_to_choice(doc)
    scores = scores[:len(choices)]  # lm-eval's mutual-information variant appends unconditional requests
    if spec.metric.endswith("_norm"):
        scores = scores / np.array([float(len(choice)) for choice in choices])
    return scores


def _exp_neg_kl(reference: np.ndarray, scores: np.ndarray) -> float:
    """exp(-KL(q || p)) of the softmax distributions q of ``reference`` and p of ``scores`` (log-weights; -inf is
    a weight of 0, whose term q log(q / p) is 0)."""
    log_q = reference - np.logaddexp.reduce(reference)
    log_p = scores - np.logaddexp.reduce(scores)
    q = np.exp(log_q)
    with np.errstate(invalid="ignore"):  # 0 x (-inf - -inf) is computed, then discarded
        terms = np.where(q > 0, q * (log_q - log_p), 0.0)
    return float(np.exp(-terms.sum()))


def _target_and_rest(loglikelihood: float) -> np.ndarray:
    """The log-probabilities of (the target, anything else) for a target of log-probability ``l``:
    log(1 - e^l) = log(-expm1(l)), exact for probabilities near 1."""
    return np.array([loglikelihood, np.log(-np.expm1(loglikelihood)) if loglikelihood < 0 else -np.inf])


def divergence_value(spec: TaskSpec, doc: Any, loglikelihoods: Sequence[float], doc_id: int) -> float:
    """How close the model's answer distribution on document ``doc_id`` (lm-eval's: its position in
    ``spec.doc_indices``) stays to the full model's: exp(-KL(q || p)).

    Multiple choice: ``q`` and ``p`` are the full and the pruned model's choice distributions, the softmax of the
    scores the task's accuracy ranks by (:func:`gold_probability` takes the same distribution at the gold answer).
    A loglikelihood task (one target): the Bernoulli distributions (target, anything else). The value is 1 for the
    full model and falls towards 0 as the answers move, whichever way, so it needs no gold label and moves with
    every change of the model's preferences, even where both models would pick the same answer: the
    self-distillation signal pruning work (Puzzle, Minitron) fits to, here as a value to rank by (issue 20).
    The reference ``q`` comes from the full model (:func:`set_reference`); chance is a uniform guess's value.
    """
    if spec.reference is None or doc_id not in spec.reference:
        raise EvaluationError(f"task '{spec.name}' has no full-model reference for document {doc_id}",
                              hint="The divergence objective is measured through a ValueFunction, which sets it.")
    reference = _choice_scores(spec, doc, spec.reference[doc_id])
    scores = _choice_scores(spec, doc, loglikelihoods)
    if spec.output_type == "multiple_choice":
        return _exp_neg_kl(reference, scores)
    return _exp_neg_kl(_target_and_rest(reference[0]), _target_and_rest(scores[0]))


def gold_probability(spec: TaskSpec, doc: Any, loglikelihoods: Sequence[float]) -> float:
    """The probability the model gives the gold answer, from the log-likelihoods lm-eval's accuracy compares.

    Multiple choice: the softmax over the choices of the scores ``acc`` ranks by (``prob``: the choices'
    log-likelihoods ``l_i``) or ``acc_norm`` ranks by (``prob_norm``: ``l_i / len(choice_i)`` in characters),
    at the gold choice (summed over the gold choices of a multi-target task):

        p_gold = exp(s_gold) / sum_i exp(s_i).

    Its mean over documents is the accuracy of a model that answers by sampling from that distribution, so
    uniform guessing scores the same chance, 1 / choices; unlike the 0/1 accuracy it moves with every change of
    the model's preference, which is what a small layer effect on tens of documents is (issue 20). A
    loglikelihood task (one target): exp(l), the target's probability.
    """
    scores = _choice_scores(spec, doc, loglikelihoods)
    if spec.output_type != "multiple_choice":
        return float(np.exp(scores[0]))
    task = spec.task
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    golds = {choices.index(g) if isinstance(g, str) else int(g) for g in (gold if isinstance(gold, list) else [gold])}
    weights = np.exp(scores - scores.max())
    return float(sum(weights[g] for g in golds) / weights.sum())


def aggregate(spec: TaskSpec, values: list[float]) -> float:
    """The task's own aggregation of per-document values (a mean for acc and acc_norm, and for the continuous
    objectives' values)."""
    if spec.probability or spec.divergence:
        return float(np.mean(values))
    return float(spec.task.aggregation()[spec.metric](values))
