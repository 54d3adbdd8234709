"""Token requests to padded batches: de-duplicate lm-eval's requests, lay them out in rows, build the tensors.

Everything here is plain token lists and CPU tensors, with no model: the engine
(:mod:`cornerstone.engine`) runs what it builds.

* A request is lm-eval's model input for one (context, continuation) pair, cut from the left as HFLM
  cuts it; identical requests (the same question in two tasks, say) are scored once.
* A row is one sequence of a batch. Unpacked, it is one distinct model input, shared by every request
  whose input it is (choices of one token, as in lm-eval's own logits cache). Packed, it is one distinct
  context followed by every choice's continuation as a branch: position ids restart after the context,
  and a 4D mask lets each branch see the context and itself only.
* A batch is up to ``batch_size`` rows of similar length, right-padded, with the flat positions whose
  logits are scored and the tokens scored there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import EvaluationError

# A new batch starts wherever a row is shorter than this fraction of the batch's longest row, which bounds
# padding to about 1 - MIN_FILL of a batch.
MIN_FILL = 0.85


@dataclass(frozen=True)
class Request:
    """One scored sequence, as lm-eval's HFLM feeds it to the model."""

    tokens: tuple[int, ...]  # model input: (context + continuation)[-(max_length + 1):][:-1]
    continuation: tuple[int, ...]

    @classmethod
    def of(cls, context: Sequence[int], continuation: Sequence[int], max_length: int) -> Request:
        """lm-eval's model input for the pair: context + continuation cut from the left to ``max_length`` + 1
        tokens, without its last token (HFLM ``_loglikelihood_tokens``)."""
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        return cls(tuple(whole[:-1]), tuple(continuation))

    @property
    def prefix(self) -> tuple[int, ...]:
        """The (possibly truncated) context: the input before the continuation's own tokens."""
        return self.tokens[: len(self.tokens) - len(self.continuation) + 1]


def check_scorable(task: str, doc_id: int, choice: int, context: Sequence[int], continuation: Sequence[int],
                   max_length: int) -> None:
    """Refuse a request lm-eval asserts on (empty context or continuation, a continuation longer than
    ``max_length``). Left-truncation keeps every other request's continuation whole inside the input;
    these would put a scored position before the row's start and read another row's state."""
    if not context:
        what = "an empty context"
    elif not continuation:
        what = "an empty continuation"
    elif len(continuation) > max_length:
        what = f"a continuation of {len(continuation)} tokens, longer than the model's context of {max_length},"
    else:
        return
    raise EvaluationError(f"task '{task}' doc {doc_id} choice {choice}: {what} cannot be scored",
                          hint="lm-eval refuses it too (it asserts); leave the document out (another --limit or "
                               "--seed) or use a model with a longer context.")


def unique_requests(pairs: Iterable[tuple[Sequence[int], Sequence[int]]], max_length: int) -> dict[Request, int]:
    """Each distinct request among the (context, continuation) pairs, numbered in order of first appearance.

    Two pairs are one request when lm-eval would feed the model the same input and score the same
    continuation: after left-truncation, contexts that differ only in what was cut away are one request.
    """
    index: dict[Request, int] = {}
    for context, continuation in pairs:
        index.setdefault(Request.of(context, continuation, max_length), len(index))
    return index


@dataclass
class Row:
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


def plain_rows(requests: Sequence[Request]) -> list[Row]:
    """One row per distinct model input; choices whose continuation is one token share their
    context's input, as in lm-eval's own logits cache."""
    by_input: dict[tuple[int, ...], list[int]] = {}
    for request_id, request in enumerate(requests):
        by_input.setdefault(request.tokens, []).append(request_id)
    rows = []
    for tokens, request_ids in by_input.items():
        scored = []
        for request_id in request_ids:
            continuation = requests[request_id].continuation
            first = len(tokens) - len(continuation)
            scored.append((request_id, list(range(first, len(tokens))), continuation))
        rows.append(Row(list(tokens), list(range(len(tokens))), [0] * len(tokens), scored))
    return rows


