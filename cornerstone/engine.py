"""A scoring engine for lm-eval's loglikelihood tasks that does once what does not change between masks.

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
* logits only where they are scored: the final hidden states are gathered at the continuation
  positions on their way into the LM head, instead of projecting every position onto the vocabulary.

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

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from . import harness
from .errors import EvaluationError
from .masking import removed as removed_players
from .players import Player, decoder_layers, text_config


_MIN_FILL = 0.85

# The dtype of the log-softmax over the vocabulary, whatever the model's: bf16 keeps ~3 significant
# digits, and the metric compares log-probabilities of competing choices.
LOGSOFTMAX_DTYPE = torch.float32


def _forward_order(player: Player) -> tuple[int, int, str]:
    """Players in the order the forward pass meets them (a whole block before its sublayers)."""
    return player.layer, {"block": 0, "attn": 1, "mlp": 2}.get(player.kind, 3), player.name


@dataclass(frozen=True)
class _Request:
    tokens: tuple[int, ...]  # model input: (context + continuation)[-(max_length + 1):][:-1]
    continuation: tuple[int, ...]

    @property
    def prefix(self) -> tuple[int, ...]:
        """The (possibly truncated) context: the input before the continuation's own tokens."""
        return self.tokens[: len(self.tokens) - len(self.continuation) + 1]


@dataclass
class _Row:
    """One sequence of a batch: a shared prefix followed by one branch per request.

    Branch i holds request i's continuation minus its last token; its first continuation token is
    predicted at the prefix's last position, which every branch shares. ``segments`` is 0 on the
    prefix and i + 1 on branch i, ``positions`` restarts after the prefix for every branch, so each
    branch sees exactly the token sequence lm-eval gives that request.
    """

    tokens: list[int]
    positions: list[int]
    segments: list[int]
    scored: list[tuple[int, list[int], tuple[int, ...]]]  # (request id, row index predicting each token, tokens)


