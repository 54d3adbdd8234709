"""Configuration of a sublayer-pruned Llama in the DeciLM / Nemotron-NAS format.

This file is copied, alone, into every exported model folder, so it imports nothing but the standard
library and transformers.

The format is the one of NVIDIA's Llama-3_1-Nemotron-51B-Instruct (its remote code:
configuration_decilm.py, block_config.py, modeling_decilm.py), as read by vLLM
(vllm/model_executor/models/nemotron_nas.py) and llama.cpp (convert_hf_to_gguf.py, ``DeciModel``):
a Llama config with ``model_type: "nemotron-nas"`` and one ``block_configs`` entry per layer::

    {"attention": {"no_op": false, "replace_with_linear": false, "n_heads_in_group": 8},
     "ffn":       {"no_op": false, "replace_with_linear": false, "ffn_mult": 5.25}}

* ``attention.n_heads_in_group`` is the GQA group size: the layer has
  ``num_attention_heads // n_heads_in_group`` key/value heads.
* ``ffn.ffn_mult`` gives the FFN width through :func:`ffn_mult_to_intermediate_size` (the formula of
  all three sources).
* ``no_op`` removes the sublayer together with its pre-norm: the residual stream passes unchanged.
  A no_op sublayer stores ``n_heads_in_group: null`` / ``ffn_mult: null``, as NVIDIA's ``block_config.py``
  does, because llama.cpp's converter recognises an attention-free or FFN-free layer by those nulls.
* Extension: ``ffn.intermediate_size`` pins the width when the formula cannot reproduce it (tiny test
  models). Attribute access (what vLLM uses) then hides ``ffn_mult``, since vLLM takes the explicit
  width only when ``ffn_mult`` is absent. llama.cpp ignores the key.

``replace_with_linear`` sublayers and the other Nemotron extensions (sliding windows, sinks, MoE) are
not supported and are rejected rather than silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from transformers import LlamaConfig

_ATTENTION_KEYS = ("no_op", "replace_with_linear", "n_heads_in_group")
_FFN_KEYS = ("no_op", "replace_with_linear", "ffn_mult", "intermediate_size")


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """FFN width of a block: ``2/3 * ffn_mult * hidden_size`` rounded up to a multiple of 256."""
    return _find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> float:
    """The ``ffn_mult`` of a width (exact inverse when the formula above can give that width)."""
    return round(1.5 * intermediate_size / hidden_size, 6)


class _Section(dict):
    """A ``block_configs`` entry or section: still a plain dict for JSON and ``==``, but also readable
    as attributes, the way vLLM reads ``config.block_configs[i].attention.no_op``."""

    def __getattr__(self, name: str) -> Any:
        # An explicit width must win in vLLM too, which only falls back to it without ffn_mult.
        if name in self and not (name == "ffn_mult" and self.get("intermediate_size") is not None):
            return self[name]
        raise AttributeError(name)


def _unsupported(section: dict, known: Iterable[str]) -> dict:
    # Keys from other Nemotron variants are harmless when unset (null/false); set, they change the math.
    return {k: v for k, v in section.items() if k not in known and v not in (None, False)}


class DeciLMConfig(LlamaConfig):
    """A :class:`~transformers.LlamaConfig` plus per-layer ``block_configs`` (see the module docstring).

    Without ``block_configs`` every layer is a plain Llama block. Entries are validated and completed
    on init (missing keys filled in, nulls written for no_op sublayers), so what is saved is what
    vLLM and llama.cpp will read.
    """

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list[dict] | None = None, **kwargs):
        super().__init__(**kwargs)
        if block_configs is None:
            block_configs = [{} for _ in range(self.num_hidden_layers)]
        if len(block_configs) != self.num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(block_configs)} entries but the model has num_hidden_layers="
                f"{self.num_hidden_layers}: give exactly one entry per layer"
            )
        self.block_configs = [self._complete(i, block) for i, block in enumerate(block_configs)]

    @classmethod
    def from_llama(cls, config: LlamaConfig, no_attention: Iterable[int] = (), no_ffn: Iterable[int] = ()
                   ) -> DeciLMConfig:
        """The DeciLM config of ``config`` with the attention of layers ``no_attention`` and the FFN of
        layers ``no_ffn`` removed; everything else (rope scaling, tied embeddings, ...) is kept."""
        no_attention, no_ffn = set(no_attention), set(no_ffn)
        kwargs = {k: v for k, v in config.to_dict().items()
                  if k not in ("model_type", "architectures", "auto_map", "transformers_version", "block_configs")}
        blocks = [{"attention": {"no_op": i in no_attention}, "ffn": {"no_op": i in no_ffn}}
                  for i in range(config.num_hidden_layers)]
        return cls(block_configs=blocks, **kwargs)

    def _complete(self, index: int, block: dict) -> _Section:
        where = f"block_configs[{index}]"
        if not isinstance(block, dict):
            raise TypeError(f"{where} must be a dict with 'attention' and 'ffn', got {block!r}")
        attention, ffn = dict(block.get("attention") or {}), dict(block.get("ffn") or {})
        for name, section, known in (("attention", attention, _ATTENTION_KEYS), ("ffn", ffn, _FFN_KEYS)):
            if section.get("replace_with_linear"):
                raise ValueError(f"{where}.{name}: replace_with_linear is not supported; "
                                 "use no_op to remove a sublayer")
            if bad := _unsupported(section, known):
                raise ValueError(f"{where}.{name}: unsupported settings {bad}")
        if bad := _unsupported(block, ("attention", "ffn")):
            raise ValueError(f"{where}: unsupported settings {bad}")

        attention = {**attention, "no_op": bool(attention.get("no_op", False)), "replace_with_linear": False}
        if attention["no_op"]:
            attention["n_heads_in_group"] = None
        else:
            group = attention.get("n_heads_in_group")
            group = self.num_attention_heads // self.num_key_value_heads if group is None else group
            if not isinstance(group, int) or group < 1 or self.num_attention_heads % group:
                raise ValueError(f"{where}.attention.n_heads_in_group={group!r} must be a positive divisor "
                                 f"of num_attention_heads={self.num_attention_heads}")
            attention["n_heads_in_group"] = group

        ffn = {**ffn, "no_op": bool(ffn.get("no_op", False)), "replace_with_linear": False}
        if ffn["no_op"]:
            ffn["ffn_mult"] = None
            ffn.pop("intermediate_size", None)
        else:
            width = ffn.get("intermediate_size")
            if ffn.get("ffn_mult") is None:
                # A plain block: the source model's width, written as ffn_mult when the formula allows.
                width = self.intermediate_size if width is None else width
                ffn["ffn_mult"] = intermediate_size_to_ffn_mult(width, self.hidden_size)
                if ffn_mult_to_intermediate_size(ffn["ffn_mult"], self.hidden_size) == width:
                    ffn.pop("intermediate_size", None)
                else:
                    ffn["intermediate_size"] = width
            mult = ffn["ffn_mult"]
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult <= 0:
                raise ValueError(f"{where}.ffn.ffn_mult={mult!r} must be a positive number")
            ffn["ffn_mult"] = float(mult)  # llama.cpp's converter asserts a float
            if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
                raise ValueError(f"{where}.ffn.intermediate_size={width!r} must be a positive int")
        return _Section({**block, "attention": _Section(attention), "ffn": _Section(ffn)})

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # transformers 5 writes RoPE only as rope_parameters; a reader on transformers 4 (4.56 checked,
        # and vLLM releases pinned to it) would silently fall back to rope_theta=10000, no scaling.
        rope = out.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in out:
            out["rope_theta"] = rope["rope_theta"]
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            out.setdefault("rope_scaling", None if scaling.get("rope_type", "default") == "default" else scaling)
        return out

    def layer_sizes(self, index: int) -> tuple[int | None, int | None]:
        """(key/value heads, FFN width) of layer ``index``; ``None`` for a removed sublayer."""
        attention, ffn = self.block_configs[index]["attention"], self.block_configs[index]["ffn"]
        heads = None if attention["no_op"] else self.num_attention_heads // attention["n_heads_in_group"]
        if ffn["no_op"]:
            return heads, None
        width = ffn.get("intermediate_size")
        return heads, width if width is not None else ffn_mult_to_intermediate_size(ffn["ffn_mult"], self.hidden_size)


__all__ = ["DeciLMConfig", "ffn_mult_to_intermediate_size", "intermediate_size_to_ffn_mult"]
