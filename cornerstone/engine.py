"""A scoring engine for lm-eval's loglikelihood tasks that does once what does not change between masks.

This module runs things on the model; what to run is decided without one: :mod:`cornerstone.batching`
turns requests into batches, :mod:`cornerstone.schedule` orders the masks and plans which states to keep.

It computes the same numbers as lm-eval's HFLM loop (same requests, same tokens, same right-padded
forward without attention mask, the task's own ``process_results``), with three savings:

* requests are built and tokenised once per run, not once per mask;
* prefix reuse: the hidden state entering block k is the full model's whenever no player before
  block k is removed. The full model's block outputs are cached (within ``cache_bytes``; beyond it
  only every s-th block is kept and the rest recomputed), and a masked forward starts from the
  cached state just before its first removed player: blocks before it return the cached tensor
  instead of computing;
* shared contexts: a document's context is computed once for all its choices. Each row of a batch
  is a context followed by every choice's continuation as a branch, with position ids restarting
  after the context and a 4D mask letting each branch see the context and itself only (lm-eval
  itself shares a context only between single-token continuations);
* rolling log-likelihood tasks (a ``text:FILE`` task, lm-eval's ``loglikelihood_rolling`` tasks) are served the
  same way: each document's requests are HFLM's rolling windows (:func:`cornerstone.harness.rolling_windows`),
  de-duplicated, packed and scheduled like any other pair, and the document's log-likelihood is their sum;
* logits only where they are scored: the final hidden states are gathered at the continuation
  positions on their way into the LM head, instead of projecting every position onto the vocabulary;
* a rolling task under the divergence objective (:func:`cornerstone.harness.token_divergence_result`) is served
  by the same passes: the full model's pass keeps, at every scored position, its :data:`TOKEN_KL_TOP` most
  likely next tokens' log-probabilities and the rest's (a few MB, not the vocabulary), and every masked pass
  sums KL(q || p) over those outcomes per request, next to its log-likelihood.

Packed rows change only the order of floating-point sums (an explicit mask instead of a causal
kernel): log-likelihoods agree with lm-eval's to ~1e-6 in float32, so a document's result differs
only where two choices tie to that precision.

A request longer than the model's context is cut from the left as HFLM cuts it, to
``(context + continuation)[-(max_length + 1):][:-1]``; a request HFLM asserts on (a continuation
longer than ``max_length``, an empty context or continuation) is refused with an
:class:`~cornerstone.errors.EvaluationError` before anything runs.

The bfloat16 (and float16) contract: the numbers are lm-eval's only to the dtype's precision, for
two reasons. A half-precision forward rounds differently when the batch is shaped differently
(packed rows, an explicit mask, other batch sizes: lm-eval's own loglikelihoods move by up to 0.25
nats between its batch sizes 1 and 8 on SmolLM2-135M in bf16), and lm-eval takes its log-softmax in
the model's dtype where the engine takes it in float32 (that alone moves them by up to 0.075 nats
there). Measured on CPU in bf16, per request: |engine - lm-eval| <= 0.6% of the loglikelihood on the
tiny 3-block test models, and up to 0.58 nats (within 5% + 0.1) on SmolLM2-135M over 75 bundled-task
documents and 2 masks, where 1 of the 150 document results differed. A document's result can differ
only where lm-eval's two best choices (after the metric's length normalisation) are that close;
tests/test_engine.py checks 1% + 0.01 per request on a tiny bf16 Llama, and that every differing
document lies within it. The store never mixes the two loops' values (:func:`cornerstone.store.game_key`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from . import harness
from .batching import (Batch, Request, build_batch, can_pack, check_scorable, group_rows, packed_rows, plain_rows,
                       unique_requests)
from .masking import without
from .players import Player, decoder_layers, enumerate_players, text_config
from .schedule import plan_cache, schedule

# The dtype of the log-softmax over the vocabulary, whatever the model's: bf16 keeps ~3 significant
# digits, and the metric compares log-probabilities of competing choices.
LOGSOFTMAX_DTYPE = torch.float32
# The divergence objective on text compares next-token distributions over the full model's TOKEN_KL_TOP most
# likely tokens and "any other token" as one more outcome: that coarsened KL is exact for those K + 1 outcomes
# and never above the KL over the whole vocabulary (the chain rule of KL: the whole-vocabulary KL adds the rest's
# mass times the KL of the two models' distributions within the rest), and it keeps the reference to K + 1
# numbers per position instead of the vocabulary (49,152 for SmolLM2, 262,144 for Gemma 3).
TOKEN_KL_TOP = 256


def _coarse_kl(log_q: torch.Tensor, log_q_rest: torch.Tensor, log_p: torch.Tensor, log_p_rest: torch.Tensor) -> torch.Tensor:
    """Per row, KL(q || p) = sum_i q_i (log q_i - log p_i) + q_rest (log q_rest - log p_rest) over the outcomes
    ``log_q``'s columns name and "the rest"; an outcome q gives probability 0 adds nothing."""
    q, q_rest = log_q.exp(), log_q_rest.exp()
    top = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=-1)
    return top + torch.where(q_rest > 0, q_rest * (log_q_rest - log_p_rest), torch.zeros_like(q_rest))


