"""The mask scheduler: in which order masks run, and which prefix states each run starts from and keeps.

Pure data in, pure data out, with no model: :func:`schedule` turns a list of masks (players to
remove) into :class:`Step` s that :class:`cornerstone.engine.Engine` executes, and :func:`plan_cache`
picks the full model's states worth keeping.

The rule it rests on: the hidden state entering block d depends only on the players removed before
block d. So

* the full model's states serve every mask whose first removed player is at block d or later;
* masks run in lexicographic order of their players (in forward order) are a depth-first walk of the
  trie of masks, and where the next mask leaves the current one's path at block c (their
  *divergence*), the state entering c is worth keeping: that mask starts there instead of at the
  embeddings. Each mask's *branch points* are the blocks where some later mask leaves its path
  before the walk leaves it for good;
* a kept state is released as soon as the walk leaves its branch, and states are kept only while the
  byte budget has room.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .players import Player, forward_order

Source = Literal["embeddings", "full", "branch"]


def in_forward_order(mask: Sequence[Player]) -> tuple[Player, ...]:
    """The distinct players of ``mask`` in forward order: the form every mask takes in a schedule."""
    return tuple(sorted(set(mask), key=forward_order))


def divergence(a: Sequence[Player], b: Sequence[Player], n_blocks: int) -> int:
    """The first block whose input differs between masks ``a`` and ``b`` (both in forward order): the layer
    of the first player in which they differ, or ``n_blocks`` if they are the same mask."""
    for x, y in zip(a, b):
        if x != y:
            return min(x.layer, y.layer)
    longer = a if len(a) > len(b) else b
    return longer[min(len(a), len(b))].layer if len(a) != len(b) else n_blocks


def branch_points(masks: Sequence[Sequence[Player]], n_blocks: int) -> list[frozenset[int]]:
    """For each mask of a walk (masks in the order they run, each in forward order), the blocks entering
    which its state serves a later mask: D_p = {c_p} + {d in D_(p+1) : d < c_p}, c_p = divergence(p, p+1).
    Block 0 (the embeddings) and ``n_blocks`` (a repeated mask) are never branch points."""
    points: list[frozenset[int]] = [frozenset() for _ in masks]
    for position in range(len(masks) - 2, -1, -1):
        c = divergence(masks[position], masks[position + 1], n_blocks)
        below = frozenset(d for d in points[position + 1] if d < c)
        points[position] = below | {c} if 0 < c < n_blocks else below
    return points


def plan_cache(n_blocks: int, state_bytes: int, cache_bytes: int) -> list[int]:
    """Which full-model states to keep, named by the block they enter (1 .. n_blocks - 1): all if they fit
    ``cache_bytes``, else every s-th, as many as fit. ``state_bytes`` is one state over every batch."""
    keep = min(n_blocks - 1, cache_bytes // state_bytes) if state_bytes else 0
    if keep <= 0:
        return []
    stride = -(-(n_blocks - 1) // keep)
    return list(range(1, n_blocks, stride))[:keep]


@dataclass(frozen=True)
class Run:
    """One batch's forward pass within a step."""

    batch: int
    start: int  # the block the pass enters; blocks before it are not computed
    source: Source  # where the state entering ``start`` comes from (``embeddings``: start is 0)
    capture: tuple[int, ...]  # blocks (ascending) whose entering state this pass keeps for later masks


@dataclass(frozen=True)
class Step:
    """One mask's evaluation: the branch states to release first, then one run per batch.

    A step with no players is the full model, whose responses the full-model pass already gave: it has
    no runs."""

    mask: int  # index of the mask in the list given to :func:`schedule`
    players: tuple[Player, ...]  # the mask, distinct and in forward order
    release: tuple[tuple[int, int], ...]  # (batch, block) branch states dropped before the runs
    branches: frozenset[int]  # this mask's branch points (what its runs capture, budget allowing)
    runs: tuple[Run, ...]
    kept_bytes: int  # bytes of branch states held after the step


