"""The mask scheduler without a model: run order, branch points, which state each run starts from, budget."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cornerstone.players import Player
from cornerstone.schedule import (Run, blocks_computed, branch_points, divergence, in_forward_order, plan_cache, schedule,
                                 shares)

N_BLOCKS = 4


def player(name: str) -> Player:
    """``L2`` (a block), ``L2.attn`` or ``L2.mlp``, as :func:`cornerstone.players.parse_players` names them."""
    layer, _, kind = name[1:].partition(".")
    return Player(name, int(layer), kind or "block", f"model.layers.{layer}" + (f".{kind}" if kind else ""))


def mask(*names: str) -> list[Player]:
    return [player(name) for name in names]


def names(players) -> list[str]:
    return [p.name for p in players]


def test_a_mask_is_its_distinct_players_in_forward_order():
    assert names(in_forward_order(mask("L2.mlp", "L0.mlp", "L2", "L0.attn", "L2.mlp", "L1"))) == \
        ["L0.attn", "L0.mlp", "L1", "L2", "L2.mlp"]
    assert in_forward_order([]) == ()


@pytest.mark.parametrize(("a", "b", "block"), [
    ((), (), N_BLOCKS),  # the same mask: no block's input differs
    (("L1.attn",), ("L1.attn",), N_BLOCKS),
    ((), ("L2.mlp",), 2),  # the full model and a mask: from the mask's first player on
    (("L1.attn",), ("L1.attn", "L3.mlp"), 3),  # one mask extends the other: from the extra player on
    (("L0.mlp", "L2.attn"), ("L0.mlp", "L3.attn"), 2),  # the first player in which they differ, the earlier one
    (("L1",), ("L1.attn",), 1),
])
def test_divergence_is_the_first_block_whose_input_differs(a, b, block):
    a, b = in_forward_order(mask(*a)), in_forward_order(mask(*b))
    assert divergence(a, b, N_BLOCKS) == divergence(b, a, N_BLOCKS) == block


def test_no_masks_is_no_steps():
    assert schedule([], n_blocks=N_BLOCKS, state_bytes=[10, 20], budget=1000) == []


def test_masks_run_in_lexicographic_forward_order_with_the_full_model_first():
    masks = [mask("L2.mlp"), mask("L1.mlp"), mask(), mask("L1.attn", "L3.attn"), mask("L1.attn"), mask("L0")]
    steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=[10])
    assert [step.mask for step in steps] == [2, 5, 4, 3, 1, 0]
    assert [names(step.players) for step in steps] == [[], ["L0"], ["L1.attn"], ["L1.attn", "L3.attn"], ["L1.mlp"], ["L2.mlp"]]
    # the full model's responses come from the full-model pass: no run
    assert steps[0].runs == ()


def test_one_mask_starts_from_the_deepest_full_model_state_before_its_first_player():
    def runs(*names, cached=()):
        [step] = schedule([mask(*names)], n_blocks=N_BLOCKS, state_bytes=[10, 20], cached=cached, budget=1000)
        assert step.release == () and step.branches == frozenset() and step.kept_bytes == 0
        return step.runs

    assert runs("L2.mlp") == (Run(0, 0, "embeddings", ()), Run(1, 0, "embeddings", ()))  # nothing cached
    assert runs("L2.mlp", cached=[1, 2, 3]) == (Run(0, 2, "full", ()), Run(1, 2, "full", ()))
    assert runs("L2", "L3.attn", cached=[1, 3]) == (Run(0, 1, "full", ()), Run(1, 1, "full", ()))
    assert runs("L0.mlp", cached=[1, 2, 3]) == (Run(0, 0, "embeddings", ()), Run(1, 0, "embeddings", ()))


def test_masks_differing_only_late_share_the_state_before_where_they_differ():
    masks = [mask("L0.mlp", "L3.attn"), mask("L0.mlp"), mask("L0.mlp", "L2.attn")]
    steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=[10, 20], budget=1000)
    assert [step.mask for step in steps] == [1, 2, 0]
    # L0.mlp is left for L0.mlp+L2.attn at block 2, which is left for L0.mlp+L3.attn at block 2 too
    assert [step.branches for step in steps] == [{2}, {2}, set()]
    first, second, third = steps
    assert first.runs == (Run(0, 0, "embeddings", (2,)), Run(1, 0, "embeddings", (2,)))
    assert first.kept_bytes == 30
    assert second.runs == (Run(0, 2, "branch", ()), Run(1, 2, "branch", ()))
    assert second.release == () and third.release == ()  # the shared state stays while its branch lasts
    assert third.runs == (Run(0, 2, "branch", ()), Run(1, 2, "branch", ()))


def test_states_are_released_when_the_walk_leaves_their_branch():
    masks = [mask("L0.mlp"), mask("L0.mlp", "L2.attn"), mask("L1.attn"), mask("L1.attn", "L3.attn")]
    steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=[10], budget=1000)
    assert [step.mask for step in steps] == [0, 1, 2, 3]
    assert [step.branches for step in steps] == [{2}, set(), {3}, set()]
    assert steps[1].runs == (Run(0, 2, "branch", ()),)
    # leaving L0.mlp's branch (divergence at block 0) releases its state before the next mask runs
    assert steps[2].release == ((0, 2),)
    assert steps[2].runs == (Run(0, 0, "embeddings", (3,)),)
    assert [step.kept_bytes for step in steps] == [10, 10, 10, 10]
    assert steps[3].runs == (Run(0, 3, "branch", ()),)


def test_a_removal_chain_keeps_every_branch_point_of_the_walk():
    """Permutation sampling's removal chains: each mask extends the previous one by one player."""
    order = ["L0.attn", "L0.mlp", "L1.attn", "L1.mlp", "L2.attn", "L2.mlp", "L3.attn"]
    chain = [mask(*order[:k]) for k in range(1, len(order) + 1)]
    steps = schedule(chain, n_blocks=N_BLOCKS, state_bytes=[10], budget=1000)
    assert [step.mask for step in steps] == list(range(len(chain)))
    # mask k differs from mask k + 1 at the block of player k + 1: blocks 0 (never kept), 1, 1, 2, 2, 3
    assert [step.branches for step in steps] == [set(), {1}, {1}, {2}, {2}, {3}, set()]
    assert [run.start for step in steps for run in step.runs] == [0, 0, 1, 1, 2, 2, 3]
    assert [run.source for step in steps for run in step.runs][2:] == ["branch"] * 5