class Engine:
    """Per-document lm-eval results of ``tasks`` under any mask, reusing work across masks.

    ``cache_bytes`` bounds the prefix cache (default 2 GiB); 0 disables prefix reuse. ``pack``
    (default: where the attention implementation takes a custom mask) computes a document's shared
    context once for all its choices.
    """

    def __init__(self, model: Any, lm: Any, tasks: Sequence[harness.TaskSpec], *, batch_size: int = 32,
                 cache_bytes: int = 2 << 30, pack: bool | None = None) -> None:
        self.model = model
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.cache_bytes = cache_bytes
        self._head = model.get_output_embeddings()
        # the decoder's own config: a multimodal wrapper (Gemma 3) keeps its attention settings, sliding
        # window and sizes in its text part
        config = text_config(model.config)
        _, self._layers = decoder_layers(model)
        self._output_tail: tuple | None = None  # what a block returns besides hidden states, if a tuple
        max_length = harness.context_length(lm)
        self.docs = {spec.name: harness.encode_requests(lm, spec) for spec in self.tasks}
        for spec in self.tasks:
            for doc in self.docs[spec.name]:
                for choice, (context, continuation) in enumerate(doc.requests):
                    check_scorable(spec.name, doc.doc_id, choice, context, continuation, max_length)
        index = unique_requests((pair for spec in self.tasks for doc in self.docs[spec.name] for pair in doc.requests),
                                max_length)
        self.requests = list(index)
        # per task, per document: the request each choice is answered by
        self._request_ids = {spec.name: [[index[Request.of(context, continuation, max_length)]
                                          for context, continuation in doc.requests] for doc in self.docs[spec.name]]
                             for spec in self.tasks}
        self.packed = can_pack(config, self.requests) if pack is None else pack
        rows = packed_rows(self.requests) if self.packed else plain_rows(self.requests)
        # eager attention adds its mask, sdpa selects with a boolean one
        mask_dtype = model.dtype if self.packed and config._attn_implementation == "eager" else None
        self.batches = [build_batch(chunk, packed=self.packed, mask_dtype=mask_dtype).to(model.device)
                        for chunk in group_rows(rows, batch_size)]
        element = torch.finfo(model.dtype).bits // 8
        # one hidden state of each batch: what keeping the state entering a block costs
        self._state_bytes = [b.inputs.numel() * config.hidden_size * element for b in self.batches]
        self._cache: dict[tuple[int, int], torch.Tensor] = {}  # (batch, block entered): full-model state
        self._full: list[tuple[float, bool]] | None = None  # the full model's responses
        # the divergence objective on text: the full model's next-token distributions per batch (top-k token ids,
        # their log-probabilities, the rest's log-probability), taken by the full pass
        self._token_kl = any(spec.token_divergence for spec in self.tasks)
        self._reference: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._uniform_kl: list[float] = [0.0] * len(self.requests)  # per request: a uniform predictor's KL sum
        self.block_passes = 0  # blocks computed over all batches and masks: the work prefix reuse saves
        # Matrix-multiply work of the forwards run, in FLOPs: what a matmul bound is computed from
        # (bench/engine_bound.py). Per token a sublayer costs 2 x its weight matrices' entries (an MoE's
        # every expert counted), the head 2 x its entries at each scored position only; attention's own
        # products cost 4 x length x width per token and layer, over the padded row.
        self.linear_flops = 0
        self.attention_flops = 0
        self._sublayer_flops = {(p.layer, p.kind): 2 * sum(w.numel() for w in model.get_submodule(p.module_path).parameters()
                                                         if w.dim() >= 2)
                                for p in enumerate_players(model)}
        self._head_flops = 2 * self._head.weight.numel()
        self._attention_width = getattr(config, "num_attention_heads", 0) * (
            getattr(config, "head_dim", None) or config.hidden_size // max(1, getattr(config, "num_attention_heads", 1)))
        self._cached_blocks = plan_cache(len(self._layers), sum(self._state_bytes), cache_bytes)
        self.tokens = sum(b.inputs.shape[0] * b.inputs.shape[1] for b in self.batches)

    @property
    def numerics(self) -> dict[str, str]:
        """What sets this engine's numbers apart from another loop's on the same model: the dtype of its
        log-softmax (part of a value's key in the store, :func:`cornerstone.store.game_key`)."""
        return {"engine": "fast", "logsoftmax": str(LOGSOFTMAX_DTYPE).removeprefix("torch."),
                **({"token_kl_top": TOKEN_KL_TOP} if self._token_kl else {})}

    @property
    def longest_sequence(self) -> int:
        """Tokens in the longest row of any batch (what one forward pass's activations scale with)."""
        return max(b.inputs.shape[1] for b in self.batches)

    @property
    def cache_size_bytes(self) -> int:
        """Bytes of the full model's states held for prefix reuse (known after the first evaluation)."""
        return sum(t.numel() * t.element_size() for t in self._cache.values())

    # -- running a schedule ---------------------------------------------------------------------------

    def _fill_cache(self) -> None:
        """One full-model pass keeping the planned states (and the full model's responses)."""
        if self._full is not None:
            return
        full: list[tuple[float, bool]] = [(0.0, False)] * len(self.requests)
        for batch_index, batch in enumerate(self.batches):
            results, states = self._run(batch_index, (), capture=self._cached_blocks)
            for block, state in states.items():
                self._cache[(batch_index, block)] = state
            for request_id, loglikelihood, greedy, _ in results:
                full[request_id] = (loglikelihood, greedy)
        self._full = full
        if self._token_kl:
            self._set_token_chance()

    def _set_token_chance(self) -> None:
        """A token divergence task's chance: the value of a uniform next-token predictor, exp(-KL(q || uniform))
        per token, token-weighted as the task's value is (:func:`cornerstone.harness.token_divergence_result`)."""
        for spec in self.tasks:
            if spec.token_divergence:
                docs = self.docs[spec.name]
                uniform = [sum(self._uniform_kl[r] for r in requests) for requests in self._request_ids[spec.name]]
                spec.chance = harness.token_divergence_result(uniform, [doc.tokens for doc in docs]).score

    def loglikelihoods_many(self, masks: Sequence[Sequence[Player]]) -> Iterator[tuple[int, list[tuple[float, bool]]]]:
        """(mask index, (loglikelihood, is_greedy) of every unique request) for each mask, as each finishes.
        See :meth:`_responses_many`."""
        for index, responses, _ in self._responses_many(masks):
            yield index, responses

    def _responses_many(self, masks: Sequence[Sequence[Player]]
                        ) -> Iterator[tuple[int, list[tuple[float, bool]], list[float]]]:
        """(mask index, (loglikelihood, is_greedy) of every unique request, each request's summed next-token KL
        from the full model, 0 unless a token divergence task asks for it) for each mask, as each finishes.

        Masks run in the order :func:`cornerstone.schedule.schedule` gives (a depth-first walk of the
        trie of masks), each batch starting from the deepest hidden state that serves it: one the walk
        kept where an earlier mask removed the same players, else a full-model state before the mask's
        first removed player. Kept states are dropped as soon as the walk leaves their branch, and a run
        starts keeping new ones only while they and the full-model states leave room in ``cache_bytes``.
        """
        self._fill_cache()
        steps = schedule(masks, n_blocks=len(self._layers), state_bytes=self._state_bytes, cached=self._cached_blocks,
                         budget=self.cache_bytes - self.cache_size_bytes)
        held = {"full": self._cache, "branch": {}}  # by a run's source: (batch, block entered) -> state
        for step in steps:
            for key in step.release:
                del held["branch"][key]
            if not step.players:
                yield step.mask, list(self._full), [0.0] * len(self.requests)  # type: ignore[arg-type]
                continue
            responses: list[tuple[float, bool]] = [(0.0, False)] * len(self.requests)
            divergences = [0.0] * len(self.requests)
            for run in step.runs:
                state = held.get(run.source, {}).get((run.batch, run.start))
                results, captured = self._run(run.batch, step.players, start=run.start, state=state, capture=run.capture)
                held["branch"].update({(run.batch, block): tensor for block, tensor in captured.items()})
                for request_id, loglikelihood, greedy, divergence in results:
                    responses[request_id] = (loglikelihood, greedy)
                    divergences[request_id] = divergence
            yield step.mask, responses, divergences

    @contextmanager
    def _enter_at(self, block: int, state: torch.Tensor) -> Iterator[None]:
        """Start the forward at ``block`` with ``state`` as its input: earlier blocks pass their input
        through, and the one just before returns ``state``."""
        originals = {}
        tail = self._output_tail

        def as_output(hidden: torch.Tensor) -> Any:
            return hidden if tail is None else (hidden,) + tail

        def passthrough(*args: Any, **kwargs: Any) -> Any:
            return as_output(args[0] if args else kwargs["hidden_states"])

        def cached_output(*_args: Any, **_kwargs: Any) -> Any:
            return as_output(state)

        try:
            for j in range(block):
                module = self._layers[j]
                originals[j] = module.__dict__.get("forward")
                module.forward = cached_output if j == block - 1 else passthrough
            yield
        finally:
            for j, original in originals.items():
                if original is None:
                    del self._layers[j].forward
                else:
                    self._layers[j].forward = original

    def _run(self, batch_index: int, players: Sequence[Player], *, start: int = 0, state: torch.Tensor | None = None,
             capture: Iterable[int] = ()) -> tuple[list[tuple[int, float, bool, float]], dict[int, torch.Tensor]]:
        """Forward batch ``batch_index`` with ``players`` removed, entering block ``start`` with ``state`` (which
        already holds the removals before it), and keep the states entering the blocks in ``capture``."""
        batch = self.batches[batch_index]
        captured: dict[int, torch.Tensor] = {}

        def keeper(block: int) -> Any:
            def keep(_module: Any, _args: Any, output: Any) -> None:
                if isinstance(output, tuple):
                    self._output_tail = tuple(output[1:])
                    output = output[0]
                captured[block] = output.detach()
            return keep

        with ExitStack() as stack:
            # removal hooks first, so a capture hook on the same block sees the removed output
            stack.enter_context(without(self.model, [p for p in players if p.layer >= start]))
            if start:
                stack.enter_context(self._enter_at(start, state))  # type: ignore[arg-type]
            for block in capture:
                if block > start:
                    stack.callback(self._layers[block - 1].register_forward_hook(keeper(block)).remove)
            results = self._forward(batch_index, full=not players)
        self.block_passes += len(self._layers) - start
        self._count_work(batch, players, start)
        return results, captured

    def _count_work(self, batch: Batch, players: Sequence[Player], start: int) -> None:
        rows, length = batch.inputs.shape[0], batch.inputs.shape[1]
        removed = {(p.layer, p.kind) for p in players}
        for layer in range(start, len(self._layers)):
            if (layer, "block") in removed:
                continue
            present = [kind for kind in ("attn", "mlp") if (layer, kind) not in removed]
            self.linear_flops += rows * length * sum(self._sublayer_flops.get((layer, kind), 0) for kind in present)
            if "attn" in present:
                self.attention_flops += 4 * rows * length * length * self._attention_width
        self.linear_flops += batch.positions.numel() * self._head_flops

    def _forward(self, batch_index: int, *, full: bool) -> list[tuple[int, float, bool, float]]:
        """(request id, log-likelihood, is_greedy, summed next-token KL from the full model) per request of the
        batch; the KL is 0 unless a token divergence task needs it, and the full model's pass (``full``) keeps
        the reference it is measured against."""
        batch = self.batches[batch_index]

        def scored_only(_head: Any, args: tuple) -> tuple:
            hidden = args[0]
            return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.positions)[None],) + args[1:]

        # The model's own forward, with its head fed the scored positions only: whatever the model class
        # does after the head (Gemma 2's logit softcapping; Gemma 3's multimodal wrapper skips its text
        # config's) is what lm-eval's logits get too.
        handle = self._head.register_forward_pre_hook(scored_only)
        try:
            with torch.inference_mode():
                logits = self.model(input_ids=batch.inputs, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, use_cache=False).logits[0]
                logprobs = torch.log_softmax(logits.to(LOGSOFTMAX_DTYPE), dim=-1)
                argmax = logprobs.argmax(dim=-1)
                token_ll = logprobs[batch.gather_rows, batch.targets]
                greedy = argmax[batch.gather_rows] == batch.targets
                token_kl = self._token_divergence(batch_index, logprobs, full=full)[batch.gather_rows] \
                    if self._token_kl else None
        finally:
            handle.remove()
        return [
            (request_id, float(token_ll[start:end].sum()), bool(greedy[start:end].all()),
             float(token_kl[start:end].sum()) if token_kl is not None else 0.0)
            for request_id, start, end in batch.owners
        ]

    def _token_divergence(self, batch_index: int, logprobs: torch.Tensor, *, full: bool) -> torch.Tensor:
        """KL(q || p) at every scored position of the batch, ``q`` the full model's next-token distribution
        coarsened to its :data:`TOKEN_KL_TOP` most likely tokens and the rest, ``p`` this pass's ``logprobs``
        coarsened alike. The full pass keeps ``q`` (and every request's KL from a uniform predictor, for the
        chance level) and returns zeros. ``logprobs`` is overwritten."""
        if full:
            top = min(TOKEN_KL_TOP, logprobs.shape[-1])
            log_q, tokens = logprobs.topk(top, dim=-1)
            log_q_rest = self._log_rest(logprobs, tokens)
            self._reference[batch_index] = (tokens, log_q, log_q_rest)
            # a uniform predictor over the vocabulary, coarsened to the same outcomes
            vocab = logprobs.shape[-1]
            uniform = _coarse_kl(log_q, log_q_rest, torch.full_like(log_q, -math.log(vocab)),
                                 torch.full_like(log_q_rest, math.log((vocab - top) / vocab) if vocab > top else -math.inf))
            batch = self.batches[batch_index]
            per_token = uniform[batch.gather_rows]
            for request_id, start, end in batch.owners:
                self._uniform_kl[request_id] = float(per_token[start:end].sum())
            return torch.zeros_like(log_q_rest)
        tokens, log_q, log_q_rest = self._reference[batch_index]
        return _coarse_kl(log_q, log_q_rest, logprobs.gather(1, tokens), self._log_rest(logprobs, tokens))

    @staticmethod
    def _log_rest(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log of the probability of every token but ``tokens`` per row, as a log-sum-exp over the others (exact
        where 1 - sum(top) would cancel); overwrites ``logprobs`` at ``tokens``."""
        return torch.logsumexp(logprobs.scatter_(1, tokens, -math.inf), dim=-1)

    # -- results --------------------------------------------------------------------------------------

    def loglikelihoods(self, players: Sequence[Player] = ()) -> list[tuple[float, bool]]:
        """(loglikelihood, is_greedy) of every unique request with ``players`` removed."""
        [(_, responses)] = list(self.loglikelihoods_many([players]))
        return responses

    def per_document(self, responses: Sequence[tuple[float, bool]]) -> dict[str, list[list[tuple[float, bool]]]]:
        """The responses to each document's requests (one per choice, in lm-eval's order), per task in the
        order of :attr:`docs`, from the per-request responses :meth:`loglikelihoods` returns."""
        return {task: [[responses[request_id] for request_id in doc] for doc in docs]
                for task, docs in self._request_ids.items()}

    def task_results_many(self, masks: Sequence[Sequence[Player]]) -> Iterator[tuple[int, dict[str, harness.TaskResult]]]:
        """(mask index, each task's result) for each mask, as each finishes; see :meth:`loglikelihoods_many`."""
        for index, responses, divergences in self._responses_many(masks):
            yield index, self._results(responses, divergences)

    def task_results(self, players: Sequence[Player] = ()) -> dict[str, harness.TaskResult]:
        """Each task's metric and per-document values under the mask, as :func:`harness.run_tasks` returns them."""
        [(_, results)] = list(self.task_results_many([players]))
        return results

    def set_references(self) -> None:
        """Give the divergence objective's tasks the full model's log-likelihoods as their reference
        (:func:`harness.set_reference`), from the full-model pass the prefix cache is filled by (which also
        keeps a token divergence task's next-token distributions and sets its chance)."""
        self._fill_cache()
        full = self.per_document(self._full)  # type: ignore[arg-type]
        for spec in self.tasks:
            if spec.divergence and spec.reference is None:
                harness.set_reference(spec, {doc.doc_id: [ll for ll, _ in answers]
                                             for doc, answers in zip(self.docs[spec.name], full[spec.name])})

    def _results(self, responses: list[tuple[float, bool]], divergences: Sequence[float]) -> dict[str, harness.TaskResult]:
        if any(spec.divergence and spec.reference is None for spec in self.tasks):
            self.set_references()
        answers = self.per_document(responses)
        results = {}
        for spec in self.tasks:
            for doc, doc_answers in zip(self.docs[spec.name], answers[spec.name]):
                harness.check_finite(spec, doc.doc_id, doc_answers)
            if spec.token_divergence:
                # a document's divergence is the sum over its windows' tokens, as its log-likelihood is
                results[spec.name] = harness.token_divergence_result(
                    [sum(divergences[r] for r in requests) for requests in self._request_ids[spec.name]],
                    [doc.tokens for doc in self.docs[spec.name]])
                continue
            if spec.output_type == harness.ROLLING:
                # a document's log-likelihood is the sum over its windows, as in HFLM.loglikelihood_rolling
                results[spec.name] = harness.rolling_result(
                    [sum(ll for ll, _ in doc_answers) for doc_answers in answers[spec.name]],
                    [doc.tokens for doc in self.docs[spec.name]])
                continue
            per_doc = [harness.score_doc(spec, doc.doc, doc_answers, doc.doc_id)
                       for doc, doc_answers in zip(self.docs[spec.name], answers[spec.name])]
            results[spec.name] = harness.TaskResult(score=harness.aggregate(spec, per_doc), per_doc=per_doc)
        return results
