"""Remove any set of players for the duration of a forward pass.

Removal follows Zhang, Dong & Kawaguchi (2024), Sec. 3: a removed sublayer contributes nothing, so
the residual stream passes it unchanged (``h + f(h)`` becomes ``h``); a removed block is the
identity. Both are done with forward hooks that replace the module's output, so every architecture
with the usual pre-norm or post-norm residual layout is covered by the same code: post-sublayer norms
(Gemma 2/3, OLMo 2) map a zero input to zero, and parallel-residual blocks (GPT-NeoX) add the zero.
The hooks are removed when the context exits, whatever happens inside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .players import Player


def _zero_output(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + output[1:]
    return torch.zeros_like(output)


def _identity_output(_module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    hidden_in = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden_in,) + output[1:]
    return hidden_in


@contextmanager
def without(model: torch.nn.Module, players: Iterable[Player]) -> Iterator[None]:
    """Run the model inside the block as if ``players`` were absent.

    >>> with without(model, parse_players(model, "L0.mlp,L3")):
    ...     logits = model(ids).logits
    """
    handles = []
    try:
        for player in players:
            module = model.get_submodule(player.module_path)
            if player.kind == "block":
                handles.append(module.register_forward_hook(_identity_output, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_zero_output))
        yield
    finally:
        for handle in handles:
            handle.remove()
