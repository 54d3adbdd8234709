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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from .errors import PlayerError, UnsupportedArchitectureError

Granularity = Literal["sublayer", "block"]
PlayerKind = Literal["attn", "mlp", "block"]


@dataclass(frozen=True)
class Architecture:
    """Where the parts of one model family live, as attribute paths from the top-level model.

    ``layers`` and ``mlp`` list candidates tried in order, because module names moved between
    transformers releases (Mixtral's ``block_sparse_moe`` became ``mlp`` in v5) and between the
    text-only and multimodal wrappers of the same family.
    """

    layers: tuple[str, ...]
    attn: str
    mlp: tuple[str, ...]
    moe: bool = False
    # Norms that serve only one sublayer: they go with it when it is cut from a checkpoint (a removed
    # sublayer's input norm is computed for nothing; a post-norm of the zeroed output stays zero).
    attn_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    # The checkpoint layout a sublayer plan is written in: "decilm" (DeciLM/Nemotron-NAS ``block_configs``,
    # a Llama format serving engines read), "gemma3-pruned" (Gemma 3 with cornerstone's remote code), or
    # None (no format: only whole-block plans export).
    sublayer_layout: str | None = None
    # The module whose output the residual stream adds for attention, when it is not the attention
    # itself (a post-attention norm in Gemma 2/3 and OLMo 2); the one-pass proxies hook it.
    attn_residual: str | None = None
    # The config flag that makes attention and FFN read the same input in parallel (GPT-NeoX).
    parallel_residual: str | None = None


_DECODER = ("model.layers", "model.language_model.layers", "model.model.layers")

_GEMMA_NORMS = dict(attn_norms=("input_layernorm", "post_attention_layernorm"),
                    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
                    attn_residual="post_attention_layernorm")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_DECODER, "self_attn", ("mlp",), sublayer_layout="decilm"),
    "mistral": Architecture(_DECODER, "self_attn", ("mlp",)),
    "qwen2": Architecture(_DECODER, "self_attn", ("mlp",)),
    "qwen3": Architecture(_DECODER, "self_attn", ("mlp",)),
    "gemma": Architecture(_DECODER, "self_attn", ("mlp",)),
    "gemma2": Architecture(_DECODER, "self_attn", ("mlp",), **_GEMMA_NORMS),
    "gemma3": Architecture(_DECODER, "self_attn", ("mlp",), **_GEMMA_NORMS),
    "gemma3_text": Architecture(_DECODER, "self_attn", ("mlp",), sublayer_layout="gemma3-pruned", **_GEMMA_NORMS),
    "phi3": Architecture(_DECODER, "self_attn", ("mlp",)),
    "olmo2": Architecture(_DECODER, "self_attn", ("mlp",), attn_norms=("post_attention_layernorm",),
                      mlp_norms=("post_feedforward_layernorm",), attn_residual="post_attention_layernorm"),
    "mixtral": Architecture(_DECODER, "self_attn", ("mlp", "block_sparse_moe"), moe=True),
    "qwen2_moe": Architecture(_DECODER, "self_attn", ("mlp",), moe=True),
    "qwen3_moe": Architecture(_DECODER, "self_attn", ("mlp",), moe=True),
    "gpt2": Architecture(("transformer.h",), "attn", ("mlp",), attn_norms=("ln_1",), mlp_norms=("ln_2",)),
    "gpt_neox": Architecture(("gpt_neox.layers",), "attention", ("mlp",), parallel_residual="use_parallel_residual"),
}


@dataclass(frozen=True)
class Player:
    """One removable part: a sublayer (``L3.attn``, ``L3.mlp``) or a whole block (``L3``)."""

    name: str
    layer: int
    kind: PlayerKind
    module_path: str


# ASCII digits, no leading zero, no trailing newline (`\d` takes any script's digits, `$` a final "\n"): else
# "L٣", "L05" or "L5\n" would match yet name no player
_PLAYER_ID = re.compile(r"^L(0|[1-9][0-9]*)(?:\.(attn|mlp))?\Z")