def test_identical_masks_have_no_branch_point_and_run_alike():
    masks = [mask("L1.mlp", "L2.attn"), mask("L2.attn", "L1.mlp"), mask("L1.mlp", "L2.attn")]
    steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=[10], cached=[1, 2, 3], budget=1000)
    assert sorted(step.mask for step in steps) == [0, 1, 2]
    assert all(step.branches == frozenset() and step.release == () and step.kept_bytes == 0 for step in steps)
    assert {step.runs for step in steps} == {(Run(0, 1, "full", ()),)}


def test_a_run_starts_from_the_deepest_state_that_serves_it():
    masks = [mask("L2.attn"), mask("L2.attn", "L3.mlp")]
    steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=[10], cached=[1, 2, 3], budget=1000)
    assert steps[0].runs == (Run(0, 2, "full", (3,)),)
    assert steps[1].runs == (Run(0, 3, "branch", ()),)


def test_no_budget_keeps_nothing_and_every_run_starts_where_the_full_model_lets_it():
    masks = [mask("L0.mlp"), mask("L0.mlp", "L2.attn"), mask("L0.mlp", "L3.attn")]
    for budget in (0, -5):
        steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=[10, 20], cached=[2], budget=budget)
        assert all(run.capture == () and run.source == "embeddings" for step in steps for run in step.runs)
        assert all(step.kept_bytes == 0 for step in steps)


def test_budget_is_checked_before_each_run_and_overshoots_by_at_most_that_runs_captures():
    # branch points {1, 2, 3}: a chain whose masks part at every block
    masks = [mask("L0.mlp"), mask("L0.mlp", "L1.mlp"), mask("L0.mlp", "L1.mlp", "L2.mlp"),
             mask("L0.mlp", "L1.mlp", "L2.mlp", "L3.mlp")]
    steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=[10, 20, 40], budget=25)
    assert steps[0].branches == {1}
    # batch 0 captures (25 left -> 15), batch 1 too (15 -> -5), batch 2 finds no room
    assert [run.capture for run in steps[0].runs] == [(1,), (1,), ()]
    assert steps[0].kept_bytes == 30
    assert [run.source for run in steps[1].runs] == ["branch", "branch", "embeddings"]
    assert all(run.capture == () for step in steps[1:] for run in step.runs)
    # a run with room captures all its branch points: the budget bounds starting to keep, not what is kept
    masks = [mask("L0.mlp", "L1.attn", "L3.attn"), mask("L0.mlp", "L1.attn", "L3.mlp"), mask("L0.mlp", "L1.mlp")]
    steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=[10], budget=1)
    assert [step.mask for step in steps] == [0, 1, 2]
    assert steps[0].branches == {1, 3} and steps[0].runs[0].capture == (1, 3) and steps[0].kept_bytes == 20
    assert steps[1].runs == (Run(0, 3, "branch", ()),)
    assert steps[2].release == ((0, 3),) and steps[2].runs == (Run(0, 1, "branch", ()),)


def test_released_states_give_their_bytes_back():
    masks = [mask("L0.mlp"), mask("L0.mlp", "L2.attn"), mask("L1.attn"), mask("L1.attn", "L3.attn")]
    steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=[10], budget=10)
    assert steps[0].runs[0].capture == (2,)
    assert steps[2].release == ((0, 2),) and steps[2].runs[0].capture == (3,)  # room again once released


