"""The value function of the layer game: v(S) = task score of the model with only the players in S.

Following Zhang, Dong & Kawaguchi (2024), v is an lm-eval accuracy: ``acc_norm`` where the task
has it, else ``acc``; on a rolling log-likelihood task (``text:FILE``, wikitext) it is 1 / perplexity per
token (:func:`cornerstone.harness.rolling_result`), or under the divergence objective exp(-KL) per token from the
full model's next-token distributions (:func:`cornerstone.harness.token_divergence_result`). With several tasks v is their unweighted mean (a macro average), and so is the
chance level. Coalitions are named by what they remove, since every estimator here works near the
full model: ``value.evaluate([L0_mlp])`` is v(N \\ {L0.mlp}).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from . import harness
from .errors import ConfigError
from .loading import LoadedModel
from .masking import without
from .players import Player, decoder_layers
from .schedule import shares
from .store import ValueStore, game_key

if TYPE_CHECKING:
    from .distributed import Ranks


@dataclass(frozen=True)
class Evaluation:
    """v of one coalition: the macro-averaged score, each task's score and each document's value."""

    removed: tuple[str, ...]
    score: float
    per_task: dict[str, float]
    per_doc: dict[str, list[float]] = field(repr=False)
    seconds: float


def _digest(reference: dict[int, list[float]]) -> str:
    return hashlib.sha256(json.dumps(sorted(reference.items())).encode()).hexdigest()


class ValueFunction:
    """v(N \\ removed) for one model, one fixed task/document set and one metric per task.

    Results are memoised per coalition within the object, so an estimator may ask for the same
    coalition twice (the full model, for instance) and pay once.

    With a ``store`` folder (see :mod:`cornerstone.store`), every value is also kept on disk as it is computed
    and read back instead of computed again (see :meth:`evaluate_many`).

    With ``ranks`` (a multi-process job, :mod:`cornerstone.distributed`) each batch of unknown values
    is split across the processes and gathered, so every process ends each call with every value.

    ``engine="fast"`` (default) computes with :class:`~cornerstone.engine.Engine`, which reuses work
    across masks and gives lm-eval's per-document results; ``engine="lm-eval"`` runs lm-eval's own
    evaluation loop for every coalition (the reference).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        tasks: Sequence[harness.TaskSpec],
        *,
        batch_size: int = 32,
        engine: Literal["fast", "lm-eval"] = "fast",
        cache_bytes: int = 2 << 30,
        store: str | Path | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        self.loaded = loaded
        self.ranks = ranks
        self.tasks = list(tasks)
        # a rolling task's chance is a uniform predictor's over what the model's head scores
        harness.set_vocabulary(self.tasks, loaded.model.get_output_embeddings().weight.shape[0])
        self.batch_size = batch_size
        self.engine = engine
        self._lm = harness.make_lm(loaded.model, loaded.tokenizer, batch_size=batch_size)
        if engine == "fast":
            from .engine import Engine

            self._engine: Engine | None = Engine(loaded.model, self._lm, self.tasks, batch_size=batch_size,
                                                 cache_bytes=cache_bytes)
            self.numerics = self._engine.numerics
        elif engine == "lm-eval":
            harness.check_lm_eval_loop(self.tasks)  # before the loop runs the full model for a reference
            self._engine = None
            # HFLM takes its log-softmax in ``softmax_dtype`` when set, else in the logits' (the model's) dtype
            softmax = getattr(self._lm, "softmax_dtype", None) or loaded.model.dtype
            self.numerics = {"engine": "lm-eval", "logsoftmax": str(softmax).removeprefix("torch.")}
        else:
            raise ConfigError(f"unknown engine '{engine}'", hint="Use 'fast' or 'lm-eval'.")
        if any(spec.token_divergence or (spec.divergence and spec.reference is None) for spec in self.tasks):
            self._set_references()
        self.store = ValueStore(store, self.game()) if store is not None else None
        self._memo: dict[frozenset[str], Evaluation] = {}
        self.evaluations = 0  # values computed by this object
        self.reused = 0  # values read from the store instead
        self.seconds = 0.0

    def _set_references(self) -> None:
        """The divergence objective compares every coalition with the full model: its log-likelihoods become the
        tasks' reference (:func:`harness.set_reference`) before any value, chance included, is read. A reference
        the tasks already hold is kept: a caller comparing a changed copy (a repaired model) with the original
        sets it from the original."""
        if self._engine is not None:
            self._engine.set_references()
            return
        full = harness.lm_eval_loglikelihoods(self._lm, self.tasks)
        for spec in self.tasks:
            if spec.divergence and spec.reference is None:
                harness.set_reference(spec, full[spec.name])

    def game(self) -> dict:
        """The key of this value function's values in a :class:`~cornerstone.store.ValueStore`
        (what it covers: :func:`~cornerstone.store.game_key`)."""
        from .provenance import package_versions

        # a divergence value is relative to its reference, which a caller may have set from another model (the
        # unrepaired one a repaired copy is compared with): the reference is part of what the values mean
        tasks = [{"name": s.name, "metric": s.metric, "doc_indices": s.doc_indices,
                  "version": s.describe()["version"], "content": s.content_hash,
                  **({"reference": _digest(s.reference)} if s.reference is not None else {})} for s in self.tasks]
        return game_key(self.loaded.describe(), tasks, engine=self.numerics, versions=package_versions())

    def footprint(self) -> tuple[int, int]:
        """(longest sequence in tokens, prefix-cache bytes) of this value function's evaluations."""
        if self._engine is not None:
            return self._engine.longest_sequence, self._engine.cache_size_bytes
        return harness.context_length(self._lm), 0

    @property
    def requests(self) -> int:
        """Sequences one evaluation scores (a multiple-choice document asks one per choice): no forward
        pass holds more rows, whatever the batch size."""
        return sum(harness.request_count(spec) for spec in self.tasks)

    @property
    def chance(self) -> float:
        return sum(spec.chance for spec in self.tasks) / len(self.tasks)

    def evaluate(self, removed: Iterable[Player] = ()) -> Evaluation:
        """v(N \\ removed)."""
        return self.evaluate_many([list(removed)])[0]

    def evaluate_many(self, masks: Sequence[Iterable[Player]],
                      on_done: Callable[[Evaluation], None] | None = None) -> list[Evaluation]:
        """v(N \\ mask) for every mask, in the order given.

        Values already known (in memory, or in the on-disk store from this or an earlier run) cost
        nothing; the rest go to the engine as one batch, so masks that remove the same players early
        share the forward pass up to where they differ. Each new value is stored as soon as it is
        computed, and ``on_done`` is called with it.
        """
        masks = [list(mask) for mask in masks]
        keys = [frozenset(p.name for p in mask) for mask in masks]
        todo: dict[frozenset[str], list[Player]] = {}
        for mask, key in zip(masks, keys):
            if key not in self._memo and key not in todo and not self._from_store(key):
                todo[key] = mask
        if self.ranks is not None:
            # rank 0's view decides, so every rank computes and gathers the same list
            names = self.ranks.broadcast([sorted(key) for key in todo])
            by_key = dict(zip(keys, masks))
            todo = {frozenset(name): by_key[frozenset(name)] for name in names}
            for key in keys:  # known to rank 0 from the store, which this rank may have read earlier
                if key not in self._memo and key not in todo and not self._from_store(key):
                    raise RuntimeError(f"rank {self.ranks.rank} cannot find the stored value of {sorted(key)}")
        pending = list(todo.items())
        if self.ranks is None:
            mine = list(range(len(pending)))
        else:  # whole branches of the mask trie per process, so each keeps its prefix reuse
            blocks = len(decoder_layers(self.loaded.model)[1])
            mine = sorted(shares([mask for _, mask in pending], self.ranks.world, n_blocks=blocks)[self.ranks.rank])
        computed: list[Evaluation] = []
        started = time.perf_counter()
        for position, results in self._compute([pending[index][1] for index in mine]):
            index = mine[position]
            finished = time.perf_counter()
            evaluation = Evaluation(
                removed=tuple(sorted(pending[index][0])),
                score=sum(r.score for r in results.values()) / len(results),
                per_task={name: r.score for name, r in results.items()},
                per_doc={name: r.per_doc for name, r in results.items()},
                seconds=finished - started,
            )
            started = finished
            computed.append(evaluation)
            self._record(evaluation, on_done)
            if self.store is not None:
                self.store.put({"removed": list(evaluation.removed), "score": evaluation.score,
                                "per_task": evaluation.per_task, "per_doc": evaluation.per_doc,
                                "seconds": evaluation.seconds})
        if self.ranks is not None and pending:
            for share in self.ranks.gather(computed):
                for evaluation in share:
                    if frozenset(evaluation.removed) not in self._memo:
                        self._record(evaluation, on_done)
        return [self._memo[key] for key in keys]

    def _from_store(self, key: frozenset[str]) -> bool:
        """Take ``key``'s value from the on-disk store into memory; whether it was there."""
        record = self.store.get(tuple(sorted(key))) if self.store is not None else None
        if record is None:
            return False
        self._memo[key] = Evaluation(removed=tuple(record["removed"]), score=record["score"], per_task=record["per_task"],
                                     per_doc=record["per_doc"], seconds=record["seconds"])
        self.reused += 1
        return True

    def _record(self, evaluation: Evaluation, on_done: Callable[[Evaluation], None] | None) -> None:
        """A value computed in this job (by this process or, gathered, by another)."""
        self._memo[frozenset(evaluation.removed)] = evaluation
        self.evaluations += 1
        self.seconds += evaluation.seconds
        if on_done is not None:
            on_done(evaluation)

    def _compute(self, masks: list[list[Player]]) -> Iterator[tuple[int, dict[str, harness.TaskResult]]]:
        if self._engine is not None:
            yield from self._engine.task_results_many(masks)
            return
        for index, mask in enumerate(masks):
            with without(self.loaded.model, mask):
                yield index, harness.run_tasks(self._lm, self.tasks)

    def __call__(self, removed: Iterable[Player] = ()) -> float:
        return self.evaluate(removed).score