def model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def text_config(config: Any) -> Any:
    """The decoder's config: itself for text models, the text part of a multimodal one."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def architecture(model: torch.nn.Module) -> Architecture:
    """The :class:`Architecture` row for ``model``; a clear error naming the supported families otherwise."""
    kind = model_type(model)
    arch = ARCHITECTURES.get(kind)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"architecture '{kind}' is not supported",
            hint="Supported: " + ", ".join(sorted(ARCHITECTURES)) + ". Adding one is a row in cornerstone/players.py.",
        )
    return arch


def _resolve(model: torch.nn.Module, candidates: tuple[str, ...]) -> tuple[str, torch.nn.Module] | None:
    for path in candidates:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    return None


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The dotted path and the ``ModuleList`` of decoder blocks."""
    arch = architecture(model)
    found = _resolve(model, arch.layers)
    if found is None or not isinstance(found[1], torch.nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"no decoder block list at {' or '.join(arch.layers)} in {type(model).__name__}",
            hint="The module layout differs from cornerstone's table; update its row in cornerstone/players.py.",
        )
    return found  # type: ignore[return-value]


def enumerate_players(model: torch.nn.Module, granularity: Granularity = "sublayer") -> list[Player]:
    """All players of ``model`` in forward order.

    ``sublayer``: ``L0.attn, L0.mlp, L1.attn, ...`` (2 per block); ``block``: ``L0, L1, ...``.
    """
    arch = architecture(model)
    path, layers = decoder_layers(model)
    players: list[Player] = []
    for index, block in enumerate(layers):
        block_path = f"{path}.{index}"
        if granularity == "block":
            players.append(Player(f"L{index}", index, "block", block_path))
            continue
        if not hasattr(block, arch.attn):
            raise UnsupportedArchitectureError(f"block {block_path} has no attention module '{arch.attn}'")
        mlp = _resolve(block, arch.mlp)
        if mlp is None:
            raise UnsupportedArchitectureError(f"block {block_path} has no feed-forward module {' or '.join(arch.mlp)}")
        players.append(Player(f"L{index}.attn", index, "attn", f"{block_path}.{arch.attn}"))
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


def owned_modules(model: torch.nn.Module, player: Player) -> list[str]:
    """Dotted paths of every module that exists only to serve ``player``: the sublayer and its own norms
    (see :attr:`Architecture.attn_norms`), or the whole block. Cutting a player from a checkpoint removes exactly these."""
    if player.kind == "block":
        return [player.module_path]
    arch = architecture(model)
    block_path = player.module_path.rsplit(".", 1)[0]
    block = model.get_submodule(block_path)
    norms = arch.attn_norms if player.kind == "attn" else arch.mlp_norms
    return [player.module_path] + [f"{block_path}.{norm}" for norm in norms if hasattr(block, norm)]


def player_parameters(model: torch.nn.Module, player: Player) -> int:
    """Parameters a checkpoint loses when ``player`` is cut (:func:`owned_modules`); shared weights counted once."""
    return _count_once(p for path in owned_modules(model, player) for p in model.get_submodule(path).parameters())


def unique_parameters(module: torch.nn.Module) -> int:
    """The parameters of ``module``, each weight counted once: a tied weight (one tensor in two places,
    such as the embeddings and the language-model head) is one weight, and so are two parameters that
    share one storage. What a checkpoint of ``module`` holds, and what a report's ``model.parameters`` says."""
    return _count_once(module.parameters())


def _count_once(parameters: Iterable[torch.nn.Parameter]) -> int:
    # keyed by storage where there is one (two Parameter objects may alias it), else by identity (meta tensors,
    # whose data_ptr is 0 for all)
    sizes = {(p.device, p.data_ptr()) if p.device.type != "meta" and p.numel() else id(p): p.numel()
             for p in parameters}
    return sum(sizes.values())


class _Placed(Protocol):
    """Anything that names a player's place: a :class:`Player`, a plan's removal, a report's player."""

    @property
    def layer(self) -> int: ...

    @property
    def kind(self) -> str: ...


_KIND_ORDER = {"block": 0, "attn": 1, "mlp": 2}


def forward_order(player: _Placed) -> tuple[int, int]:
    """Sort key: players in the order the forward pass meets them (a block before its sublayers, attention
    before the feed-forward), the order :func:`enumerate_players` lists them in."""
    return player.layer, _KIND_ORDER[player.kind]


def removed_blocks(players: Iterable[_Placed]) -> set[int]:
    """The blocks that removing ``players`` empties: whole blocks, and blocks whose attention and FFN both go.
    A block is removed fully exactly when it is in this set; a plan all of whose players lie in such blocks
    can be cut as whole blocks."""
    players = list(players)
    halves: dict[int, set[str]] = {}
    for p in players:
        if p.kind != "block":
            halves.setdefault(p.layer, set()).add(p.kind)
    return {p.layer for p in players if p.kind == "block"} | {layer for layer, kinds in halves.items()
                                                               if kinds >= {"attn", "mlp"}}
