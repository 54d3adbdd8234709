"""Remove any set of players for the duration of a forward pass.

Removal follows Zhang, Dong & Kawaguchi (2024), Sec. 3: a removed sublayer contributes nothing, so
the residual stream passes it unchanged (``h + f(h)`` becomes ``h``); a removed block is the
identity. Both are done by replacing the removed module's ``forward`` for the duration, with one
that computes nothing and returns zeros (a sublayer) or its input (a block), so every architecture
with the usual pre-norm or post-norm residual layout is covered by the same code: post-sublayer norms
(Gemma 2/3, OLMo 2) map a zero input to zero, and parallel-residual blocks (GPT-NeoX) add the zero.
Not computing what is removed matters for search: a Shapley coalition removes about half the
players, a greedy step every player chosen so far. The model is restored when the context exits,
whatever happens inside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .players import Player


# What each module class returns, learnt from its first real call: (returns a tuple, tuple length).
# A removed player is then answered without computing it, in the shape its caller unpacks.
_RETURNS: dict[tuple[type, bool], tuple[bool, int]] = {}


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _skipping(module: torch.nn.Module, kind: str, compute: Any) -> Any:
    """A forward for a removed player that computes nothing: a block returns its input, a sublayer zeros
    shaped like its input (the residual then passes ``h`` on; a post-sublayer norm maps 0 to 0). What
    else the module returns (attention weights, router logits) comes back as None; the first call of
    each module class runs ``compute`` once to learn the shape of its return."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = _hidden_input(args, kwargs)
        key = (type(module), bool(kwargs.get("output_attentions")))
        if key not in _RETURNS:
            output = compute(*args, **kwargs)
            _RETURNS[key] = (isinstance(output, tuple), len(output) if isinstance(output, tuple) else 0)
        as_tuple, length = _RETURNS[key]
        result = hidden if kind == "block" else torch.zeros_like(hidden)
        return (result,) + (None,) * (length - 1) if as_tuple else result

    return forward


@contextmanager
def without(model: torch.nn.Module, players: Iterable[Player]) -> Iterator[None]:
    """Run the model inside the block as if ``players`` were absent, without computing them.

    >>> with without(model, parse_players(model, "L0.mlp,L3")):
    ...     logits = model(ids).logits

    Each removed module's ``forward`` is replaced on the instance (hooks on it still run, and an
    accelerate offload hook, itself an instance ``forward``, is put back with it), so a mask that removes
    k of n players costs about (n - k) / n of the full forward.
    """
    replaced: list[tuple[torch.nn.Module, Any]] = []
    try:
        for player in players:
            module = model.get_submodule(player.module_path)
            replaced.append((module, module.__dict__.get("forward")))
            module.forward = _skipping(module, player.kind, module.forward)
        yield
    finally:
        for module, original in reversed(replaced):
            if original is None:
                del module.forward
            else:
                module.forward = original
