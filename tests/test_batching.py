"""Requests to batches without a model: de-duplication, row packing, batching, the packed mask."""

from types import SimpleNamespace

import pytest
import torch

from cornerstone.batching import (MIN_FILL, Request, build_batch, can_pack, check_scorable, group_rows, packed_mask,
                                  packed_rows, plain_rows, unique_requests)
from cornerstone.errors import EvaluationError

# (context, continuation) token pairs as harness.encode_requests gives them: two documents of two choices
# (one with single-token choices), a repeat of the first, and one whose context outgrows a short model
PAIRS = [
    ([1, 5, 6, 7], [8, 9]), ([1, 5, 6, 7], [10]),
    ([1, 5, 6], [11]), ([1, 5, 6], [12]),
    ([1, 5, 6, 7], [8, 9]),
    ([1, 20, 21, 22, 23, 24, 25], [26, 27]),
]


def requests(max_length=64):
    return list(unique_requests(PAIRS, max_length))


def test_a_request_is_hflms_model_input_cut_from_the_left():
    assert Request.of([1, 5, 6, 7], [8, 9], 64) == Request((1, 5, 6, 7, 8), (8, 9))
    assert Request.of([1, 5, 6, 7], [8, 9], 64).prefix == (1, 5, 6, 7)
    # max_length + 1 tokens kept, the last dropped: the continuation stays whole, the context loses its start
    cut = Request.of([1, 20, 21, 22, 23, 24, 25], [26, 27], 4)
    assert cut == Request((23, 24, 25, 26), (26, 27)) and cut.prefix == (23, 24, 25)


def test_identical_requests_are_scored_once_in_order_of_first_appearance():
    index = unique_requests(PAIRS, 64)
    assert list(index.values()) == list(range(5))
    assert [index[Request.of(c, k, 64)] for c, k in PAIRS] == [0, 1, 2, 3, 0, 4]
    # contexts that differ only in what left-truncation cuts away are one request
    assert len(unique_requests([([1, 2, 3, 4], [5]), ([9, 2, 3, 4], [5])], 3)) == 1
    assert unique_requests([], 8) == {}


@pytest.mark.parametrize(("context", "continuation", "what"), [
    ([], [3], "an empty context"),
    ([3], [], "an empty continuation"),
    ([3], [4, 5, 6, 7, 8], "a continuation of 5 tokens, longer than the model's context of 4,"),
])
def test_requests_lm_eval_asserts_on_are_refused_in_one_line(context, continuation, what):
    with pytest.raises(EvaluationError) as info:
        check_scorable("toy", 7, 1, context, continuation, max_length=4)
    assert info.value.message == f"task 'toy' doc 7 choice 1: {what} cannot be scored"
    assert "\n" not in info.value.message and "lm-eval" in info.value.hint
    check_scorable("toy", 7, 1, [3], [4, 5, 6, 7], max_length=4)  # a continuation of max_length tokens is fine


def visible(batch, row, column, causal):
    """(token, position id) of every input the position at (row, column) attends to, in order."""
    if causal:
        return [(int(t), j) for j, t in enumerate(batch.inputs[row, :column + 1])]
    allowed = batch.attention_mask[row, 0, column]
    allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    return [(int(batch.inputs[row, j]), int(batch.position_ids[row, j])) for j in torch.nonzero(allowed).flatten()]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mask_dtype", [None, torch.float32])
