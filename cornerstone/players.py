"""Players: the named parts of a model whose importance cornerstone measures.

A decoder block ``Lk`` holds two sublayer players, its attention ``Lk.attn`` and its feed-forward or
mixture-of-experts ``Lk.mlp`` (the "FFN/MoE sublayer" of Zhang, Dong & Kawaguchi 2024,
https://arxiv.org/abs/2409.14381). Players are listed in forward order, which later steps rely on
(windows of consecutive players, prefix reuse).

Architecture knowledge is data: :data:`ARCHITECTURES` maps a ``config.model_type`` to where the
block list and the two sublayers live. Adding a family is one row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import PlayerError, UnsupportedArchitectureError

Granularity = Literal["sublayer", "block"]
PlayerKind = Literal["attn", "mlp", "block"]


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one model family live, as attribute paths from the top-level model.

    ``layers`` and ``mlp`` list candidates tried in order, because module names moved between
    transformers releases (Mixtral's ``block_sparse_moe`` became ``mlp`` in v5) and between the
    text-only and multimodal wrappers of the same family.
    """

    layers: tuple[str, ...]
    attn: str
    mlp: tuple[str, ...]
    moe: bool = False


_DECODER = ("model.layers", "model.language_model.layers", "model.model.layers")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "mistral": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "qwen2": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "qwen3": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "gemma": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "gemma2": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "gemma3": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "gemma3_text": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "phi3": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "olmo2": ArchSpec(_DECODER, "self_attn", ("mlp",)),
    "mixtral": ArchSpec(_DECODER, "self_attn", ("mlp", "block_sparse_moe"), moe=True),
    "qwen2_moe": ArchSpec(_DECODER, "self_attn", ("mlp",), moe=True),
    "qwen3_moe": ArchSpec(_DECODER, "self_attn", ("mlp",), moe=True),
    "gpt2": ArchSpec(("transformer.h",), "attn", ("mlp",)),
    "gpt_neox": ArchSpec(("gpt_neox.layers",), "attention", ("mlp",)),
}


@dataclass(frozen=True)
class Player:
    """One removable part: a sublayer (``L3.attn``, ``L3.mlp``) or a whole block (``L3``)."""

    name: str
    layer: int
    kind: PlayerKind
    module_path: str


_PLAYER_ID = re.compile(r"^L(\d+)(?:\.(attn|mlp))?$")


def model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def architecture(model: torch.nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` row for ``model``; a clear error naming the supported families otherwise."""
    kind = model_type(model)
    spec = ARCHITECTURES.get(kind)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"architecture '{kind}' is not supported",
            hint="Supported: " + ", ".join(sorted(ARCHITECTURES)) + ". Adding one is a row in cornerstone/players.py.",
        )
    return spec


def _resolve(model: torch.nn.Module, candidates: tuple[str, ...]) -> tuple[str, torch.nn.Module] | None:
    for path in candidates:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    return None


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The dotted path and the ``ModuleList`` of decoder blocks."""
    spec = architecture(model)
    found = _resolve(model, spec.layers)
    if found is None or not isinstance(found[1], torch.nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"no decoder block list at {' or '.join(spec.layers)} in {type(model).__name__}",
            hint="The module layout differs from cornerstone's table; update its row in cornerstone/players.py.",
        )
    return found  # type: ignore[return-value]


def enumerate_players(model: torch.nn.Module, granularity: Granularity = "sublayer") -> list[Player]:
    """All players of ``model`` in forward order.

    ``sublayer``: ``L0.attn, L0.mlp, L1.attn, ...`` (2 per block); ``block``: ``L0, L1, ...``.
    """
    spec = architecture(model)
    path, layers = decoder_layers(model)
    players: list[Player] = []
    for index, block in enumerate(layers):
        block_path = f"{path}.{index}"
        if granularity == "block":
            players.append(Player(f"L{index}", index, "block", block_path))
            continue
        if not hasattr(block, spec.attn):
            raise UnsupportedArchitectureError(f"block {block_path} has no attention module '{spec.attn}'")
        mlp = _resolve(block, spec.mlp)
        if mlp is None:
            raise UnsupportedArchitectureError(f"block {block_path} has no feed-forward module {' or '.join(spec.mlp)}")
        players.append(Player(f"L{index}.attn", index, "attn", f"{block_path}.{spec.attn}"))
        players.append(Player(f"L{index}.mlp", index, "mlp", f"{block_path}.{mlp[0]}"))
    if granularity not in ("sublayer", "block"):
        raise PlayerError(f"unknown granularity '{granularity}'", hint="Use 'sublayer' or 'block'.")
    return players


def parse_players(model: torch.nn.Module, ids: list[str] | str) -> list[Player]:
    """Turn ids such as ``["L0.attn", "L3"]`` (or ``"L0.attn,L3"``) into players of ``model``."""
    if isinstance(ids, str):
        ids = [part.strip() for part in ids.split(",") if part.strip()]
    _, layers = decoder_layers(model)
    by_name = {p.name: p for g in ("sublayer", "block") for p in enumerate_players(model, g)}  # type: ignore[arg-type]
    chosen: list[Player] = []
    for raw in ids:
        match = _PLAYER_ID.match(raw)
        if match is None:
            raise PlayerError(f"'{raw}' is not a player id")
        if int(match.group(1)) >= len(layers):
            raise PlayerError(
                f"player '{raw}' is out of range: the model has blocks L0..L{len(layers) - 1}",
            )
        chosen.append(by_name[raw])
    return chosen