def schedule(masks: Sequence[Sequence[Player]], *, n_blocks: int, state_bytes: Sequence[int],
             cached: Sequence[int] = (), budget: int = 0) -> list[Step]:
    """The steps that evaluate every mask (players to remove) on ``len(state_bytes)`` batches.

    ``state_bytes[b]`` is the size of one hidden state of batch b; ``cached`` the blocks whose entering
    full-model state is held (:func:`plan_cache`); ``budget`` the bytes branch states may take besides.
    Each batch's run starts from the deepest state that serves it: a branch state kept for the
    current path, else a full-model state at or before the mask's first player, else the embeddings.
    A run captures its mask's branch points past its start while the budget is positive when it
    starts, so the branch states exceed the budget by at most one run's captures; released states
    give their bytes back.
    """
    ordered = [in_forward_order(mask) for mask in masks]
    order = sorted(range(len(ordered)), key=lambda j: [forward_order(p) for p in ordered[j]])
    points = branch_points([ordered[j] for j in order], n_blocks)
    kept: dict[tuple[int, int], int] = {}  # (batch, block entered) -> bytes, on the current path
    steps = []
    for position, j in enumerate(order):
        mask = ordered[j]
        release: tuple[tuple[int, int], ...] = ()
        if position:
            shared = divergence(ordered[order[position - 1]], mask, n_blocks)
            release = tuple(key for key in kept if key[1] > shared)
            for key in release:
                budget += kept.pop(key)
        runs = []
        if mask:
            first = mask[0].layer
            for batch, size in enumerate(state_bytes):
                # the two kinds never tie: a run that could start from a full-model state at d captures nothing at d
                candidates: list[tuple[int, Source]] = [(d, "branch") for (b, d) in kept if b == batch]
                candidates += [(d, "full") for d in cached if d <= first]
                start, source = max(candidates, key=lambda c: c[0], default=(0, "embeddings"))
                capture = tuple(sorted(d for d in points[position] if d > start and budget > 0))
                for d in capture:
                    kept[(batch, d)] = size
                    budget -= size
                runs.append(Run(batch, start, source, capture))
        steps.append(Step(j, mask, release, points[position], tuple(runs), sum(kept.values())))
    return steps


def blocks_computed(steps: Sequence[Step], n_blocks: int) -> int:
    """Block forward passes (over all batches) that ``steps`` run: what prefix reuse saves is the rest."""
    return sum(n_blocks - run.start for step in steps for run in step.runs)


def shares(masks: Sequence[Sequence[Player]], world: int, *, n_blocks: int) -> list[list[int]]:
    """Which masks each of ``world`` processes evaluates: whole branches of the trie, not every world-th mask.

    Dealing masks round robin splits every removal chain across processes, so each loses the prefix
    states the others compute. Instead the masks are put in the order of the walk (:func:`schedule`)
    and cut into ``world`` consecutive runs of about equal cost. A mask's cost is the blocks it computes
    when the walk keeps every branch state: ``n_blocks - max(first removed layer, divergence from the
    mask before it)`` (the full model's own mask costs nothing). Each cut is moved to the place, within
    a quarter of a share of the even split, where consecutive masks diverge earliest, so a cut falls
    between top branches of the trie where it can. Indices refer to ``masks``; a share may be empty
    when there are fewer masks than processes.
    """
    ordered = [in_forward_order(mask) for mask in masks]
    order = sorted(range(len(ordered)), key=lambda j: [forward_order(p) for p in ordered[j]])
    if world <= 1 or not order:
        return [order] + [[] for _ in range(max(0, world - 1))]
    # where the walk's mask p leaves mask p-1's path: a low value is a cut between big branches
    split = [0] + [divergence(ordered[order[p - 1]], ordered[order[p]], n_blocks) for p in range(1, len(order))]
    cost = [n_blocks - max(ordered[j][0].layer, split[p]) if ordered[j] else 0 for p, j in enumerate(order)]
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    total, cuts = prefix[-1], [0]
    for r in range(1, world):
        target = total * r / world
        candidates = range(cuts[-1], len(order) + 1)
        near = [p for p in candidates if p > 0 and abs(prefix[p] - target) <= total / world / 4] if total else []
        cuts.append(min(near, key=lambda p: (split[p] if p < len(order) else n_blocks, abs(prefix[p] - target)))
                    if near else min(candidates, key=lambda p: abs(prefix[p] - target)))
    cuts.append(len(order))
    return [order[a:b] for a, b in zip(cuts, cuts[1:])]