@pytest.mark.parametrize("max_length", [64, 5])
def test_every_scored_token_sees_exactly_the_tokens_lm_eval_gives_its_request(packed, mask_dtype, max_length):
    """Whatever the layout, the position that scores continuation token i of a request attends to that
    request's model input up to it, at positions 0, 1, 2, ... as in lm-eval's own forward."""
    reqs = requests(max_length)
    rows = packed_rows(reqs) if packed else plain_rows(reqs)
    scored = set()
    for chunk in group_rows(rows, batch_size=2):
        batch = build_batch(chunk, packed=packed, mask_dtype=mask_dtype)
        length = batch.inputs.shape[1]
        for request_id, start, end in batch.owners:
            request = reqs[request_id]
            assert end - start == len(request.continuation)
            for i, k in enumerate(range(start, end)):
                flat = int(batch.positions[batch.gather_rows[k]])
                seen = visible(batch, flat // length, flat % length, causal=not packed)
                expected = request.tokens[: len(request.tokens) - len(request.continuation) + 1 + i]
                assert seen == [(token, position) for position, token in enumerate(expected)]
                assert int(batch.targets[k]) == request.continuation[i]
            scored.add(request_id)
    assert scored == set(range(len(reqs)))


def test_unpacked_rows_share_an_input_only_between_single_token_continuations():
    rows = plain_rows(requests())
    # the 1-token choices of a document share their context's input; a longer one has its own
    assert [row.tokens for row in rows] == [[1, 5, 6, 7, 8], [1, 5, 6, 7], [1, 5, 6], [1, 20, 21, 22, 23, 24, 25, 26]]
    assert [[request_id for request_id, _, _ in row.scored] for row in rows] == [[0], [1], [2, 3], [4]]
    assert all(row.segments == [0] * len(row.tokens) and row.positions == list(range(len(row.tokens))) for row in rows)


def test_packed_rows_hold_each_context_once_with_a_branch_per_choice():
    rows = packed_rows(requests())
    assert len(rows) == 3
    first = rows[0]
    # context [1, 5, 6, 7], then choice 0's continuation minus its last token (choice 1 has nothing to add)
    assert first.tokens == [1, 5, 6, 7, 8]
    assert first.positions == [0, 1, 2, 3, 4] and first.segments == [0, 0, 0, 0, 1]
    # both choices' first token is predicted at the context's last position
    assert first.scored == [(0, [3, 4], (8, 9)), (1, [3], (10,))]
    assert sum(len(row.tokens) for row in rows) < sum(len(row.tokens) for row in plain_rows(requests()))


def test_rows_are_batched_longest_first_within_batch_size_and_fill():
    def row(n):
        return plain_rows([Request(tuple(range(n)), (0,))])[0]

    lengths = [10, 3, 9, 20, 19, 18, 17]
    chunks = group_rows([row(n) for n in lengths], batch_size=3)
    # 20, 19, 18 fill a batch; 17 starts the next; 10 < 0.85 * 17 starts another; 9 joins it; 3 is alone
    assert [[len(r.tokens) for r in chunk] for chunk in chunks] == [[20, 19, 18], [17], [10, 9], [3]]
    assert all(len(c[-1].tokens) >= MIN_FILL * len(c[0].tokens) for c in chunks)
    assert group_rows([], batch_size=3) == []


def test_a_batch_is_right_padded_and_carries_packing_only_when_packed():
    def longest_first(rows):
        return sorted(rows, key=lambda row: -len(row.tokens))

    batch = build_batch(longest_first(plain_rows(requests())), packed=False)
    assert batch.position_ids is None and batch.attention_mask is None
    assert batch.inputs.tolist()[-1] == [1, 5, 6, 0, 0, 0, 0, 0]  # padded with 0 on the right
    packed = build_batch(longest_first(packed_rows(requests())), packed=True)
    assert packed.position_ids.shape == packed.inputs.shape
    assert packed.attention_mask.shape == (3, 1, 8, 8) and packed.attention_mask.dtype == torch.bool
    moved = packed.to("cpu")
    assert torch.equal(moved.attention_mask, packed.attention_mask) and moved.owners == packed.owners


def test_packed_mask_is_causal_within_a_branch_and_onto_the_prefix():
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    allowed = packed_mask(segments)[0, 0]
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # branch 2 skips branch 1
        [1, 1, 0, 0, 0, 1],  # padding sees the prefix and itself: no empty row
    ]
    additive = packed_mask(segments, torch.bfloat16)[0, 0]
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, allowed) and (additive[~allowed] == torch.finfo(torch.bfloat16).min).all()


@pytest.mark.parametrize(("config", "packs"), [
    (dict(_attn_implementation="sdpa"), True),
    (dict(_attn_implementation="eager", sliding_window=None), True),
    (dict(_attn_implementation="flash_attention_2"), False),  # takes no custom mask
    (dict(_attn_implementation="sdpa", sliding_window=8), True),  # no request outgrows it
    (dict(_attn_implementation="sdpa", sliding_window=7), False),
    (dict(_attn_implementation="sdpa", sliding_window=7, use_sliding_window=False), True),
])
def test_packing_needs_a_custom_mask_and_a_window_no_request_outgrows(config, packs):
    assert max(len(r.tokens) for r in requests()) == 8
    assert can_pack(SimpleNamespace(**config), requests()) is packs