@dataclass
class _Batch:
    inputs: torch.Tensor  # [rows, length]: model inputs, right-padded
    position_ids: torch.Tensor | None  # [rows, length] when rows are packed, else None (positions 0..length-1)
    attention_mask: torch.Tensor | None  # [rows, 1, length, length] when rows are packed, else None (causal)
    positions: torch.Tensor  # [n_positions] flat indices (row * length + position) whose logits are needed
    gather_rows: torch.Tensor  # [n_scored] for each scored token: which of ``positions`` predicts it
    targets: torch.Tensor  # [n_scored] the continuation token scored there
    owners: list[tuple[int, int, int]]  # per request: (request id, start, end) into the scored tokens


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
        self._config = text_config(model.config)
        self._layers_path, self._layers = decoder_layers(model)
        self._max_length = lm.max_length
        self._output_tail: tuple | None = None  # what a block returns besides hidden states, if a tuple
        self.docs = {spec.name: harness.encode_requests(lm, spec) for spec in self.tasks}
        index: dict[_Request, int] = {}
        for spec in self.tasks:
            for doc in self.docs[spec.name]:
                for choice, (context, continuation) in enumerate(doc.requests):
                    self._check_scorable(spec, doc.doc_id, choice, context, continuation)
                    index.setdefault(self._request(context, continuation), len(index))
        self.requests = list(index)
        self._index = index
        self.packed = self._can_pack() if pack is None else pack
        rows = self._packed_rows() if self.packed else self._plain_rows()
        self._batches = self._make_batches(rows)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}  # (batch, block entered): full-model state
        self._full: list[tuple[float, bool]] | None = None  # the full model's responses
        self.block_passes = 0  # blocks computed over all batches and masks: the work prefix reuse saves
        self._cached_blocks = self._plan_cache() if cache_bytes > 0 else []
        self.tokens = sum(b.inputs.shape[0] * b.inputs.shape[1] for b in self._batches)

    @property
    def numerics(self) -> dict[str, str]:
        """What sets this engine's numbers apart from another loop's on the same model: the dtype of its
        log-softmax (part of a value's key in the store, :func:`cornerstone.store.game_key`)."""
        return {"engine": "fast", "logsoftmax": str(LOGSOFTMAX_DTYPE).removeprefix("torch.")}

    def _request(self, context: list[int], continuation: list[int]) -> _Request:
        """lm-eval's model input for the pair: context + continuation cut from the left to the model's
        ``max_length`` + 1 tokens, without its last token (HFLM ``_loglikelihood_tokens``)."""
        whole = (context + continuation)[-(self._max_length + 1):]
        return _Request(tuple(whole[:-1]), tuple(continuation))

    def _check_scorable(self, spec: harness.TaskSpec, doc_id: int, choice: int, context: list[int],
                        continuation: list[int]) -> None:
        """Refuse a request lm-eval asserts on (empty context or continuation, a continuation longer than
        ``max_length``). Left-truncation keeps every other request's continuation whole inside the input;
        these would put a scored position before the row's start and read another row's state."""
        if not context:
            what = "an empty context"
        elif not continuation:
            what = "an empty continuation"
        elif len(continuation) > self._max_length:
            what = f"a continuation of {len(continuation)} tokens, longer than the model's context of {self._max_length},"
        else:
            return
        raise EvaluationError(f"task '{spec.name}' doc {doc_id} choice {choice}: {what} cannot be scored",
                              hint="lm-eval refuses it too (it asserts); leave the document out (another --limit or "
                                   "--seed) or use a model with a longer context.")

    def _can_pack(self) -> bool:
        """Packing needs a custom 4D mask (sdpa or eager attention; flash attention takes none), and
        a sliding window no request outgrows, since one mask serves full and sliding layers alike."""
        config = self._config
        if getattr(config, "_attn_implementation", "eager") not in ("sdpa", "eager"):
            return False
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        return not window or all(len(r.tokens) <= window for r in self.requests)

    def _plain_rows(self) -> list[_Row]:
        """One row per distinct model input; choices whose continuation is one token share their
        context's input, as in lm-eval's own logits cache."""
        by_input: dict[tuple[int, ...], list[int]] = {}
        for request_id, request in enumerate(self.requests):
            by_input.setdefault(request.tokens, []).append(request_id)
        rows = []
        for tokens, request_ids in by_input.items():
            scored = []
            for request_id in request_ids:
                continuation = self.requests[request_id].continuation
                first = len(tokens) - len(continuation)
                scored.append((request_id, list(range(first, len(tokens))), continuation))
            rows.append(_Row(list(tokens), list(range(len(tokens))), [0] * len(tokens), scored))
        return rows

    def _packed_rows(self) -> list[_Row]:
        """One row per distinct prefix, every request on that prefix a branch of it."""
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        for request_id, request in enumerate(self.requests):
            by_prefix.setdefault(request.prefix, []).append(request_id)
        rows = []
        for prefix, request_ids in by_prefix.items():
            row = _Row(list(prefix), list(range(len(prefix))), [0] * len(prefix), [])
            for branch, request_id in enumerate(request_ids, start=1):
                continuation = self.requests[request_id].continuation
                extra = continuation[:-1]
                start = len(row.tokens)
                row.tokens += extra
                row.positions += range(len(prefix), len(prefix) + len(extra))
                row.segments += [branch] * len(extra)
                row.scored.append((request_id, [len(prefix) - 1, *range(start, start + len(extra))], continuation))
            rows.append(row)
        return rows

    def _make_batches(self, rows: list[_Row]) -> list[_Batch]:
        """Sort rows by length and batch them: at most ``batch_size`` rows, and a new batch wherever a row
        is shorter than ``_MIN_FILL`` of the batch's longest, which bounds padding to ~1 - _MIN_FILL."""
        rows = sorted(rows, key=lambda row: -len(row.tokens))
        chunks: list[list[_Row]] = []
        for row in rows:
            if not chunks or len(chunks[-1]) == self.batch_size or len(row.tokens) < _MIN_FILL * len(chunks[-1][0].tokens):
                chunks.append([])
            chunks[-1].append(row)
        device = self.model.device
        batches = []
        for chunk in chunks:
            length = len(chunk[0].tokens)
            inputs = torch.zeros(len(chunk), length, dtype=torch.long)
            # padding stays at position 0: a packed row is longer than any one request, and a position past
            # the model's context would index outside learned position embeddings (GPT-2)
            position_ids = torch.zeros(len(chunk), length, dtype=torch.long)
            segments = torch.full((len(chunk), length), -1, dtype=torch.long)  # -1: padding
            position_index: dict[int, int] = {}
            gather_rows, targets, owners = [], [], []
            for r, row in enumerate(chunk):
                n = len(row.tokens)
                inputs[r, :n] = torch.tensor(row.tokens)
                position_ids[r, :n] = torch.tensor(row.positions)
                segments[r, :n] = torch.tensor(row.segments)
                for request_id, predicting, continuation in row.scored:
                    owners.append((request_id, len(targets), len(targets) + len(continuation)))
                    for index, token in zip(predicting, continuation):
                        gather_rows.append(position_index.setdefault(r * length + index, len(position_index)))
                        targets.append(token)
            batches.append(_Batch(
                inputs=inputs.to(device),
                position_ids=position_ids.to(device) if self.packed else None,
                attention_mask=self._packed_mask(segments).to(device) if self.packed else None,
                positions=torch.tensor(list(position_index), device=device),
                gather_rows=torch.tensor(gather_rows, device=device),
                targets=torch.tensor(targets, device=device),
                owners=owners,
            ))
        return batches

    def _packed_mask(self, segments: torch.Tensor) -> torch.Tensor:
        """Causal attention within a branch and onto the shared prefix, in the form the model's attention
        implementation adds or selects with (padding attends to the prefix and padding, so no row is empty)."""
        length = segments.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        query, key = segments[:, :, None], segments[:, None, :]
        allowed = causal & ((key == 0) | (key == query))
        if self._config._attn_implementation == "eager":
            blocked = torch.finfo(self.model.dtype).min
            return torch.zeros(allowed.shape, dtype=self.model.dtype).masked_fill(~allowed, blocked)[:, None]
        return allowed[:, None]

    # -- prefix cache ---------------------------------------------------------------------------------

    def _plan_cache(self) -> list[int]:
        """Which full-model states to keep, named by the block they enter: all if they fit ``cache_bytes``,
        else every s-th."""
        n_blocks = len(self._layers)
        keep = min(n_blocks - 1, self.cache_bytes // self._state_bytes) if self._state_bytes else 0
        if keep == 0:
            return []
        stride = -(-(n_blocks - 1) // keep)
        return list(range(1, n_blocks, stride))[:keep]

    @property
    def _state_bytes(self) -> int:
        """Bytes of one hidden state over every batch."""
        element = torch.finfo(self.model.dtype).bits // 8
        return sum(b.inputs.numel() for b in self._batches) * self._config.hidden_size * element

    @property
    def longest_sequence(self) -> int:
        """Tokens in the longest row of any batch (what one forward pass's activations scale with)."""
        return max(b.inputs.shape[1] for b in self._batches)

    @property
    def cache_size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cache.values())

    def _fill_cache(self) -> None:
        """One full-model pass keeping the planned states (and the full model's responses)."""
        if self._full is not None:
            return
        full: list[tuple[float, bool]] = [(0.0, False)] * len(self.requests)
        for batch_index, batch in enumerate(self._batches):
            results, states = self._run(batch, (), capture=self._cached_blocks)
            for block, state in states.items():
                self._cache[(batch_index, block)] = state
            for request_id, loglikelihood, greedy in results:
                full[request_id] = (loglikelihood, greedy)
        self._full = full

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

    # -- forward --------------------------------------------------------------------------------------

    def _run(self, batch: _Batch, players: Sequence[Player], *, start: int = 0, state: torch.Tensor | None = None,
             capture: Iterable[int] = ()) -> tuple[list[tuple[int, float, bool]], dict[int, torch.Tensor]]:
        """Forward ``batch`` with ``players`` removed, entering block ``start`` with ``state`` (which
        already holds the removals before it), and keep the states entering the blocks in ``capture``."""
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
            stack.enter_context(removed_players(self.model, [p for p in players if p.layer >= start]))
            if start:
                stack.enter_context(self._enter_at(start, state))  # type: ignore[arg-type]
            for block in capture:
                if block > start:
                    stack.callback(self._layers[block - 1].register_forward_hook(keeper(block)).remove)
            results = self._forward(batch)
        self.block_passes += len(self._layers) - start
        return results, captured

    def _forward(self, batch: _Batch) -> list[tuple[int, float, bool]]:
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
        finally:
            handle.remove()
        return [
            (request_id, float(token_ll[start:end].sum()), bool(greedy[start:end].all()))
            for request_id, start, end in batch.owners
        ]

    # -- masks ----------------------------------------------------------------------------------------

    def _divergence(self, a: tuple[Player, ...], b: tuple[Player, ...]) -> int:
        """The first block whose input differs between masks ``a`` and ``b`` (both in forward order):
        the layer of the first player in which they differ, or the number of blocks if none."""
        for x, y in zip(a, b):
            if x != y:
                return min(x.layer, y.layer)
        longer = a if len(a) > len(b) else b
        return longer[min(len(a), len(b))].layer if len(a) != len(b) else len(self._layers)

    def loglikelihoods_many(self, masks: Sequence[Sequence[Player]]) -> Iterator[tuple[int, list[tuple[float, bool]]]]:
        """(mask index, (loglikelihood, is_greedy) of every unique request) for each mask, as each finishes.

        Masks are run in lexicographic order of their players (a depth-first walk of the trie of
        masks), and the hidden state entering block d is kept whenever a later mask removes the same
        players before d: that mask starts there instead of at the embeddings. States are dropped as
        soon as the walk leaves their branch; together with the full-model states they stay within
        ``cache_bytes`` (beyond it, they are recomputed).
        """
        self._fill_cache()
        ordered = [tuple(sorted(set(mask), key=_forward_order)) for mask in masks]
        order = sorted(range(len(ordered)), key=lambda j: [_forward_order(p) for p in ordered[j]])
        # blocks where a later mask branches off: D_p = {c_p} + {d in D_(p+1) : d < c_p}, c_p = divergence(p, p+1)
        n_blocks = len(self._layers)
        branch_points: list[set[int]] = [set() for _ in order]
        for position in range(len(order) - 2, -1, -1):
            c = self._divergence(ordered[order[position]], ordered[order[position + 1]])
            below = {d for d in branch_points[position + 1] if d < c}
            branch_points[position] = ({c} | below) if 0 < c < n_blocks else below
        states: dict[tuple[int, int], torch.Tensor] = {}  # (batch, block entered) on the current branch
        budget = self.cache_bytes - self.cache_size_bytes
        for position, j in enumerate(order):
            mask = ordered[j]
            if position:
                shared = self._divergence(ordered[order[position - 1]], mask)
                for key in [k for k in states if k[1] > shared]:
                    dropped = states.pop(key)
                    budget += dropped.numel() * dropped.element_size()
            if not mask:
                yield j, list(self._full)  # type: ignore[arg-type]
                continue
            first = mask[0].layer
            responses: list[tuple[float, bool]] = [(0.0, False)] * len(self.requests)
            for batch_index, batch in enumerate(self._batches):
                candidates = [(d, states[(batch_index, d)]) for (b, d) in states if b == batch_index]
                candidates += [(d, self._cache[(batch_index, d)]) for d in self._cached_blocks if d <= first]
                start, state = max(candidates, key=lambda c: c[0], default=(0, None))
                capture = [d for d in branch_points[position] if d > start and budget > 0]
                results, captured = self._run(batch, mask, start=start, state=state, capture=capture)
                for d, tensor in captured.items():
                    states[(batch_index, d)] = tensor
                    budget -= tensor.numel() * tensor.element_size()
                for request_id, loglikelihood, greedy in results:
                    responses[request_id] = (loglikelihood, greedy)
            yield j, responses

    def loglikelihoods(self, players: Sequence[Player] = ()) -> list[tuple[float, bool]]:
        """(loglikelihood, is_greedy) of every unique request with ``players`` removed."""
        [(_, responses)] = list(self.loglikelihoods_many([players]))
        return responses

    def evaluate_many(self, masks: Sequence[Sequence[Player]]) -> Iterator[tuple[int, dict[str, harness.TaskResult]]]:
        """(mask index, each task's result) for each mask, as each finishes; see :meth:`loglikelihoods_many`."""
        for index, responses in self.loglikelihoods_many(masks):
            yield index, self._results(responses)

    def evaluate(self, players: Sequence[Player] = ()) -> dict[str, harness.TaskResult]:
        """Each task's metric and per-document values under the mask, as :func:`harness.evaluate` returns them."""
        return self._results(self.loglikelihoods(players))

    def _results(self, responses: list[tuple[float, bool]]) -> dict[str, harness.TaskResult]:
        results = {}
        for spec in self.tasks:
            per_doc = []
            for doc in self.docs[spec.name]:
                answers = [responses[self._lookup(context, continuation)] for context, continuation in doc.requests]
                harness.check_finite(spec, doc.doc_id, answers)
                per_doc.append(harness.score_doc(spec, doc.doc, answers))
            results[spec.name] = harness.TaskResult(score=harness.aggregate(spec, per_doc), per_doc=per_doc)
        return results

    def _lookup(self, context: list[int], continuation: list[int]) -> int:
        return self._index[self._request(context, continuation)]