@pytest.mark.parametrize(("state_bytes", "cache_bytes", "kept"), [
    (10, 1000, [1, 2, 3, 4, 5]),  # all fit
    (10, 50, [1, 2, 3, 4, 5]),
    (10, 49, [1, 3, 5]),  # four fit: every 2nd (a stride of 2 reaches three)
    (10, 20, [1, 4]),  # two fit: every 3rd
    (10, 10, [1]),
    (10, 9, []),  # not one fits
    (10, 0, []),
    (10, -1, []),
    (0, 1000, []),  # nothing to keep
])
def test_full_model_states_kept_within_the_budget(state_bytes, cache_bytes, kept):
    assert plan_cache(6, state_bytes, cache_bytes) == kept
    assert len(kept) * state_bytes <= max(cache_bytes, 0)


player_names = st.sampled_from([f"L{layer}{kind}" for layer in range(N_BLOCKS) for kind in ("", ".attn", ".mlp")])
masks_strategy = st.lists(st.lists(player_names, max_size=5).map(lambda ns: mask(*ns)), max_size=8)


@given(masks=masks_strategy, sizes=st.lists(st.integers(1, 50), min_size=1, max_size=3),
       cached=st.sets(st.integers(1, N_BLOCKS - 1)), budget=st.integers(-10, 200))
def test_every_run_starts_from_a_state_its_mask_shares(masks, sizes, cached, budget):
    """Replay a schedule, tracking which removals each kept state holds: a run may start at block d only
    from a state computed with exactly its mask's players before d, and the bytes add up."""
    steps = schedule(masks, n_blocks=N_BLOCKS, state_bytes=sizes, cached=sorted(cached), budget=budget)
    assert sorted(step.mask for step in steps) == list(range(len(masks)))
    assert branch_points([step.players for step in steps], N_BLOCKS) == [step.branches for step in steps]
    kept: dict[tuple[int, int], tuple[Player, ...]] = {}  # (batch, block) -> players removed before it
    room = budget
    for step in steps:
        assert step.players == in_forward_order(masks[step.mask])
        for key in step.release:
            del kept[key]
            room += sizes[key[0]]
        assert len(step.runs) == (len(sizes) if step.players else 0)
        for run in step.runs:
            before = tuple(p for p in step.players if p.layer < run.start)
            if run.source == "branch":  # may lie past removed players: the state holds their removal
                assert kept[(run.batch, run.start)] == before
            elif run.source == "full":
                assert run.start in cached and run.start <= step.players[0].layer
            else:
                assert run.start == 0
            assert list(run.capture) == (sorted(d for d in step.branches if d > run.start) if room > 0 else [])
            for d in run.capture:
                kept[(run.batch, d)] = tuple(p for p in step.players if p.layer < d)
                room -= sizes[run.batch]
        assert step.kept_bytes == sum(sizes[batch] for batch, _ in kept) == budget - room


def test_processes_get_whole_branches_of_the_trie():
    """Two removal chains of equal cost: each process gets one whole chain, not every other mask."""
    chains = [mask("L1"), mask("L1", "L2"), mask("L1", "L2", "L3"), mask("L2"), mask("L2", "L3"), mask("L2", "L3.mlp")]
    split = shares(chains, 2, n_blocks=N_BLOCKS)
    assert sorted(map(sorted, split)) == [[0, 1, 2], [3, 4, 5]]


def test_whole_branches_compute_fewer_blocks_than_round_robin():
    """Prefix reuse survives the split: a process that holds a chain computes each removal from the state
    its earlier mask kept; dealt round robin, chains break and their shared blocks are computed twice."""
    chains = [mask(*[f"L{b}" for b in range(first, first + depth)])
              for first in (1, 2, 3, 4) for depth in range(1, 4)]
    n_blocks = 8

    def cost(indices):
        steps = schedule([chains[i] for i in indices], n_blocks=n_blocks, state_bytes=[1], budget=10**6)
        return blocks_computed(steps, n_blocks)

    branches = shares(chains, 2, n_blocks=n_blocks)
    dealt = [list(range(len(chains)))[r::2] for r in range(2)]
    assert sum(map(cost, branches)) < sum(map(cost, dealt))
    # and neither process is left with most of the work
    assert max(map(cost, branches)) <= 0.75 * sum(map(cost, branches))


@given(masks=masks_strategy, world=st.integers(1, 4))
def test_shares_split_the_masks_into_consecutive_runs_of_the_walk(masks, world):
    split = shares(masks, world, n_blocks=N_BLOCKS)
    assert len(split) == world
    assert sorted(i for share in split for i in share) == list(range(len(masks)))
    walk = [step.mask for step in schedule(masks, n_blocks=N_BLOCKS, state_bytes=[1])]
    assert [i for share in split for i in share] == walk