def packed_rows(requests: Sequence[Request]) -> list[Row]:
    """One row per distinct prefix, every request on that prefix a branch of it; a one-token prefix is not
    shared.

    Sharing one token saves one token per branch and costs a row as long as all the branches together,
    attending over its whole length: the rolling windows of a text task all start from the prefix token
    (:func:`cornerstone.harness.rolling_windows`) and would otherwise put every document's text in one row.
    """
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for request_id, request in enumerate(requests):
        key = request.prefix if len(request.prefix) > 1 else (*request.prefix, -1 - request_id)
        by_prefix.setdefault(key, []).append(request_id)
    rows = []
    for request_ids in by_prefix.values():
        prefix = requests[request_ids[0]].prefix
        row = Row(list(prefix), list(range(len(prefix))), [0] * len(prefix), [])
        for branch, request_id in enumerate(request_ids, start=1):
            continuation = requests[request_id].continuation
            extra = continuation[:-1]
            start = len(row.tokens)
            row.tokens += extra
            row.positions += range(len(prefix), len(prefix) + len(extra))
            row.segments += [branch] * len(extra)
            row.scored.append((request_id, [len(prefix) - 1, *range(start, start + len(extra))], continuation))
        rows.append(row)
    return rows


def can_pack(config: Any, requests: Sequence[Request]) -> bool:
    """Whether packed rows serve a decoder with this (text) config: packing needs a custom 4D mask (sdpa
    or eager attention; flash attention takes none), and a sliding window no request outgrows, since one
    mask serves full and sliding layers alike."""
    if getattr(config, "_attn_implementation", "eager") not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return not window or all(len(r.tokens) <= window for r in requests)


def group_rows(rows: Sequence[Row], batch_size: int) -> list[list[Row]]:
    """Rows sorted longest first, cut into batches of at most ``batch_size`` rows, with a new batch
    wherever a row is shorter than :data:`MIN_FILL` of its batch's longest."""
    chunks: list[list[Row]] = []
    for row in sorted(rows, key=lambda row: -len(row.tokens)):
        if not chunks or len(chunks[-1]) == batch_size or len(row.tokens) < MIN_FILL * len(chunks[-1][0].tokens):
            chunks.append([])
        chunks[-1].append(row)
    return chunks


@dataclass
class Batch:
    """One forward pass's tensors, and where its requests' scored tokens are in the output."""

    inputs: torch.Tensor  # [rows, length]: model inputs, right-padded
    position_ids: torch.Tensor | None  # [rows, length] when rows are packed, else None (positions 0..length-1)
    attention_mask: torch.Tensor | None  # [rows, 1, length, length] when rows are packed, else None (causal)
    positions: torch.Tensor  # [n_positions] flat indices (row * length + position) whose logits are needed
    gather_rows: torch.Tensor  # [n_scored] for each scored token: which of ``positions`` predicts it
    targets: torch.Tensor  # [n_scored] the continuation token scored there
    owners: list[tuple[int, int, int]]  # per request: (request id, start, end) into the scored tokens

    def to(self, device: Any) -> Batch:
        """The same batch with its tensors on ``device``."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return Batch(self.inputs.to(device), move(self.position_ids), move(self.attention_mask),
                     self.positions.to(device), self.gather_rows.to(device), self.targets.to(device), self.owners)


def build_batch(rows: Sequence[Row], *, packed: bool, mask_dtype: torch.dtype | None = None) -> Batch:
    """The padded tensors of ``rows`` (longest first). With ``packed``, position ids and the attention mask
    of :func:`packed_mask` (additive in ``mask_dtype`` if given, else boolean) come with them."""
    length = len(rows[0].tokens)
    inputs = torch.zeros(len(rows), length, dtype=torch.long)
    # padding stays at position 0: a packed row is longer than any one request, and a position past
    # the model's context would index outside learned position embeddings (GPT-2)
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)  # -1: padding
    position_index: dict[int, int] = {}
    gather_rows, targets, owners = [], [], []
    for r, row in enumerate(rows):
        n = len(row.tokens)
        inputs[r, :n] = torch.tensor(row.tokens)
        position_ids[r, :n] = torch.tensor(row.positions)
        segments[r, :n] = torch.tensor(row.segments)
        for request_id, predicting, continuation in row.scored:
            owners.append((request_id, len(targets), len(targets) + len(continuation)))
            for index, token in zip(predicting, continuation):
                gather_rows.append(position_index.setdefault(r * length + index, len(position_index)))
                targets.append(token)
    return Batch(
        inputs=inputs,
        position_ids=position_ids if packed else None,
        attention_mask=packed_mask(segments, mask_dtype) if packed else None,
        positions=torch.tensor(list(position_index)),
        gather_rows=torch.tensor(gather_rows),
        targets=torch.tensor(targets),
        owners=owners,
    )


def packed_mask(segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal attention within a branch and onto the shared prefix (segment 0), as a [rows, 1, length,
    length] mask: boolean (sdpa selects with it), or additive in ``dtype`` (eager attention adds it).
    Padding (segment -1) attends to the prefix and padding, so no row of the mask is empty."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((key == 0) | (key == query))
    if dtype is not None:
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    return allowed[:, None]
